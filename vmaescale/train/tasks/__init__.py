"""What a training stage adds to the one loop (`vmaescale.train.trainer.Trainer`).

A task builds its model and loader, turns a batch into a loss, reports its FLOPs per clip,
says what to evaluate and when, and what `final/` holds. It never owns the engine, the
checkpoints or the loop:

    build_model()                       -> nn.Module (single-device model code)
    setup(model, resuming)              after the model is on its device (resuming: the
                                        checkpoint, not an init source, gives the weights)
    train_loader(epoch, start_step)     the loader for one epoch, from micro step start_step
    loss(engine, batch, run_state)      one micro batch -> loss (forward through the engine)
    after_optimizer_step(engine)        e.g. the weight EMA
    train_flops_per_clip()              for MFU
    evaluation_due(step, steps_per_epoch), evaluate(step) -> EvalResult | None
    state_dict() / load_state_dict()    this rank's state for exact resume (e.g. mask RNG)
    shared_state() / load_shared_state(tag_dir)   state equal on every rank (the EMA)
    write_model_dir(state_dict, out, tag_dir)     final/ and best/
    after_training()                    after final/: e.g. the multi-view test of best/

Post-pretraining is the classification task with another config and an init.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vmaescale.config import RunConfig


@dataclass(frozen=True)
class RunContext:
    """Where a task runs: its config, rank, world size, device, precision, output dir.

    Precision is applied in one place, DeepSpeed's bf16 section (parameters held in bf16,
    fp32 master weights): training, validation and reconstruction forwards all run the
    module as it is, with no torch.autocast (DeepSpeed 0.19.8's engine.forward disables an
    outer autocast anyway, so one around a training forward would do nothing)."""

    cfg: RunConfig
    rank: int
    world: int
    device: torch.device
    precision: str
    out: Path


@dataclass
class EvalResult:
    """An evaluation's metrics (logged at the step), its score for best/ (None: no best/),
    and what the run summary shows."""

    metrics: dict[str, float]
    score: float | None = None
    score_name: str = ""
    summary: dict = field(default_factory=dict)


class Task:
    """Defaults for the optional hooks; see the module docstring."""

    def __init__(self, ctx: RunContext):
        self.ctx, self.cfg = ctx, ctx.cfg

    def setup(self, model, resuming: bool) -> None:
        self.model = model

    def attach_engine(self, engine) -> None:
        self.engine = engine

    def after_optimizer_step(self, engine) -> None:
        pass

    def prepare_evaluation(self, tracker) -> None:
        self.tracker = tracker

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def shared_state(self) -> dict[str, torch.Tensor] | None:
        return None

    def load_shared_state(self, tag_dir: Path) -> None:
        pass

    def after_training(self) -> dict:
        """Every rank, once final/ (and best/) are written: e.g. the classifier's multi-view
        test. Returns what the run summary adds."""
        return {}


def make_task(ctx: RunContext) -> Task:
    """The task object for `cfg.task`."""
    if ctx.cfg.task == "pretrain":
        from vmaescale.train.tasks.pretrain import PretrainTask
        return PretrainTask(ctx)
    from vmaescale.train.tasks.classify import ClassifyTask
    return ClassifyTask(ctx)
