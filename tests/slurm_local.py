"""A single-node SLURM for tests, everything in one temporary folder: munged (as the munge user, with its own
key and socket), slurmctld and slurmd (in the foreground, as root) on free ports, one node `localhost` with 2
CPUs and one partition `debug`. A requeued job starts again once its old credential has expired (cred_expire
+ 1 s: 121 s by default, 6 s here, SLURM's least). `LocalSlurm.env` points the SLURM commands at it
(SLURM_CONF); `stop()` ends the three daemons it started, by their process ids. Debian: `apt-get install
slurm-wlm munge` (as root)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

COMMANDS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "pkill")


def unavailable() -> str | None:
    """Why a local SLURM cannot start here (None: it can)."""
    missing = [c for c in COMMANDS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]
    if missing:
        return (f"SLURM and munge are not installed ({', '.join(missing)} missing; "
                f"apt-get install slurm-wlm munge procps)")
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "there is no munge user (apt-get install munge creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen] = []
        self.env: dict[str, str] = {}

    def start(self, timeout_s: float = 60) -> LocalSlurm:
        base = self.base
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)  # munged (not root) must reach its folder; it refuses a socket folder others can write
        munge = base / "munge"
        munge.mkdir(mode=0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        pw = pwd.getpwnam("munge")
        for p in (munge, key):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        sock = munge / "munge.socket"
        self._spawn([_binary("munged"), "-F", f"--key-file={key}", f"--socket={sock}",
                     f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                     f"--log-file={munge / 'munged.log'}"], munge / "munged.out", user=pw.pw_uid, group=pw.pw_gid)
        self._wait(lambda: sock.exists(), timeout_s, "munged", munge / "munged.out")
        s = base / "slurm"
        for d in ("state", "spool", "log"):
            (s / d).mkdir(parents=True)
        conf = s / "slurm.conf"
        conf.write_text("\n".join([
            "ClusterName=dyntest", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock},cred_expire=5",
            f"StateSaveLocation={s / 'state'}", f"SlurmdSpoolDir={s / 'spool'}",
            f"SlurmctldPidFile={s / 'slurmctld.pid'}", f"SlurmdPidFile={s / 'slurmd.pid'}",
            f"SlurmctldLogFile={s / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={s / 'log' / 'slurmd.log'}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill", "MpiDefault=none",
            "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MinJobAge=600", "KillWait=30",
            "NodeName=localhost CPUs=2 RealMemory=2000 State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""]))
        self.env = {"SLURM_CONF": str(conf)}
        env = {**os.environ, **self.env}
        self._spawn([_binary("slurmctld"), "-D", "-f", str(conf)], s / "slurmctld.out", env=env)
        self._spawn([_binary("slurmd"), "-D", "-f", str(conf)], s / "slurmd.out", env=env)

        def idle() -> bool:
            res = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=env, capture_output=True, text=True)
            return res.returncode == 0 and res.stdout.strip() == "idle"

        self._wait(idle, timeout_s, "slurmd", s / "slurmd.out")
        return self

    def _spawn(self, cmd: list[str], log: Path, **kw) -> None:
        with open(log, "w") as f:
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.base, **kw))

    def _wait(self, ready, timeout_s: float, what: str, log: Path) -> None:
        t0 = time.monotonic()
        while not ready():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() - t0 > timeout_s:
                self.stop()
                raise RuntimeError(f"{what} did not come up: {log.read_text(errors='ignore')[-2000:]}")
            time.sleep(0.2)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM command against this cluster."""
        res = subprocess.run(list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {res.stderr}")
        return res

    def queue(self) -> list[str]:
        """Every queued or running task, as JOB_INDEX (or JOB) STATE REASON."""
        return self.run("squeue", "--noheader", "--array", "--format=%i %T %r").stdout.split("\n")[:-1]

    def stop(self) -> None:
        """Cancel what is still queued (its slurmstepd processes end with it), then SIGTERM to slurmd,
        slurmctld and munged, each by its pid; SIGKILL after 30 s."""
        if self.procs and all(p.poll() is None for p in self.procs):
            try:
                self.run("scancel", f"--user={os.getuid()}", check=False)
                t0 = time.monotonic()
                while self.queue() and time.monotonic() - t0 < 60:
                    time.sleep(0.5)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []
