"""The training loop's one host synchronisation: stop flag, non-finite losses, logged sums.

A check reads, in one all-reduce (SUM) and one host copy, what the loop must agree on across
ranks: whether any rank was asked to stop, how many losses were non-finite since the last
check, whether any rank has seen `max_bad_steps` non-finite losses in a row, and, at a log
point, the window's loss sum, loss count and bad-sample count. Between checks nothing is
read on the host: the counters live on the device.

Skip-and-stop without a sync before backward: a non-finite loss still goes through
backward; its gradients are non-finite, so DeepSpeed's overflow check (ZeRO 1-3, and bf16)
skips that optimizer step on every rank and nothing is trained on it. The optimizer step it
belonged to is skipped whole (with grad_accum > 1 its good micro batches go too), so the
accumulation boundary stays DeepSpeed's and ours. The run stops with NonFiniteLossError at
the first check after a rank's `max_bad_steps`-th non-finite loss in a row, or after
`max_bad_steps` optimizer steps in a row skipped by DeepSpeed (the host knows those without
a sync; reaching the limit forces a check to tell the two kinds apart).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    """Raised after `train.max_bad_steps` non-finite losses (or skipped steps) in a row."""


def too_many_in_a_row(kind: str, count: int, step: int, limit: int) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{count} {kind} in a row at step {step} (train.max_bad_steps={limit}); stopping. Check "
        "the data for NaN/Inf pixels, lower optim.base_lr or set optim.clip_grad, then resume "
        "from the last checkpoint.")


class StepChecks:
    """Device-side non-finite counters and the host-side run of skipped optimizer steps."""

    def __init__(self, device: torch.device, limit: int, every: int):
        self.device, self.limit, self.every = device, limit, every
        self.losses_bad = torch.zeros((), device=device)  # non-finite losses since the check
        self.run = torch.zeros((), device=device)  # this rank's non-finite losses in a row
        self.worst_run = torch.zeros((), device=device)  # the longest run since the check
        self.skip_run = 0  # optimizer steps in a row that DeepSpeed skipped (same on all ranks)
        self.worst_skip_run = 0

    def add_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Count a micro batch's loss on the device; returns its finite flag (float 0-d)."""
        finite = torch.isfinite(loss.detach()).float()
        self.losses_bad = self.losses_bad + (1 - finite)
        self.run = (self.run + 1) * (1 - finite)
        self.worst_run = torch.maximum(self.worst_run, self.run)
        return finite

    def add_step(self, skipped: bool) -> None:
        self.skip_run = self.skip_run + 1 if skipped else 0
        self.worst_skip_run = max(self.worst_skip_run, self.skip_run)

    def due(self, step: int) -> bool:
        """Every `every` steps, and as soon as skipped steps reach the limit."""
        return step % self.every == 0 or self.worst_skip_run >= self.limit

    def check(self, stop_raised: bool, step: int, extra: list[torch.Tensor] = ()) -> "CheckResult":
        """The one all-reduce. `extra`: 0-d tensors summed over ranks in the same call (a log
        point's window sums). At the limit the result carries the NonFiniteLossError to raise."""
        parts = [torch.tensor(float(stop_raised), device=self.device), self.losses_bad,
                 (self.worst_run >= self.limit).float(), *extra]
        values = torch.stack([p.to(self.device, torch.float64) for p in parts])
        dist.all_reduce(values)
        host = values.tolist()  # the one host sync
        self.losses_bad = torch.zeros((), device=self.device)
        self.worst_run = self.run.clone()
        worst_skip, self.worst_skip_run = self.worst_skip_run, self.skip_run
        error = None
        if host[2] > 0:
            error = too_many_in_a_row("non-finite losses", self.limit, step, self.limit)
        elif worst_skip >= self.limit:
            error = too_many_in_a_row("optimizer steps skipped by DeepSpeed (non-finite gradients)",
                                      worst_skip, step, self.limit)
        return CheckResult(stop=host[0] > 0, nonfinite=int(host[1]), extra=host[3:], error=error)


@dataclass(frozen=True)
class CheckResult:
    stop: bool  # some rank was asked to stop
    nonfinite: int  # non-finite losses since the last check, summed over ranks
    extra: list[float]  # the `extra` sums, in order
    error: NonFiniteLossError | None  # the run must stop: raise it
