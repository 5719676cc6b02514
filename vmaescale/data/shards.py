"""Build WebDataset shards (format: see vmaescale/data/__init__.py) from videos.

Inputs are a folder of videos (a video under a sub-folder takes the sub-folder name as
its class; class names sorted -> label indices) or a CSV list (`path[,label]` with or
without a header, or header-less `path label`).

Order and resuming
------------------
Inputs are put in a canonical order (sorted paths for a folder, file order for a CSV),
which fixes each sample's key (`<position>_<stem>`), then shuffled with `seed`. Shards are
filled in the shuffled order and close at `shard_size` samples (or before exceeding
`shard_max_bytes`). A shard is committed by writing `shard-NNNNNN.tar` and `.idx` under
temporary names, renaming them into place, and then writing its sidecar
`.build/shard-NNNNNN.json` (manifest rows, rejects, and the input position it ended at).
The sidecar is the commit mark: a re-run with the same inputs and options skips the
inputs covered by sidecars and redoes the rest. Transcoding is deterministic, so an
interrupted-and-resumed build equals an uninterrupted one. manifest.parquet,
rejects.parquet, labels.json and dataset.json are assembled from the sidecars at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import struct
import tarfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import av
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from vmaescale.data.tar_format import (  # noqa: F401 (the reading half, re-exported here)
    _TAR_BLOCK_BYTES, IndexedMember, dali_index_text, member_name_problem, read_dali_index,
    shard_name, split_member_name, tar_problem)
from vmaescale.data.video_io import (CODECS, REJECT_REASONS, VideoError, VideoInfo, codec_by_name,
                                     encode_to_bytes, open_container, open_video, probe)
from vmaescale.fileio import write_atomic

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                  ".wmv", ".ogv", ".3gp", ".ts")
BUILD_DIR = ".build"
_KEY_STEM_CHARS = 40

MANIFEST_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("key", pa.string()), ("label", pa.int64()), ("frames", pa.int32()),
    ("fps", pa.float64()), ("width", pa.int32()), ("height", pa.int32()), ("bytes", pa.int64()),
    ("source", pa.string()),
])
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


@dataclass(frozen=True)
class BuildOptions:
    """Everything that decides a shard set's content (a resumed build must use the same)."""

    codec: str = "h264"                      # h264 (.mp4) | vp9 (.webm); ignored with passthrough
    short_side: int = 320                    # resize keeping aspect; 0 keeps the source size
    fps: Optional[float] = None              # constant output rate; None: source rate rounded
    gop: int = 16                            # frames between keyframes
    passthrough: bool = False                # store the source bytes unchanged
    shard_size: int = 1000                   # samples per shard
    shard_max_bytes: Optional[int] = None    # close a shard before it grows past this
    min_frames: int = 16                     # fewer decoded frames -> rejected as too_short
    seed: int = 0                            # fixes the shuffle and so the shard assignment

    def __post_init__(self):
        codec_by_name(self.codec)
        _check(self.short_side >= 0 and self.short_side % 2 == 0, "short_side", self.short_side,
               "an even number of pixels, or 0 to keep the source size")
        _check(self.fps is None or self.fps > 0, "fps", self.fps, "a positive rate or None")
        _check(self.gop >= 1, "gop", self.gop, ">= 1")
        _check(self.shard_size >= 1, "shard_size", self.shard_size, ">= 1")
        _check(self.shard_max_bytes is None or self.shard_max_bytes > 0, "shard_max_bytes",
               self.shard_max_bytes, "a positive byte count or None")
        _check(self.min_frames >= 1, "min_frames", self.min_frames, ">= 1")


