"""Check and summarise a shard set written by vmaescale.data.shards.

Every shard is opened: its samples must match the manifest rows for it (same keys, same
order), carry the components of the format (video, 4-byte .nframes, .json, .cls when
labeled), and its DALI index must equal the one computed from the tar. The first sample
of each shard is decoded with PyAV and must give .nframes frames of the manifest's size.
"""

from __future__ import annotations

import json
import struct
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import pyarrow.parquet as pq

from vmaescale.data.shards import VIDEO_SUFFIXES, split_member_name, dali_index_text
from vmaescale.data.video_io import VideoError, decode_frames

_VIDEO_EXTS = {suffix[1:] for suffix in VIDEO_SUFFIXES}


@dataclass(frozen=True)
class ShardCheck:
    """One shard's verdict: `error` is None when the shard is sound."""

    name: str
    samples: int
    video_exts: dict
    error: Optional[str]


@dataclass
class ShardSetReport:
    directory: str
    dataset: dict
    samples: int
    stats: dict                      # column -> (min, mean, max)
    labels: list                     # (class name, index, count); name "(unlabeled)" for -1
    rejects: dict                    # reason -> count
    shards: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.shards) and all(s.error is None for s in self.shards)

    @property
    def video_exts(self) -> Counter:
        return sum((Counter(s.video_exts) for s in self.shards), Counter())


def _samples_in_tar(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: payload}, in tar order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isreg():
                key, ext = split_member_name(member.name)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _sample_problem(key: str, components: dict, labeled: bool) -> Optional[str]:
    """What is wrong with one sample's components, or None."""
    videos = [ext for ext in components if ext in _VIDEO_EXTS]
    if len(videos) != 1:
        return f"sample {key} has video components {videos}; expected exactly one"
    if len(components.get("nframes", b"")) != 4:
        return f"sample {key} .nframes is not 4 bytes"
    if "json" not in components:
        return f"sample {key} has no .json"
    if labeled and "cls" not in components:
        return f"sample {key} has no .cls although its manifest label is set"
    return None


def _decode_problem(key: str, components: dict, row: dict) -> Optional[str]:
    """Decode a whole sample; a problem if frame count or size differ from what is stored."""
    video = next(payload for ext, payload in components.items() if ext in _VIDEO_EXTS)
    (nframes,) = struct.unpack("<i", components["nframes"])
    try:
        frames = decode_frames(video, range(nframes))  # [T, H, W, 3]
    except (VideoError, IndexError) as e:
        return f"sample {key} does not decode: {e}"
    if frames.shape[1:3] != (row["height"], row["width"]):
        return (f"sample {key} decodes to {frames.shape[2]}x{frames.shape[1]}, manifest says "
                f"{row['width']}x{row['height']}")
    return None


def check_shard(tar_path: Path, rows: list[dict], decode: bool = True) -> ShardCheck:
    """Check one shard against its manifest rows (see the module docstring)."""
    try:
        samples = _samples_in_tar(tar_path)
        exts = Counter(ext for c in samples.values() for ext in c if ext in _VIDEO_EXTS)
        error = _shard_problem(tar_path, samples, rows, decode)
    except (OSError, tarfile.TarError, ValueError) as e:
        return ShardCheck(tar_path.name, 0, {}, f"cannot read {tar_path.name}: {e}")
    return ShardCheck(tar_path.name, len(samples), dict(exts), error)


def _shard_problem(tar_path: Path, samples: dict, rows: list[dict], decode: bool) -> Optional[str]:
    keys = [r["key"] for r in rows]
    if list(samples) != keys:
        return f"tar keys {list(samples)[:3]}... differ from the manifest's {keys[:3]}..."
    index_path = tar_path.with_suffix(".idx")
    if not index_path.is_file():
        return f"{index_path.name} is missing"
    if index_path.read_text() != dali_index_text(tar_path):
        return f"{index_path.name} does not match the tar (rebuild it with wds2idx)"
    for row in rows:
        problem = _sample_problem(row["key"], samples[row["key"]], row["label"] >= 0)
        if problem:
            return problem
    if decode and rows:
        return _decode_problem(rows[0]["key"], samples[rows[0]["key"]], rows[0])
    return None


def _stats(values: list) -> tuple:
    return (min(values), sum(values) / len(values), max(values)) if values else (0, 0, 0)


def _label_histogram(labels: list[int], names: dict) -> list[tuple[str, int, int]]:
    by_index = {index: name for name, index in names.items()}
    counts = Counter(labels)
    return [(by_index.get(i, "(unlabeled)" if i < 0 else "?"), i, counts[i]) for i in sorted(counts)]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def inspect_shards(directory: Union[str, Path], decode: bool = True) -> ShardSetReport:
    """Check every shard of a shard set and gather its statistics."""
    directory = Path(directory)
    manifest_path = directory / "manifest.parquet"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing; is {directory} a shard set "
                                "written by data_tools/build_shards.py?")
    rows = pq.read_table(manifest_path).to_pylist()
    rejects_path = directory / "rejects.parquet"
    rejects = pq.read_table(rejects_path).column("reason").to_pylist() if rejects_path.is_file() else []
    report = ShardSetReport(
        str(directory), _read_json(directory / "dataset.json"), len(rows),
        {c: _stats([r[c] for r in rows]) for c in ("frames", "fps", "width", "height", "bytes")},
        _label_histogram([r["label"] for r in rows], _read_json(directory / "labels.json")),
        dict(Counter(rejects)))
    rows_by_tar: dict[str, list[dict]] = {}
    for row in rows:
        rows_by_tar.setdefault(f"shard-{row['shard']:06d}.tar", []).append(row)
    for name in sorted(set(rows_by_tar) | {p.name for p in directory.glob("shard-*.tar")}):
        tar_path = directory / name
        if not tar_path.is_file():
            report.shards.append(ShardCheck(name, 0, {}, f"{name} is in the manifest but missing"))
        else:
            report.shards.append(check_shard(tar_path, rows_by_tar.get(name, []), decode))
    return report


def _stat_line(name: str, stat: tuple) -> str:
    low, mean, high = stat
    return f"  {name:<8} min {low:g}  mean {mean:.4g}  max {high:g}"


def format_report(report: ShardSetReport) -> str:
    """A readable summary, one line per shard with a problem."""
    codec = report.dataset.get("codec", "?")
    exts = ", ".join(f"{ext} {n}" for ext, n in sorted(report.video_exts.items())) or "none"
    lines = [f"{report.directory}: {report.samples} samples in {len(report.shards)} shards "
             f"(codec {codec}; videos: {exts})"]
    lines += [_stat_line(name, stat) for name, stat in report.stats.items()]
    lines.append(f"labels: {len(report.labels)} values")
    lines += [f"  {index:>5}  {name:<24} {count}" for name, index, count in report.labels]
    rejected = sum(report.rejects.values())
    lines.append(f"rejects: {rejected}" + "".join(f"\n  {reason:<16} {n}"
                                                   for reason, n in sorted(report.rejects.items())))
    bad = [s for s in report.shards if s.error]
    lines += [f"FAILED {s.name}: {s.error}" for s in bad]
    lines.append(f"{len(report.shards) - len(bad)}/{len(report.shards)} shards OK"
                 + ("" if report.ok else " -- shard set is NOT usable"))
    return "\n".join(lines)
