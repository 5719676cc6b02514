"""A non-finite loss is skipped on every rank and stops the run after train.max_bad_steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vmaescale.config import load_config
from vmaescale.data.memory import InMemoryClips

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.usefixtures("single_rank")
def test_nan_batches_are_skipped_then_the_run_stops_with_a_clear_message(tmp_path):
    from vmaescale.train.pretrain import NonFiniteLossError, Pretraining

    cfg = load_config(REPO / "configs" / "tiny.json", [
        "data.backend=synthetic", "model.size=nano", "data.num_frames=4", "data.image_size=32",
        "train.videos_per_gpu=1", "train.max_steps=10", "train.max_bad_steps=3",
        "train.zero_stage=1", "tracking.enabled=false", f"output_dir={tmp_path / 'run'}"])
    run = Pretraining(cfg)
    before = [p.detach().clone() for p in run.engine.module.parameters()]
    poisoned = InMemoryClips(2, 4, 32, steps_per_epoch=100)
    for clip in poisoned.pool:
        clip[0, 0, 0, 0, 0] = float("nan")
    run.loader = poisoned
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        run.train()
    assert run.run_state["nonfinite_skipped"] == 3
    after = list(run.engine.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing trained on NaN
