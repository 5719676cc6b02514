"""`build_loader`: the DALI or the PyAV fallback input pipeline, and what both share.

Backend choice (`data.backend`):
- "auto": DALI when it imports and can decode the shards' codec here (VP8/VP9/MJPEG on
  the CPU; anything else needs a CUDA `device` for DALI's "mixed" decoder), else the
  fallback. The choice and the reason are logged.
- "dali": DALI or a ValueError saying why it cannot run here.
- "fallback": the torch DataLoader + webdataset + PyAV loader.
- "synthetic": in-memory random clips (`vmaescale.data.memory`), no shards, no decoding:
  benchmarks and engine tests.

Where things live (no import circle): the shard set in `shardset`, the sample types and what
both loaders share in `samples`, the backend choice in `backends`; `dali` and `fallback` import
those, never each other or this module, and this module imports a backend only once chosen.
Nothing on the DALI path imports PyAV.

Both loaders follow the batch contract in `vmaescale.data`, draw their clips with
`vmaescale.data.transforms` (the same frames and crops for the same video, seed and
epoch), and expose `backend`, `steps_per_epoch`, `bad_samples`, `failed`,
`set_epoch(epoch, start_step=0)` and `__len__` (batches left in this epoch).

Steps per epoch
- train: floor(videos / (world_size * videos_per_gpu)) on every rank; the remainder of
  the epoch is dropped. A rank whose share is smaller than that (possible with the
  fallback's per-tar split) tops it up by reading its tars again (repeating samples).
- eval: enough steps for the rank with the most videos; every video is seen exactly once,
  so the last batches of a rank can be short or empty (batch dimension 0).

Bad shards (`data.bad_shards`): before any DALI pipeline or DataLoader is made, every tar
is checked cheaply (it exists, is not empty, starts with a tar header, and every member its
`.idx` lists ends inside the file behind a tar header of that size; nothing is decoded).
"refuse" (default) raises a ShardSetError naming every bad tar and why; "skip" leaves them
out with one warning each, and refuses only when no tar is left.

Bad samples: a sample whose member name is absolute or has a '..' component, that is
empty, lacks a readable `.nframes`, is not in the manifest, has a label outside the class
range, or whose needed frames do not decode (not a video, truncated before the frames a
clip uses, a different frame size than the manifest says) is skipped, counted in
`bad_samples` and logged with its shard and key. In train mode the next sample takes its
place; in eval mode it is added to `failed` as (key, reason) and nothing replaces it.
"""

from __future__ import annotations

import logging

import torch

from vmaescale.config import DataConfig
from vmaescale.data.backends import (BACKENDS, DALI_CPU_CODECS, choose_backend,  # noqa: F401
                                     dali_unavailable_reason)
from vmaescale.data.samples import (MAX_BAD_IN_A_ROW, BadSample, BadSampleLog,  # noqa: F401
                                    DecodedVideo, EpochPosition, RawSample, SampleInfo,
                                    assemble_batch, batches_from_videos, eval_steps_per_epoch,
                                    parse_label, parse_nframes, sample_info, train_steps_per_epoch,
                                    view_shape)
from vmaescale.data.shardset import (BAD_SHARD_POLICIES, CODEC_BY_EXT, VIDEO_EXTS,  # noqa: F401
                                     BadShard, ShardSet, ShardSetError, find_bad_shards,
                                     open_shard_set, read_class_names, usable_tars)

log = logging.getLogger(__name__)

MODES = ("train", "eval")
SYNTHETIC_EVAL_SEED = 12345  # eval clips of the synthetic backend: one fixed pool per rank
SYNTHETIC_STEPS_PER_EPOCH = 100


def check_loader_args(data_cfg: DataConfig, videos_per_gpu: int, rank: int, world_size: int,
                      mode: str, start_step: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: accepted values are {list(MODES)}")
    if videos_per_gpu < 1:
        raise ValueError(f"videos_per_gpu={videos_per_gpu}: must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
    if start_step < 0:
        raise ValueError(f"start_step={start_step}: must be >= 0")
    if mode == "eval" and start_step:
        raise ValueError(f"start_step={start_step}: eval loaders always start at step 0")
    if mode == "eval" and data_cfg.image_size > data_cfg.short_side:
        raise ValueError(f"data.image_size={data_cfg.image_size} > data.short_side="
                         f"{data_cfg.short_side}: eval crops image_size squares from frames "
                         "whose short side is short_side")


def build_loader(data_cfg: DataConfig, videos_per_gpu: int, rank: int, world_size: int,
                 mode: str = "train", seed: int = 0, epoch: int = 0, start_step: int = 0,
                 device: torch.device | str | None = None, num_classes: int | None = None,
                 steps_per_epoch: int = 0):
    """The input pipeline for one rank: a DaliLoader, a FallbackLoader or InMemoryClips
    (see module doc).

    `num_classes` (classification): labels outside [0, num_classes) are bad samples.
    `steps_per_epoch`: the synthetic backend's batches per epoch (0 = 100); the shard
    backends derive theirs from the manifest."""
    check_loader_args(data_cfg, videos_per_gpu, rank, world_size, mode, start_step)
    device = torch.device(device) if device is not None else None
    if data_cfg.backend == "synthetic":
        return synthetic_loader(data_cfg, videos_per_gpu, rank, mode, seed, start_step, device,
                                num_classes, steps_per_epoch or SYNTHETIC_STEPS_PER_EPOCH)
    shards = open_shard_set(data_cfg.shards, data_cfg.bad_shards)
    backend, why = choose_backend(data_cfg.backend, shards.codec, device)
    log.info("input pipeline for rank %d (%s mode): %s backend, because %s", rank, mode,
             backend, why)
    if backend == "dali":
        from vmaescale.data.dali import DaliLoader
        return DaliLoader(shards, data_cfg, videos_per_gpu, rank, world_size, mode, seed, epoch,
                          start_step, device, num_classes)
    check_fallback_augmentation(data_cfg, mode)
    from vmaescale.data.fallback import FallbackLoader
    return FallbackLoader(shards, data_cfg, videos_per_gpu, rank, world_size, mode, seed,
                          epoch, start_step, num_classes, device)


def synthetic_loader(data_cfg: DataConfig, videos_per_gpu: int, rank: int, mode: str, seed: int,
                     start_step: int, device: torch.device | None, num_classes: int | None,
                     steps_per_epoch: int):
    """In-memory clips on `device`: train batches of videos_per_gpu * num_sample clips seeded
    by (seed, rank); eval batches of videos_per_gpu clips from one fixed pool."""
    from vmaescale.data.memory import InMemoryClips
    clips = videos_per_gpu * (data_cfg.num_sample if mode == "train" else 1)
    pool_seed = seed if mode == "train" else SYNTHETIC_EVAL_SEED
    return InMemoryClips(clips, data_cfg.num_frames, data_cfg.image_size, steps_per_epoch,
                         pool_seed, rank, device, start_step=start_step, num_classes=num_classes)


def check_fallback_augmentation(data_cfg: DataConfig, mode: str) -> None:
    """The fallback loader has no frame-consistent RandAugment: refuse it, naming the option."""
    if mode == "train" and data_cfg.rand_augment != "none":
        raise ValueError(f"data.rand_augment={data_cfg.rand_augment!r} needs the DALI backend "
                         "(nvidia.dali.auto_aug, one op per clip on every frame); the fallback "
                         "loader has none here (torchvision, and so timm, does not import next to "
                         "this torch build). Set data.rand_augment='none' or use data.backend='dali'")
