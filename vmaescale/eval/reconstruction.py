"""Reconstructions from a pretraining model: pixels, PNG grids and region metrics.

    pred (normalized per token) --un-normalize with the original token's mean/std-->
      pixels of the tokens that are encoder-masked and decoded; every other token keeps
      the original pixels --> reconstruction [B, 3, T, H, W] in [0, 1]

Metrics (PSNR, SSIM, MSE) are computed on [0, 1] pixels inside the reconstructed region
only: the tokens the encoder did not see and the decoder predicted. Pure torch / numpy /
PIL: no MLflow, no DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vmaescale.models.videomae import patchify, true_indices, unnormalize

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2
MIN_MSE = 1e-10  # caps PSNR at 100 dB for an exact reconstruction
GRID_PAD = 2
GRID_LABEL_WIDTH = 64
GRID_ROWS = ("original", "masked", "recon")


def unpatchify(patches: torch.Tensor, shape: Sequence[int], patch_size: int,
               tubelet_size: int) -> torch.Tensor:
    """[B, N, tubelet*p*p, C] -> [B, C, T, H, W] of `shape`; the inverse of `patchify`."""
    b, c, t, h, w = shape
    p, tt = patch_size, tubelet_size
    x = patches.reshape(b, t // tt, h // p, w // p, tt, p, p, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T', tt, Hp, p, Wp, p]
    return x.reshape(b, c, t, h, w)


def token_mask_to_pixels(mask: torch.Tensor, shape: Sequence[int], patch_size: int,
                         tubelet_size: int) -> torch.Tensor:
    """bool [B, N] token mask -> bool [B, 1, T, H, W] pixel mask."""
    b, _, t, h, w = shape
    per_token = mask[:, :, None, None].expand(b, mask.shape[1], tubelet_size * patch_size ** 2, 1)
    return unpatchify(per_token, (b, 1, t, h, w), patch_size, tubelet_size)


def reconstruct_clip(video: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                     decoded: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """Reconstructed pixels [B, 3, T, H, W] in [0, 1].

    video [B, 3, T, H, W] ImageNet-normalized; pred [B, Nd, tubelet*p*p*3] at the `decoded`
    positions (bool [B, N], ascending); mask bool [B, N], True = hidden from the encoder.
    Tokens both masked and decoded get the prediction un-normalized with the original
    token's per-channel mean and std (the inverse of `reconstruction_target`); every other
    token, including decoded ones the encoder saw, keeps its original pixels.
    """
    patches = patchify(unnormalize(video.float()), patch_size, tubelet_size)  # [B, N, P, C]
    idx = true_indices(decoded)  # [B, Nd]
    if pred.shape[:2] != idx.shape:
        raise ValueError(f"pred has {tuple(pred.shape[:2])} (batch, tokens) but `decoded` "
                         f"selects {tuple(idx.shape)}; they must match")
    at_decoded = idx[:, :, None, None].expand(*idx.shape, *patches.shape[2:])  # [B, Nd, P, C]
    original = patches.gather(1, at_decoded)
    mean = original.mean(dim=-2, keepdim=True)  # [B, Nd, 1, C]
    std = original.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    pixels = pred.float().reshape(at_decoded.shape) * (std + 1e-6) + mean
    hidden = torch.gather(mask, 1, idx)[:, :, None, None]  # [B, Nd, 1, 1], masked & decoded
    recon = patches.scatter(1, at_decoded, torch.where(hidden, pixels, original))
    return unpatchify(recon, video.shape, patch_size, tubelet_size).clamp(0, 1)


def masked_input(video: torch.Tensor, mask: torch.Tensor, patch_size: int, tubelet_size: int,
                 fill: float = 0.5) -> torch.Tensor:
    """What the encoder saw: [0, 1] pixels [B, 3, T, H, W], encoder-masked tokens set to `fill`."""
    pixels = unnormalize(video.float())
    hidden = token_mask_to_pixels(mask, video.shape, patch_size, tubelet_size)
    return pixels.masked_fill(hidden, fill).clamp(0, 1)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalized 2-D Gaussian [size, size]."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel SSIM [N, C, H, W] of images x, y [N, C, H, W] in [0, 1].

    Local statistics use an 11x11 Gaussian window (sigma 1.5) restricted to pixels where
    `weight` [N, 1, H, W] is 1 and renormalized, so pixels outside it (and outside the
    image) never enter the result. weight None = every pixel.
    """
    x, y = x.double(), y.double()
    if weight is None:
        weight = torch.ones_like(x[:, :1])
    weight = weight.double()
    c = x.shape[1]
    window = gaussian_window().to(x.device)[None, None].expand(c, 1, -1, -1)

    def local_mean(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z * weight, window, padding=SSIM_WINDOW // 2, groups=c)

    norm = local_mean(torch.ones_like(x)).clamp_min(1e-12)
    mu_x, mu_y = local_mean(x) / norm, local_mean(y) / norm
    var_x = local_mean(x * x) / norm - mu_x ** 2
    var_y = local_mean(y * y) / norm - mu_y ** 2
    cov = local_mean(x * y) / norm - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + SSIM_C1) / (mu_x ** 2 + mu_y ** 2 + SSIM_C1)
    structure = (2 * cov + SSIM_C2) / (var_x + var_y + SSIM_C2)
    return luminance * structure


