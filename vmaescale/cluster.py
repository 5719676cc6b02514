"""Where this process sits in a distributed run, whichever launcher started it, and how it ends.

    deepspeed / torchrun / accelerate --multi_gpu   set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*
    srun, one task per GPU                          only SLURM_*: derived here
    srun torchrun, one task per node                torchrun sets them (SLURM_* is ignored)
    python launch/pretrain.py                       one rank, MASTER_PORT a free port

`launch_env(environ)` returns the five variables a process group needs, derived from what the
launcher set; nothing is derived for a variable the launcher set itself. Under Slurm
MASTER_ADDR is the first host of the step's node list and MASTER_PORT is a function of the job
id (`slurm_master_port`), so every task of a job, and the same job requeued, agree on it
without talking; the batch scripts (launch/slurm/) ask this module for the same values.

Exit codes: `EXIT_REQUEUE` (75, sysexits' EX_TEMPFAIL) means "checkpointed after a stop
request or the time budget: run the same command again to resume"; the batch scripts requeue
on it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping

EXIT_REQUEUE = 75
SLURM_PORT_BASE = 10000  # ports 10000-29999: below Linux's ephemeral range (32768-60999)
SLURM_PORT_SPAN = 20000
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnv:
    """The process-group variables of this process and the launcher they were read from."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "launcher" (torchrun, deepspeed, accelerate), "slurm" or "single"

    def variables(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank),
                "WORLD_SIZE": str(self.world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (for a one-node standalone run)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def slurm_master_port(job_id: str | int) -> int:
    """The rendezvous port of a Slurm job: 10000 + job id mod 20000 (the requeued job keeps it)."""
    try:
        return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN
    except ValueError:
        raise ValueError(f"SLURM_JOB_ID: {job_id!r} is not a number; expected Slurm's integer job id") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm host list: 'gpu[003-010,012],cpu1' -> 'gpu003'."""
    entry = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())  # up to the first top-level comma
    if entry is None or "[" in re.sub(r"\[[^\]]*\]", "", entry.group(0)):
        raise ValueError(f"SLURM_JOB_NODELIST: {nodelist!r} is not a Slurm host list "
                         f"(expected e.g. 'node01' or 'node[01-08]')")
    return re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", entry.group(0))


def in_slurm_step(environ: Mapping[str, str]) -> bool:
    """True inside a task of an srun step (not the batch shell, which has no step id)."""
    return "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ)


def launch_env(environ: Mapping[str, str], pick_port: Callable[[], int] = free_port) -> LaunchEnv:
    """The process-group variables, from the launcher if it set RANK, else Slurm, else 1 rank."""
    if "RANK" in environ:
        return _from_launcher(environ, pick_port)
    if in_slurm_step(environ):
        return _from_slurm(environ)
    return LaunchEnv(0, 0, 1, environ.get("MASTER_ADDR", "127.0.0.1"),
                     int(environ.get("MASTER_PORT") or pick_port()), "single")


def _from_launcher(environ: Mapping[str, str], pick_port: Callable[[], int]) -> LaunchEnv:
    world = int(environ.get("WORLD_SIZE", 1))
    port = environ.get("MASTER_PORT")
    if not port and world > 1:
        raise ValueError("MASTER_PORT: not set, but WORLD_SIZE is "
                         f"{world}; the launcher must set MASTER_ADDR and MASTER_PORT for a "
                         "multi-process run (torchrun, deepspeed and accelerate do)")
    return LaunchEnv(int(environ["RANK"]), int(environ.get("LOCAL_RANK", 0)), world,
                     environ.get("MASTER_ADDR", "127.0.0.1"), int(port or pick_port()), "launcher")


def _from_slurm(environ: Mapping[str, str]) -> LaunchEnv:
    world = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS", "1")
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    addr = environ.get("MASTER_ADDR") or first_slurm_host(nodes)
    port = environ.get("MASTER_PORT") or slurm_master_port(environ.get("SLURM_JOB_ID", "0"))
    return LaunchEnv(int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", 0)),
                     int(world), addr, int(port), "slurm")


def apply_launch_env(environ=os.environ) -> LaunchEnv:
    """Derive the process-group variables and write them into `environ` (os.environ)."""
    env = launch_env(environ)
    environ.update(env.variables())
    return env


def single_process_accelerate_note(environ: Mapping[str, str], gpu_count: int) -> str | None:
    """The warning for `accelerate launch` without --multi_gpu on a machine without GPUs.

    accelerate then starts one plain process (ACCELERATE_* set, no RANK); training goes on
    with one rank, which is rarely what was meant."""
    from_accelerate = any(key.startswith("ACCELERATE_") for key in environ)
    if not from_accelerate or "RANK" in environ or gpu_count > 0:
        return None
    return ("note: `accelerate launch` started a single process (it does so without --multi_gpu "
            "on a machine without GPUs): training on 1 rank; for N ranks run `accelerate launch "
            "--multi_gpu --num_processes N ...`, `torchrun --nproc_per_node N ...` or "
            "`deepspeed --num_gpus N ...`")


# ---------------------------------------------------------------- the time budget


def parse_slurm_time(text: str) -> float | None:
    """Seconds since the epoch of squeue's %e ('2026-12-02T05:00:00', local time), or None."""
    text = text.strip()
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", text):
        return None  # 'N/A', 'Unknown', 'NONE': no end time
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def slurm_job_end_time(environ: Mapping[str, str]) -> float | None:
    """The Slurm job's end time (SLURM_JOB_END_TIME, else `squeue -h -j ID -o %e`), or None."""
    if environ.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(environ["SLURM_JOB_END_TIME"])
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_slurm_time(out)


def stop_deadline(time_limit_s: float, end_margin_s: float, started: float,
                  environ: Mapping[str, str], job_end: Callable = slurm_job_end_time) -> float | None:
    """When this launch should checkpoint and exit for requeue (seconds since the epoch), or None.

    `time_limit_s` > 0: that long after `started`. `end_margin_s` > 0 under Slurm: that long
    before the job's end time. The earlier of the two wins."""
    deadlines = []
    if time_limit_s > 0:
        deadlines.append(started + time_limit_s)
    if end_margin_s > 0 and "SLURM_JOB_ID" in environ:
        end = job_end(environ)
        if end is not None:
            deadlines.append(end - end_margin_s)
    return min(deadlines) if deadlines else None


# ---------------------------------------------------------------- a dead or hung rank

PEER_KEY = "vmaescale/peer/{rank}"
ANSWER_KEY = "vmaescale/answer/{rank}"
COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|ProcessGroup|Connection (reset|closed)|Timed out|"
                                r"timed out|Broken pipe|DistBackendError", re.IGNORECASE)


