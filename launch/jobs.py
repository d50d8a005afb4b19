"""What a launcher submits: the code packager, the job's environment lines, NeMo-Run's
SlurmExecutor and the task; then rendering (--dry-run), submitting, reporting and waiting for
the jobs. See `common.py` for the whole flow."""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from layout import Layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSPECTION_NOTE = ("# megatron-trace --dry-run: for inspection only (not submittable): no code was packaged and the "
                   "job folder it names was deleted; submit without --dry-run")
HEAD_NODE_LINE = 'head_node_ip=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


# ----------------------------------------------------------------------------------- code, environment

def code_packager(mode: str, tag: str, *, dry_run: bool, files: dict[str, str]):
    """NeMo-Run's packager for --code (see the module docstring), which also writes `files` (the
    resolved config) into the job folder, and a line that says what it packs."""
    from job_files import FilesOnly, GitArchiveWithFiles

    if dry_run:
        return FilesOnly(job_files=files), f"--code {mode} (not packaged by --dry-run)"
    if mode == "installed":
        return FilesOnly(job_files=files), "installed: megatron_trace is imported from the job's environment"

    def git(*args, env=None):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"error: --code {mode} needs {REPO} to be a git checkout (git {' '.join(args)}: "
                             f"{out.stderr.strip()}); use --code installed to run the job's installed package")
        return out.stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    changed = [line for line in git("status", "--porcelain").splitlines() if line]
    if mode == "committed":
        if changed:
            print(f"[{tag}] note: --code committed packages HEAD {head}; {len(changed)} uncommitted change(s) are not "
                  "in it (--code worktree packages them)", file=sys.stderr)
        return GitArchiveWithFiles(basepath=REPO, ref="HEAD", job_files=files), f"committed tree HEAD {head}"
    return GitArchiveWithFiles(basepath=REPO, ref=worktree_tree(), job_files=files), \
        f"working tree (HEAD {head} + {len(changed)} changed file(s))"


_TREE: list[str] = []


def worktree_tree() -> str:
    """A git tree object of the working tree as it is (tracked and untracked, not ignored, files),
    made through a throw-away index: the repository's index and refs are untouched, only objects
    are written. Made once per launcher run."""
    if not _TREE:
        def git(*args, env=None):
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, env=env,
                                  check=True).stdout.strip()

        with tempfile.TemporaryDirectory() as d:
            index = os.path.join(d, "index")
            git_index = os.path.join(git("rev-parse", "--absolute-git-dir"), "index")
            if os.path.exists(git_index):
                shutil.copyfile(git_index, index)
            env = {**os.environ, "GIT_INDEX_FILE": index}
            # earlier jobs' folders (packaged code, logs) are never packaged again, wherever they are
            git("add", "-A", "--", ".", ":(exclude,glob)**/experiments/mt-*/**", env=env)
            _TREE.append(git("write-tree", env=env))
    return _TREE[0]


def env_setup_lines(cfg, tag: str, *, strict: bool) -> list[str]:
    """Shell lines that give a job without a container its Python: activate cluster.venv (default:
    the venv of the interpreter running this launcher, else the project's .venv), then the
    cluster.setup lines."""
    c = cfg.cluster
    lines = []
    if c.container_image is None:
        venv = c.venv
        if venv is None:
            if sys.prefix != sys.base_prefix:
                venv = sys.prefix
            elif os.path.exists(os.path.join(REPO, ".venv", "bin", "activate")):
                venv = os.path.join(REPO, ".venv")
        if venv:
            venv = os.path.abspath(venv)
            activate = venv if venv.endswith("activate") else os.path.join(venv, "bin", "activate")
            if strict and not os.path.exists(activate):
                raise SystemExit(f"error: cluster.venv / --venv: {activate} does not exist; give a venv folder (or "
                                 "its bin/activate) on storage the compute nodes share, or a --setup command")
            lines += ["# the environment (no container): a venv", f"source {shlex.quote(activate)}"]
        else:
            bindir = os.path.dirname(sys.executable)
            lines += ["# the environment (no container): this interpreter's folder first on PATH",
                      f"export PATH={shlex.quote(bindir)}:$PATH"]
    lines += list(c.setup)
    return lines


def _sbatch_params(flags: list[str]) -> dict:
    """Extra #SBATCH flags ("--qos=high", "--requeue") as NeMo-Run's additional_parameters."""
    params = {}
    for flag in flags:
        key, eq, value = flag[2:].partition("=")
        params[key.replace("-", "_")] = value if eq else True
    return params


