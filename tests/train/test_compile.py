"""model.compile: nano pretraining through DeepSpeed's engine.compile() (inductor on CPU), 1 rank.

The first compile of the nano graphs costs about a minute of g++ per ZeRO stage on 2 cores;
inductor's on-disk cache (/tmp/torchinductor_$USER) makes later runs take seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vmaescale.config import load_config
from vmaescale.models.checkpoint import load_model_dir

pytestmark = pytest.mark.slow


def config(out: Path, *overrides: str):
    """A 4-step nano run on in-memory clips; every field it relies on is set here."""
    return load_config(None, [
        "data.backend=synthetic", "model.size=nano", "model.decoder_depth=2", "data.num_frames=4",
        "data.image_size=32", "data.num_sample=2", "train.videos_per_gpu=1",
        "train.steps_per_epoch=50", "train.max_steps=4", "train.warmup_steps=2",
        "optim.base_lr=0.03", "train.log_every=1", "train.checkpoint_every=2",
        "train.recon_every=0", "tracking.enabled=false",
        f"output_dir={out}", *overrides])


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def graphs_after_each_micro_step(run) -> list[int]:
    """Record dynamo's count of compiled graphs after every forward_backward of `run`."""
    from torch._dynamo.utils import counters

    seen, inner = [counters["stats"]["unique_graphs"]], run.forward_backward

    def counted(batch):
        loss = inner(batch)
        seen.append(counters["stats"]["unique_graphs"])
        return loss

    run.forward_backward = counted
    return seen


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("stage", [1, 3])
def test_compiled_run_matches_eager_resumes_and_exports_plain_keys(tmp_path, stage):
    from vmaescale.train.trainer import Trainer

    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    zero = f"train.zero_stage={stage}"  # 3: Attention reads qkv.weight without calling qkv
    first = Trainer(config(compiled, zero, "model.compile=true", "train.run_steps=3"))
    assert first.engine.is_compiled
    graphs = graphs_after_each_micro_step(first)
    assert first.train()["status"] == "paused"
    assert graphs[1] > graphs[0], "the first step compiled nothing"
    # ZeRO-3 recompiles PatchEmbed once: from step 2 on, prefetch has gathered proj.weight
    settled = 1 if stage == 1 else 2
    assert graphs[-1] == graphs[settled], f"compiled graphs after each step: {graphs}"

    second = Trainer(config(compiled, zero, "model.compile=true"))
    assert second.run_state["step"] == 3  # resumed from the step-3 checkpoint
    assert second.train()["status"] == "completed"
    assert Trainer(config(eager, zero)).train()["status"] == "completed"

    got, expected = losses(compiled), losses(eager)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:  # inductor may reorder fp32 sums: seen equal to ~1e-7 relative
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step

    keys = set(load_file(compiled / "final" / "model.safetensors"))
    assert not [k for k in keys if "_orig_mod" in k]
    model, reference = load_model_dir(compiled / "final"), load_model_dir(eager / "final")
    assert keys == set(reference.state_dict())
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert (compiled / "reconstructions" / "step_00000004.png").is_file()
