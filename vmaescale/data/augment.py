"""Finetuning augmentation, drawn on the host per clip and applied to every frame alike.

The official VideoMAE V2 finetuning order per clip: RandAugment -> normalize -> random
resized crop -> flip -> random erasing. Every random choice is drawn here from the video's
generator (`transforms.video_rng(seed, epoch, video)`), so both loaders and a resumed run
see the same augmentation; the loaders only apply it:

- RandAugment (timm 'rand-m7-n4-mstd0.5-inc1'): n layers per clip, each picks one op
  uniformly and fires with p 0.5; the magnitude is m plus Gaussian noise (std mstd),
  clipped to [0, 10], and ops with a sign are negated with p 0.5. The DALI loader applies
  it with `nvidia.dali.auto_aug`'s RandAugment suite (increasing magnitudes, the `inc1`
  ops), op index, magnitude bin and sign fed from here; a layer that does not fire runs
  the identity. The suite has no Invert / SolarizeAdd (timm's increasing set has them).
- random resized crop: torchvision's RandomResizedCrop draw (10 tries, then a centre crop
  clamped to the ratio range), one box for all frames.
- flip: p 0.5, all frames.
- random erasing: timm RandomErasing(probability, mode='pixel', max_count=1) with one
  box for every frame of the clip and fresh N(0, 1) noise per pixel and frame, applied
  after normalization on the clip's device (`apply_erasing`). Done in torch for both
  loaders: DALI's fn.erase fills a constant only, and the recipe's pixel mode needs noise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

# nvidia.dali.auto_aug.rand_augment.get_rand_augment_suite() order; identity is last.
RAND_AUGMENT_OPS = ("translate_x", "translate_y", "shear_x", "shear_y", "rotate", "brightness",
                    "contrast", "color", "sharpness", "posterize", "solarize", "equalize",
                    "auto_contrast", "identity")
IDENTITY_OP = len(RAND_AUGMENT_OPS) - 1
MAGNITUDE_MAX = 10.0  # timm's _LEVEL_DENOM: magnitudes run 0..10
MAGNITUDE_BINS = 101  # DALI bins: bin = round(magnitude * 10), linspace over the op's range
RAND_AUGMENT_FIRE_PROB = 0.5
ERASE_AREA = (0.02, 1 / 3)
ERASE_MIN_ASPECT = 0.3
ERASE_TRIES = 10
RRC_TRIES = 10


@dataclass(frozen=True)
class RandAugmentSpec:
    magnitude: float  # m
    num_layers: int  # n
    magnitude_std: float  # mstd
    increasing: bool  # inc1

    @property
    def text(self) -> str:
        return (f"rand-m{self.magnitude:g}-n{self.num_layers}-mstd{self.magnitude_std:g}"
                f"-inc{int(self.increasing)}")


def parse_rand_augment(text: str) -> RandAugmentSpec:
    """'rand-m7-n4-mstd0.5-inc1' -> RandAugmentSpec; ValueError naming what is accepted."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError(f"{text!r}: accepted 'none' or 'rand-m<M>-n<N>[-mstd<S>][-inc1]'")
    fields = {"m": 9.0, "n": 2.0, "mstd": 0.0, "inc": 0.0}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|inc|m|n)(\d+(?:\.\d+)?)", part)
        if not match:
            raise ValueError(f"{text!r}: unknown part {part!r}; accepted m<M>, n<N>, mstd<S>, inc<0|1>")
        fields[match.group(1)] = float(match.group(2))
    if not 0 <= fields["m"] <= MAGNITUDE_MAX or fields["n"] < 1 or fields["n"] != int(fields["n"]):
        raise ValueError(f"{text!r}: m must be in [0, 10] and n a positive integer")
    if fields["inc"] != 1:
        raise ValueError(f"{text!r}: only the increasing-magnitude ops (inc1) are available "
                         "(DALI's monotonic RandAugment suite)")
    return RandAugmentSpec(fields["m"], int(fields["n"]), fields["mstd"], True)


@dataclass(frozen=True)
class EraseBox:
    """A random-erasing box in output pixels and the seed of its noise."""

    x: int
    y: int
    w: int
    h: int
    noise_seed: int


@dataclass(frozen=True)
class TrainAugment:
    """The train-mode augmentation of a run (from its DataConfig)."""

    crop: str = "multi_scale"  # or "random_resized"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    flip: bool = False
    rand_augment: RandAugmentSpec | None = None
    erase_prob: float = 0.0

    @classmethod
    def from_config(cls, data_cfg) -> "TrainAugment":
        ra = None if data_cfg.rand_augment == "none" else parse_rand_augment(data_cfg.rand_augment)
        return cls(data_cfg.train_crop, tuple(data_cfg.crop_scale), tuple(data_cfg.crop_ratio),
                   data_cfg.flip, ra, data_cfg.erase_prob)


def rand_augment_params(rng: np.random.Generator, spec: RandAugmentSpec) -> np.ndarray:
    """int32 [n, 3]: (op index, magnitude bin, sign) per layer; a layer that does not fire
    is the identity."""
    rows = []
    for _ in range(spec.num_layers):
        fires = rng.random() < RAND_AUGMENT_FIRE_PROB
        op = int(rng.integers(IDENTITY_OP))
        magnitude = spec.magnitude + (rng.normal(0.0, spec.magnitude_std) if spec.magnitude_std > 0 else 0.0)
        magnitude_bin = int(round(min(MAGNITUDE_MAX, max(0.0, magnitude)) * 10))
        sign = int(rng.integers(2))
        rows.append((op if fires else IDENTITY_OP, magnitude_bin, sign))
    return np.asarray(rows, np.int32)


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float], ratio: tuple[float, float]):
    """torchvision RandomResizedCrop.get_params: (x, y, w, h) in source pixels."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(RRC_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return x, y, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_erasing_box(rng: np.random.Generator, size: int, prob: float) -> EraseBox | None:
    """timm RandomErasing (count 1) on a size x size clip: a box, or None (not erased)."""
    if prob <= 0 or rng.random() > prob:
        return None
    area = size * size
    log_aspect = (math.log(ERASE_MIN_ASPECT), math.log(1 / ERASE_MIN_ASPECT))
    for _ in range(ERASE_TRIES):
        target_area = rng.uniform(*ERASE_AREA) * area
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < size and h < size:
            y = int(rng.integers(0, size - h + 1))
            x = int(rng.integers(0, size - w + 1))
            return EraseBox(x, y, w, h, int(rng.integers(2 ** 62)))
    return None


def apply_erasing(clip: torch.Tensor, box: EraseBox | None) -> torch.Tensor:
    """Normalized [3, T, S, S] -> the same with one box (all frames) of fresh N(0, 1) noise."""
    if box is None:
        return clip
    gen = torch.Generator(device=clip.device).manual_seed(box.noise_seed)
    noise = torch.randn((clip.shape[0], clip.shape[1], box.h, box.w), generator=gen,
                        device=clip.device, dtype=clip.dtype)
    clip = clip.clone()
    clip[:, :, box.y:box.y + box.h, box.x:box.x + box.w] = noise
    return clip
