"""Frozen-encoder features over long windows (seeds/001: VideoMAE as a feature extractor).

    for every video: windows of `window` frames every `stride` frames
      -> 16 (the model's clip length) frames per window at linspace(0, window - 1).long()
      -> short side resized to the model's image size, centre crop, ImageNet normalisation
      -> encoder over every token -> mean over tokens (-> fc_norm for classifiers, optional)
      -> one float32 vector per window

A video of n >= window frames has 1 + (n - window) // stride windows (the tail that does
not fill a window is not covered). A shorter video gets one window padded by repeating
its last frame (`short="pad"`, `window_frames` then says how many frames were real), or
none (`short="skip"`: it is listed in the summary as skipped).

Inputs: a shard dir (manifest.parquet + tars), a folder of video files (a sub-folder is the
label) or a CSV list (`path[,label]`). Decoding: PyAV on the CPU, or DALI (`fn.decoders.video`
on the GPU, "mixed", when there is one; on the CPU for VP8/VP9/MJPEG).

Parquet columns: key, label, window_start, window_frames, embedding (fixed-size list of
float32).
"""

from __future__ import annotations

import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from vmaescale.data.transforms import IMAGENET_MEAN, IMAGENET_STD, short_side_resize_wh, spatial_crop_boxes

SHORT_POLICIES = ("pad", "skip")
DECODERS = ("auto", "pyav", "dali")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


@dataclass(frozen=True)
class VideoItem:
    """One input video: its key, label (-1: none), encoded bytes or path, and frame count
    (None: count it)."""

    key: str
    label: int
    source: bytes | str
    nframes: int | None = None
    origin: str = ""  # the tar or file, for messages


@dataclass(frozen=True)
class Window:
    start: int
    frames: int  # real frames in the window (< window only for a padded short video)
    indices: np.ndarray  # int64 [clip frames]


def window_starts(nframes: int, window: int, stride: int) -> list[int]:
    """Starts of the full windows of a video: 0, stride, ... while start + window <= nframes."""
    if window < 1 or stride < 1:
        raise ValueError(f"window={window}, stride={stride}: both must be >= 1")
    if nframes < window:
        return []
    return list(range(0, nframes - window + 1, stride))


def window_indices(start: int, window: int, clip_frames: int, nframes: int) -> np.ndarray:
    """`clip_frames` indices spread over [start, start + window - 1] (linspace, truncated, as
    `torch.linspace(0, window - 1, clip_frames).long()`), past the end repeating the last frame."""
    offsets = torch.linspace(0, window - 1, clip_frames).long().numpy()
    return np.minimum(start + offsets, nframes - 1).astype(np.int64)


def video_windows(nframes: int, window: int, stride: int, clip_frames: int, short: str) -> list[Window]:
    """The windows of a video of `nframes` frames (see the module doc for short videos)."""
    if short not in SHORT_POLICIES:
        raise ValueError(f"short={short!r}: accepted values are {list(SHORT_POLICIES)}")
    starts = window_starts(nframes, window, stride)
    if starts:
        return [Window(s, window, window_indices(s, window, clip_frames, nframes)) for s in starts]
    if short == "skip" or nframes < 1:
        return []
    return [Window(0, nframes, window_indices(0, window, clip_frames, nframes))]


# ---------------------------------------------------------------- inputs


def shard_items(spec: str) -> Iterator[VideoItem]:
    """Every sample of a shard set, in tar order (key, `.cls` label, `.nframes`)."""
    from vmaescale.data.loader import open_shard_set, parse_label, parse_nframes
    from vmaescale.data.shards import split_member_name

    shards = open_shard_set(spec, "refuse")
    for tar_path in shards.tars:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isfile():
                    key, ext = split_member_name(member.name)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, parts in samples.items():
            video = next((parts[e] for e in shards.video_exts if e in parts), None)
            if video is None:
                continue
            nframes = parse_nframes(parts["nframes"]) if "nframes" in parts else None
            yield VideoItem(key, parse_label(parts.get("cls", b"")), video, nframes, tar_path.name)


