"""A non-finite loss skips its optimizer step on every rank and stops the run after
train.max_bad_steps in a row; the loop learns of it at its one check, not before backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vmaescale.config import load_config
from vmaescale.data.memory import InMemoryClips

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def nano_run(out: Path, *overrides: str):
    from vmaescale.train.trainer import Trainer

    return Trainer(load_config(REPO / "configs" / "tiny.json", [
        "data.backend=synthetic", "model.size=nano", "data.num_frames=4", "data.image_size=32",
        "train.videos_per_gpu=1", "train.max_steps=10", "train.max_bad_steps=3",
        "train.zero_stage=1", "tracking.enabled=false", f"output_dir={out}", *overrides]))


def poison_first_pixel(run, batches=range(4)) -> None:
    """The batches of the cycled pool of 4 get a NaN at pixel (0, 0, 0) of their first clip,
    i.e. in token 0."""
    poisoned = InMemoryClips(2, 4, 32, steps_per_epoch=100)
    for i in batches:
        poisoned.pool[i][0, 0, 0, 0, 0] = float("nan")
    run.loader = poisoned


class FixedMasks:
    """One mask pair for every batch; checkpoints still save the real generator's state."""

    def __init__(self, generator, mask, decoder_mask):
        self.generator, self.pair = generator, (mask, decoder_mask)

    def __call__(self, batch: int):
        return self.pair

    def state_dict(self) -> dict:
        return self.generator.state_dict()


def fix_token0(run, visible: bool) -> None:
    """Always use one mask pair in which token 0 of clip 0 is visible, or hidden and not decoded."""
    for _ in range(1000):
        mask, decoder_mask = run.task.masks(2)
        hidden_undecoded = bool(mask[0, 0]) and bool(decoder_mask[0, 0])
        if (not mask[0, 0]) if visible else hidden_undecoded:
            run.task.masks = FixedMasks(run.task.masks, mask, decoder_mask)
            return
    raise AssertionError("no such mask in 1000 draws")


@pytest.mark.usefixtures("single_rank")
def test_nan_batches_are_skipped_then_the_run_stops_with_a_clear_message(tmp_path):
    from vmaescale.train.trainer import NonFiniteLossError

    run = nano_run(tmp_path / "run")
    before = [p.detach().clone() for p in run.engine.module.parameters()]
    poison_first_pixel(run)
    fix_token0(run, visible=True)  # the encoder sees the NaN: the loss is NaN
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        run.train()
    assert run.run_state["nonfinite_skipped"] == 3
    after = list(run.engine.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing trained on NaN


@pytest.mark.usefixtures("single_rank")
def test_nan_gradients_under_a_finite_loss_are_skipped_then_stop_the_run(tmp_path):
    """A NaN pixel in a token neither encoded nor decoded leaves the loss finite, but the patch
    embedding's gradient is NaN (0 x NaN): DeepSpeed skips the step; repeated, the run stops."""
    from vmaescale.train.trainer import NonFiniteLossError

    run = nano_run(tmp_path / "run")
    before = [p.detach().clone() for p in run.engine.module.parameters()]
    poison_first_pixel(run)
    fix_token0(run, visible=False)
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps skipped by DeepSpeed"):
        run.train()
    assert run.run_state["nonfinite_skipped"] == 0 and run.engine.skipped_steps == 3
    after = list(run.engine.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.usefixtures("single_rank")
def test_a_non_finite_micro_batch_skips_its_optimizer_step_and_accumulation_stays_aligned(tmp_path):
    run = nano_run(tmp_path / "run", "train.grad_accum=2", "train.max_steps=4",
                   "train.checkpoint_every=100", "train.recon_every=0", "train.check_every=4")
    poison_first_pixel(run, batches=[1])  # micro batches 1 and 5 are NaN: steps 1 and 3
    fix_token0(run, visible=True)
    assert run.train()["status"] == "completed"
    assert run.run_state["nonfinite_skipped"] == 2  # both counted at the one check, step 4
    assert run.engine.skipped_steps == 2
    assert run.engine.global_steps == run.run_state["step"] == 4
    assert run.run_state["micro_step_in_epoch"] == 8  # no micro batch replaced: 4 x 2


@pytest.mark.usefixtures("single_rank")
def test_the_limit_stops_at_the_next_check_even_between_check_points(tmp_path):
    """Non-finite losses every step: the host sees DeepSpeed skip, so reaching the limit
    forces a check at once; the message names non-finite losses, not gradients."""
    from vmaescale.train.trainer import NonFiniteLossError

    run = nano_run(tmp_path / "run", "train.check_every=1000", "train.log_every=1000")
    poison_first_pixel(run)
    fix_token0(run, visible=True)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row at step 3"):
        run.train()
    assert run.run_state["step"] == 3
