"""Counting what reads device values on the host, and collectives, by the code that asks.

A TorchFunctionMode sees every `.item()`, `.tolist()`, `bool(t)`, `int(t)` and `float(t)`;
torch.distributed's collectives are wrapped to count and then run as they are. Each event
is attributed to the package of the Python frame that made the call (vmaescale, deepspeed,
torch, ...), so a test can pin vmaescale's own number per step.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__index__}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single")


def caller_package(depth: int) -> str:
    """The top-level package of the first frame at `depth` or above outside this file."""
    frame = sys._getframe(depth)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    return (frame.f_globals.get("__name__", "?") if frame else "?").split(".")[0]


class HostSyncs(TorchFunctionMode):
    """Counts host reads and collectives as (package, kind) while active; `paused` stops it."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.events: Counter = Counter()
        self.paused = False
        for name in COLLECTIVES:
            if hasattr(dist, name):
                monkeypatch.setattr(dist, name, self._counted(getattr(dist, name), name))

    def _counted(self, fn, name: str):
        def collective(*args, **kwargs):
            if not self.paused:
                self.events[(caller_package(2), "collective")] += 1
            return fn(*args, **kwargs)
        return collective

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS and not self.paused:
            self.events[(caller_package(2), "host_read")] += 1
        return func(*args, **(kwargs or {}))

    def take(self, package: str = "vmaescale") -> dict[str, int]:
        """This package's counts since the last take, by kind; clears all counts."""
        mine = {kind: n for (pkg, kind), n in self.events.items() if pkg == package}
        self.events.clear()
        return mine
