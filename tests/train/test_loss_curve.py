"""Loss-curve regression: the tiny pretraining run's per-step losses, 1 and 2 ranks.

The baseline file was written by the pretraining loop before it became the shared trainer
(`VMAESCALE_WRITE_BASELINE=1 pytest tests/train/test_loss_curve.py` rewrites it; do that
only for a change that is meant to alter the numbers, and say why in the commit).
Every later change to the trainer, the tasks, the model or the optimizer must reproduce
these losses to 1e-6 relative.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_distributed import losses, run  # noqa: E402  (tests/train is on sys.path)

pytestmark = pytest.mark.slow
BASELINE = Path(__file__).parent / "baselines" / "pretrain_tiny_losses.json"
RUN = ("model.size=tiny", "data.num_frames=8", "data.image_size=64", "train.max_steps=8",
       "train.warmup_steps=3", "train.checkpoint_every=100", "train.zero_stage=2")


@pytest.mark.parametrize("nproc", [1, 2])
def test_pretraining_losses_match_the_stored_baseline(tmp_path, nproc):
    out = tmp_path / f"ranks{nproc}"
    run(out, nproc, *RUN)
    got = losses(out)
    stored = json.loads(BASELINE.read_text()) if BASELINE.is_file() else {}
    if os.environ.get("VMAESCALE_WRITE_BASELINE") == "1":
        stored[str(nproc)] = {str(k): v for k, v in sorted(got.items())}
        BASELINE.write_text(json.dumps(stored, indent=2) + "\n")
    expected = {int(k): v for k, v in stored[str(nproc)].items()}
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6), f"step {step}"
