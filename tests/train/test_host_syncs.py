"""vmaescale's loop makes at most one host sync per optimizer step, and the stop flag and
the non-finite counters ride on it (real DeepSpeed, 1 rank on gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_syncs import HostSyncs
from vmaescale.config import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def nano_run(out: Path, *overrides: str):
    from vmaescale.train.trainer import Trainer

    return Trainer(load_config(REPO / "configs" / "tiny.json", [
        "data.backend=synthetic", "model.size=nano", "data.num_frames=4", "data.image_size=32",
        "train.videos_per_gpu=1", "train.max_steps=12", "train.log_every=6", "train.check_every=3",
        "train.checkpoint_every=100", "train.recon_every=0", "train.zero_stage=1",
        "tracking.enabled=false", f"output_dir={out}", *overrides]))


def syncs_per_step(run, monkeypatch) -> dict[int, dict[str, int]]:
    """vmaescale's host reads and collectives during each optimizer step of run.train(),
    outside evaluation and checkpointing (not steady state)."""
    counter, per_step = HostSyncs(monkeypatch), {}
    after_step = run.task.after_optimizer_step

    def add_to_step() -> None:
        step = per_step.setdefault(run.run_state["step"], {})
        for kind, n in counter.take().items():
            step[kind] = step.get(kind, 0) + n

    def step_done(engine):  # the step's micro batches (the step counter moves next)
        after_step(engine)
        run.run_state["step"] += 1
        add_to_step()
        run.run_state["step"] -= 1

    def checked(inner):  # the check that follows a step
        def call(*args, **kwargs):
            result = inner(*args, **kwargs)
            add_to_step()
            return result
        return call

    def paused(inner):
        def call(*args, **kwargs):
            counter.paused = True
            try:
                return inner(*args, **kwargs)
            finally:
                counter.paused = False
        return call

    monkeypatch.setattr(run.task, "after_optimizer_step", step_done)
    monkeypatch.setattr(run, "_check", checked(run._check))
    for name in ("save", "evaluate", "write_final", "write_best"):
        monkeypatch.setattr(run, name, paused(getattr(run, name)))
    with counter:
        run.train()
    return per_step


@pytest.mark.usefixtures("single_rank")
def test_the_loop_syncs_once_at_check_and_log_steps_and_never_between(tmp_path, monkeypatch):
    run = nano_run(tmp_path / "run")
    per_step = syncs_per_step(run, monkeypatch)
    assert sorted(per_step) == list(range(1, 13))
    one_sync = {"collective": 1, "host_read": 1}
    for step, seen in per_step.items():
        if step % 3 == 0:  # check_every=3; the log steps 6 and 12 are check steps too
            assert seen == one_sync, (step, seen)
        else:
            assert seen == {}, (step, seen)


@pytest.mark.usefixtures("single_rank")
def test_a_stop_signal_is_acted_on_at_the_next_check(tmp_path, monkeypatch):
    run = nano_run(tmp_path / "run", "train.check_every=4")
    after_step = run.task.after_optimizer_step

    def signal_at_step_5(engine):
        after_step(engine)
        if run.run_state["step"] == 4:  # step 5 is being finished (the counter moves next)
            run.stop.raised = True

    monkeypatch.setattr(run.task, "after_optimizer_step", signal_at_step_5)
    summary = run.train()
    assert summary["status"] == "preempted"
    assert summary["step"] == 6  # the log point at step 6 is the next check
    assert summary["checkpoint"].endswith("step_00000006")
