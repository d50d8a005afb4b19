"""Shared pieces of the NeMo-Run launchers. This module resolves and validates the config and
holds the cluster flags; `layout.py` plans the job's ranks; `jobs.py` builds NeMo-Run's
SlurmExecutor and the task, submits (or renders) an experiment, reports and waits.

The task is `python -m megatron_trace.cli train --config <resolved config>` (the module form of
`megatron-trace train`). The config and its overrides are resolved and validated here, on the
submitting side, before anything is rendered or submitted: relative paths (run.dir, data,
models, and the MT_RUNS / MT_DATA / MT_MODELS variables behind the recipes' defaults) become
absolute against the folder the launcher runs in, the job's layout is fixed, and the resolved
copy is written into the job's folder and handed to the job (`/nemo_run/<name>.yaml`, which is
the job folder itself without a container). The job never re-resolves anything, so what was
validated is what runs, whatever the compute nodes' environment holds.

Jobs (DESIGN section 11):
- GPU (cluster.gpus_per_node >= 1): WORLD = nodes x gpus_per_node = tp x pp x dp ranks, one per
  GPU, started by one torchrun per node. dp = WORLD / (tp x pp) is derived from the job's size; a
  size that tp x pp does not divide, or that disagrees with an explicit parallel.dp, is refused.
  The rendezvous host is the first node of the allocation, from Slurm.
- CPU (cluster.gpus_per_node = 0, or parallel.device = cpu): one node, no GPU request, one core
  per rank; the job runs `megatron-trace train` directly and it spawns its tp x pp x dp gloo
  ranks (parallel.dp is written into the resolved config).

With `rollout.placement=colocated` every replica runs one rollout engine on its first TP group's
GPUs (SGLang tp_size = parallel.tp), so there are dp engines; `remote` puts none on the trainer.

Code reaches the job through NeMo-Run's GitArchivePackager, unpacked at /nemo_run/code (the
job's working directory and PYTHONPATH): `--code worktree` (default) packages the working tree as
it is (tracked and untracked, not ignored, files, snapshotted into a git tree object), `committed`
packages HEAD, `installed` packages nothing (the job imports megatron_trace from its environment:
the venv, or the container image).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _require_nemo_run() -> None:
    """The launchers are NeMo-Run front ends; NeMo-Run is the `launch` extra, not a core dependency."""
    from megatron_trace.extras import MissingExtra, require

    try:
        require("nemo_run", "launch", "launch/ (the NeMo-Run launchers)")
    except MissingExtra as exc:
        raise SystemExit(f"error: {exc} (or pip install -e '.[launch]' in a checkout)") from None


_require_nemo_run()

from layout import Layout, job_layout  # noqa: E402 - after the check above, which names the extra

# ----------------------------------------------------------------------------------- config

def resolve(config: str, overrides: list[str]):
    from megatron_trace.config import ConfigError, check_teacher_data, dump_config, load_config

    try:
        cfg = load_config(config, overrides)
        check_teacher_data(cfg)  # refused here, before a job is submitted, as `train` would
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    return cfg, dump_config(cfg)


def reload(text: str, where: str):
    """Validate a resolved config as the job will load it (the schema checks run again)."""
    from megatron_trace.config import ConfigError, load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name)
    except ConfigError as exc:
        raise SystemExit(f"error: {where}: {exc}") from None
    finally:
        os.unlink(f.name)


ENV_PATHS = ("MT_RUNS", "MT_DATA", "MT_MODELS")
# (key, what it is, the variable that usually sets it)
PATH_KEYS = (("run.dir", "out", "MT_RUNS"), ("annotate.cache_dir", "out", None), ("model.hf_dir", "in", "MT_MODELS"),
             ("model.ckpt", "in", None), ("data.source", "data", "MT_DATA"), ("eval.in_loop_source", "data", "MT_DATA"),
             ("eval.gpqa_csv", "in", None), ("train.records_dir", "in", None))
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def absolute_env(tag: str) -> None:
    """MT_RUNS / MT_DATA / MT_MODELS made absolute (against this folder) before a config reads
    them, so that the resolved config holds paths the job can use from its own folder."""
    for var in ENV_PATHS:
        value = os.environ.get(var)
        if value and not os.path.isabs(value):
            os.environ[var] = os.path.abspath(value)
            print(f"[{tag}] {var}={value} -> {os.environ[var]}", file=sys.stderr)


def _get(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg, key: str, value) -> None:
    head, _, last = key.rpartition(".")
    setattr(_get(cfg, head), last, value)


def absolute_paths(cfg, tag: str, *, strict: bool) -> None:
    """Make the config's relative paths absolute (against the folder the launcher runs in), in
    place. strict (a real submission): refuse a relative input path that does not exist here,
    naming what to set; a job would only fail on it later, on another machine."""
    here = os.getcwd()
    for key, kind, var in PATH_KEYS:
        value = _get(cfg, key)
        if not value or os.path.isabs(value) or "://" in value:
            continue
        full = os.path.abspath(value)
        if kind == "data" and (value == "arith" or (not os.path.exists(full) and not value.endswith(DATA_SUFFIXES))):
            continue  # the built-in task or a hub dataset name
        if kind != "out" and not os.path.exists(full) and strict:
            hint = f"set {var} to the shared folder that holds it, or " if var else ""
            raise SystemExit(f"error: {key}={value} is relative and does not exist here ({full}); the job runs on "
                             f"another machine and in another folder: {hint}pass {key}=/absolute/path on storage "
                             "the compute nodes share")
        _set(cfg, key, full)
        print(f"[{tag}] {key}={value} -> {full} (relative to {here})", file=sys.stderr)


# ----------------------------------------------------------------------------------- flags

CODE_MODES = ("worktree", "committed", "installed")


def add_cluster_flags(p) -> None:
    """The flags both Slurm launchers share; each overrides a `cluster.*` key of the config(s)."""
    g = p.add_argument_group("cluster profile (each flag overrides the cluster.* key named)")
    g.add_argument("--account", default=None, help="cluster.account; default: none (no --account line)")
    g.add_argument("--partition", default=None, help="cluster.partition; default: the cluster's default partition")
    g.add_argument("--nodes", type=int, default=None, help="cluster.nodes")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="cluster.gpus_per_node; 0 = a CPU partition (no GPU request, CPU gloo ranks)")
    g.add_argument("--cpus-per-node", type=int, default=None,
                   help="cluster.cpus_per_node: CPU jobs, the cores asked for = the ranks started "
                        "(default tp x pp x dp)")
    g.add_argument("--time", default=None, help="cluster.time")
    g.add_argument("--rollout-nodes", type=int, default=None,
                   help="cluster.rollout_nodes: start a rollout fleet (SGLang servers + sglang-router, "
                        "cluster.rollout_server_cmd) on the job's first K nodes and train on the others with "
                        "rollout.placement=remote (a CPU job: K servers next to the trainer)")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--container-image", default=None, help="cluster.container_image (pyxis/enroot)")
    c.add_argument("--no-container", action="store_true", help="cluster.container_image=null: run in a venv")
    g.add_argument("--mounts", nargs="*", default=None, help="cluster.container_mounts, SRC:DST ...")
    g.add_argument("--venv", default=None,
                   help="cluster.venv: without a container, the venv (folder or bin/activate) the job activates; "
                        "default: this interpreter's venv")
    g.add_argument("--setup", action="append", default=None,
                   help="cluster.setup: a shell line the job runs before the task (repeatable), e.g. 'module load cuda'")
    g.add_argument("--exclusive", action="store_true", default=None, help="cluster.exclusive: #SBATCH --exclusive")
    g.add_argument("--sbatch", action="append", default=None,
                   help="cluster.sbatch: an extra #SBATCH flag (repeatable): --sbatch qos=high or --sbatch=--qos=high")
    p.add_argument("--code", choices=CODE_MODES, default="worktree",
                   help="what code the job runs: the working tree as it is (default), the committed HEAD, or the "
                        "package installed in the job's environment")
    p.add_argument("--job-dir", default=None,
                   help="NeMo-Run's folder for the job files, packaged code and logs, on storage the compute nodes "
                        "share")
    p.add_argument("--dry-run", action="store_true",
                   help="render the sbatch script(s) into --out, for inspection only (not submittable)")
    p.add_argument("--wait", action="store_true",
                   help="block until the job(s) end; exit 0 when all COMPLETED, else the first failure's exit code")


def cluster_overrides(args) -> list[str]:
    """The flags that change the job's size, as config overrides (the config checks them)."""
    over = []
    for flag, key in (("nodes", "nodes"), ("gpus_per_node", "gpus_per_node"), ("cpus_per_node", "cpus_per_node"),
                      ("time", "time"), ("rollout_nodes", "rollout_nodes")):
        value = getattr(args, flag)
        if value is not None:
            over.append(f"cluster.{key}={value}")
    return over


