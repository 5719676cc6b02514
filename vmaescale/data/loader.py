"""`build_loader`: the DALI or the PyAV fallback input pipeline, and what both share.

Backend choice (`data.backend`):
- "auto": DALI when it imports and can decode the shards' codec here (VP8/VP9/MJPEG on
  the CPU; anything else needs a CUDA `device` for DALI's "mixed" decoder), else the
  fallback. The choice and the reason are logged.
- "dali": DALI or a ValueError saying why it cannot run here.
- "fallback": the torch DataLoader + webdataset + PyAV loader.

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

import glob
import json
import logging
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from vmaescale.config import DataConfig
from vmaescale.data.shards import member_name_problem, shard_name, tar_problem

log = logging.getLogger(__name__)

MODES = ("train", "eval")
BACKENDS = ("auto", "dali", "fallback")
DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")
CODEC_BY_EXT = {"webm": "vp9", "mp4": "h264"}
VIDEO_EXTS = ("mp4", "webm")
MAX_BAD_IN_A_ROW = 1000
BAD_SHARD_POLICIES = ("refuse", "skip")


class ShardSetError(ValueError):
    """A shard set the loaders will not read: bad tars with data.bad_shards='refuse', or none left."""


@dataclass(frozen=True)
class ShardSet:
    """A shard directory: its tars, DALI index files, manifest columns and codec."""

    root: Path
    tars: tuple[Path, ...]
    index_paths: tuple[Path, ...]  # empty when any .idx is missing (DALI then scans the tars)
    codec: str
    video_exts: tuple[str, ...]  # extensions of the video component
    shard: tuple[str, ...]  # per manifest row: the tar's file name
    key: tuple[str, ...]
    frames: np.ndarray  # int64 [N]
    width: np.ndarray  # int64 [N]
    height: np.ndarray  # int64 [N]
    label: np.ndarray  # int64 [N]
    row_by_sample: dict = field(repr=False)  # (tar name, key) -> manifest row
    class_names: tuple[str, ...] = ()  # labels.json, in index order; () when unlabeled

    @property
    def tar_names(self) -> list[str]:
        return [t.name for t in self.tars]

    @property
    def num_videos(self) -> int:
        """Manifest rows that live in this set's tars."""
        return sum(self.videos_per_tar())

    def videos_per_tar(self) -> list[int]:
        counts = dict.fromkeys(self.tar_names, 0)
        for name in self.shard:
            if name in counts:
                counts[name] += 1
        return [counts[name] for name in self.tar_names]

    def row(self, tar_name: str, key: str) -> int | None:
        return self.row_by_sample.get((tar_name, key))


def _shard_tars(spec: str) -> tuple[Path, list[Path]]:
    """The shard directory and its tars, from a directory or a glob of .tar files."""
    path = Path(spec)
    tars = sorted(path.glob("*.tar")) if path.is_dir() else sorted(Path(p) for p in glob.glob(spec))
    if not tars:
        raise FileNotFoundError(f"data.shards={spec!r}: no .tar shards found; expected a shard "
                                "directory (with manifest.parquet) or a glob of .tar files")
    roots = {t.parent for t in tars}
    if len(roots) != 1:
        raise ValueError(f"data.shards={spec!r} matches tars in {len(roots)} directories "
                         f"({sorted(map(str, roots))[:3]}...); a shard set is one directory")
    return roots.pop(), tars


def _dataset_summary(root: Path) -> dict:
    path = root / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _first_video_ext(tar_path: Path) -> str | None:
    with tarfile.open(tar_path) as tar:
        for name in tar.getnames():
            ext = name.rsplit(".", 1)[-1]
            if ext in CODEC_BY_EXT:
                return ext
    return None


def _codec_and_exts(root: Path, first_tar: Path) -> tuple[str, tuple[str, ...]]:
    """dataset.json's codec and video extensions, else guessed from the first tar."""
    summary = _dataset_summary(root)
    exts = tuple(summary.get("video_exts") or VIDEO_EXTS)
    if summary.get("codec"):
        return str(summary["codec"]).lower(), exts
    ext = _first_video_ext(first_tar)
    if ext is None:
        raise ValueError(f"{root}: cannot tell the codec (no dataset.json codec, no .mp4/.webm "
                         f"in {first_tar.name})")
    return CODEC_BY_EXT[ext], exts


