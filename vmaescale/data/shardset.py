"""The shard set: a shard directory's tars, DALI index files, manifest and codec, and the
cheap checks that refuse or leave out bad tars (`data.bad_shards`, see `vmaescale.data.loader`).

Imported by both backends and by `build_loader`; imports neither backend, nor PyAV.
"""

from __future__ import annotations

import glob
import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow.parquet as pq

from vmaescale.data.tar_format import dali_index_text, shard_name, split_member_name, tar_problem

log = logging.getLogger(__name__)

CODEC_BY_EXT = {"webm": "vp9", "mp4": "h264"}
VIDEO_EXTS = ("mp4", "webm")
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


READ_COMPONENTS = ("video", "nframes", "cls")  # the columns of SampleIndex.offset / .size


@dataclass(frozen=True)
class SampleIndex:
    """Every sample of a shard set's tars in reading order (the tars in order, each in the
    order of its `.idx`: the order and grouping of DALI's webdataset reader), with where its
    video, `.nframes` and `.cls` lie in its tar. Random access: a loader reads any sample
    with one seek per component, so an epoch's order can be any permutation."""

    tars: tuple[Path, ...]
    tar: np.ndarray  # int32 [N]: the sample's position in `tars`
    key: tuple[str, ...]  # the member name up to the first dot of its file name, as wds2idx splits it
    offset: np.ndarray  # int64 [N, 3]: data offset of video, nframes, cls; -1 = absent
    size: np.ndarray  # int64 [N, 3]

    def __len__(self) -> int:
        return len(self.key)


def _index_lines(tar: Path) -> list[str]:
    """The tar's `.idx` sample lines, or (no `.idx`) the lines wds2idx would write for it."""
    index_path = tar.with_suffix(".idx")
    text = index_path.read_text(errors="replace") if index_path.is_file() else dali_index_text(tar)
    return text.splitlines()[1:]


def index_samples(shards: ShardSet) -> SampleIndex:
    """The SampleIndex of `shards` (its `.idx` files; a tar without one is walked)."""
    column = {"nframes": 1, "cls": 2, **dict.fromkeys(shards.video_exts, 0)}
    tar_of, keys, offsets, sizes = [], [], [], []
    for t, tar in enumerate(shards.tars):
        for line in _index_lines(tar):
            fields = line.split()  # ext offset size name, per member
            where = np.full((2, len(READ_COMPONENTS)), -1, np.int64)
            for ext, offset, size in zip(fields[0::4], fields[1::4], fields[2::4]):
                c = column.get(ext)
                if c is not None and where[0, c] < 0:  # a second video: the first one counts
                    where[:, c] = int(offset), int(size)
            tar_of.append(t)
            keys.append(split_member_name(fields[3])[0])
            offsets.append(where[0])
            sizes.append(where[1])
    empty = np.zeros((0, len(READ_COMPONENTS)), np.int64)
    return SampleIndex(tars=shards.tars, tar=np.asarray(tar_of, np.int32), key=tuple(keys),
                       offset=np.stack(offsets) if offsets else empty,
                       size=np.stack(sizes) if sizes else empty)
