"""Running a launcher under torchrun from a test, and reading what the run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def torchrun(script: str, config: str, overrides: list[str], nproc: int = 2,
             check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N launch/<script> --config configs/<config> --set ...`."""
    args = [a for s in overrides for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "launch" / script), "--config", str(REPO / "configs" / config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(out) if "loss" in r}