def ssim(x: torch.Tensor, y: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> float:
    """Mean SSIM of images x, y [N, C, H, W] over the pixels where pixel_mask [N, 1, H, W] is True."""
    if pixel_mask is None:
        return float(ssim_map(x, y).mean())
    weight = pixel_mask.to(torch.float64)
    values = ssim_map(x, y, weight) * weight
    return float(values.sum() / (weight.sum() * x.shape[1]))


def frames_of(video: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W]."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)


def region_metrics(original: torch.Tensor, reconstructed: torch.Tensor,
                   region_mask_tokens: torch.Tensor, patch_size: int,
                   tubelet_size: int) -> dict[str, float]:
    """PSNR (dB, data range 1), SSIM and MSE of [0, 1] clips [B, 3, T, H, W] inside a region.

    region_mask_tokens bool [B, N]: usually encoder-masked & decoded. MSE and PSNR pool
    every region pixel of the batch (PSNR capped at 100 dB); SSIM is the per-frame SSIM
    map averaged over region pixels, with local statistics taken from region pixels only.
    Pixels outside the region, in either clip, do not affect any value.
    """
    if original.shape != reconstructed.shape:
        raise ValueError(f"original {tuple(original.shape)} and reconstructed "
                         f"{tuple(reconstructed.shape)} must have the same shape")
    region = token_mask_to_pixels(region_mask_tokens, original.shape, patch_size, tubelet_size)
    if not region.any():
        raise ValueError("region_mask_tokens selects no token; metrics need a non-empty region")
    a, b = original.double(), reconstructed.double()
    in_region = region.expand_as(a)
    mse = float(((a - b) ** 2)[in_region].mean())
    psnr = 10 * math.log10(1.0 / max(mse, MIN_MSE))
    value = ssim(frames_of(a), frames_of(b), frames_of(region))
    return {"psnr": psnr, "ssim": value, "mse": mse}


def evenly_spaced_frames(num_frames: int, count: int = 4) -> tuple[int, ...]:
    """`count` frame indices spread over [0, num_frames), first and last included."""
    if num_frames <= count:
        return tuple(range(num_frames))
    return tuple(round(i * (num_frames - 1) / (count - 1)) for i in range(count))


def to_uint8_image(frame: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> uint8 [H, W, 3]."""
    pixels = (frame.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


def grid_size(num_clips: int, num_frames: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid: a label column, then one tile per frame."""
    grid_w = GRID_LABEL_WIDTH + num_frames * (width + GRID_PAD) + GRID_PAD
    grid_h = num_clips * len(GRID_ROWS) * (height + GRID_PAD) + GRID_PAD
    return grid_w, grid_h


def save_reconstruction_grid(original: torch.Tensor, masked: torch.Tensor,
                             reconstructed: torch.Tensor, path: str | Path, max_clips: int = 4,
                             frames: Sequence[int] | None = None) -> Path:
    """Write a PNG: per clip, rows original / masked input / reconstruction, one column per frame.

    Inputs are [B, 3, T, H, W] in [0, 1]. frames None = 4 evenly spaced frames. Size:
    `grid_size(min(B, max_clips), len(frames), H, W)`.
    """
    if not original.shape == masked.shape == reconstructed.shape:
        raise ValueError(f"original {tuple(original.shape)}, masked {tuple(masked.shape)} and "
                         f"reconstructed {tuple(reconstructed.shape)} must have the same shape")
    b, _, t, h, w = original.shape
    frames = tuple(frames) if frames is not None else evenly_spaced_frames(t)
    bad = [f for f in frames if not 0 <= f < t]
    if bad or not frames:
        raise ValueError(f"frames {frames}: need at least one index in [0, {t})")
    clips = min(b, max_clips)
    canvas = Image.new("RGB", grid_size(clips, len(frames), h, w), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for clip in range(clips):
        for r, (label, video) in enumerate(zip(GRID_ROWS, (original, masked, reconstructed))):
            top = GRID_PAD + (clip * len(GRID_ROWS) + r) * (h + GRID_PAD)
            draw.text((4, top + h // 2 - 5), f"{clip}:{label}", fill=(0, 0, 0))
            for col, f in enumerate(frames):
                left = GRID_LABEL_WIDTH + GRID_PAD + col * (w + GRID_PAD)
                canvas.paste(Image.fromarray(to_uint8_image(video[clip, :, f])), (left, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
