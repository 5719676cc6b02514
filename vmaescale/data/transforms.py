"""Clip sampling and augmentation parameters, shared by the DALI and fallback loaders.

Both loaders draw every random choice here, on the host, from a generator keyed by
(seed, epoch, video_index), so the same video in the same epoch gets the same frames and
crops whichever backend decodes it and wherever it falls in the batch order.

Train (VideoMAE V2 pretraining):
- one clip of `num_frames` frames at stride `sampling_rate`, starting at a uniform random
  frame in [0, max(0, nframes - (num_frames - 1) * sampling_rate - 1)]; indices past the
  end repeat the last frame (edge padding, DALI's pad_mode="edge");
- `num_sample` crops of that one decoded clip, each chosen like the official
  `GroupMultiScaleCrop` (scales [1, .875, .75, .66] of the short side, max_distort 1,
  13 fixed offsets), the same box for every frame, resized to `image_size`.

Finetuning adds a random resized crop instead, a flip, RandAugment and random erasing per
clip (`vmaescale.data.augment`), drawn here too.

Eval: `test_num_segment` evenly spaced clips (or SSv2-style segment sampling); frames resized so the short side is
`short_side`; `test_num_crop` square crops of `image_size` (3: start / centre / end of the
long side, 1: centre).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vmaescale.data.augment import (TrainAugment, apply_erasing, rand_augment_params,
                                    random_erasing_box, random_resized_crop_box)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MULTI_SCALE_CROP_SCALES = (1.0, 0.875, 0.75, 0.66)
MULTI_SCALE_MAX_DISTORT = 1
CROP_SIZE_SNAP_PX = 3  # official: a crop side within 3 px of the output size snaps to it


@dataclass(frozen=True)
class CropBox:
    """A crop in pixels: left x, top y, width w, height h."""

    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class TrainView:
    """What one decoded training video yields: frame indices and, per clip, one crop box
    (all frames), and the finetuning extras (`vmaescale.data.augment`) when configured."""

    frame_indices: np.ndarray  # int32 [T]
    boxes: tuple[CropBox, ...]  # num_sample boxes
    flips: tuple[bool, ...] = ()  # per clip; () = no flip augmentation
    rand_augment: np.ndarray | None = None  # int32 [num_sample, n, 3] (op, magnitude bin, sign)
    erase: tuple = ()  # per clip: EraseBox or None; () = no erasing


@dataclass(frozen=True)
class EvalView:
    """What one eval video yields: all segments' frames, the resized size and the crops."""

    frame_indices: np.ndarray  # int32 [S * T], segment-major
    resized_wh: tuple[int, int]
    boxes: tuple[CropBox, ...]  # num_crop boxes in the resized frame


def video_rng(seed: int, epoch: int, video_index: int) -> np.random.Generator:
    """The generator for one video's random choices in one epoch."""
    return np.random.default_rng([seed, epoch, video_index])


def clip_span(num_frames: int, stride: int) -> int:
    """Frames covered by a clip from its first to its last sampled frame."""
    return (num_frames - 1) * stride + 1


def sample_clip_start(rng: np.random.Generator, nframes: int, num_frames: int, stride: int) -> int:
    """Uniform start in [0, max(0, nframes - span)]; short videos always start at 0."""
    max_start = max(0, nframes - clip_span(num_frames, stride))
    return int(rng.integers(0, max_start + 1))


def clip_frame_indices(start: int, nframes: int, num_frames: int, stride: int) -> np.ndarray:
    """[T] indices start, start + stride, ...; past the end they repeat the last frame."""
    if nframes < 1:
        raise ValueError(f"nframes={nframes}: a video needs at least 1 frame")
    indices = start + stride * np.arange(num_frames)
    return np.minimum(indices, nframes - 1).astype(np.int32)


