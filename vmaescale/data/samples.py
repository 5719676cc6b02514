"""What both loaders share: raw and decoded sample types, sample checks, bad-sample
accounting, the epoch position, steps per epoch and batch assembly (the batch contract in
`vmaescale.data`). Imports neither backend, nor PyAV.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from vmaescale.config import DataConfig
from vmaescale.data.shardset import ShardSet
from vmaescale.data.tar_format import member_name_problem

log = logging.getLogger(__name__)

MAX_BAD_IN_A_ROW = 1000


@dataclass
class RawSample:
    """One shard sample before decoding."""

    shard: str  # tar file name
    key: str
    video: bytes | np.ndarray  # encoded video (np.uint8 [bytes] on the DALI path)
    nframes_raw: bytes
    label_raw: bytes


@dataclass(frozen=True)
class BadSample:
    shard: str
    key: str
    reason: str


def parse_nframes(raw: bytes) -> int:
    """The `.nframes` component: 4 bytes, little-endian int32, >= 1."""
    if len(raw) != 4:
        raise ValueError(f".nframes has {len(raw)} bytes; expected 4 (little-endian int32)")
    (n,) = struct.unpack("<i", raw)
    if n < 1:
        raise ValueError(f".nframes is {n}; expected >= 1")
    return n


def parse_label(raw: bytes) -> int:
    """The `.cls` component: ASCII decimal; -1 when absent."""
    text = raw.decode("ascii", "replace").strip()
    if not text:
        return -1
    try:
        return int(text)
    except ValueError as e:
        raise ValueError(f".cls is {text[:20]!r}; expected an ASCII decimal label") from e


@dataclass(frozen=True)
class SampleInfo:
    """What a sample needs before decoding: manifest row, frame count, size, label."""

    video_index: int
    nframes: int
    width: int
    height: int
    label: int


def sample_info(sample: RawSample, shards: ShardSet, num_classes: int | None = None) -> SampleInfo:
    """Check a raw sample and look it up; raises ValueError with the reason it is bad.

    With `num_classes` (classification), a label outside [0, num_classes) is bad too: it is
    reported and never trained on. So is a member name that is absolute or has a '..'
    component, even when the manifest lists it."""
    name_problem = member_name_problem(sample.key)
    if name_problem:
        raise ValueError(name_problem)
    if len(sample.video) == 0:
        raise ValueError("zero-byte or missing video (.mp4/.webm)")
    row = shards.row(sample.shard, sample.key)
    if row is None:
        raise ValueError(f"key not in {shards.root / 'manifest.parquet'}")
    label = parse_label(bytes(sample.label_raw))
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside the class range [0, {num_classes})")
    return SampleInfo(row, parse_nframes(bytes(sample.nframes_raw)), int(shards.width[row]),
                      int(shards.height[row]), label)


class EpochPosition:
    """What both loaders share: the epoch and step to start from, and bad-sample counts.

    Subclasses set `steps_per_epoch` and `_bad` (a BadSampleLog) before `set_epoch`.
    """

    steps_per_epoch: int
    _bad: "BadSampleLog"

    @property
    def bad_samples(self) -> int:
        return self._bad.count

    @property
    def failed(self) -> list[tuple[str, str]]:
        return self._bad.failed

    @property
    def failed_samples(self) -> list["BadSample"]:
        """Eval: every video that could not be used, with its shard and reason."""
        return self._bad.failed_samples

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration covers `epoch` from micro step `start_step`; `bad_samples`
        counts from 0 again (it is per epoch)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} is outside [0, {self.steps_per_epoch}]")
        self.epoch, self.start_step = epoch, start_step
        self._bad.count = 0

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step


class BadSampleLog:
    """Counts, logs and (in eval) lists the samples a loader could not use.

    `count` counts every time a bad sample is met (a train rank that reads its share
    twice meets it twice). MAX_BAD_IN_A_ROW failures with no good video in between stop
    the run: that is a broken pipeline or data set, not a few bad files.
    """

    def __init__(self, mode: str, backend: str):
        self.mode = mode
        self.backend = backend
        self.count = 0
        self.in_a_row = 0
        self.failed: list[tuple[str, str]] = []  # eval: (key, reason)
        self.failed_samples: list[BadSample] = []  # eval: with the shard

    def record(self, bad: BadSample) -> None:
        self.count += 1
        self.in_a_row += 1
        action = "skipped" if self.mode == "train" else "failed (not replaced)"
        log.warning("%s loader: bad sample %s in shard %s %s: %s", self.backend, bad.key,
                    bad.shard, action, bad.reason)
        if self.mode == "eval":
            self.failed.append((bad.key, bad.reason))
            self.failed_samples.append(bad)
        if self.in_a_row >= MAX_BAD_IN_A_ROW:
            raise RuntimeError(f"{self.in_a_row} samples in a row could not be used (last: "
                               f"{bad.key} in {bad.shard}: {bad.reason}); check the shards and "
                               "the decoder")

    def record_good(self) -> None:
        self.in_a_row = 0


@dataclass
class DecodedVideo:
    """The views of one video: clips [V, 3, T, H, W] plus its label and manifest row."""

    clips: torch.Tensor
    label: int
    video_index: int


def assemble_batch(videos: list[DecodedVideo], empty_shape: tuple[int, ...]) -> dict:
    """Contract batch from decoded videos; views of one video are consecutive."""
    if not videos:
        empty = torch.empty(0, dtype=torch.long)
        return {"video": torch.empty((0, *empty_shape)), "label": empty, "video_index": empty,
                "view": empty}
    views = [v.clips.shape[0] for v in videos]
    return {
        "video": torch.cat([v.clips for v in videos]),  # [B, 3, T, H, W]
        "label": torch.tensor([v.label for v, n in zip(videos, views) for _ in range(n)]),
        "video_index": torch.tensor([v.video_index for v, n in zip(videos, views)
                                     for _ in range(n)]),
        "view": torch.cat([torch.arange(n) for n in views]),
    }


def train_steps_per_epoch(num_videos: int, world_size: int, videos_per_gpu: int) -> int:
    """floor(videos / (world_size * videos_per_gpu)); raises when that is 0."""
    steps = num_videos // (world_size * videos_per_gpu)
    if steps < 1:
        raise ValueError(f"{num_videos} videos cannot fill one step of {world_size} ranks x "
                         f"{videos_per_gpu} videos_per_gpu; lower videos_per_gpu or add videos")
    return steps


def eval_steps_per_epoch(videos_per_rank: Iterable[int], videos_per_gpu: int) -> int:
    """Steps for the rank with the most videos (at least 1)."""
    return max(1, max(-(-n // videos_per_gpu) for n in videos_per_rank))


def view_shape(data_cfg: DataConfig) -> tuple[int, int, int, int]:
    """[3, T, H, W] of one clip."""
    return (3, data_cfg.num_frames, data_cfg.image_size, data_cfg.image_size)


def batches_from_videos(videos: Iterator[DecodedVideo | BadSample], bad_log: BadSampleLog,
                        videos_per_batch: int, steps: int, empty_shape: tuple[int, ...],
                        finite: bool) -> Iterator[dict]:
    """`steps` batches of `videos_per_batch` videos; bad samples are recorded, never batched.

    A finite stream (eval) that runs out leaves the remaining steps short or empty; after
    the last step it is drained so that failures at its very end are recorded too.
    """
    for _ in range(steps):
        batch: list[DecodedVideo] = []
        for item in videos:
            if isinstance(item, BadSample):
                bad_log.record(item)
                continue
            bad_log.record_good()
            batch.append(item)
            if len(batch) == videos_per_batch:
                break
        yield assemble_batch(batch, empty_shape)
    if finite:
        for item in videos:
            if not isinstance(item, BadSample):
                raise RuntimeError(f"video {item.video_index} is left over after {steps} eval "
                                   "steps; the step count is wrong")
            bad_log.record(item)
