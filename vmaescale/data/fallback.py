"""The fallback input pipeline: torch DataLoader + webdataset + PyAV, any codec, CPU only.

Splitting: with at least `world_size` tars, rank r reads tars[r::world_size] (the same rule
as `webdataset.split_by_node`, but with the rank given to `build_loader`); with fewer
tars, every rank reads every tar and keeps the samples whose position in their tar is
r mod world_size. DataLoader workers then split the rank's tars with
`webdataset.split_by_worker` (at most one worker per tar).

Order: train mode reshuffles the tar order and mixes samples in a `shuffle_buffer`, all
from generators seeded by (seed, epoch, rank, worker, pass), and reads its tars again when
the epoch needs more samples than the rank holds. The DataLoader takes videos from its
workers round-robin, so the stream is a function of (seed, epoch, rank, num_workers), and
a worker whose tars hold fewer samples starts its next pass sooner: with uneven tars an
epoch can repeat a few samples and leave out as many (few, with many tars per worker).
`start_step` skips start_step * videos_per_gpu videos by reading their tar members
without decoding them (exact unless a skipped sample was bad).
"""

from __future__ import annotations

import itertools
import random
import signal
from dataclasses import dataclass
from typing import Iterator

import av
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vmaescale.config import DataConfig
from vmaescale.data.augment import TrainAugment
from vmaescale.data.samples import (BadSample, BadSampleLog, DecodedVideo, EpochPosition, RawSample,
                                    SampleInfo, batches_from_videos, eval_steps_per_epoch,
                                    sample_info, train_steps_per_epoch, view_shape)
from vmaescale.data.shardset import ShardSet
from vmaescale.data.transforms import (crop_resize, eval_view, finish_train_clips, normalize_clip,
                                       resize_frames, train_view)
from vmaescale.data.video_io import VideoError, decode_frames

DECODE_ERRORS = (VideoError, ValueError, av.FFmpegError, EOFError, OSError)


@dataclass(frozen=True)
class RankSplit:
    """The tars a rank reads and which of their samples it keeps."""

    tars: tuple[str, ...]
    keep_every: int  # keep samples whose position in their tar is `keep_offset` mod this
    keep_offset: int

    def keeps(self, position_in_tar: int) -> bool:
        return position_in_tar % self.keep_every == self.keep_offset


def rank_split(shards: ShardSet, rank: int, world_size: int) -> RankSplit:
    """Per-tar split when every rank gets a tar, else per-sample within every tar."""
    tars = tuple(str(t) for t in shards.tars)
    if len(tars) >= world_size:
        return RankSplit(tars[rank::world_size], 1, 0)
    return RankSplit(tars, world_size, rank)


def videos_in_split(shards: ShardSet, split: RankSplit) -> int:
    counts = dict(zip(map(str, shards.tars), shards.videos_per_tar()))
    return sum(len(range(split.keep_offset, counts[t], split.keep_every)) for t in split.tars)


def decode_train_video(video: bytes, info: SampleInfo, cfg: DataConfig, seed: int,
                       epoch: int) -> torch.Tensor:
    """One training video -> num_sample clips [num_sample, 3, T, S, S]: crop, flip,
    normalize, erase, each with one parameter set for every frame of a clip."""
    view = train_view(seed, epoch, info.video_index, info.nframes, info.width, info.height,
                      cfg.num_frames, cfg.sampling_rate, cfg.image_size, cfg.num_sample,
                      TrainAugment.from_config(cfg))
    frames = torch.from_numpy(decode_and_check(video, view.frame_indices, info))  # [T, H, W, 3]
    clips = []
    for k, box in enumerate(view.boxes):
        clip = crop_resize(frames, box, cfg.image_size)  # [T, 3, S, S]
        if view.flips and view.flips[k]:
            clip = clip.flip(-1)
        clips.append(normalize_clip(clip))
    return finish_train_clips(torch.stack(clips), view)


def decode_eval_video(video: bytes, info: SampleInfo, cfg: DataConfig) -> torch.Tensor:
    """One eval video -> segments x crops clips [S * K, 3, T, C, C], view = s * K + k."""
    view = eval_view(info.nframes, info.width, info.height, cfg.num_frames, cfg.sampling_rate,
                     cfg.test_num_segment, cfg.test_num_crop, cfg.short_side, cfg.image_size,
                     cfg.test_sampling)
    frames = torch.from_numpy(decode_and_check(video, view.frame_indices, info))  # [S*T, H, W, 3]
    resized = resize_frames(frames, *view.resized_wh)  # [S*T, 3, h, w]
    segments = resized.unflatten(0, (cfg.test_num_segment, cfg.num_frames))  # [S, T, 3, h, w]
    return torch.stack([normalize_clip(segment[..., b.y:b.y + b.h, b.x:b.x + b.w])
                        for segment in segments for b in view.boxes])


def decode_and_check(video: bytes, indices, info: SampleInfo):
    """uint8 [len(indices), H, W, 3]; ValueError when frames are missing or the wrong size."""
    try:
        frames = decode_frames(video, [int(i) for i in indices])
    except IndexError as e:
        raise ValueError(f"truncated: .nframes says {info.nframes} frames but {e}") from e
    height, width = frames.shape[1:3]
    if (width, height) != (info.width, info.height):
        raise ValueError(f"decoded frames are {width}x{height}; the manifest says "
                         f"{info.width}x{info.height}")
    return frames


