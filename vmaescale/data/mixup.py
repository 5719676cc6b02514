"""Mixup / cutmix for video batches, and soft targets with label smoothing (timm's recipe).

    mixed, targets = MixupCutmix(...)(video, labels, rng)   # video [B, C, T, H, W]

Mode "batch", as the official VideoMAE V2 finetuning: one lambda for the whole batch;
sample i mixes with sample B-1-i (the batch flipped). Cutmix cuts one H x W box for every
frame of every clip. (The official code reshapes to [B, C*T, H, W] for timm's Mixup; a
plain 5-D tensor through timm's cutmix would slice T x H instead and mislabel silently.)
The cutmix lambda is corrected to the box's real area (timm correct_lam), so the soft
targets are exactly the mixed pixel fractions. Runs on the batch's device after the loader.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """[B] -> [B, K]: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over the batch of -sum_k target_k * log_softmax(logits)_k."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@dataclass(frozen=True)
class CutBox:
    """A cutmix box in pixels: rows y0:y1, columns x0:x1."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def area(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)


def cutmix_box(rng: np.random.Generator, height: int, width: int, lam: float) -> CutBox:
    """timm rand_bbox: a box of area ~(1 - lam) centred uniformly, clipped to the frame."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    return CutBox(int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height)),
                  int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width)))


class MixupCutmix:
    """One lambda per batch; mixup or (with switch_prob) cutmix, with probability `prob`."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, smoothing: float = 0.1):
        self.num_classes, self.smoothing = num_classes, smoothing
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def draw(self, rng: np.random.Generator) -> tuple[float, bool]:
        """(lambda, use_cutmix) for one batch; lambda 1 = no mixing."""
        if not self.enabled or rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), use_cutmix

    def __call__(self, video: torch.Tensor, labels: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, C, T, H, W], labels [B] -> mixed video, soft targets [B, K]."""
        lam, use_cutmix = self.draw(rng)
        if lam < 1.0 and video.shape[0] % 2:
            raise ValueError(f"mixup / cutmix needs an even batch, got {video.shape[0]} clips "
                             "(videos_per_gpu x num_sample)")
        if lam < 1.0 and use_cutmix:
            box = cutmix_box(rng, video.shape[-2], video.shape[-1], lam)
            video = video.clone()
            video[..., box.y0:box.y1, box.x0:box.x1] = video.flip(0)[..., box.y0:box.y1, box.x0:box.x1]
            lam = 1.0 - box.area / (video.shape[-2] * video.shape[-1])
        elif lam < 1.0:
            video = video * lam + video.flip(0) * (1.0 - lam)
        y1 = smoothed_one_hot(labels, self.num_classes, self.smoothing)
        return video, y1 * lam + y1.flip(0) * (1.0 - lam)
