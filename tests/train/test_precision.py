"""bf16 is applied in one place (DeepSpeed's bf16 section): the training forward, the
reconstruction forward and validation reach the matmuls with the same dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vmaescale.config import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
MATMUL_OPS = ("mm", "addmm", "bmm", "convolution", "scaled_dot_product", "layer_norm", "linear")


class MatmulDtypes(TorchDispatchMode):
    """The set of (op family, input dtypes) of every matmul-like aten op run inside `model`'s
    forward (not the metrics around it)."""

    def __init__(self, model):
        super().__init__()
        self.seen: set[tuple[str, tuple]] = set()
        self.inside = False
        self.hooks = [model.register_forward_pre_hook(lambda *_: setattr(self, "inside", True)),
                      model.register_forward_hook(lambda *_: setattr(self, "inside", False))]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        family = next((f for f in MATMUL_OPS if f in name and "backward" not in name), None)
        if family is not None and self.inside:
            dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
            self.seen.add((family, dtypes))
        return func(*args, **(kwargs or {}))


def run_config(out: Path, *overrides: str):
    return load_config(REPO / "configs" / "tiny.json", [
        "data.backend=synthetic", "model.size=nano", "data.num_frames=4", "data.image_size=32",
        "train.videos_per_gpu=1", "train.max_steps=2", "train.precision=bf16", "train.zero_stage=1",
        "tracking.enabled=false", f"output_dir={out}", *overrides])


def recorded(model, fn) -> set:
    with MatmulDtypes(model) as mode:
        fn()
    for hook in mode.hooks:
        hook.remove()
    return mode.seen


@pytest.mark.usefixtures("single_rank")
def test_pretraining_and_reconstruction_forwards_compute_in_the_same_precision(tmp_path):
    from vmaescale.train.trainer import Trainer

    run = Trainer(run_config(tmp_path / "run"))
    task, batch = run.task, next(iter(run.loader))
    training = recorded(run.engine.module, lambda: task.loss(run.engine, batch, run.run_state))
    assert {dtypes for _, dtypes in training} >= {("torch.bfloat16", "torch.bfloat16")}
    assert recorded(run.engine.module, lambda: task.evaluate(step=1)) == training  # the reconstruction forward


@pytest.mark.usefixtures("single_rank")
def test_finetuning_and_validation_forwards_compute_in_the_same_precision(tmp_path):
    from vmaescale.train.trainer import Trainer

    run = Trainer(run_config(tmp_path / "run", "task=finetune", "finetune.num_classes=5",
                             "finetune.mixup=0", "finetune.cutmix=0"))
    batch = next(iter(run.loader))
    training = recorded(run.engine.module, lambda: run.task.loss(run.engine, batch, run.run_state))
    assert any("torch.bfloat16" in dtypes for _, dtypes in training)
    assert recorded(run.engine.module, lambda: run.task.validate("val")) == training