def file_items(source: str) -> Iterator[VideoItem]:
    """Videos of a folder (a sub-folder is the label) or of a CSV list (`path[,label]`)."""
    from vmaescale.data.shards import label_map_for, list_inputs

    inputs = list_inputs(source)
    labels = label_map_for(inputs)
    root = Path(source) if Path(source).is_dir() else None
    for item in inputs:
        path = Path(item.source)
        key = str(path.relative_to(root.resolve()).with_suffix("")) if root else str(path)
        yield VideoItem(key, labels[item.label] if item.label is not None else -1, str(path), None, str(path))


def input_items(source: str) -> Iterator[VideoItem]:
    """A shard dir (manifest.parquet), a folder of videos or a CSV list."""
    path = Path(source)
    if path.is_dir() and (path / "manifest.parquet").is_file() or source.endswith(".tar"):
        return shard_items(source)
    if path.exists():
        return file_items(source)
    raise FileNotFoundError(f"--shards {source!r}: no such shard dir, video folder or CSV list")


# ---------------------------------------------------------------- decoding


def choose_decoder(requested: str, device: torch.device) -> str:
    if requested not in DECODERS:
        raise ValueError(f"--decoder {requested!r}: accepted values are {list(DECODERS)}")
    if requested != "auto":
        return requested
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "pyav"
    return "dali" if device.type == "cuda" else "pyav"


class PyAVFrames:
    """Decodes the wanted frames on the CPU."""

    name = "pyav"

    def count(self, item: VideoItem) -> int:
        from vmaescale.data.video_io import frame_count
        return item.nframes or frame_count(item.source)

    def decode(self, item: VideoItem, indices: np.ndarray, device: torch.device) -> torch.Tensor:
        """uint8 [len(indices), H, W, 3] on `device`."""
        from vmaescale.data.video_io import decode_frames
        return torch.from_numpy(decode_frames(item.source, indices.tolist())).to(device)


