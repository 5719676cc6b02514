"""The wall-clock budget: train.time_limit_s makes a launch checkpoint and exit 75 for requeue,
and the next launch resumes from there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster_runs import PRETRAIN, REPO, TINY, cpu_env, latest_step, overrides

pytestmark = pytest.mark.slow


def launch(out, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PRETRAIN), "--config", str(TINY),
                           *overrides(out, "train.max_steps=100000", "train.checkpoint_every=100000", *extra)],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)


def test_time_budget_checkpoints_and_exits_for_requeue(tmp_path):
    out = tmp_path / "run"
    first = launch(out, "train.time_limit_s=20")
    assert first.returncode == 75, first.stdout[-2000:] + first.stderr[-2000:]
    assert "stopped by time budget (train.time_limit_s / train.end_margin_s) after checkpointing" in first.stdout
    step = latest_step(out)
    assert 0 < step < 100000
    again = launch(out, "train.run_steps=1")  # a harmless change: the budget is off now
    assert again.returncode == 0 and f"at step {step}" in again.stdout, again.stdout[-2000:]
    assert latest_step(out) == step + 1