def _check(ok: bool, name: str, value, accepted: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not accepted; use {accepted}")


@dataclass(frozen=True)
class VideoInput:
    """One listed video and its class name (None when unlabeled)."""

    source: str
    label: Optional[str]


@dataclass(frozen=True)
class SampleTask:
    """What a worker needs to turn one input into a sample."""

    key: str
    source: str
    label: int
    options: BuildOptions


@dataclass(frozen=True)
class Reject:
    """An input that could not be used; `reason` is one of REJECT_REASONS."""

    source: str
    reason: str
    detail: str


@dataclass(frozen=True)
class EncodedSample:
    """A finished sample: the stored video bytes and what was measured."""

    key: str
    label: int
    source: str
    data: bytes
    ext: str
    stored: VideoInfo
    original: VideoInfo

    def members(self) -> list[tuple[str, bytes]]:
        """Tar members (name, payload): video, nframes, cls when labeled, json."""
        members = [(f"{self.key}.{self.ext}", self.data),
                   (f"{self.key}.nframes", struct.pack("<i", self.stored.frames))]
        if self.label >= 0:
            members.append((f"{self.key}.cls", str(self.label).encode()))
        members.append((f"{self.key}.json", json.dumps(self.metadata(), sort_keys=True).encode()))
        return members

    def metadata(self) -> dict:
        """The .json component: source path, original fps/size/duration/codec, stored ones."""
        return {"source": self.source, "fps": self.original.fps, "width": self.original.width,
                "height": self.original.height, "duration": self.original.duration,
                "codec": self.original.codec, "frames": self.original.frames,
                "stored": {"fps": self.stored.fps, "width": self.stored.width,
                           "height": self.stored.height, "frames": self.stored.frames,
                           "codec": self.stored.codec}}

    def manifest_row(self, shard: int) -> dict:
        """This sample's manifest.parquet row."""
        return {"shard": shard, "key": self.key, "label": self.label, "frames": self.stored.frames,
                "fps": self.stored.fps, "width": self.stored.width, "height": self.stored.height,
                "bytes": len(self.data), "source": self.source}

    def tar_bytes(self) -> int:
        """Bytes this sample adds to a tar (headers and padding included)."""
        return sum(_TAR_BLOCK_BYTES + -(-len(payload) // _TAR_BLOCK_BYTES) * _TAR_BLOCK_BYTES
                   for _, payload in self.members())


@dataclass(frozen=True)
class BuildSummary:
    """Counts of a finished build, and how long this run took."""

    out_dir: str
    samples: int
    shards: int
    classes: int
    total_bytes: int
    rejects_by_reason: dict
    processed: int
    elapsed_s: float

    @property
    def videos_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0


# ---------------------------------------------------------------------------- inputs


def list_inputs(source: Union[str, Path], root: Union[str, Path, None] = None) -> list[VideoInput]:
    """Videos of a folder (sorted) or of a CSV list (file order; paths relative to `root`)."""
    source = Path(source)
    if source.is_dir():
        return folder_inputs(source)
    if source.is_file():
        return csv_inputs(source, Path(root) if root is not None else source.parent)
    raise FileNotFoundError(f"source {source} is neither a folder of videos nor a CSV file")


def folder_inputs(root: Path) -> list[VideoInput]:
    """Every video file under `root`; one in a sub-folder is labeled with the sub-folder name."""
    inputs = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).parts
        if (path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES
                and not any(part.startswith(".") for part in relative)):
            inputs.append(VideoInput(str(path.resolve()), relative[0] if len(relative) > 1 else None))
    return inputs


def _csv_rows(lines: list[str]) -> list[list[str]]:
    """Split lines on commas when the first has one, else on the last run of whitespace."""
    rows = list(csv.reader(lines)) if "," in lines[0] else [line.rsplit(None, 1) for line in lines]
    return [[field.strip() for field in row] for row in rows]


def csv_inputs(csv_path: Path, root: Path) -> list[VideoInput]:
    """Rows of `path[,label]` (optional header naming `path` and `label` columns)."""
    lines = [line for line in csv_path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{csv_path} lists no videos")
    rows = _csv_rows(lines)
    header = [name.lower() for name in rows[0]]
    if "path" in header:
        path_col, label_col = header.index("path"), header.index("label") if "label" in header else None
        rows = rows[1:]
    else:
        path_col, label_col = 0, 1
        wide = [i for i, row in enumerate(rows, 1) if len(row) > 2]
        if wide:
            raise ValueError(f"{csv_path} line {wide[0]} has {len(rows[wide[0] - 1])} columns; "
                             "without a header use 'path' or 'path,label' (or 'path label')")
    return [VideoInput(str((root / row[path_col]).resolve()), _label_field(row, label_col))
            for row in rows]


def _label_field(row: list[str], column: Optional[int]) -> Optional[str]:
    if column is None or column >= len(row) or not row[column]:
        return None
    return row[column]


def label_map_for(inputs: list[VideoInput], given: Optional[dict] = None) -> dict[str, int]:
    """Class name -> index: `given` if passed, identity for integer labels, else sorted names."""
    names = {i.label for i in inputs if i.label is not None}
    if given is not None:
        unknown = sorted(names - set(given))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not in the given label map "
                             f"(it has {len(given)} classes, e.g. {sorted(given)[:5]})")
        return {str(name): int(index) for name, index in given.items()}
    if names and all(re.fullmatch(r"-?\d+", name) for name in names):
        return {name: int(name) for name in sorted(names, key=int)}
    return {name: index for index, name in enumerate(sorted(names))}


def sample_key(position: int, source: str, digits: int) -> str:
    """A stable tar key without dots: zero-padded canonical position + sanitized stem."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(source).stem)[:_KEY_STEM_CHARS]
    return f"{position:0{digits}d}_{stem}"


def shuffled_order(count: int, seed: int) -> list[int]:
    """Canonical positions in the order they are written; fixed by `seed`."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def plan_tasks(inputs: list[VideoInput], labels: dict[str, int],
               options: BuildOptions) -> list[SampleTask]:
    """One task per input, in shuffled write order."""
    digits = max(6, len(str(len(inputs) - 1)))
    return [SampleTask(sample_key(p, inputs[p].source, digits), inputs[p].source,
                       labels[inputs[p].label] if inputs[p].label is not None else -1, options)
            for p in shuffled_order(len(inputs), options.seed)]


