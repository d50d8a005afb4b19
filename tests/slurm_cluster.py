"""TEST FIXTURE: a real one-node Slurm cluster of its own (Debian's slurm-wlm + munge), in a
temporary folder: munged with its own key and socket, slurmctld and slurmd started as child
processes with a slurm.conf that keeps every state, spool and log file in that folder, and
stopped by PID at the end. One partition `batch` with this machine's cores, no GPUs, no
cgroups, no accounting database (finished jobs are recorded by jobcomp/filetxt and stay visible
to `scontrol show job` for an hour). Every Slurm client must see SLURM_CONF=<folder>/slurm.conf
(`SlurmCluster.env`).

`tools/install_slurm.sh` (run by .ci/run) installs the packages; `missing()` names what is absent.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

DAEMONS = {"munged": ("/usr/sbin/munged",), "slurmctld": ("/usr/sbin/slurmctld",), "slurmd": ("/usr/sbin/slurmd",)}
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


def _find(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


def missing() -> list[str]:
    """The Slurm and munge binaries this machine lacks (empty: a cluster can be started)."""
    return [name for name in (*DAEMONS, *CLIENTS) if _find(name) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: str
    node: str = ""
    cpus: int = 0
    conf: str = ""
    jobcomp: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm client needs to talk to this cluster (added to a minimal environment)."""
        return {"SLURM_CONF": self.conf}

    def _run(self, *args: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=check,
                              env={**os.environ, **self.env})

    def logs(self) -> str:
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log", "munged.out", "slurmctld.out", "slurmd.out"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                out.append(f"--- {name}\n" + open(path, errors="replace").read()[-3000:])
        return "\n".join(out)

    def start(self, timeout: float = 60) -> None:
        os.chmod(self.root, 0o711)  # munged wants to reach its socket's folder; others may enter, not list
        for sub in ("state", "spool", "log", "munge"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(os.path.join(self.root, "munge"), 0o700)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = max(2, os.cpu_count() or 1)  # two ranks in one job need two cores (config_overrides)
        user = pwd.getpwuid(os.getuid()).pw_name
        key = os.path.join(self.root, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = os.path.join(self.root, "munge", "munge.socket")
        log = os.path.join(self.root, "log")
        self.conf = os.path.join(self.root, "slurm.conf")
        self.jobcomp = os.path.join(self.root, "jobcomp.txt")
        plugstack = os.path.join(self.root, "plugstack.conf")
        open(plugstack, "w").close()  # no SPANK plugins from the system's /etc/slurm
        ctld_port, d_port = _free_port(), _free_port()
        with open(self.conf, "w") as f:
            f.write(f"""# a one-node test cluster (tests/slurm_cluster.py)
ClusterName=mttest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={log}/slurmctld.log
SlurmdLogFile={log}/slurmd.log
PlugStackConfig={plugstack}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=3600
SlurmdParameters=config_overrides
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=2000 State=UNKNOWN
PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        env = {**os.environ, **self.env}

        def spawn(name: str, *args: str) -> None:
            out = open(os.path.join(log, f"{name}.out"), "w")
            self.procs[name] = subprocess.Popen([_find(name), *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True)

        spawn("munged", "-F", "-f", f"--key-file={key}", f"--socket={sock}",
              f"--pid-file={self.root}/munge/munged.pid", f"--log-file={log}/munged.log",
              f"--seed-file={self.root}/munge/munged.seed")
        self._until(lambda: os.path.exists(sock), timeout, "munged's socket")
        spawn("slurmctld", "-D", "-i", "-f", self.conf)
        self._until(lambda: self._run("scontrol", "ping").returncode == 0, timeout, "slurmctld")
        spawn("slurmd", "-D", "-N", self.node, "-f", self.conf)
        self._until(lambda: self._run("sinfo", "-h", "-n", self.node, "-o", "%T").stdout.strip() == "idle", timeout,
                    "the node to be idle")

    def _until(self, ready, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, ExitCode, NumCPUs, ...)."""
        out = self._run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def stop(self) -> None:
        """Cancel what still runs, then stop slurmd, slurmctld and munged by PID (TERM, then KILL)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self._run("scancel", "--partition=batch", "--full", timeout=10)
                end = time.time() + 20
                while time.time() < end and self._run("squeue", "-h", timeout=10).stdout.strip():
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
