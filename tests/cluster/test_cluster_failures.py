"""A dead or hung rank: the survivor leaves within train.dist_timeout_s, naming it; the
relaunch resumes. Two plain processes (no torchrun agent that would kill the survivor for us)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from cluster_runs import PRETRAIN, REPO, TINY, cpu_env, latest_step, overrides, start_ranks, wait_for_checkpoint

pytestmark = pytest.mark.slow
HOST = socket.gethostname()


def kill_one_rank(out, sig) -> tuple[list, str]:
    """Two ranks to their step-2 checkpoint, then `sig` to rank 1; rank 0's stderr once it exits."""
    procs = start_ranks(out, 2, "train.max_steps=400", "train.checkpoint_every=2",
                        "train.dist_timeout_s=15")
    try:
        wait_for_checkpoint(out, 2, procs)
        procs[1].send_signal(sig)
        _, stderr = procs[0].communicate(timeout=240)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, stderr[-3000:]
    line = [x for x in stderr.splitlines() if x.startswith("launch/pretrain.py: error: rank 0")]
    assert line, stderr[-3000:]
    return procs, line[0]


def test_killed_rank_is_named_by_the_survivor_and_the_relaunch_resumes(tmp_path):
    out = tmp_path / "run"
    procs, line = kill_one_rank(out, signal.SIGKILL)
    assert f"rank 1 (host {HOST}, pid {procs[1].pid}) died" in line, line
    assert "run the same command again" in line
    step = latest_step(out)
    again = subprocess.run([sys.executable, str(PRETRAIN), "--config", str(TINY),
                            *overrides(out, "train.max_steps=400", "train.checkpoint_every=2",
                                       "train.run_steps=1")],
                           cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"at step {step}" in again.stdout  # one rank now: resumed through Universal Checkpointing
    assert latest_step(out) == step + 1


def test_hung_rank_is_named_after_the_process_group_timeout(tmp_path):
    procs, line = kill_one_rank(tmp_path / "run", signal.SIGSTOP)
    assert f"rank 1 (host {HOST}, pid {procs[1].pid}) is stopped" in line, line
    assert "train.dist_timeout_s=15: it hangs" in line
