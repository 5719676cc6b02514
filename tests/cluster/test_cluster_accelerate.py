"""`accelerate launch` (a habit of Hugging Face users) runs the training entry points unchanged."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_runs import PRETRAIN, REPO, TINY, cpu_env, overrides, step_losses

pytestmark = pytest.mark.slow
ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
COMMON = ["--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1"]


def accelerate(args: list[str], out) -> subprocess.CompletedProcess:
    cmd = [ACCELERATE, "launch", *COMMON, *args, str(PRETRAIN), "--config", str(TINY), *overrides(out)]
    done = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_accelerate_multi_gpu_gives_the_torchrun_losses(tmp_path):
    pytest.importorskip("accelerate")
    accelerate(["--multi_gpu", "--num_processes", "2"], tmp_path / "accelerate")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(PRETRAIN), "--config", str(TINY), *overrides(tmp_path / "torchrun")]
    done = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = step_losses(tmp_path / "accelerate"), step_losses(tmp_path / "torchrun")
    assert sorted(ours) == list(range(1, 7)) and ours == pytest.approx(theirs, rel=1e-6)


def test_a_plain_accelerate_launch_on_a_cpu_machine_says_it_started_one_process(tmp_path):
    pytest.importorskip("accelerate")
    done = accelerate(["--num_processes", "1"], tmp_path / "one")
    assert "`accelerate launch` started a single process" in done.stdout + done.stderr
    assert "world_size      1" in done.stdout
