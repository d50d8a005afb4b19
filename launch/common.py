"""Shared pieces of the NeMo-Run launchers: resolve and validate the config, plan the job,
build NeMo-Run's SlurmExecutor, submit (or render) an experiment, report and wait.

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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _require_nemo_run() -> None:
    """The launchers are NeMo-Run front ends; NeMo-Run is the `launch` extra, not a core dependency."""
    try:
        import nemo_run  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"error: the launchers in launch/ need NeMo-Run, which is not installed ({exc}); "
                         "install the 'launch' extra: pip install 'megatron-trace[launch]' "
                         "(or pip install -e '.[launch]' in a checkout)") from None


_require_nemo_run()

INSPECTION_NOTE = ("# megatron-trace --dry-run: for inspection only (not submittable): no code was packaged and the "
                   "job folder it names was deleted; submit without --dry-run")
HEAD_NODE_LINE = 'head_node_ip=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


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


# ----------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Layout:
    """How a job's ranks split up, and where its rollout engines run."""

    tp: int
    pp: int
    dp: int
    world: int
    engines: int  # rollout engines on the trainer's GPUs: dp (colocated), 1 (rank0), 0 (remote)
    placement: str
    where: str  # how the world size came about, e.g. "2 nodes x 8 GPUs"
    rollout: str  # the engines in words

    def line(self) -> str:
        return (f"layout tp={self.tp} pp={self.pp} dp={self.dp} ({self.world} ranks = {self.where}), "
                f"engines={self.engines} ({self.rollout})")


def plan_layout(cfg, world: int, where: str, *, keys: str = "", gpus_per_node: int | None = None,
                nodes: int = 1) -> Layout:
    """The layout of `world` ranks under cfg, or SystemExit naming the keys to change.

    where: how the world size came about ("2 nodes x 8 GPUs", "--nproc 4"); keys: the settings
    behind it, named in the errors. gpus_per_node (GPU jobs): a colocated SGLang engine lives on
    one node, so a TP group must not straddle two."""
    p, r = cfg.parallel, cfg.rollout
    src = f"{where}{'; ' + keys if keys else ''}"
    mp = p.tp * p.pp
    if world < 1 or world % mp:
        raise SystemExit(f"error: parallel.tp={p.tp} x parallel.pp={p.pp} = {mp} does not divide the job's {world} "
                         f"rank(s) ({src}); change parallel.tp / parallel.pp or the job size")
    dp = world // mp
    if p.dp is not None and p.dp != dp:
        raise SystemExit(f"error: parallel.dp={p.dp} disagrees with the job: {world} rank(s) ({src}) at "
                         f"parallel.tp={p.tp} x parallel.pp={p.pp} give dp={dp}; set parallel.dp=null to derive it "
                         f"(or parallel.dp={dp})")
    if cfg.train.mode == "train_only":
        engines, rollout = 0, "train.mode=train_only: no rollouts"
    elif r.placement == "colocated":
        engines = dp
        rollout = f"colocated {r.engine}, one per DP replica"
        if r.engine == "sglang":
            rollout += f", tp_size={p.tp}, mem_fraction_static={r.mem_fraction_static:g}"
            if gpus_per_node and nodes > 1 and gpus_per_node % p.tp:
                raise SystemExit(f"error: parallel.tp={p.tp} does not divide cluster.gpus_per_node={gpus_per_node}: "
                                 "some TP groups straddle two nodes, and a colocated SGLang engine "
                                 "(rollout.placement=colocated) runs on one node's GPUs; change parallel.tp or "
                                 "cluster.gpus_per_node, or use rollout.placement=remote")
    elif r.placement == "rank0":
        engines, rollout = 1, f"rank0 {r.engine} (debugging)"
    else:
        servers = f"router {r.remote.router_url}" if r.remote.router_url else f"{len(r.remote.urls)} server(s)"
        engines, rollout = 0, f"remote: {servers}"
    return Layout(p.tp, p.pp, dp, world, engines, r.placement, where, rollout)


def cluster_layout(cfg) -> Layout:
    """The layout of a Slurm GPU job of cfg.cluster.nodes x cfg.cluster.gpus_per_node GPUs."""
    c = cfg.cluster
    return plan_layout(cfg, c.nodes * c.gpus_per_node, f"{c.nodes} node{'s' * (c.nodes > 1)} x {c.gpus_per_node} GPUs",
                       keys=f"cluster.nodes={c.nodes} x cluster.gpus_per_node={c.gpus_per_node}",
                       gpus_per_node=c.gpus_per_node, nodes=c.nodes)


