"""AdamW parameter groups (no-decay, layer-wise lr decay) and the per-step lr schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256


def skips_weight_decay(model: nn.Module, name: str, param: torch.Tensor) -> bool:
    """1-D params (norms, q/v biases), biases and the model's no-decay names get no decay."""
    return (param.ndim == 1 or name.endswith(".bias")
            or name.split(".")[-1] in model.no_weight_decay_names)


def layer_scale(layer_decay: float, layer: int, num_layers: int) -> float:
    """The official layer-wise lr scale: decay^(L + 1 - layer)."""
    return layer_decay ** (num_layers + 1 - layer)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups keyed by (decay, layer); each carries `lr_scale` = decay^(L + 1 - layer).

    The model says which layer each parameter is in and which names skip weight decay
    (`vmaescale.models.vit.OptimizerInterface`); this function names no parameter.
    """
    num_layers = model.optimizer_num_layers
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not skips_weight_decay(model, name, param)
        layer = model.optimizer_layer_id(name) if layer_decay != 1.0 else 0
        scale = layer_scale(layer_decay, layer, num_layers) if layer_decay != 1.0 else 1.0
        group = groups.setdefault((decay, layer), {
            "params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale,
            "name": f"{'decay' if decay else 'no_decay'}_layer{layer}"})
        group["params"].append(param)
    return list(groups.values())


def warmup_cosine(step: int, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                  warmup_lr: float = 0.0) -> float:
    """Linear warmup from warmup_lr to peak_lr, then per-step cosine down to min_lr."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / max(1, warmup_steps - 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets every group's lr to warmup_cosine(step) * lr_scale; DeepSpeed steps it per update."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, min_lr: float,
                 warmup_steps: int, total_steps: int, warmup_lr: float = 0.0):
        self.optimizer = optimizer
        self.peak_lr, self.min_lr, self.warmup_lr = peak_lr, min_lr, warmup_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.last_step = 0
        self._apply()

    def lr(self) -> float:
        return warmup_cosine(self.last_step, self.peak_lr, self.min_lr, self.warmup_steps,
                             self.total_steps, self.warmup_lr)

    def _apply(self) -> None:
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state["last_step"]
        self._apply()