class DaliFrames(PyAVFrames):
    """Decodes the wanted frames with DALI's video decoder ("mixed" on a GPU, else "cpu"),
    copied into torch on the consuming stream."""

    name = "dali"

    def __init__(self, device: torch.device, num_threads: int = 2):
        from nvidia.dali import fn, pipeline_def, types

        gpu = device.type == "cuda"

        @pipeline_def(batch_size=1, num_threads=num_threads, device_id=(device.index or 0) if gpu else None,
                      exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        def frames():
            video = fn.external_source(name="video", dtype=types.UINT8, ndim=1)
            indices = fn.external_source(name="indices", dtype=types.INT32, ndim=1)
            return fn.decoders.video(video, device="mixed" if gpu else "cpu", frames=indices, pad_mode="none")

        self.pipe = frames()
        self.pipe.build()

    def decode(self, item: VideoItem, indices: np.ndarray, device: torch.device) -> torch.Tensor:
        data = item.source if isinstance(item.source, bytes) else Path(item.source).read_bytes()
        self.pipe.feed_input("video", [np.frombuffer(data, np.uint8)])
        self.pipe.feed_input("indices", [indices.astype(np.int32)])
        (out,) = self.pipe.run()
        tensor = out.as_tensor()
        if device.type != "cuda":
            return torch.from_numpy(np.array(tensor)[0])
        from nvidia.dali.plugin.pytorch import feed_ndarray
        result = torch.empty(tensor.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(device))
        return result[0]


def preprocess(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> normalized [3, T, S, S]: short side to S, centre crop (the
    Hugging Face VideoMAE image processor's defaults)."""
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    w, h = short_side_resize_wh(x.shape[-1], x.shape[-2], image_size)
    if (h, w) != tuple(x.shape[-2:]):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                                            antialias=True).clamp_(0, 1)
    box = spatial_crop_boxes(w, h, image_size, 1)[0]
    x = x[:, :, box.y:box.y + image_size, box.x:box.x + image_size]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).transpose(0, 1)


# ---------------------------------------------------------------- the encoder


def pooled_features(model: nn.Module, clips: torch.Tensor, fc_norm: bool) -> torch.Tensor:
    """float32 [B, D]: the mean over every encoder token; fc_norm after it for a classifier
    when asked (a pretraining encoder's final norm is part of its tokens)."""
    with torch.autocast(clips.device.type, dtype=torch.bfloat16, enabled=clips.device.type == "cuda"):
        pooled = model.forward_tokens(clips).float().mean(dim=1)
        if fc_norm and hasattr(model, "fc_norm"):
            pooled = model.fc_norm(pooled).float()
    return pooled


@dataclass
class FeatureRun:
    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    failed: list[tuple[str, str]] = field(default_factory=list)
    videos: int = 0
    clips: int = 0
    elapsed_s: float = 0.0


@torch.no_grad()
def extract(model: nn.Module, items: Iterator[VideoItem], device: torch.device, window: int, stride: int,
            short: str = "pad", fc_norm: bool = True, batch_size: int = 8, decoder: str = "auto",
            show_progress: bool = True) -> FeatureRun:
    """Features of every window of every video (see the module doc)."""
    from tqdm import tqdm

    from vmaescale.data.video_io import VideoError

    kind = choose_decoder(decoder, device)
    frames_of = DaliFrames(device) if kind == "dali" else PyAVFrames()
    run, pending = FeatureRun(), []
    model = model.eval().to(device)
    start = time.time()

    def flush() -> None:
        clips = torch.stack([clip for _, clip in pending])
        for (row, _), vector in zip(pending, pooled_features(model, clips, fc_norm).cpu().numpy()):
            run.rows.append(row | {"embedding": vector.astype(np.float32)})
        run.clips += len(pending)
        pending.clear()

    progress = tqdm(items, desc=f"features ({kind})", unit="video", disable=not show_progress)
    for item in progress:
        run.videos += 1
        try:
            nframes = frames_of.count(item)
            windows = video_windows(nframes, window, stride, model.num_frames, short)
            if not windows:
                run.skipped.append((item.key, f"{nframes} frames, shorter than one window of {window}"))
                continue
            wanted = np.unique(np.concatenate([w.indices for w in windows]))
            decoded = frames_of.decode(item, wanted, device)
        except (VideoError, ValueError, IndexError, RuntimeError) as e:
            run.failed.append((item.key, f"{item.origin}: {e}"))
            continue
        position = {int(f): i for i, f in enumerate(wanted)}
        for w in windows:
            pick = torch.tensor([position[int(f)] for f in w.indices], device=decoded.device)
            clip = preprocess(decoded.index_select(0, pick).to(device), model.image_size)
            pending.append(({"key": item.key, "label": item.label, "window_start": w.start,
                             "window_frames": w.frames}, clip))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    run.elapsed_s = time.time() - start
    return run


def write_parquet(run: FeatureRun, path: str | Path, dim: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = run.rows
    embedding = pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate([r["embedding"] for r in rows]) if rows else np.zeros(0, np.float32),
                 pa.float32()), dim)
    table = pa.table({
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "label": pa.array([r["label"] for r in rows], pa.int64()),
        "window_start": pa.array([r["window_start"] for r in rows], pa.int64()),
        "window_frames": pa.array([r["window_frames"] for r in rows], pa.int64()),
        "embedding": embedding})
    pq.write_table(table, path)
    return path


def run_extract_features(args) -> int:
    """`vmaescale extract-features`: see `vmaescale.cli` for the flags."""
    from vmaescale.eval.source import compute_device, open_source

    source = open_source(args.src, args.select, args.allow_pickle)
    device = compute_device(args.device)
    window = args.window or source.model.num_frames
    run = extract(source.model, input_items(args.shards), device, window, args.stride or window, args.short,
                  not args.no_fc_norm, args.batch_size, args.decoder)
    out = write_parquet(run, args.out, source.model.size.embed_dim)
    rate = run.clips / run.elapsed_s if run.elapsed_s > 0 else 0.0
    print(f"\nfeatures of {source.describe()}")
    print(f"videos          {run.videos} ({len(run.skipped)} skipped, {len(run.failed)} failed)")
    print(f"windows         {len(run.rows)} of {window} frames every {args.stride or window} "
          f"({source.model.num_frames} frames each, short videos: {args.short})")
    print(f"embedding       {source.model.size.embed_dim} float32"
          + (", fc_norm applied" if source.is_classifier and not args.no_fc_norm else ""))
    print(f"throughput      {rate:.1f} clips/s ({run.clips} clips, {run.elapsed_s:.1f} s)")
    for key, why in run.skipped[:20]:
        print(f"skipped         {key}: {why}")
    for key, why in run.failed[:20]:
        print(f"failed          {key}: {why}")
    print(f"written to      {out}")
    return 0
