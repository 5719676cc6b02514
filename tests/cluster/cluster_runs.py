"""The tiny pretraining the cluster tests launch (nano model, synthetic clips, 2 CPU ranks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "launch" / "pretrain.py"
TINY = REPO / "configs" / "tiny.json"


def overrides(out: Path, *extra: str) -> list[str]:
    """`--set` arguments of a few-second nano run writing to `out` (MLflow next to it)."""
    sets = ["data.backend=synthetic", "train.steps_per_epoch=50", "train.max_steps=6",
            "train.warmup_steps=2", "train.log_every=1", "train.checkpoint_every=3",
            "train.videos_per_gpu=2", "train.recon_every=0", "data.num_frames=4",
            "data.image_size=32", "model.size=nano", "train.zero_stage=2",
            "tracking.system_metrics=false",
            f"tracking.tracking_uri=sqlite:///{out.parent / 'mlflow.db'}", f"output_dir={out}", *extra]
    return [a for s in sets for a in ("--set", s)]


def cpu_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # scripts' `python`: this one
    return {**env, "PATH": path, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(out: Path, world: int, *extra: str) -> list[subprocess.Popen]:
    """`world` plain processes with RANK / WORLD_SIZE / MASTER_* set, as deepspeed's launcher
    or srun with exported variables would start them (no agent that kills the others)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(PRETRAIN), "--config", str(TINY),
                                       *overrides(out, *extra)], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def latest_step(out: Path) -> int:
    latest = out / "checkpoints" / "latest"
    return int(latest.read_text().split("_")[1]) if latest.is_file() else 0


def wait_for_checkpoint(out: Path, step: int, procs: list[subprocess.Popen], timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while latest_step(out) < step:
        assert all(p.poll() is None for p in procs), "a rank ended before the checkpoint"
        assert time.time() < deadline, f"no checkpoint at step {step} after {timeout_s} s"
        time.sleep(0.2)


def step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
