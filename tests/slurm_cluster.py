"""A one-node SLURM cluster on this machine for the integration test: Debian's slurm-wlm and munge,
configured in a temporary folder (munged, slurmctld and slurmd on free local ports, no cgroups, no
accounting), started from the test and torn down after it. `ensure_installed()` installs the packages with
apt-get when they are missing (as root); it returns why it cannot, and the test skips with that reason."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def missing_programs() -> list[str]:
    search = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [p for p in PROGRAMS if shutil.which(p, path=search) is None]


def ensure_installed(timeout: int = 600) -> str | None:
    """None when SLURM and munge are there (installing them if needed); else the reason they are not."""
    if not missing_programs():
        return None
    failed = apt_install(
        PACKAGES, f"{', '.join(missing_programs())} missing", timeout, ["--no-install-recommends"]
    )
    if failed:
        return failed
    return None if not missing_programs() else f"still missing after apt-get: {', '.join(missing_programs())}"


def apt_install(packages, missing: str, timeout: int = 600, options: list[str] = ()) -> str | None:
    """Install Debian packages with apt-get (as root); None when it worked, else why it could not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{missing} and apt-get cannot install them here (needs root and apt)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(os.path.join(tempfile.gettempdir(), "biovis-tests-apt.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers install one after the other, never at once
        return _apt_get(packages, options, env, timeout)


def _apt_get(packages, options, env: dict, timeout: int) -> str | None:
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *options, *packages]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as err:
            return f"`{' '.join(cmd)}` failed: {err}"
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            return f"`{' '.join(cmd)}` failed: {lines[-1] if lines else done.returncode}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


class Cluster:
    """munged + slurmctld + slurmd for this host, all state under `root`; `env` is for SLURM's clients."""

    def __init__(self, root: Path):
        self.root = root
        self.processes: list[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def _config(self) -> str:
        node = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, timeout=60).stdout
        node_line = next(line for line in node.splitlines() if line.startswith("NodeName="))
        node_line = re.sub(r"^NodeName=\S+", f"NodeName={self.host} NodeAddr=127.0.0.1", node_line)
        r = self.root
        return "\n".join([
            "ClusterName=biovistest", f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge.socket,cred_expire=5", f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin",
            "MpiDefault=none", "ReturnToService=2", "KillWait=10", "MinJobAge=600", "InactiveLimit=0",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "JobRequeue=1",
            "SchedulerParameters=sched_interval=1",  # a requeued job waits for the periodic pass (60 s by default)
            node_line.strip() + " State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"  # fmt: skip

    def start(self, timeout: float = 60) -> None:
        r = self.root
        for sub in ("state", "spool", "munge"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        (r / "slurm.conf").write_text(self._config())
        self._run([_sbin("munged"), "--foreground", "--force", f"--socket={r}/munge.socket",
                   f"--key-file={key}", f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/munge/munged.log",
                   f"--seed-file={r}/munge/munge.seed"], "munged.out")  # fmt: skip
        self._wait(lambda: (r / "munge.socket").exists(), timeout, "munged did not start")
        self._run([_sbin("slurmctld"), "-D", "-c", "-i", "-f", str(r / "slurm.conf")], "slurmctld.out")
        self._wait(lambda: self.call("scontrol", "ping").returncode == 0, timeout, "slurmctld did not start")
        self._run([_sbin("slurmd"), "-D", "-f", str(r / "slurm.conf"), "-N", self.host], "slurmd.out")
        self._wait(self._node_idle, timeout, "slurmd did not register")

    def _run(self, cmd: list[str], log: str) -> None:
        out = open(self.root / log, "wb")  # noqa: SIM115 (kept open for the daemon's life)
        self.processes.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env))

    def _wait(self, ready, timeout: float, message: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.processes):
                break
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{message}; logs:\n{self.logs()}")

    def _node_idle(self) -> bool:
        out = self.call("sinfo", "-h", "-o", "%T").stdout.strip()
        return out.startswith("idle")

    def call(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.call("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log", "slurmctld.out", "slurmd.out"):
            path = self.root / name
            if path.is_file():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what still runs (and let slurmd end it), then stop the daemons."""
        if self.processes and all(p.poll() is None for p in self.processes):
            self.call("scancel", "--full", "--quiet", "-u", "root")
            deadline = time.time() + 20
            while self.call("squeue", "-h").stdout.strip() and time.time() < deadline:
                time.sleep(0.2)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
