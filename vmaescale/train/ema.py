"""A weight EMA (timm ModelEmaV2): ema = decay * ema + (1 - decay) * weights, after each step.

Kept in fp32 beside the engine's module, on its device; it needs every parameter whole on
every rank, so ZeRO-3 runs refuse it (finetune.model_ema needs train.zero_stage <= 2).
Buffers are copied, not averaged (the models' buffers are fixed position tables).
"""

from __future__ import annotations

import torch
from torch import nn


class WeightEma:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[name].mul_(self.decay).add_(value.detach().float(), alpha=1.0 - self.decay)
            else:
                self.shadow[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])

    @torch.no_grad()
    def swap_into(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Load the EMA weights into `model`; returns its own weights to restore later."""
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(saved[k].dtype) for k, v in self.shadow.items()})
        return saved