def slurm_executor(cfg, layout: Layout, cpu: bool, *, job_dir: str, packager, tag: str, strict: bool):
    """NeMo-Run's SlurmExecutor for one job of cfg (its cluster section); its experiment folder
    and NeMo-Run's job folder are the same: `job_dir`/experiments (LocalTunnel)."""
    import nemo_run as run

    from megatron_trace.fleet.job import KEY_LINES

    c = cfg.cluster
    setup = env_setup_lines(cfg, tag, strict=strict)
    if c.rollout_nodes:  # a fresh key per job, in the environment of every node's task only
        setup += ["# the rollout fleet (cluster.rollout_nodes): megatron-trace fleet-job starts it", *KEY_LINES]
    env = {"PYTHONPATH": "/nemo_run/code"}
    common = dict(account=c.account, partition=c.partition, time=c.time, nodes=c.nodes, job_name_prefix="mt-",
                  tunnel=run.LocalTunnel(job_dir=os.path.join(job_dir, "experiments")), packager=packager,
                  exclusive=True if c.exclusive else None, container_image=c.container_image,
                  container_mounts=list(c.container_mounts) if c.container_image else [],
                  additional_parameters=_sbatch_params(c.sbatch) or None, poll_estimated_start_time=False)
    if cpu:
        cores = layout.world + c.rollout_nodes  # a fleet's servers: one core each
        return run.SlurmExecutor(**common, ntasks_per_node=1, cpus_per_task=cores,
                                 srun_args=[f"--cpus-per-task={cores}"], setup_lines="\n".join(setup) or None,
                                 env_vars=env)
    if c.rollout_nodes:  # one `fleet-job` task per node; the trainer nodes start torchrun themselves
        return run.SlurmExecutor(**common, ntasks_per_node=1, gpus_per_node=c.gpus_per_node,
                                 setup_lines="\n".join(setup),
                                 env_vars={**env, "NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
    setup += ["# rendezvous: the allocation's first node, from Slurm", HEAD_NODE_LINE]
    return run.SlurmExecutor(**common, ntasks_per_node=c.gpus_per_node, gpus_per_node=c.gpus_per_node,
                             launcher="torchrun", setup_lines="\n".join(setup),
                             env_vars={**env, "NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})


def repo_relative(path: str) -> str:
    """The config's path inside the packaged code (launch/local.py: the working directory is the
    repository)."""
    full = os.path.abspath(path)
    if not full.startswith(REPO + os.sep):
        raise SystemExit(f"error: --config {path} must live inside the repository ({REPO})")
    return os.path.relpath(full, REPO)


def train_task(config_path: str, overrides: list[str] | tuple[str, ...] = (), *, fleet: bool = False):
    """The job's command: train on the config at config_path (as the job sees it); with a fleet
    in the job, `fleet-job`, which gives each node its role (megatron_trace/fleet/job.py)."""
    return cli_task(["fleet-job" if fleet else "train", "--config", config_path, *overrides])


def cli_task(args: list[str]):
    """`python -m megatron_trace.cli ARGS` as NeMo-Run's task."""
    import nemo_run as run

    return run.Script(path="megatron_trace.cli", entrypoint="python", m=True, args=list(args))


# ----------------------------------------------------------------------------------- submit

@dataclass
class Job:
    name: str
    text: str  # the resolved config
    cfg: object
    layout: Layout
    cpu: bool
    executor: object
    args: list[str] | None = None  # the megatron-trace command (default: train on /nemo_run/<name>.yaml)
    after: str | None = None  # the name of a job this one waits for (sbatch --dependency=afterok)
    files: dict[str, str] | None = None  # the files /nemo_run/ holds for it (run_local writes them itself)

    def task(self):
        if self.args is not None:
            return cli_task(self.args)
        return train_task(f"/nemo_run/{self.name}.yaml", fleet=self.cfg.cluster.rollout_nodes > 0)


def _add_all(exp, jobs: list[Job]) -> None:
    """Every job into the experiment, a dependent job after the one it names."""
    ids: dict[str, str] = {}
    for job in jobs:
        deps = [ids[job.after]] if job.after else None
        ids[job.name] = exp.add(job.task(), executor=job.executor, name=job.name, dependencies=deps)


@dataclass
class Submitted:
    name: str
    job_id: str
    job_dir: str
    script: str
    batch_log: str
    task_log: str
    config: str
    run_dir: str


def describe(job: Job) -> str:
    c = job.cfg.cluster
    what = (f"CPU, {job.layout.world} core(s) on 1 node" if job.cpu else f"{c.nodes} node(s) x {c.gpus_per_node} GPUs")
    return f"{what}; {'container ' + c.container_image if c.container_image else 'no container'}"


def _quiet_nemo_run() -> None:
    """NeMo-Run's console notes (launcher adjustments, experiment banners) off: the launchers
    print what matters themselves."""
    from nemo_run.core.frontend.console.api import CONSOLE

    CONSOLE.quiet = True


def render(title: str, jobs: list[Job], out_dir: str, base: str) -> list[str]:
    """--dry-run: the sbatch script of every job (marked for inspection only) and its resolved
    config, written into out_dir; the NeMo-Run folder it renders into (base, the executors'
    job_dir) is deleted. Returns the files written."""
    import nemo_run as run

    _quiet_nemo_run()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for job in jobs:
        extra = {k: v for k, v in (job.files or {}).items() if k != f"{job.name}.yaml"}  # e.g. <name>.sft.yaml
        for name, text in {f"{job.name}.resolved.yaml": job.text, **extra}.items():
            path = os.path.join(out_dir, name)
            with open(path, "w") as f:
                f.write(text)
            written.append(path)
    with run.Experiment(title, base_dir=base, log_level="WARN", clean_mode=True, enable_goodbye_message=False,
                        skip_status_at_exit=True) as exp:
        _add_all(exp, jobs)
        exp.dryrun(log=False, exist_ok=True, delete_exp_dir=False)
        exp_dir = exp._exp_dir
    after = {f"{job.name}_sbatch.sh": job.after for job in jobs if job.after}
    for f in sorted(glob.glob(os.path.join(exp_dir, "**", "*_sbatch.sh"), recursive=True)):
        dst = os.path.join(out_dir, os.path.basename(f))
        lines = open(f).read().split("\n")
        note = [INSPECTION_NOTE]
        if os.path.basename(f) in after:
            note.append(f"# submitted with --dependency=afterok:<the job id of {after[os.path.basename(f)]}>")
        with open(dst, "w") as g:
            g.write("\n".join(lines[:1] + note + lines[1:]))
        written.append(dst)
    shutil.rmtree(base, ignore_errors=True)
    return written


def submit(title: str, jobs: list[Job], job_dir: str) -> list[Submitted]:
    """Submit every job in one NeMo-Run experiment under job_dir (its base folder and the
    LocalTunnel's job folder agree: sbatch finds the scripts NeMo-Run writes). Each job's
    resolved config goes into its job folder with its code (launch/job_files.py)."""
    import nemo_run as run

    if shutil.which("sbatch") is None:
        raise SystemExit("error: sbatch is not on PATH: run the launcher on a Slurm login node (or --dry-run)")
    _quiet_nemo_run()
    os.makedirs(job_dir, exist_ok=True)
    here = os.getcwd()
    os.chdir(REPO)  # NeMo-Run's packaging asks git from the current folder
    try:
        with run.Experiment(title, base_dir=job_dir, log_level="WARN", clean_mode=True, enable_goodbye_message=False,
                            skip_status_at_exit=True) as exp:
            _add_all(exp, jobs)
            exp.run(detach=True)
            exp_dir = exp._exp_dir
    finally:
        os.chdir(here)
    out = []
    for added, job in zip(exp.jobs, jobs):
        job_id = added.handle.rstrip("/").rsplit("/", 1)[-1].split(";")[0]
        ex = added.executor
        out.append(Submitted(
            name=job.name, job_id=job_id, job_dir=ex.job_dir,
            script=os.path.join(exp_dir, f"{ex.job_name}_sbatch.sh"),
            batch_log=str(ex.job_details.stdout).replace("%j", job_id),
            task_log=str(ex.job_details.srun_stdout).replace("%j", job_id).replace("${SLURM_RESTART_COUNT:-0}", "0"),
            config=os.path.join(ex.job_dir, f"{job.name}.yaml"), run_dir=job.cfg.run.dir))
    return out


def run_local(title: str, jobs: list[Job], job_dir: str, check) -> int:
    """Every job on this machine, one after the other, through NeMo-Run's LocalExecutor (logs
    streamed). The files a Slurm job finds in /nemo_run/ are written into `job_dir`, and the code
    is this working tree (PYTHONPATH). `check(job)` says after each job whether it did its work
    (None) or why not; returns 0 when every job did, else 1 (the rest still run)."""
    import nemo_run as run

    _quiet_nemo_run()
    os.makedirs(job_dir, exist_ok=True)
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    failed = []
    for i, job in enumerate(jobs):
        for name, text in (job.files or {}).items():
            with open(os.path.join(job_dir, name), "w") as f:
                f.write(text)
        args = [a.replace("/nemo_run/", job_dir.rstrip(os.sep) + os.sep) for a in (job.args or ["train", "--config",
                f"/nemo_run/{job.name}.yaml"])]
        print(f"[sweep] local {i + 1}/{len(jobs)}: {job.name}: megatron-trace {' '.join(args)}", flush=True)
        executor = run.LocalExecutor(ntasks_per_node=1, env_vars={"PYTHONUNBUFFERED": "1", "PYTHONPATH": REPO})
        try:
            run.run(cli_task(args), executor=executor, name=job.name, tail_logs=True, log_level="WARN")
        except Exception as exc:  # noqa: BLE001 (the launcher's error; the cell's own is in its FAILED)
            print(f"[sweep] {job.name}: NeMo-Run raised {type(exc).__name__}: {exc}", file=sys.stderr)
        why = check(job)
        print(f"[sweep] {job.name}: {'done' if why is None else 'FAILED: ' + why}", flush=True)
        if why is not None:
            failed.append(job.name)
    if failed:
        print(f"[sweep] {len(failed)} of {len(jobs)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def report(tag: str, sub: Submitted, what: str) -> None:
    """The job id, its files and the commands that follow and cancel it (stdout)."""
    i = sub.job_id
    print(f"[{tag}] submitted {sub.name}: job {i} ({what})\n"
          f"[{tag}]   run dir:   {sub.run_dir}\n"
          f"[{tag}]   config:    {sub.config}\n"
          f"[{tag}]   job dir:   {sub.job_dir}\n"
          f"[{tag}]   script:    {sub.script}\n"
          f"[{tag}]   batch log: {sub.batch_log}\n"
          f"[{tag}]   task log:  {sub.task_log}\n"
          f"[{tag}]   status:    squeue -j {i}\n"
          f"[{tag}]   finished:  scontrol show job {i}   (or sacct -j {i} where accounting is on)\n"
          f"[{tag}]   follow:    tail -F {sub.task_log}\n"
          f"[{tag}]   cancel:    scancel {i}\n"
          f"[{tag}]   (config: the resolved config the job trains on; job dir/code: the packaged code; "
          "after a requeue the task log ends _1, _2, ...)", flush=True)


def _exit_code(text: str) -> int | None:
    """Slurm's "rc:signal" as one exit status (128 + signal when killed by one)."""
    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not m:
        return None
    rc, sig = int(m.group(1)), int(m.group(2))
    return rc or (128 + sig if sig else 0)


def job_state(job_id: str) -> tuple[str, int | None]:
    """(state, exit code) of a Slurm job from scontrol, or sacct once scontrol has forgotten it;
    ("UNKNOWN", None) when neither knows it."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    m = re.search(r"\bJobState=(\S+)", out.stdout) if out.returncode == 0 else None
    if m:
        code = re.search(r"\bExitCode=(\S+)", out.stdout)
        return m.group(1), _exit_code(code.group(1)) if code else None
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"], capture_output=True,
                         text=True)
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    if lines and "|" in lines[0]:
        state, _, code = lines[0].partition("|")
        return state.split()[0], _exit_code(code)
    return "UNKNOWN", None


def wait(tag: str, subs: list[Submitted], poll_s: float = 2.0) -> int:
    """Block until every job ends; print each state change. 0 when all COMPLETED, else the exit
    code of the first job that did not (1 when it has none)."""
    states: dict[str, str] = {}
    final: dict[str, tuple[str, int | None]] = {}
    unknown: dict[str, int] = {}
    try:
        while len(final) < len(subs):
            for sub in subs:
                if sub.job_id in final:
                    continue
                state, code = job_state(sub.job_id)
                if state == "UNKNOWN":
                    unknown[sub.job_id] = unknown.get(sub.job_id, 0) + 1
                    if unknown[sub.job_id] < 5:
                        continue
                if state != states.get(sub.job_id):
                    states[sub.job_id] = state
                    print(f"[{tag}] job {sub.job_id} ({sub.name}): {state}", flush=True)
                if state in TERMINAL or state == "UNKNOWN":
                    final[sub.job_id] = (state, code)
            if len(final) < len(subs):
                time.sleep(poll_s)
    except KeyboardInterrupt:
        ids = " ".join(s.job_id for s in subs if s.job_id not in final)
        print(f"[{tag}] stopped waiting; the job(s) keep running: squeue -j {ids.replace(' ', ',')}; "
              f"scancel {ids}", file=sys.stderr)
        return 130
    rc = 0
    for sub in subs:
        state, code = final[sub.job_id]
        print(f"[{tag}] job {sub.job_id} ({sub.name}) ended {state}"
              f"{f' (exit code {code})' if code is not None else ''}; task log: {sub.task_log}", flush=True)
        if state != "COMPLETED" and rc == 0:
            rc = code if code else 1
    return rc