# ---------------------------------------------------------------------------- one sample


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at `short_side` (0: unchanged), both even."""
    scale = short_side / min(width, height) if short_side else 1.0
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def constant_rate(frames: Iterable[av.VideoFrame], source_fps: float,
                  fps: float) -> Iterator[av.VideoFrame]:
    """Resample to a constant `fps`: output time k/fps shows the source frame nearest to it."""
    previous, previous_t, start, k = None, 0.0, None, 0
    for j, frame in enumerate(frames):
        t = frame.time if frame.time is not None else j / source_fps
        start = t if start is None else start
        t -= start
        if previous is not None:
            while k / fps < (previous_t + t) / 2:
                yield previous
                k += 1
        previous, previous_t = frame, t
    while previous is not None and k / fps < previous_t + 0.5 / source_fps:
        yield previous
        k += 1


def transcode(data: bytes, options: BuildOptions) -> tuple[bytes, VideoInfo]:
    """Re-encode to options.codec at a constant rate and short side -> (bytes, source info)."""
    with open_video(data) as reader:
        if not (options.fps or reader.fps):
            raise VideoError("unreadable", "the video stream has no frame rate; pass fps")
        fps = options.fps or max(1, round(reader.fps))
        width, height = scaled_size(reader.width, reader.height, options.short_side)
        frames = constant_rate(reader.frames(), reader.fps or fps, fps)
        resized = (f.reformat(width, height, "yuv420p", interpolation="BICUBIC") for f in frames)
        encoded = encode_to_bytes(resized, options.codec, fps, width, height, options.gop)
        return encoded, reader.info()


def _passthrough_ext(source: str, data: bytes) -> str:
    """The source's own extension, or one named after its container format."""
    suffix = Path(source).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return suffix[1:]
    with open_container(data) as container:
        format_name = container.format.name.split(",")[0]  # e.g. "mov" of "mov,mp4,m4a,..."
    return {"mov": "mp4", "matroska": "mkv"}.get(format_name, format_name)