def segment_starts(nframes: int, num_frames: int, stride: int, num_segments: int) -> list[int]:
    """Evenly spaced clip starts from 0 to the last full start; one segment is centred."""
    max_start = max(0, nframes - clip_span(num_frames, stride))
    if num_segments == 1:
        return [max_start // 2]
    return [s * max_start // (num_segments - 1) for s in range(num_segments)]


EVAL_SAMPLINGS = ("stride", "segment")


def segment_sampled_indices(nframes: int, num_frames: int, num_views: int) -> np.ndarray:
    """[S * T] indices of SSv2-style segment sampling, view-major.

    The video is cut into `num_frames` equal segments of `tick = nframes / num_frames`
    frames; view s takes frame int(tick * x + s * tick / S) of segment x. For S = 2 this is
    the official test sampling (view 0 the segment starts, view 1 their middles)."""
    tick = nframes / num_frames
    x = np.arange(num_frames)
    views = [np.floor(tick * x + s * tick / num_views) for s in range(num_views)]
    return np.minimum(np.concatenate(views), nframes - 1).astype(np.int32)


def eval_frame_indices(nframes: int, num_frames: int, stride: int, num_segments: int,
                       sampling: str = "stride") -> np.ndarray:
    """[S * T] frame indices of all eval segments, segment-major.

    sampling "stride": S clips of T frames at `stride`, starts spread over the video;
    "segment": `segment_sampled_indices` (SSv2-like sets; `stride` unused)."""
    if sampling == "segment":
        return segment_sampled_indices(nframes, num_frames, num_segments)
    if sampling != "stride":
        raise ValueError(f"sampling={sampling!r}: accepted values are {list(EVAL_SAMPLINGS)}")
    starts = segment_starts(nframes, num_frames, stride, num_segments)
    return np.concatenate([clip_frame_indices(s, nframes, num_frames, stride) for s in starts])


def multi_scale_crop_sizes(width: int, height: int, image_size: int) -> list[tuple[int, int]]:
    """Candidate (crop_w, crop_h) pairs, in the official order (rows by height scale)."""
    base = min(width, height)
    sizes = [int(base * s) for s in MULTI_SCALE_CROP_SCALES]
    sizes = [image_size if abs(s - image_size) < CROP_SIZE_SNAP_PX else s for s in sizes]
    return [(w, h) for i, h in enumerate(sizes) for j, w in enumerate(sizes)
            if abs(i - j) <= MULTI_SCALE_MAX_DISTORT]


def fixed_crop_offsets(width: int, height: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """The 13 (x, y) offsets of `fill_fix_offset(more_fix_crop=True)`, in the official order."""
    w_step = (width - crop_w) // 4
    h_step = (height - crop_h) // 4
    grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2),  # corners, centre
            (0, 2), (4, 2), (2, 4), (2, 0),  # edge centres
            (1, 1), (3, 1), (1, 3), (3, 3)]  # quarter positions
    return [(a * w_step, b * h_step) for a, b in grid]


def multi_scale_crop_params(rng: np.random.Generator, width: int, height: int,
                            image_size: int) -> CropBox:
    """One GroupMultiScaleCrop draw: a size pair, then one of the 13 fixed offsets."""
    pairs = multi_scale_crop_sizes(width, height, image_size)
    crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
    offsets = fixed_crop_offsets(width, height, crop_w, crop_h)
    x, y = offsets[int(rng.integers(len(offsets)))]
    return CropBox(x, y, crop_w, crop_h)


def train_view(seed: int, epoch: int, video_index: int, nframes: int, width: int, height: int,
               num_frames: int, stride: int, image_size: int, num_sample: int,
               aug: TrainAugment | None = None) -> TrainView:
    """Frames and, per clip of `num_sample`, its crop box and extras, for one video in one epoch.

    Draw order: the start frame, then per clip its box, flip, RandAugment and erasing (each
    only when configured), so pretraining draws exactly what it always drew."""
    aug = aug or TrainAugment()
    rng = video_rng(seed, epoch, video_index)
    start = sample_clip_start(rng, nframes, num_frames, stride)
    boxes, flips, rand_aug, erase = [], [], [], []
    for _ in range(num_sample):
        if aug.crop == "random_resized":
            boxes.append(CropBox(*random_resized_crop_box(rng, width, height, aug.crop_scale, aug.crop_ratio)))
        else:
            boxes.append(multi_scale_crop_params(rng, width, height, image_size))
        if aug.flip:
            flips.append(bool(rng.random() < 0.5))
        if aug.rand_augment is not None:
            rand_aug.append(rand_augment_params(rng, aug.rand_augment))
        if aug.erase_prob > 0:
            erase.append(random_erasing_box(rng, image_size, aug.erase_prob))
    return TrainView(clip_frame_indices(start, nframes, num_frames, stride), tuple(boxes),
                     tuple(flips), np.stack(rand_aug) if rand_aug else None, tuple(erase))


def finish_train_clips(clips: torch.Tensor, view: TrainView) -> torch.Tensor:
    """Normalized [num_sample, 3, T, S, S] -> the same with each clip's erasing applied."""
    if not view.erase:
        return clips
    return torch.stack([apply_erasing(clip, box) for clip, box in zip(clips, view.erase)])


def short_side_resize_wh(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side at `short_side`; the long side scales and truncates."""
    if width <= height:
        return short_side, height * short_side // width
    return width * short_side // height, short_side


def spatial_crop_boxes(width: int, height: int, crop_size: int, num_crops: int) -> list[CropBox]:
    """Square crops: 3 = start / centre / end of the long side, 1 = centre; short side centred."""
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops={num_crops}: accepted values are 1 and 3")
    if crop_size > min(width, height):
        raise ValueError(f"crop_size={crop_size} is larger than the {width}x{height} frame; "
                         f"it must be <= the short side")
    long_slack = max(width, height) - crop_size
    short_pos = (min(width, height) - crop_size) // 2
    positions = [long_slack // 2] if num_crops == 1 else [0, long_slack // 2, long_slack]
    if width >= height:
        return [CropBox(p, short_pos, crop_size, crop_size) for p in positions]
    return [CropBox(short_pos, p, crop_size, crop_size) for p in positions]


def eval_view(nframes: int, width: int, height: int, num_frames: int, stride: int,
              num_segments: int, num_crops: int, short_side: int, image_size: int,
              sampling: str = "stride") -> EvalView:
    """Frames of all segments, the short-side resize and the spatial crops for one video."""
    resized_wh = short_side_resize_wh(width, height, short_side)
    boxes = tuple(spatial_crop_boxes(*resized_wh, image_size, num_crops))
    indices = eval_frame_indices(nframes, num_frames, stride, num_segments, sampling)
    return EvalView(indices, resized_wh, boxes)


def crop_resize(frames: torch.Tensor, box: CropBox, size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, size, size] in [0, 1]; one box for every frame."""
    return resize_frames(frames[:, box.y:box.y + box.h, box.x:box.x + box.w], size, size)


def resize_frames(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, height, width] in [0, 1]."""
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)  # [T, 3, H, W]
    if x.shape[-2:] == (height, width):
        return x
    out = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.clamp_(0.0, 1.0)


def normalize_clip(frames: torch.Tensor) -> torch.Tensor:
    """float [T, 3, H, W] in [0, 1] -> ImageNet-normalized [3, T, H, W]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return (frames.permute(1, 0, 2, 3) - mean) / std


def unnormalize_video(video: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized [B, 3, T, H, W] -> [B, 3, T, H, W] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=video.dtype, device=video.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=video.dtype, device=video.device).view(1, 3, 1, 1, 1)
    return video * std + mean