def is_cpu_job(cfg) -> bool:
    """cluster.gpus_per_node=0 or parallel.device=cpu: a CPU job (refused with cuda + 0 GPUs)."""
    c, p = cfg.cluster, cfg.parallel
    if c.gpus_per_node == 0 and p.device == "cuda":
        raise SystemExit("error: cluster.gpus_per_node=0 (--gpus-per-node 0) asks for a CPU partition, but "
                         "parallel.device=cuda; set parallel.device=cpu (or auto), or ask for GPUs")
    return c.gpus_per_node == 0 or p.device == "cpu"


def job_layout(cfg) -> tuple[Layout, bool]:
    """(layout, CPU job) of the Slurm job cfg asks for. A CPU job's layout is fixed in cfg
    (parallel.device=cpu, parallel.dp set): the job spawns exactly those ranks."""
    if not is_cpu_job(cfg):
        return cluster_layout(cfg), False
    c, p = cfg.cluster, cfg.parallel
    if c.nodes > 1:
        raise SystemExit(f"error: a CPU job runs on one node (megatron-trace spawns its gloo ranks there), but "
                         f"cluster.nodes={c.nodes}; set --nodes 1 (cluster.nodes=1) and ask for cores with "
                         "--cpus-per-node (cluster.cpus_per_node)")
    if c.cpus_per_node:
        world, where, keys = c.cpus_per_node, f"{c.cpus_per_node} cores on 1 node", \
            f"cluster.cpus_per_node={c.cpus_per_node}"
    else:
        world = p.tp * p.pp * (p.dp or 1)
        where, keys = f"{world} core{'s' * (world > 1)} on 1 node", "cluster.cpus_per_node=null: tp x pp x dp cores"
    lay = plan_layout(cfg, world, where, keys=keys)
    p.device, p.dp = "cpu", lay.dp
    return lay, True


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

    c = cfg.cluster
    setup = env_setup_lines(cfg, tag, strict=strict)
    env = {"PYTHONPATH": "/nemo_run/code"}
    common = dict(account=c.account, partition=c.partition, time=c.time, nodes=c.nodes, job_name_prefix="mt-",
                  tunnel=run.LocalTunnel(job_dir=os.path.join(job_dir, "experiments")), packager=packager,
                  exclusive=True if c.exclusive else None, container_image=c.container_image,
                  container_mounts=list(c.container_mounts) if c.container_image else [],
                  additional_parameters=_sbatch_params(c.sbatch) or None, poll_estimated_start_time=False)
    if cpu:
        return run.SlurmExecutor(**common, ntasks_per_node=1, cpus_per_task=layout.world,
                                 srun_args=[f"--cpus-per-task={layout.world}"], setup_lines="\n".join(setup) or None,
                                 env_vars=env)
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


def train_task(config_path: str, overrides: list[str] | tuple[str, ...] = ()):
    """The job's command: train on the config at config_path (as the job sees it)."""
    import nemo_run as run

    return run.Script(path="megatron_trace.cli", entrypoint="python", m=True,
                      args=["train", "--config", config_path, *overrides])


# ----------------------------------------------------------------------------------- submit

@dataclass
class Job:
    name: str
    text: str  # the resolved config
    cfg: object
    layout: Layout
    cpu: bool
    executor: object


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
        path = os.path.join(out_dir, f"{job.name}.resolved.yaml")
        with open(path, "w") as f:
            f.write(job.text)
        written.append(path)
    with run.Experiment(title, base_dir=base, log_level="WARN", clean_mode=True, enable_goodbye_message=False,
                        skip_status_at_exit=True) as exp:
        for job in jobs:
            exp.add(train_task(f"/nemo_run/{job.name}.yaml"), executor=job.executor, name=job.name)
        exp.dryrun(log=False, exist_ok=True, delete_exp_dir=False)
        exp_dir = exp._exp_dir
    for f in sorted(glob.glob(os.path.join(exp_dir, "**", "*_sbatch.sh"), recursive=True)):
        dst = os.path.join(out_dir, os.path.basename(f))
        lines = open(f).read().split("\n")
        with open(dst, "w") as g:
            g.write("\n".join(lines[:1] + [INSPECTION_NOTE] + lines[1:]))
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
            for job in jobs:
                exp.add(train_task(f"/nemo_run/{job.name}.yaml"), executor=job.executor, name=job.name)
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
                      ("time", "time")):
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