def _encode_sample(task: SampleTask, data: bytes) -> EncodedSample:
    options = task.options
    if options.passthrough:
        stored_data, ext = data, _passthrough_ext(task.source, data)
        original = stored = probe(data)
    else:
        stored_data, original = transcode(data, options)
        ext, stored = CODECS[options.codec].ext, probe(stored_data)
    if stored.frames < options.min_frames:
        raise VideoError("too_short", f"{stored.frames} frames, fewer than min_frames={options.min_frames}")
    return EncodedSample(task.key, task.label, task.source, stored_data, ext, stored, original)


def prepare_sample(task: SampleTask) -> Union[EncodedSample, Reject]:
    """Read, check and (unless passthrough) transcode one input; input problems become Rejects."""
    try:
        data = Path(task.source).read_bytes()
    except OSError as e:
        return Reject(task.source, "unreadable", str(e))
    try:
        return _encode_sample(task, data)
    except VideoError as e:
        return Reject(task.source, e.reason, e.detail)
    except av.FFmpegError as e:  # e.g. a pixel format swscale cannot convert
        return Reject(task.source, "unreadable", f"FFmpeg failed on it: {e}")


# ---------------------------------------------------------------------------- files


def _atomic_write_json(path: Path, value) -> None:
    write_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def _atomic_write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    write_atomic(path, buffer.getvalue())


class ShardWriter:
    """Collects one shard's samples and rejects; `commit` makes it durable and visible."""

    def __init__(self, out_dir: Path, index: int, input_start: int):
        self.out_dir, self.index, self.input_start = out_dir, index, input_start
        self.tar_path = out_dir / shard_name(index)
        self.tmp_path = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self.tar: Optional[tarfile.TarFile] = None
        self.rows: list[dict] = []
        self.rejects: list[dict] = []
        self.exts: set[str] = set()
        self.size_bytes = 0

    def is_full_for(self, sample: EncodedSample, options: BuildOptions) -> bool:
        """Whether `sample` must go to the next shard."""
        if len(self.rows) >= options.shard_size:
            return True
        limit = options.shard_max_bytes
        return bool(self.rows) and limit is not None and self.size_bytes + sample.tar_bytes() > limit

    def add(self, sample: EncodedSample) -> None:
        """Append a sample's members to the temporary tar and its row to the shard's rows."""
        if self.tar is None:
            self.tar = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)
        for name, payload in sample.members():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(payload), 0o444, 0
            self.tar.addfile(info, io.BytesIO(payload))
        self.rows.append(sample.manifest_row(self.index))
        self.exts.add(sample.ext)
        self.size_bytes += sample.tar_bytes()

    def reject(self, reject: Reject) -> None:
        """Record an input consumed by this shard that gave no sample."""
        self.rejects.append(dataclasses.asdict(reject))

    def commit(self, input_end: int) -> None:
        """Rename the tar and index into place, then write the sidecar (the commit mark)."""
        if self.tar is not None:
            self.tar.close()
            with open(self.tmp_path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp_path, self.tar_path)
            write_atomic(self.tar_path.with_suffix(".idx"), dali_index_text(self.tar_path).encode())
        sidecar = {"shard": self.index, "input_start": self.input_start, "input_end": input_end,
                   "exts": sorted(self.exts), "rows": self.rows, "rejects": self.rejects}
        _atomic_write_json(self.out_dir / BUILD_DIR / f"shard-{self.index:06d}.json", sidecar)