def read_class_names(root: Path) -> tuple[str, ...]:
    """The class names of labels.json ({"name": index}) in index order; () when unlabeled.

    Indices must be 0..K-1, each once: a gap would leave a head row without a name."""
    path = root / "labels.json"
    if not path.is_file():
        return ()
    labels = json.loads(path.read_text())
    by_index = sorted((int(i), str(name)) for name, i in labels.items())
    if [i for i, _ in by_index] != list(range(len(by_index))):
        raise ValueError(f"{path}: class indices {[i for i, _ in by_index][:10]} are not 0..{len(by_index) - 1}, "
                         "each once")
    return tuple(name for _, name in by_index)


def _tar_name(shard) -> str:
    """Manifest `shard` (an index, or a file name) -> the tar's file name."""
    return shard_name(shard) if isinstance(shard, int) else Path(str(shard)).name


@dataclass(frozen=True)
class BadShard:
    """A tar found unreadable when the loader is built; `reason` follows its name."""

    tar: str  # file name
    reason: str

    def __str__(self) -> str:
        return f"{self.tar} {self.reason}"


def find_bad_shards(root: Path, tars: list[Path], manifest_tars: Iterable[str],
                    whole_directory: bool) -> list[BadShard]:
    """Every tar that `shards.tar_problem` finds unreadable, and (when the whole directory
    is the shard set) every tar the manifest names that is not there."""
    bad = [BadShard(t.name, problem) for t in tars if (problem := tar_problem(t))]
    if whole_directory:
        present = {t.name for t in tars}
        bad += [BadShard(name, "is listed in manifest.parquet but missing")
                for name in sorted(set(manifest_tars) - present)]
    return bad


def usable_tars(root: Path, tars: list[Path], bad: list[BadShard], policy: str) -> list[Path]:
    """The tars to read under data.bad_shards=`policy`: refuse on any bad tar, or leave them
    out (one warning per tar) and refuse only when none is left."""
    if policy not in BAD_SHARD_POLICIES:
        raise ValueError(f"data.bad_shards={policy!r}: accepted values are {list(BAD_SHARD_POLICIES)}")
    if not bad:
        return tars
    if policy == "refuse":
        raise ShardSetError(f"data.bad_shards='refuse': {len(bad)} bad tar(s) in {root}: "
                            f"{'; '.join(map(str, bad))}; replace or remove them, or set "
                            "data.bad_shards='skip' to leave them out")
    for shard in bad:
        log.warning("data.bad_shards='skip': %s; leaving it out", shard)
    names = {shard.tar for shard in bad}
    left = [t for t in tars if t.name not in names]
    if not left:
        raise ShardSetError(f"data.bad_shards='skip': every tar in {root} is bad "
                            f"({'; '.join(map(str, bad))}); nothing is left to read")
    return left


def open_shard_set(spec: str, bad_shards: str | None = None) -> ShardSet:
    """Read a shard directory (or a glob of its tars) and its manifest.parquet.

    bad_shards: None reads the tars unchecked; "refuse" or "skip" first checks every tar
    (`find_bad_shards`: headers and index offsets, nothing decoded) and refuses with a
    ShardSetError naming the bad ones, or leaves them out (see `usable_tars`)."""
    root, tars = _shard_tars(spec)
    manifest_path = root / "manifest.parquet"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing; loaders need the manifest for "
                                "video ids and frame sizes (data_tools/build_shards.py writes it)")
    table = pq.read_table(manifest_path).to_pydict()
    shard = tuple(_tar_name(s) for s in table["shard"])
    if bad_shards is not None:
        bad = find_bad_shards(root, tars, shard, Path(spec).is_dir())
        tars = usable_tars(root, tars, bad, bad_shards)
    key = tuple(str(k) for k in table["key"])
    indices = [t.with_suffix(".idx") for t in tars]
    labels = [-1 if v is None else int(v) for v in table["label"]]
    codec, video_exts = _codec_and_exts(root, tars[0])
    return ShardSet(
        root=root, tars=tuple(tars),
        index_paths=tuple(indices) if all(p.is_file() for p in indices) else (),
        codec=codec, video_exts=video_exts, shard=shard, key=key,
        frames=np.asarray(table["frames"], np.int64), width=np.asarray(table["width"], np.int64),
        height=np.asarray(table["height"], np.int64), label=np.asarray(labels, np.int64),
        row_by_sample={(s, k): i for i, (s, k) in enumerate(zip(shard, key))},
        class_names=read_class_names(root))