def raw_sample(sample: dict, video_exts: tuple[str, ...]) -> RawSample:
    """A webdataset sample dict -> RawSample (missing components become empty bytes)."""
    video = next((sample[ext] for ext in video_exts if ext in sample), b"")
    return RawSample(shard=sample["__url__"].rsplit("/", 1)[-1], key=sample["__key__"],
                     video=video, nframes_raw=sample.get("nframes", b""),
                     label_raw=sample.get("cls", b""))


class ShardVideos(IterableDataset):
    """Decoded videos (or BadSample reports) of one rank's share, for one epoch."""

    def __init__(self, shards: ShardSet, cfg: DataConfig, split: RankSplit, mode: str,
                 seed: int, epoch: int, rank: int, skip_videos: int, num_classes: int | None):
        self.shards, self.cfg, self.split, self.mode = shards, cfg, split, mode
        self.num_classes = num_classes
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.skip_videos = skip_videos

    def __iter__(self) -> Iterator[DecodedVideo | BadSample]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        tar_errors: list[BadSample] = []
        raw = self._raw_samples(worker_id, tar_errors)
        skip = len(range(worker_id, self.skip_videos, num_workers))
        for sample in itertools.islice(raw, skip, None):
            yield from tar_errors
            tar_errors.clear()
            yield self._decode(sample)
        yield from tar_errors

    def _raw_samples(self, worker_id: int, tar_errors: list[BadSample]) -> Iterator[RawSample]:
        """This worker's samples: one pass (eval) or endless reshuffled passes (train)."""
        my_tars = list(wds.split_by_worker(list(self.split.tars)))
        passes = itertools.count() if self.mode == "train" else range(1)
        for pass_index in passes:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker_id}-{pass_index}")
            tars = rng.sample(my_tars, len(my_tars)) if self.mode == "train" else my_tars
            samples = self._kept_samples(tars, tar_errors)
            if self.mode == "train" and self.cfg.shuffle_buffer > 1:
                samples = wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer,
                                      rng=rng)(samples)
            count = 0
            for count, sample in enumerate(samples, 1):
                yield sample
            if self.mode == "train" and count == 0:
                raise ValueError(f"rank {self.rank} worker {worker_id}: tars {my_tars} hold no "
                                 "samples for this rank; training needs at least one")

    def _kept_samples(self, tars: list[str], tar_errors: list[BadSample]) -> Iterator[RawSample]:
        for tar in tars:
            def report(exn: Exception, tar=tar) -> bool:
                tar_errors.append(BadSample(tar.rsplit("/", 1)[-1], "?", f"tar read error: {exn}"))
                return True
            samples = wds.tarfile_samples([{"url": tar}], handler=report)
            for position, sample in enumerate(samples):
                if self.split.keeps(position):
                    yield raw_sample(sample, self.shards.video_exts)

    def _decode(self, sample: RawSample) -> DecodedVideo | BadSample:
        try:
            info = sample_info(sample, self.shards, self.num_classes)
            if self.mode == "train":
                clips = decode_train_video(sample.video, info, self.cfg, self.seed, self.epoch)
            else:
                clips = decode_eval_video(sample.video, info, self.cfg)
        except DECODE_ERRORS as e:
            return BadSample(sample.shard, sample.key, f"{type(e).__name__}: {e}")
        return DecodedVideo(clips, info.label, info.video_index)


def _one_thread_per_worker(worker_id: int) -> None:
    """One torch thread per worker; the pre-emption signals (which `scancel --signal` and
    torchrun send to every process of the job step) are the training process's to handle:
    a worker that died of them would fail the batch the checkpoint needs."""
    torch.set_num_threads(1)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class FallbackLoader(EpochPosition):
    """PyAV loader with the batch contract; see the module docstring for order and splits."""

    backend = "fallback"

    def __init__(self, shards: ShardSet, data_cfg: DataConfig, videos_per_gpu: int, rank: int,
                 world_size: int, mode: str, seed: int, epoch: int, start_step: int,
                 num_classes: int | None = None, device: torch.device | None = None):
        self.shards, self.cfg, self.mode = shards, data_cfg, mode
        # pinned batches make the trainer's non_blocking copy to the GPU asynchronous
        self.pin_memory = device is not None and device.type == "cuda" and torch.cuda.is_available()
        self.num_classes = num_classes
        self.videos_per_gpu, self.rank, self.seed = videos_per_gpu, rank, seed
        self.split = rank_split(shards, rank, world_size)
        self.num_workers = min(data_cfg.num_workers, len(self.split.tars))
        self.videos_on_rank = videos_in_split(shards, self.split)
        if mode == "train":
            self.steps_per_epoch = train_steps_per_epoch(shards.num_videos, world_size,
                                                         videos_per_gpu)
        else:
            shares = [videos_in_split(shards, rank_split(shards, r, world_size))
                      for r in range(world_size)]
            self.steps_per_epoch = eval_steps_per_epoch(shares, videos_per_gpu)
        self._bad = BadSampleLog(mode, self.backend)
        self.set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[dict]:
        dataset = ShardVideos(self.shards, self.cfg, self.split, self.mode, self.seed, self.epoch,
                              self.rank, self.start_step * self.videos_per_gpu, self.num_classes)
        extra = {"prefetch_factor": self.cfg.prefetch_batches} if self.num_workers else {}
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            worker_init_fn=_one_thread_per_worker if self.num_workers else None,
                            **extra)
        batches = batches_from_videos(iter(loader), self._bad, self.videos_per_gpu, len(self),
                                      view_shape(self.cfg), finite=self.mode == "eval")
        for batch in batches:
            yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch
