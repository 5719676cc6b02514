"""Check and summarise a shard set written by vmaescale.data.shards.

Every tar of the directory (`*.tar`, what the loaders read) is checked and every problem
found in it is reported, not just the first:

- the tar itself: `shards.tar_problem`, the check the loaders make when they are built
  (not empty, a tar, every member its .idx lists inside the file behind a matching header);
- its .idx exists and equals the index computed from the tar;
- its samples match the manifest rows for it (same keys, same order, none twice);
- every sample: a safe member name (relative, no '..'), exactly one non-empty video,
  a 4-byte `.nframes` >= 1 equal to the manifest's frame count, a `.json` that parses,
  a `.cls` (required when the manifest label is set) equal to the manifest label and
  inside labels.json's class range;
- the first sample of each shard (every sample with decode_all) is decoded with PyAV: it
  must give exactly `.nframes` frames of the manifest's size.

Memory stays bounded by one sample whatever its components say: a video is read only
to decode it, other components only up to METADATA_LIMIT bytes, and decoding streams
one frame at a time and stops one frame past `.nframes` (nothing is allocated by a count).
"""

from __future__ import annotations

import json
import struct
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import pyarrow.parquet as pq

from vmaescale.data.shards import (VIDEO_SUFFIXES, dali_index_text, member_name_problem, shard_name,
                                   split_member_name, tar_problem)
from vmaescale.data.video_io import VideoError, open_video

_VIDEO_EXTS = {suffix[1:] for suffix in VIDEO_SUFFIXES}
METADATA_LIMIT = 1 << 16  # bytes read of a .nframes, .cls or .json component
_SHOWN = 3  # keys named in a problem about many keys


@dataclass(frozen=True)
class ShardCheck:
    """One shard's verdict: every problem found, none when the shard is sound."""

    name: str
    samples: int
    video_exts: dict
    problems: tuple[str, ...] = ()

    @property
    def error(self) -> Optional[str]:
        """All problems on one line, or None."""
        return "; ".join(self.problems) if self.problems else None


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
        return bool(self.shards) and all(not s.problems for s in self.shards)

    @property
    def video_exts(self) -> Counter:
        return sum((Counter(s.video_exts) for s in self.shards), Counter())


@dataclass
class TarSample:
    """One sample's members (extension -> TarInfo), in tar order; payloads are not read."""

    key: str
    members: dict = field(default_factory=dict)
    repeated: list = field(default_factory=list)  # extensions met more than once


def tar_samples(tar: tarfile.TarFile) -> Iterator[TarSample]:
    """The samples of an open tar: consecutive regular members sharing a key."""
    sample = None
    for member in tar:
        if not member.isreg():
            continue
        key, ext = split_member_name(member.name)
        if sample is None or key != sample.key:
            if sample is not None:
                yield sample
            sample = TarSample(key)
        if ext in sample.members:
            sample.repeated.append(ext)
        sample.members[ext] = member
    if sample is not None:
        yield sample


def read_capped(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int = METADATA_LIMIT) -> bytes:
    """At most limit + 1 bytes of a member (one more than allowed tells it is too long)."""
    return tar.extractfile(member).read(limit + 1)


def _nframes_problems(raw: bytes, row: Optional[dict]) -> tuple[list[str], Optional[int]]:
    """Problems of a `.nframes` payload, and its value when it has one."""
    if len(raw) != 4:
        shown = f"over {METADATA_LIMIT}" if len(raw) > METADATA_LIMIT else str(len(raw))
        return [f".nframes is {shown} bytes; expected 4 (little-endian int32)"], None
    (nframes,) = struct.unpack("<i", raw)
    if nframes < 1:
        return [f".nframes is {nframes}; expected >= 1"], None
    if row is not None and nframes != row["frames"]:
        return [f".nframes says {nframes} frames, the manifest {row['frames']}"], nframes
    return [], nframes


def _label_problems(raw: bytes, row: Optional[dict], num_classes: int) -> list[str]:
    """Problems of a `.cls` payload against the manifest label and the class range."""
    text = raw[:METADATA_LIMIT].decode("ascii", "replace").strip()
    try:
        label = int(text)
    except ValueError:
        return [f".cls is {text[:20]!r}; expected an ASCII decimal label"]
    problems = []
    if row is not None and label != row["label"]:
        problems.append(f".cls is {label}, the manifest says {row['label']}")
    if num_classes and not 0 <= label < num_classes:
        problems.append(f".cls {label} is outside the class range [0, {num_classes}) of labels.json")
    return problems


def _json_problems(raw: bytes) -> list[str]:
    if len(raw) > METADATA_LIMIT:
        return [f".json is over {METADATA_LIMIT} bytes"]
    try:
        json.loads(raw)
    except ValueError as e:
        return [f".json does not parse ({e})"]
    return []


def sample_problems(tar: tarfile.TarFile, sample: TarSample, row: Optional[dict],
                    num_classes: int) -> tuple[list[str], Optional[int]]:
    """Every problem of one sample's members, and its `.nframes` when readable."""
    members, problems, nframes = sample.members, [], None
    name_problem = member_name_problem(sample.key)
    if name_problem:
        problems.append(f"is unsafe: {name_problem}")
    problems += [f"has more than one .{ext}" for ext in sample.repeated]
    videos = [ext for ext in members if ext in _VIDEO_EXTS]
    if len(videos) != 1:
        problems.append(f"has video components {videos}; expected exactly one")
    elif members[videos[0]].size == 0:
        problems.append(f"video .{videos[0]} is 0 bytes")
    if "nframes" in members:
        found, nframes = _nframes_problems(read_capped(tar, members["nframes"]), row)
        problems += found
    else:
        problems.append("has no .nframes")
    problems += _json_problems(read_capped(tar, members["json"])) if "json" in members else ["has no .json"]
    if "cls" in members:
        problems += _label_problems(read_capped(tar, members["cls"]), row, num_classes)
    elif row is not None and row["label"] >= 0:
        problems.append("has no .cls although its manifest label is set")
    return [f"sample {sample.key} {p}" for p in problems], nframes


def decode_problems(key: str, video: bytes, nframes: int, row: dict) -> list[str]:
    """Stream-decode a video (one frame held at a time, at most nframes + 1 decoded): it
    must hold exactly `nframes` frames of the manifest's size."""
    count, size = 0, None
    try:
        with open_video(video) as reader:
            for frame in reader.frames():
                count += 1
                size = size or (frame.width, frame.height)
                if count > nframes:
                    break
    except VideoError as e:
        return [f"sample {key} does not decode: {e}"]
    problems = []
    if count > nframes:
        problems.append(f"sample {key} decodes to more than the {nframes} frames .nframes says")
    elif count < nframes:
        problems.append(f"sample {key} decodes to {count} frames; .nframes says {nframes}")
    if size != (row["width"], row["height"]):
        problems.append(f"sample {key} decodes to {size[0]}x{size[1]}, manifest says "
                        f"{row['width']}x{row['height']}")
    return problems


def key_problems(tar_keys: list[str], manifest_keys: list[str]) -> list[str]:
    """How the tar's sample keys differ from the manifest rows of that tar."""
    in_tar, in_manifest = set(tar_keys), set(manifest_keys)
    extra = [k for k in tar_keys if k not in in_manifest]
    missing = [k for k in manifest_keys if k not in in_tar]
    repeated = sorted(k for k, n in Counter(tar_keys).items() if n > 1)
    problems = []
    if extra:
        problems.append(f"{len(extra)} tar sample(s) are not in the manifest: {extra[:_SHOWN]}")
    if missing:
        problems.append(f"{len(missing)} manifest row(s) are missing from the tar: {missing[:_SHOWN]}")
    if repeated:
        problems.append(f"keys {repeated[:_SHOWN]} appear more than once in the tar")
    if not problems and tar_keys != manifest_keys:
        problems.append(f"tar keys {tar_keys[:_SHOWN]}... are in a different order than the "
                        f"manifest's {manifest_keys[:_SHOWN]}...")
    return problems


def index_problems(tar_path: Path) -> list[str]:
    """The .idx must exist and equal the index computed from the tar."""
    index_path = tar_path.with_suffix(".idx")
    if not index_path.is_file():
        return [f"{index_path.name} is missing"]
    try:
        expected = dali_index_text(tar_path)
    except (OSError, tarfile.TarError, ValueError) as e:
        return [f"{index_path.name} cannot be compared with the tar ({e})"]
    if index_path.read_text(errors="replace") != expected:
        return [f"{index_path.name} does not match the tar (rebuild it with wds2idx)"]
    return []


def _content_problems(tar_path: Path, rows: list[dict], decode: bool, decode_all: bool,
                      num_classes: int) -> tuple[list[str], list[str], Counter]:
    """Problems of the samples of a tar, its keys in order, and its video extensions."""
    row_by_key = {r["key"]: r for r in rows}
    problems, keys, exts = [], [], Counter()
    with tarfile.open(tar_path) as tar:
        try:
            for sample in tar_samples(tar):
                row = row_by_key.get(sample.key)
                found, nframes = sample_problems(tar, sample, row, num_classes)
                problems += found
                videos = [ext for ext in sample.members if ext in _VIDEO_EXTS]
                exts.update(videos)
                if decode and (decode_all or not keys) and row and nframes and len(videos) == 1:
                    video = tar.extractfile(sample.members[videos[0]]).read()
                    problems += decode_problems(sample.key, video, nframes, row)
                keys.append(sample.key)
        except (OSError, EOFError, tarfile.TarError) as e:
            problems.append(f"cannot read {tar_path.name} past sample {len(keys)} ({e})")
    return problems, keys, exts


def check_shard(tar_path: Path, rows: list[dict], decode: bool = True, decode_all: bool = False,
                num_classes: int = 0) -> ShardCheck:
    """Every problem of one shard against its manifest rows (see the module docstring)."""
    problems = []
    structural = tar_problem(tar_path)
    if structural:
        problems.append(f"{tar_path.name} {structural}")
    try:
        found, keys, exts = _content_problems(tar_path, rows, decode, decode_all, num_classes)
    except (OSError, tarfile.TarError) as e:  # the tar does not open: nothing more to learn
        if not structural:
            problems.append(f"cannot read {tar_path.name}: {e}")
        return ShardCheck(tar_path.name, 0, {}, tuple(problems))
    problems += index_problems(tar_path) + key_problems(keys, [r["key"] for r in rows]) + found
    return ShardCheck(tar_path.name, len(keys), dict(exts), tuple(problems))


def _stats(values: list) -> tuple:
    return (min(values), sum(values) / len(values), max(values)) if values else (0, 0, 0)


def _label_histogram(labels: list[int], names: dict) -> list[tuple[str, int, int]]:
    by_index = {index: name for name, index in names.items()}
    counts = Counter(labels)
    return [(by_index.get(i, "(unlabeled)" if i < 0 else "?"), i, counts[i]) for i in sorted(counts)]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def inspect_shards(directory: Union[str, Path], decode: bool = True,
                   decode_all: bool = False) -> ShardSetReport:
    """Check every shard of a shard set and gather its statistics.

    decode: decode the first sample of each shard; decode_all: every sample."""
    directory = Path(directory)
    manifest_path = directory / "manifest.parquet"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing; is {directory} a shard set "
                                "written by data_tools/build_shards.py?")
    rows = pq.read_table(manifest_path).to_pylist()
    rejects_path = directory / "rejects.parquet"
    rejects = pq.read_table(rejects_path).column("reason").to_pylist() if rejects_path.is_file() else []
    labels = _read_json(directory / "labels.json")
    report = ShardSetReport(
        str(directory), _read_json(directory / "dataset.json"), len(rows),
        {c: _stats([r[c] for r in rows]) for c in ("frames", "fps", "width", "height", "bytes")},
        _label_histogram([r["label"] for r in rows], labels), dict(Counter(rejects)))
    rows_by_tar: dict[str, list[dict]] = {}
    for row in rows:
        rows_by_tar.setdefault(shard_name(row["shard"]), []).append(row)
    for name in sorted(set(rows_by_tar) | {p.name for p in directory.glob("*.tar")}):
        tar_path = directory / name
        if not tar_path.is_file():
            report.shards.append(ShardCheck(name, 0, {}, (f"{name} is in the manifest but missing",)))
        else:
            report.shards.append(check_shard(tar_path, rows_by_tar.get(name, []), decode,
                                             decode_all, len(labels)))
    return report


def _stat_line(name: str, stat: tuple) -> str:
    low, mean, high = stat
    return f"  {name:<8} min {low:g}  mean {mean:.4g}  max {high:g}"


def format_report(report: ShardSetReport) -> str:
    """A readable summary, one line per problem of each shard."""
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
    bad = [s for s in report.shards if s.problems]
    lines += [f"FAILED {s.name}: {problem}" for s in bad for problem in s.problems]
    lines.append(f"{len(report.shards) - len(bad)}/{len(report.shards)} shards OK"
                 + ("" if report.ok else " -- shard set is NOT usable"))
    return "\n".join(lines)