@dataclass
class RawSample:
    """One shard sample before decoding."""

    shard: str  # tar file name
    key: str
    video: bytes | np.ndarray  # encoded video (np.uint8 [bytes] when it comes from DALI)
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
        self.failed: list[tuple[str, str]] = []

    def record(self, bad: BadSample) -> None:
        self.count += 1
        self.in_a_row += 1
        action = "skipped" if self.mode == "train" else "failed (not replaced)"
        log.warning("%s loader: bad sample %s in shard %s %s: %s", self.backend, bad.key,
                    bad.shard, action, bad.reason)
        if self.mode == "eval":
            self.failed.append((bad.key, bad.reason))
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


def dali_unavailable_reason(codec: str, device: torch.device | None) -> str | None:
    """Why DALI cannot decode `codec` here, or None when it can."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"nvidia.dali does not import ({e}); install the 'dali' extra"
    on_gpu = device is not None and device.type == "cuda" and torch.cuda.is_available()
    if codec not in DALI_CPU_CODECS and not on_gpu:
        missing = ("the loader was given no CUDA device" if torch.cuda.is_available()
                   else "there is no CUDA device")
        return (f"codec {codec!r} needs DALI's GPU decoder (device='mixed') and {missing}; "
                f"DALI's CPU decoder handles only {list(DALI_CPU_CODECS)}")
    return None


def choose_backend(requested: str, codec: str, device: torch.device | None) -> tuple[str, str]:
    """(backend, why) for data.backend = `requested`."""
    if requested not in BACKENDS:
        raise ValueError(f"data.backend={requested!r}: build_loader accepts {list(BACKENDS)}")
    if requested == "fallback":
        return "fallback", "data.backend='fallback'"
    reason = dali_unavailable_reason(codec, device)
    if requested == "dali":
        if reason:
            raise ValueError(f"data.backend='dali' cannot run here: {reason}")
        return "dali", "data.backend='dali'"
    if reason:
        return "fallback", f"auto: {reason}"
    where = "GPU (mixed)" if device is not None and device.type == "cuda" else "CPU"
    return "dali", f"auto: DALI imports and decodes {codec} on the {where}"


def build_loader(data_cfg: DataConfig, videos_per_gpu: int, rank: int, world_size: int,
                 mode: str = "train", seed: int = 0, epoch: int = 0, start_step: int = 0,
                 device: torch.device | str | None = None, num_classes: int | None = None):
    """The input pipeline for one rank: a DaliLoader or a FallbackLoader (see module doc).

    `num_classes` (classification): labels outside [0, num_classes) are bad samples."""
    check_loader_args(data_cfg, videos_per_gpu, rank, world_size, mode, start_step)
    device = torch.device(device) if device is not None else None
    shards = open_shard_set(data_cfg.shards, data_cfg.bad_shards)
    backend, why = choose_backend(data_cfg.backend, shards.codec, device)
    log.info("input pipeline for rank %d (%s mode): %s backend, because %s", rank, mode,
             backend, why)
    if backend == "dali":
        from vmaescale.data.dali import DaliLoader
        loader = DaliLoader(shards, data_cfg, videos_per_gpu, rank, world_size, mode, seed, epoch,
                            start_step, device, num_classes)
    else:
        check_fallback_augmentation(data_cfg, mode)
        from vmaescale.data.fallback import FallbackLoader
        loader = FallbackLoader(shards, data_cfg, videos_per_gpu, rank, world_size, mode, seed,
                                epoch, start_step, num_classes)
    return loader


def check_fallback_augmentation(data_cfg: DataConfig, mode: str) -> None:
    """The fallback loader has no frame-consistent RandAugment: refuse it, naming the option."""
    if mode == "train" and data_cfg.rand_augment != "none":
        raise ValueError(f"data.rand_augment={data_cfg.rand_augment!r} needs the DALI backend "
                         "(nvidia.dali.auto_aug, one op per clip on every frame); the fallback "
                         "loader has none here (torchvision, and so timm, does not import next to "
                         "this torch build). Set data.rand_augment='none' or use data.backend='dali'")


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