def committed_sidecars(out_dir: Path) -> list[dict]:
    """Sidecars of committed shards, in order, stopping at the first gap."""
    sidecars = []
    while (path := out_dir / BUILD_DIR / f"shard-{len(sidecars):06d}.json").exists():
        sidecars.append(json.loads(path.read_text()))
    return sidecars


def _plan_record(source: Path, tasks: list[SampleTask], labels: dict, options: BuildOptions) -> dict:
    listing = json.dumps([(t.key, t.source, t.label) for t in tasks]).encode()
    return {"source": str(source.resolve()), "inputs": len(tasks), "labels": labels,
            "inputs_sha256": hashlib.sha256(listing).hexdigest(),
            "options": dataclasses.asdict(options)}


def _start_or_check_plan(out_dir: Path, plan: dict) -> None:
    """Record the plan of a new build, or refuse to resume one that was planned differently."""
    path = out_dir / BUILD_DIR / "plan.json"
    if path.exists():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in plan if k != "options" and previous.get(k) != plan[k])
        changed += sorted(f"options.{k}" for k in plan["options"]
                          if previous.get("options", {}).get(k) != plan["options"][k])
        if changed:
            raise ValueError(f"{out_dir} holds a build with different {', '.join(changed)}; "
                             "re-run with the same inputs and options, or use an empty folder")
        return
    if any(out_dir.glob("shard-*.tar")):
        raise ValueError(f"{out_dir} holds shards from another build (no {BUILD_DIR}/plan.json); "
                         "use an empty folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(path, plan)


def _remove_uncommitted_files(out_dir: Path, sidecars: list[dict]) -> None:
    """Delete temporary files and shards left by an interrupted run that were never committed."""
    kept = {shard_name(s["shard"]) for s in sidecars if s["rows"]}
    kept |= {name.replace(".tar", ".idx") for name in kept}
    for path in [*out_dir.glob("shard-*"), *out_dir.glob("*.tmp"), *(out_dir / BUILD_DIR).glob("*.tmp")]:
        if path.name not in kept:
            path.unlink()


# ---------------------------------------------------------------------------- the build


@contextmanager
def _sample_results(tasks: list[SampleTask], workers: int) -> Iterator[Iterator]:
    """prepare_sample over `tasks`, in order; in worker processes when workers > 1."""
    if workers <= 1 or len(tasks) <= 1:
        yield map(prepare_sample, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool.imap(prepare_sample, tasks, chunksize=1)


def _write_shards(out_dir: Path, tasks: list[SampleTask], options: BuildOptions, workers: int,
                  progress: bool) -> int:
    """Write every shard not yet committed; returns how many inputs this run processed."""
    done = committed_sidecars(out_dir)
    cursor = done[-1]["input_end"] if done else 0
    writer = ShardWriter(out_dir, len(done), cursor)
    rejects = sum(len(s["rejects"]) for s in done)
    with _sample_results(tasks[cursor:], workers) as results, \
            tqdm(total=len(tasks), initial=cursor, unit="video", disable=not progress) as bar:
        for position, result in enumerate(results, start=cursor):
            if isinstance(result, Reject):
                writer.reject(result)
                rejects += 1
            else:
                if writer.is_full_for(result, options):
                    writer.commit(position)
                    writer = ShardWriter(out_dir, writer.index + 1, position)
                writer.add(result)
            bar.update()
            bar.set_postfix(shard=writer.index, rejects=rejects)
        if writer.rows or writer.rejects:
            writer.commit(len(tasks))
    return len(tasks) - cursor


def _frame_stats(rows: list[dict]) -> dict:
    frames = [r["frames"] for r in rows]
    return {"min": min(frames), "mean": sum(frames) / len(frames), "max": max(frames)} if frames else {}


def _write_outputs(out_dir: Path, sidecars: list[dict], labels: dict, options: BuildOptions,
                   source: Path) -> dict:
    """manifest.parquet, rejects.parquet, labels.json, dataset.json from the sidecars."""
    rows = [row for s in sidecars for row in s["rows"]]
    rejects = [reject for s in sidecars for reject in s["rejects"]]
    shards = [shard_name(s["shard"]) for s in sidecars if s["rows"]]
    exts = sorted({ext for s in sidecars for ext in s["exts"]})
    _atomic_write_parquet(out_dir / "manifest.parquet", rows, MANIFEST_SCHEMA)
    _atomic_write_parquet(out_dir / "rejects.parquet", rejects, REJECTS_SCHEMA)
    _atomic_write_json(out_dir / "labels.json", labels)
    dataset = {
        "codec": "passthrough" if options.passthrough else options.codec,
        "video_exts": exts, "samples": len(rows), "shards": shards, "classes": len(labels),
        "labeled": any(r["label"] >= 0 for r in rows), "total_bytes": sum(r["bytes"] for r in rows),
        "frames": _frame_stats(rows), "rejects": len(rejects),
        "rejects_by_reason": dict(Counter(r["reason"] for r in rejects)),
        "source": str(source.resolve()), "options": dataclasses.asdict(options),
    }
    _atomic_write_json(out_dir / "dataset.json", dataset)
    return dataset


def default_workers() -> int:
    """min(4, CPU count)."""
    return min(4, os.cpu_count() or 1)


def build_shards(source: Union[str, Path], out_dir: Union[str, Path],
                 options: BuildOptions = BuildOptions(), *, workers: Optional[int] = None,
                 root: Union[str, Path, None] = None, label_map: Optional[dict] = None,
                 progress: bool = True) -> BuildSummary:
    """Build (or finish an interrupted build of) a shard set in `out_dir`.

    source: a folder of videos or a CSV list; root: base of relative CSV paths (default:
    the CSV's folder); label_map: class name -> index to use instead of deriving one
    (e.g. the train split's labels.json when building the validation split).
    """
    started = time.monotonic()
    source, out_dir = Path(source), Path(out_dir)
    inputs = list_inputs(source, root)
    if not inputs:
        raise ValueError(f"no videos found under {source} (looked for {', '.join(VIDEO_SUFFIXES)})")
    labels = label_map_for(inputs, label_map)
    tasks = plan_tasks(inputs, labels, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    _start_or_check_plan(out_dir, _plan_record(source, tasks, labels, options))
    processed = _write_shards(out_dir, tasks, options, workers or default_workers(), progress)
    sidecars = committed_sidecars(out_dir)
    _remove_uncommitted_files(out_dir, sidecars)
    dataset = _write_outputs(out_dir, sidecars, labels, options, source)
    return BuildSummary(str(out_dir), dataset["samples"], len(dataset["shards"]), len(labels),
                        dataset["total_bytes"], dataset["rejects_by_reason"], processed,
                        time.monotonic() - started)


def _human_bytes(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def format_summary(summary: BuildSummary) -> str:
    """A one-screen report of a build."""
    rejects = sum(summary.rejects_by_reason.values())
    lines = [f"shards written to {summary.out_dir}",
             f"  samples   {summary.samples} in {summary.shards} shards, {summary.classes} classes",
             f"  bytes     {_human_bytes(summary.total_bytes)} of video",
             f"  rejects   {rejects}"]
    lines += [f"    {reason:<16}{summary.rejects_by_reason[reason]}"
              for reason in REJECT_REASONS if reason in summary.rejects_by_reason]
    lines.append(f"  elapsed   {summary.elapsed_s:.1f} s, {summary.processed} videos processed "
                 f"this run ({summary.videos_per_s:.1f} videos/s)")
    return "\n".join(lines)


def parse_bytes(text: str) -> int:
    """'500M', '2G', '1048576' -> bytes (K/M/G/T are powers of 1000)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not match:
        raise ValueError(f"size {text!r} is not a byte count; use e.g. 1048576, 500M or 2G")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[match.group(2)]
    return int(float(match.group(1)) * scale)
