"""launch/torchrun.sh outside Slurm: SIGTERM to the script makes every rank checkpoint, and the
script exits 75 ("checkpointed, requeue me") although torchrun itself reports 1."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from cluster_runs import PRETRAIN, REPO, TINY, cpu_env, latest_step, overrides, step_losses

pytestmark = pytest.mark.slow


def test_sigterm_to_torchrun_sh_checkpoints_and_exits_75(tmp_path):
    out = tmp_path / "run"
    script = subprocess.Popen(["bash", str(REPO / "launch" / "torchrun.sh"), str(PRETRAIN), "--config", str(TINY),
                               *overrides(out, "train.max_steps=400", "train.checkpoint_every=1000")],
                              cwd=REPO, env=cpu_env(NPROC_PER_NODE="2"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or not step_losses(out):
        assert script.poll() is None and time.time() < deadline, script.stdout.read()[-3000:]
        time.sleep(0.3)
    script.send_signal(signal.SIGTERM)
    stdout, _ = script.communicate(timeout=300)
    assert script.returncode == 75, stdout[-3000:]
    assert "stopped by signal SIGTERM after checkpointing (exit status 75)" in stdout
    step = latest_step(out)
    assert 0 < step < 400 and (out / "checkpoints" / f"step_{step:08d}" / "complete.json").is_file()
