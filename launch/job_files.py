"""NeMo-Run packagers that also put files into the job's folder: NeMo-Run calls a packager with
the job folder once that folder exists and before the sbatch script is submitted, so the
launchers ship each job's resolved config this way (`/nemo_run/<name>.yaml` inside the job;
the job folder itself without a container). Imported lazily by launch/jobs.py (it imports
nemo_run)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nemo_run import GitArchivePackager, Packager


def _write(job_dir: str, files: dict[str, str]) -> None:
    os.makedirs(job_dir, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(job_dir, name), "w") as f:
            f.write(text)


@dataclass(kw_only=True)
class GitArchiveWithFiles(GitArchivePackager):
    """`git archive` of `ref` (unpacked at <job folder>/code) plus job_files in the job folder."""

    #: file name (inside the job folder) -> text
    job_files: dict[str, str] = field(default_factory=dict)

    def package(self, path, job_dir: str, name: str) -> str:
        _write(job_dir, self.job_files)
        return super().package(path, job_dir, name)


@dataclass(kw_only=True)
class FilesOnly(Packager):
    """No code (the job imports the installed package), only job_files in the job folder."""

    job_files: dict[str, str] = field(default_factory=dict)

    def package(self, path, job_dir: str, name: str) -> str:
        _write(job_dir, self.job_files)
        return ""
