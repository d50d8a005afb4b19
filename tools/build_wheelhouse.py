"""Offline wheels for a CUDA machine that already has torch: `make wheelhouse [PY=3.12]`.

    python tools/build_wheelhouse.py [--out wheelhouse] [--python-version 3.12] [--constraints FILE]
                                     [--extras tensorboard,plots] [--max-mib 60]

Writes OUT (default `wheelhouse/`, git-ignored) with a wheel of this project and binary wheels of
every runtime dependency for CPython X.Y on manylinux x86_64 (glibc <= 2.28, the floor of torch's
own wheels), *less* torch and the packages torch itself depends on (sympy, networkx, jinja2,
filelock, fsspec, typing-extensions, setuptools, mpmath, MarkupSafe, nvidia-*, triton, cuda-*): a
machine with torch has those. On that machine, with no package index:

    pip install --no-index --find-links wheelhouse megatron-trace

The set is resolved with pip (`install --dry-run --report`, which reads torch's metadata but not
its wheel), then downloaded with `pip download --only-binary=:all: --no-deps` for the target
interpreter, so any X.Y works from here (pip's cache is reused). `--constraints` (the Makefile
passes constraints/cpu-py311.txt) pins every package the lock names to the same version as the
CPU development stack, minus the torch family above; `--constraints ''` resolves unconstrained.

The whole folder must stay within --max-mib (default 60: what travels with a device run is 64 MiB
in all); over it, nothing is written and the exit status is 1, with the largest wheels listed.
The default set is the core `dependencies` of pyproject.toml (what `megatron-trace
train/eval/smoke` need); optional extras (`data`, `tensorboard`, `plots`, `launch`) are left out
unless named with --extras.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
# torch and what torch itself pulls in: present wherever torch is installed.
TORCH_FAMILY = {"torch", "sympy", "networkx", "jinja2", "filelock", "fsspec", "typing-extensions", "setuptools",
                "mpmath", "markupsafe", "triton"}
TORCH_FAMILY_PREFIXES = ("nvidia-", "cuda-")
# manylinux tags pip must be told one by one (it matches manylinux_2_N exactly); 2.28 is the glibc
# floor of torch's own wheels, so any machine that runs torch accepts all of these.
GLIBC_MINORS = range(17, 29)
LEGACY_TAGS = ("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def in_torch_family(name: str) -> bool:
    n = normalize(name)
    return n in TORCH_FAMILY or n.startswith(TORCH_FAMILY_PREFIXES)


def platform_args(python_version: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in [f"manylinux_2_{m}_x86_64" for m in reversed(GLIBC_MINORS)] + list(LEGACY_TAGS):
        args += ["--platform", tag]
    return args


def _req_name(req: str) -> str | None:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    return normalize(m.group(1)) if m else None


def torch_closure(report: dict) -> set[str]:
    """torch and everything it requires (transitively, without its optional extras), among the
    packages of the resolved set."""
    requires = {normalize(i["metadata"]["name"]): i["metadata"].get("requires_dist") or []
                for i in report["install"]}
    seen, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        if name in seen or name not in requires:
            continue
        seen.add(name)
        for req in requires[name]:
            if "extra ==" in req.replace("extra==", "extra =="):
                continue
            dep = _req_name(req)
            if dep:
                todo.append(dep)
    return seen


def _run(cmd: list[str], what: str) -> None:
    shown = " ".join(a for a in cmd if not a.startswith("manylinux")).replace(" --platform", "")
    print(f"[wheelhouse] {what}: {shown} (--platform: manylinux x86_64 tags up to glibc 2.28)", flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"[wheelhouse] error: {what} failed (exit {proc.returncode})")


def build_project_wheel(tmp: str) -> str:
    """A wheel of this project, built from a copy of its sources (nothing is written in the tree)."""
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(REPO, f), src)
    shutil.copytree(os.path.join(REPO, "megatron_trace"), os.path.join(src, "megatron_trace"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = os.path.join(tmp, "project")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, src],
         "building the project's wheel")
    (wheel,) = os.listdir(dist)
    return os.path.join(dist, wheel)


def filtered_constraints(path: str, tmp: str) -> str:
    """The lock less the torch family (those are not downloaded, and the lock's CPU pins of them,
    torch==2.13.0+cpu above all, need not exist for another interpreter)."""
    out = os.path.join(tmp, "constraints.txt")
    with open(path) as src, open(out, "w") as dst:
        for line in src:
            name = _req_name(line) if line.strip() and not line.lstrip().startswith("#") else None
            if name and not in_torch_family(name):
                dst.write(line)
    return out


def resolve(project_wheel: str, extras: list[str], python_version: str, constraints: str | None,
            tmp: str) -> dict:
    report = os.path.join(tmp, "report.json")
    spec = project_wheel + (f"[{','.join(extras)}]" if extras else "")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
           "--target", os.path.join(tmp, "target"), "--report", report, *platform_args(python_version)]
    if constraints:
        cmd += ["-c", constraints]
    _run(cmd + [spec], f"resolving the dependencies for CPython {python_version}")
    with open(report) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "wheelhouse"))
    p.add_argument("--python-version", default="{}.{}".format(*sys.version_info[:2]),
                   help="target CPython X.Y (default: this interpreter's)")
    p.add_argument("--constraints", default="", help="pip constraints (the lock); '' for none")
    p.add_argument("--extras", default="", help="comma-separated extras of the project to include too")
    p.add_argument("--max-mib", type=float, default=60.0)
    args = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        raise SystemExit(f"[wheelhouse] error: --python-version {args.python_version!r}: expected 3.X, e.g. 3.12")
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    out = os.path.abspath(args.out)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        constraints = filtered_constraints(args.constraints, tmp) if args.constraints else None
        project = build_project_wheel(tmp)
        report = resolve(project, extras, args.python_version, constraints, tmp)
        skip = torch_closure(report)
        pins, excluded = [], []
        for item in report["install"]:
            name, version = item["metadata"]["name"], item["metadata"]["version"]
            if normalize(name) == "megatron-trace":
                continue
            if normalize(name) in skip or in_torch_family(name):
                excluded.append(f"{name}=={version}")
            else:
                pins.append(f"{name}=={version}")
        stage = os.path.join(tmp, "wheelhouse")
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", stage,
              *platform_args(args.python_version), *sorted(pins)], "downloading the wheels")
        shutil.copy2(project, stage)
        wheels = sorted(f for f in os.listdir(stage) if f.endswith(".whl"))
        sizes = {f: os.path.getsize(os.path.join(stage, f)) for f in wheels}
        total = sum(sizes.values())
        largest = sorted(sizes.items(), key=lambda kv: -kv[1])
        if total > args.max_mib * MIB:
            print(f"[wheelhouse] error: {len(wheels)} wheels take {total / MIB:.1f} MiB, over the "
                  f"{args.max_mib:g} MiB limit; nothing written. Largest:", file=sys.stderr)
            for f, s in largest[:10]:
                print(f"  {s / MIB:7.1f} MiB  {f}", file=sys.stderr)
            return 1
        platforms = [a for a in platform_args(args.python_version) if a.startswith("manylinux")]
        manifest = {"python_version": args.python_version, "platforms": platforms,
                    "extras": extras, "constraints": args.constraints or None, "total_mib": round(total / MIB, 2),
                    "wheels": {f: sizes[f] for f in wheels}, "excluded_torch_family": sorted(excluded),
                    "install": "pip install --no-index --find-links wheelhouse megatron-trace"}
        with open(os.path.join(stage, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.isdir(out):
            shutil.rmtree(out)
        shutil.copytree(stage, out)
    print(f"[wheelhouse] {out}: {len(wheels)} wheels, {total / MIB:.1f} MiB (limit {args.max_mib:g}) for CPython "
          f"{args.python_version} manylinux x86_64; left out (torch and its dependencies): "
          f"{', '.join(sorted(e.split('==')[0] for e in excluded)) or 'none'}")
    print("[wheelhouse] install offline with: pip install --no-index --find-links wheelhouse megatron-trace")
    return 0


if __name__ == "__main__":
    sys.exit(main())