class Peers:
    """Every rank's host and pid, published in the process group's store when it starts, so
    that a survivor of a failed collective can say which rank died or hangs."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world_size, timeout_s
        self.host = socket.gethostname()
        store.set(PEER_KEY.format(rank=rank), f"{self.host} {os.getpid()}")

    def who(self, rank: int) -> tuple[str, int]:
        host, pid = self.store.get(PEER_KEY.format(rank=rank)).decode().split()
        return host, int(pid)

    def describe_failure(self, err: BaseException, answer_wait_s: float = 10.0) -> str:
        """One line: this rank, the ranks that did not answer after the failure, what to do."""
        head = f"rank {self.rank} (host {self.host}): a collective failed ({_first_line(err)})"
        try:
            silent = self._silent_ranks(answer_wait_s)
        except Exception as store_err:  # the store lives with rank 0 (or its agent): gone too
            return (f"{head}; the rendezvous store at {os.environ.get('MASTER_ADDR')}:"
                    f"{os.environ.get('MASTER_PORT')} does not answer either ({_first_line(store_err)}): "
                    f"rank 0 or its host is gone; {RELAUNCH_HINT}")
        if not silent:
            return f"{head}; every rank still answers; {RELAUNCH_HINT}"
        return f"{head}; {'; '.join(self._describe(r) for r in silent)}; {RELAUNCH_HINT}"

    def _silent_ranks(self, wait_s: float) -> list[int]:
        """Ranks that do not answer within `wait_s` (every survivor answers for itself)."""
        self.store.set(ANSWER_KEY.format(rank=self.rank), "1")
        deadline = time.time() + wait_s
        others = [r for r in range(self.world) if r != self.rank]
        while True:
            silent = [r for r in others if not self.store.check([ANSWER_KEY.format(rank=r)])]
            if not silent or time.time() > deadline:
                return silent
            time.sleep(0.2)

    def _describe(self, rank: int) -> str:
        host, pid = self.who(rank)
        if host != self.host:
            return f"rank {rank} (host {host}, pid {pid}) does not answer: it died, hangs or its host is unreachable"
        state = process_state(pid)
        if state in ("gone", "zombie"):
            return f"rank {rank} (host {host}, pid {pid}) died"
        return (f"rank {rank} (host {host}, pid {pid}) is {state} but did not answer within "
                f"train.dist_timeout_s={self.timeout_s:g}: it hangs")


RELAUNCH_HINT = "run the same command again to resume from the last complete checkpoint"


def process_state(pid: int) -> str:
    """'gone', 'zombie', 'stopped', 'running' or 'sleeping' for a pid on this host."""
    import psutil

    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"
    return {"zombie": "zombie", "dead": "gone", "stopped": "stopped"}.get(status, status)


def is_collective_failure(err: BaseException) -> bool:
    """True for an error a failed collective raises (gloo / NCCL), not for a bug in our code."""
    import torch.distributed as dist

    return isinstance(err, getattr(dist, "DistError", ())) or (
        isinstance(err, RuntimeError) and bool(COLLECTIVE_FAILURE.search(str(err))))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


# ---------------------------------------------------------------- telling the batch script


def write_status_file(status: str, exit_code: int, environ: Mapping[str, str] = os.environ) -> None:
    """Write 'STATUS EXIT_CODE' to $VMAESCALE_STATUS_FILE when it is set.

    torchrun turns a worker's exit code into its own 1, so the batch scripts read the run's
    status from this file in the torchrun form (launch/slurm/*.sbatch set it)."""
    path = environ.get("VMAESCALE_STATUS_FILE")
    if path:
        with open(path, "w") as f:
            f.write(f"{status} {exit_code}\n")


def _print_shell_exports(environ: Mapping[str, str]) -> int:
    """`python -m vmaescale.cluster` in a batch script: MASTER_ADDR / MASTER_PORT as shell exports."""
    if "SLURM_JOB_ID" not in environ:
        print("vmaescale.cluster: error: SLURM_JOB_ID is not set; run this inside a Slurm job",
              file=sys.stderr)
        return 2
    addr = environ.get("MASTER_ADDR") or first_slurm_host(environ.get("SLURM_JOB_NODELIST", ""))
    port = environ.get("MASTER_PORT") or slurm_master_port(environ["SLURM_JOB_ID"])
    print(f"export MASTER_ADDR={addr} MASTER_PORT={port}")
    return 0


if __name__ == "__main__":
    sys.exit(_print_shell_exports(os.environ))