def split_mounts(args) -> None:
    """`--mounts A:B key=value`: a key=value after --mounts is an override, not a mount."""
    if args.mounts:
        keep = [m for m in args.mounts if not re.match(r"^[A-Za-z_][\w.]*=", m)]
        args.overrides = [m for m in args.mounts if m not in keep] + list(args.overrides)
        args.mounts = keep


def apply_site_flags(cfg, args) -> None:
    """The site flags (account, partition, container, environment, sbatch lines) into cfg.cluster."""
    c = cfg.cluster
    for flag in ("account", "partition", "container_image", "venv"):
        if getattr(args, flag) is not None:
            setattr(c, flag, getattr(args, flag))
    if args.no_container:
        c.container_image = None
    if args.mounts is not None:
        c.container_mounts = list(args.mounts)
    if args.setup is not None:
        c.setup = list(args.setup)
    if args.exclusive:
        c.exclusive = True
    if args.sbatch is not None:
        c.sbatch = [s if s.startswith("--") else f"--{s}" for s in args.sbatch]
    if c.container_mounts and not c.container_image:
        print("[launch] note: cluster.container_mounts / --mounts are ignored without a container image",
              file=sys.stderr)
        c.container_mounts = []


def prepare(cfg, args, tag: str) -> tuple[object, str, Layout, bool]:
    """Site flags, layout, absolute paths, then the resolved config as the job will load it:
    (cfg, its YAML, layout, CPU job)."""
    from megatron_trace.config import dump_config

    apply_site_flags(cfg, args)
    layout, cpu = job_layout(cfg)
    absolute_paths(cfg, tag, strict=not args.dry_run)
    text = dump_config(cfg)
    return reload(text, f"the resolved config of {cfg.run.name}"), text, layout, cpu
