"""A one-node Slurm cluster on localhost in a temporary directory: its own munge key and socket,
its own slurm.conf and ports, slurmctld + slurmd as root. Stops every daemon it started."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")

CRED_EXPIRE_S = 10  # Slurm's floor is a few seconds; a requeued job waits this long


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_reason() -> str | None:
    """Why a local cluster cannot start here, or None."""
    absent = [d for d in (*DAEMONS, "sbatch", "scontrol", "squeue") if shutil.which(d) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install slurm-wlm munge; .ci/run does it)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs as another user; this is not root"
    return None


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge.sock"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client command (sbatch, squeue, ...) of this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**env, "SLURM_CONF": str(self.conf)}

    def start(self) -> "LocalSlurm":
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.host, "-f", str(self.conf)])
        self._wait_until_idle()
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait_for(lambda: self.munge_socket.exists(), "munged socket")

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=vmaescale-test", f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire: how long revoked credentials (and so a requeued job's hold) last;
            # the default 120 s would idle the requeue test for two minutes
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "MpiDefault=none",
            "SchedulerType=sched/backfill", "ReturnToService=2", "SlurmdTimeout=60",
            "KillWait=30", "MinJobAge=600", "JobRequeue=1", "SwitchType=switch/none",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP "
            f"OverSubscribe=YES",
            ""]))

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def _wait_for(self, ready, what: str, timeout_s: float = 60) -> None:
        deadline = time.time() + timeout_s
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"local Slurm: {what} not ready ({'exited: ' + ', '.join(dead) if dead else 'timed out'}); "
                                   f"logs: {self.logs()}")
            time.sleep(0.3)

    def _wait_until_idle(self) -> None:
        self._wait_for(lambda: self.node_state() in ("idle", "mixed", "allocated"), "node")

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")
        return done

    def job_field(self, job_id: str, field: str) -> str:
        """A field of `scontrol show job` (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for token in out.split():
            if token.startswith(field + "="):
                return token.split("=", 1)[1]
        return ""

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").iterdir()):
            text = path.read_text(errors="replace").strip().splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop every daemon this cluster started (jobs first, so slurmd leaves no step behind)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False)
            time.sleep(1)
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
