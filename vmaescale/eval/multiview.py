"""Multi-view testing of a classifier (SPEC section 4): clips x crops (x flip) per video,
softmax scores averaged per video, top-1 / top-5 / mean per-class accuracy.

    views = Views(clips=5, crops=3)                       # Kinetics, UCF, HMDB
    views = Views(clips=2, crops=3, sampling="segment")   # SSv2-like sets
    result = evaluate_model(model, data_cfg, views, rank, world, device)   # every rank
    write_outputs(result, out_dir)                                          # rank 0

Views: clip starts spread over the whole video (`vmaescale.data.transforms.eval_view`),
the short side resized to `short_side` (the crop size by default), square crops at the
left / centre / right of the long side; `flip` adds the horizontal flip of every view.

On several ranks the eval loaders give each video to exactly one rank (the last batches
of a rank may be short or empty); rank 0 gathers every rank's per-video sums, so the
result does not depend on the rank count. A video that fails to decode is listed (key,
shard, reason) and counted as a miss, or left out with `exclude_failed`; it is never
replaced by another video.

Outputs (`write_outputs`): summary.json, per_class.csv, predictions.parquet (key, shard,
label, pred, top5_ids, top5_scores, views), failed.csv, confusion.png.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vmaescale.config import DataConfig

SAMPLINGS = ("stride", "segment")
MAX_CLIPS_PER_FORWARD = 32
TOP_K = 5
CONFUSION_CELL_PX = 24  # up to 40 classes; larger sets get smaller cells
CONFUSION_MAX_PX = 1200
CONFUSION_LABEL_PX = 140


@dataclass(frozen=True)
class Views:
    """The views of one video: clips x crops, optionally each with its horizontal flip."""

    clips: int = 5
    crops: int = 3
    sampling: str = "stride"
    flip: bool = False

    def __post_init__(self):
        if self.clips < 1:
            raise ValueError(f"views: {self.clips} clips; need at least 1")
        if self.crops not in (1, 3):
            raise ValueError(f"views: {self.crops} crops; accepted 1 (centre) or 3 (left / centre / right)")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling={self.sampling!r}: accepted values are {list(SAMPLINGS)}")

    @property
    def per_video(self) -> int:
        return self.clips * self.crops * (2 if self.flip else 1)

    def describe(self) -> str:
        flip = " x 2 (flip)" if self.flip else ""
        return f"{self.clips} clips x {self.crops} crops{flip} = {self.per_video} views ({self.sampling} sampling)"


def parse_views(text: str) -> tuple[int, int]:
    """'5x3' -> (5 clips, 3 crops)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--views {text!r}: accepted CLIPSxCROPS, e.g. 5x3 (Kinetics) or 2x3 (SSv2)")
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class FailedVideo:
    key: str
    shard: str
    label: int
    reason: str


@dataclass
class EvalOutput:
    """Per-video scores (rows sorted by manifest row) and what failed, gathered on rank 0."""

    keys: list[str]
    shards: list[str]
    labels: np.ndarray  # int64 [N]
    probs: np.ndarray  # float32 [N, K]: softmax averaged over the views
    views: np.ndarray  # int64 [N]: views averaged (per_video unless a view failed)
    failed: list[FailedVideo]
    class_names: tuple[str, ...]
    views_spec: Views
    exclude_failed: bool = False
    elapsed_s: float = 0.0
    clips: int = 0
    metrics: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.probs.shape[1]


def eval_data_config(base: DataConfig, shards: str, views: Views, num_frames: int, image_size: int,
                     short_side: int | None = None) -> DataConfig:
    """The loader config of a multi-view test of a model of this clip shape."""
    return dataclasses.replace(base, shards=shards, num_frames=num_frames, image_size=image_size,
                               test_num_segment=views.clips, test_num_crop=views.crops,
                               test_sampling=views.sampling,
                               short_side=short_side or image_size)


def forward_probs(model: nn.Module, video: torch.Tensor, flip: bool) -> torch.Tensor:
    """Softmax scores [B, K] (float32) of clips [B, 3, T, H, W]; with `flip`, [2B, K]: every
    clip, then every clip flipped horizontally. bf16 on CUDA, float32 elsewhere."""
    inputs = (video, video.flip(-1)) if flip else (video,)
    with torch.autocast(video.device.type, dtype=torch.bfloat16, enabled=video.device.type == "cuda"):
        return torch.cat([model(chunk).float().softmax(-1)
                          for clips in inputs for chunk in clips.split(MAX_CLIPS_PER_FORWARD)])


@torch.no_grad()
def score_videos(model: nn.Module, loader, device: torch.device, flip: bool,
                 progress=None) -> tuple[dict[int, list], int]:
    """{manifest row: [label, summed softmax, views]} for this rank's videos, and its clip count."""
    sums: dict[int, list] = {}
    clips = 0
    for batch in loader:
        if progress is not None:
            progress.update(1)
        video = batch["video"]
        if video.shape[0] == 0:
            continue
        probs = forward_probs(model, video.to(device, non_blocking=True), flip).cpu()
        rows = batch["video_index"].repeat(2 if flip else 1)
        labels = batch["label"].repeat(2 if flip else 1)
        clips += probs.shape[0]
        for row in rows.unique().tolist():
            pick = rows == row
            entry = sums.setdefault(row, [int(labels[pick][0]), torch.zeros(probs.shape[1], dtype=torch.float64), 0])
            entry[1] += probs[pick].double().sum(0)
            entry[2] += int(pick.sum())
    return sums, clips


def gather(obj) -> list:
    """Every rank's `obj` (a list on every rank); [obj] without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def failed_videos(loader, shards) -> list[FailedVideo]:
    """The loader's failed samples with their manifest label (-1 when not in the manifest)."""
    out = []
    for bad in getattr(loader, "failed_samples", []):
        row = shards.row(bad.shard, bad.key)
        out.append(FailedVideo(bad.key, bad.shard, int(shards.label[row]) if row is not None else -1,
                               bad.reason))
    return out


def evaluate_model(model: nn.Module, data_cfg: DataConfig, views: Views, rank: int, world: int,
                   device: torch.device, videos_per_batch: int = 2, exclude_failed: bool = False,
                   show_progress: bool = True) -> EvalOutput | None:
    """The multi-view test on every rank; the gathered result on rank 0 (None elsewhere)."""
    from tqdm import tqdm

    from vmaescale.data.loader import build_loader, open_shard_set

    shards = open_shard_set(data_cfg.shards, data_cfg.bad_shards)
    num_classes = model.num_classes
    loader = build_loader(data_cfg, videos_per_batch, rank, world, mode="eval", device=device,
                          num_classes=num_classes)
    was_training = model.training
    model.eval()
    progress = tqdm(total=len(loader), desc="evaluate", unit="batch", disable=rank != 0 or not show_progress)
    start = time.time()
    sums, clips = score_videos(model, loader, device, views.flip, progress)
    progress.close()
    model.train(was_training)
    mine = {"sums": {row: (label, s.numpy(), n) for row, (label, s, n) in sums.items()},
            "failed": failed_videos(loader, shards), "clips": clips}
    parts = gather(mine)
    if rank != 0:
        return None
    merged: dict[int, tuple] = {}
    for part in parts:
        for row, entry in part["sums"].items():
            if row in merged:
                raise RuntimeError(f"video {shards.key[row]} was scored on two ranks; the eval "
                                   "loaders must give every video to exactly one rank")
            merged[row] = entry
    rows = sorted(merged)
    names = tuple(getattr(model, "class_names", ()) or ()) or shards.class_names
    out = EvalOutput(
        keys=[shards.key[r] for r in rows], shards=[shards.shard[r] for r in rows],
        labels=np.array([merged[r][0] for r in rows], np.int64),
        probs=np.stack([merged[r][1] / merged[r][2] for r in rows]).astype(np.float32)
        if rows else np.zeros((0, num_classes), np.float32),
        views=np.array([merged[r][2] for r in rows], np.int64),
        failed=sorted((f for part in parts for f in part["failed"]), key=lambda f: (f.shard, f.key)),
        class_names=names if len(names) == num_classes else (), views_spec=views,
        exclude_failed=exclude_failed, elapsed_s=time.time() - start,
        clips=sum(part["clips"] for part in parts))
    out.metrics = accuracy_metrics(out)
    return out


def topk_ids(probs: np.ndarray, k: int) -> np.ndarray:
    """[N, k] class ids by descending score (ties: lower id first)."""
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def accuracy_metrics(out: EvalOutput) -> dict[str, float]:
    """top1 / top5 / mean per-class accuracy (%) with failed videos as misses (or excluded)."""
    k = min(TOP_K, out.num_classes)
    top = topk_ids(out.probs, k)
    hit1 = top[:, 0] == out.labels
    hit5 = (top == out.labels[:, None]).any(axis=1)
    counted_failed = [] if out.exclude_failed else out.failed
    n = len(out.labels) + len(counted_failed)
    per_class = per_class_rows(out)
    scored = [row["top1"] for row in per_class if row["videos"] > 0]
    return {"top1": 100 * hit1.sum() / max(n, 1), "top5": 100 * hit5.sum() / max(n, 1),
            "mean_class_accuracy": float(np.mean(scored)) if scored else 0.0,
            "videos": float(n), "scored": float(len(out.labels)), "failed": float(len(out.failed))}


def per_class_rows(out: EvalOutput) -> list[dict]:
    """Per class: videos counted, top-1 / top-5 (%), failed videos (misses unless excluded)."""
    k = min(TOP_K, out.num_classes)
    top = topk_ids(out.probs, k) if len(out.labels) else np.zeros((0, k), np.int64)
    rows = []
    for c in range(out.num_classes):
        mine = out.labels == c
        failed = sum(1 for f in out.failed if f.label == c)
        n = int(mine.sum()) + (0 if out.exclude_failed else failed)
        rows.append({"class": c, "name": out.class_names[c] if out.class_names else str(c), "videos": n,
                     "top1": 100 * float((top[mine, 0] == c).sum()) / n if n else 0.0,
                     "top5": 100 * float((top[mine] == c).any(axis=1).sum()) / n if n else 0.0,
                     "failed": failed})
    return rows


def confusion_matrix(out: EvalOutput) -> np.ndarray:
    """int64 [K, K]: rows true class, columns the top-1 prediction (scored videos only)."""
    k = out.num_classes
    matrix = np.zeros((k, k), np.int64)
    if len(out.labels):
        np.add.at(matrix, (out.labels, topk_ids(out.probs, 1)[:, 0]), 1)
    return matrix


def save_confusion_png(matrix: np.ndarray, names: tuple[str, ...], path: Path) -> Path:
    """A row-normalised heat map (white = 0, dark blue = the whole row); class names on the
    axes when there are at most 40 classes."""
    from PIL import Image, ImageDraw

    k = matrix.shape[0]
    cell = max(1, min(CONFUSION_CELL_PX, CONFUSION_MAX_PX // max(k, 1)))
    labelled = k <= 40
    margin = CONFUSION_LABEL_PX if labelled else 20
    size = margin + k * cell + 10
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for i in range(k):
        for j in range(k):
            v = float(rows[i, j])
            color = (int(255 * (1 - v)), int(255 * (1 - 0.7 * v)), 255) if v > 0 else (255, 255, 255)
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color, outline=(230, 230, 230))
            if labelled and matrix[i, j] and cell >= 16:
                draw.text((x0 + 3, y0 + cell // 4), str(int(matrix[i, j])), fill=(0, 0, 0))
    if labelled:
        for i in range(k):
            name = (names[i] if names else str(i))[:20]
            draw.text((4, margin + i * cell + cell // 4), name, fill=(0, 0, 0))
            draw.text((margin + i * cell + 2, margin - 14 - 10 * (i % 2)), str(i), fill=(0, 0, 0))
    draw.text((4, 4), "true (rows) vs predicted (columns)", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def write_predictions(out: EvalOutput, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    k = min(TOP_K, out.num_classes)
    top = topk_ids(out.probs, k) if len(out.labels) else np.zeros((0, k), np.int64)
    scores = np.take_along_axis(out.probs, top, axis=1) if len(out.labels) else np.zeros((0, k), np.float32)
    table = pa.table({
        "key": pa.array(out.keys, pa.string()), "shard": pa.array(out.shards, pa.string()),
        "label": pa.array(out.labels, pa.int64()), "pred": pa.array(top[:, 0], pa.int64()),
        "top5_ids": pa.array(top.tolist(), pa.list_(pa.int64(), k)),
        "top5_scores": pa.array(scores.tolist(), pa.list_(pa.float32(), k)),
        "views": pa.array(out.views, pa.int64())})
    pq.write_table(table, path)
    return path


def write_csv(rows: list[dict], fields: list[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def summary_of(out: EvalOutput, source: str, shards: str) -> dict:
    m = out.metrics
    return {"source": source, "shards": shards, "views": out.views_spec.describe(),
            "views_per_video": out.views_spec.per_video, "sampling": out.views_spec.sampling,
            "flip": out.views_spec.flip, "top1": m["top1"], "top5": m["top5"],
            "mean_class_accuracy": m["mean_class_accuracy"], "videos": int(m["videos"]),
            "scored": int(m["scored"]), "failed": int(m["failed"]),
            "failed_policy": "excluded" if out.exclude_failed else "counted as misses",
            "clips": out.clips, "elapsed_s": round(out.elapsed_s, 2),
            "clips_per_s": round(out.clips / out.elapsed_s, 2) if out.elapsed_s > 0 else None}


def write_outputs(out: EvalOutput, out_dir: str | Path, source: str, shards: str) -> dict:
    """summary.json (written last: its presence means a finished test) and the files beside it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "per_class": write_csv(per_class_rows(out), ["class", "name", "videos", "top1", "top5", "failed"],
                               out_dir / "per_class.csv"),
        "predictions": write_predictions(out, out_dir / "predictions.parquet"),
        "failed": write_csv([dataclasses.asdict(f) for f in out.failed], ["key", "shard", "label", "reason"],
                            out_dir / "failed.csv"),
        "confusion": save_confusion_png(confusion_matrix(out), out.class_names, out_dir / "confusion.png"),
    }
    summary = summary_of(out, source, shards) | {"files": {k: str(v) for k, v in files.items()}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def log_to_mlflow(tracker, out: EvalOutput, summary: dict, out_dir: Path, prefix: str = "test",
                  step: int = 0) -> None:
    """Metrics `<prefix>_top1` ... and every output file under the artifact folder `prefix`."""
    metrics = {f"{prefix}_{k}": float(v) for k, v in out.metrics.items()}
    tracker.log_metrics(metrics, step)
    tracker.set_tags({f"{prefix}_views": summary["views"], f"{prefix}_failed_policy": summary["failed_policy"]})
    for name in ("summary.json", "per_class.csv", "predictions.parquet", "failed.csv", "confusion.png"):
        tracker.log_artifact(out_dir / name, prefix)


def print_report(summary: dict, out: EvalOutput, worst: int = 5) -> None:
    """The end-of-test summary: metrics, the worst classes, the failed videos."""
    print(f"\nmulti-view test of {summary['source']} on {summary['shards']}")
    print(f"views           {summary['views']}")
    print(f"videos          {summary['videos']} ({summary['scored']} scored, {summary['failed']} failed: "
          f"{summary['failed_policy']})")
    print(f"top-1           {summary['top1']:.2f} %")
    print(f"top-5           {summary['top5']:.2f} %")
    print(f"mean per class  {summary['mean_class_accuracy']:.2f} %")
    if summary["clips_per_s"]:
        print(f"throughput      {summary['clips_per_s']:.1f} clips/s ({summary['clips']} clips, "
              f"{summary['elapsed_s']:.1f} s)")
    rows = sorted((r for r in per_class_rows(out) if r["videos"]), key=lambda r: r["top1"])[:worst]
    if rows:
        print("worst classes   " + ", ".join(f"{r['name']} {r['top1']:.0f}% ({r['videos']})" for r in rows))
    for f in out.failed[:20]:
        print(f"failed          {f.key} in {f.shard}: {f.reason}")
    if len(out.failed) > 20:
        print(f"failed          ... and {len(out.failed) - 20} more (failed.csv)")
    print(f"written to      {Path(summary['files']['per_class']).parent}")


# ---------------------------------------------------------------- the command


@dataclass
class Distributed:
    """This process's rank, world size and device; `created` when we started the group."""

    rank: int
    world: int
    device: torch.device
    created: bool = False

    def close(self) -> None:
        if self.created:
            dist.destroy_process_group()


def start_distributed() -> Distributed:
    """One process, or the group torchrun / deepspeed / srun describe (nccl on GPU, gloo
    otherwise); the device is cuda:LOCAL_RANK when there is a GPU."""
    from vmaescale.train.engine import dist_env

    env = dist_env()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if env.world_size == 1 or dist.is_initialized():
        return Distributed(env.rank, env.world_size, device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=env.rank, world_size=env.world_size)
    return Distributed(env.rank, env.world_size, device, created=True)


def default_out_dir(source, shards: str, out: str | None) -> Path:
    """--out, else <run dir>/eval/<shard dir name> for a run dir; other sources need --out
    (nothing is written next to a checkpoint, .pth or Hugging Face dir)."""
    if out:
        return Path(out)
    if source.run_dir is None:
        raise ValueError(f"--out is needed: {source.path} is not a vmaescale run dir, and nothing is "
                         "written next to a checkpoint, .pth or Hugging Face dir")
    return source.run_dir / "eval" / Path(shards.rstrip("/")).name


def views_of(args, source) -> Views:
    """--views / --sampling / --flip, defaulting to the run's test protocol, else 5 x 3 stride."""
    if args.views:
        clips, crops = parse_views(args.views)
    else:
        clips = source.run_field("data", "test_num_segment", 5)
        crops = source.run_field("data", "test_num_crop", 3)
    sampling = args.sampling or source.run_field("data", "test_sampling", "stride")
    return Views(clips, crops, sampling, args.flip)


def run_evaluate(args) -> int:
    """`vmaescale evaluate`: see `vmaescale.cli` for the flags."""
    from vmaescale.config import TrackingConfig
    from vmaescale.eval.source import open_source
    from vmaescale.tracking import Tracker

    source = open_source(args.src, args.select, args.allow_pickle)
    views = views_of(args, source)
    if not source.is_classifier or not source.has_head:
        raise ValueError(f"SRC {args.src!r} is a {source.kind} model without a trained classifier head; "
                         "evaluate needs a finetuned classifier (for encoders see extract-features, "
                         "for pretraining models reconstruct)")
    out_dir = default_out_dir(source, args.shards, args.out)
    stride = args.sampling_rate or source.run_field("data", "sampling_rate", 4)
    base = DataConfig(backend=args.backend, num_workers=args.num_workers, bad_shards=args.bad_shards,
                      sampling_rate=stride)
    data_cfg = eval_data_config(base, args.shards, views, source.model.num_frames, source.model.image_size,
                                args.short_side)
    group = start_distributed()
    try:
        model = source.model.to(group.device)
        out = evaluate_model(model, data_cfg, views, group.rank, group.world, group.device,
                             args.batch_videos, args.exclude_failed)
        if group.rank == 0:
            summary = write_outputs(out, out_dir, source.describe(), args.shards)
            if not args.no_track:
                run_config = {"source": source.describe(), "shards": args.shards, "views": views.describe(),
                              "sampling_rate": stride, "exclude_failed": args.exclude_failed}
                run_id = args.run_id or (None if args.parent_run_id else source.mlflow_run_id())
                tracking = (source.run_config or {}).get("tracking") or {}
                cfg = TrackingConfig(experiment=args.experiment or tracking.get("experiment", "vmaescale"),
                                     tracking_uri=args.tracking_uri or tracking.get("tracking_uri", ""),
                                     run_name=f"evaluate {Path(str(source.path)).name}", system_metrics=False)
                tracker = Tracker(cfg, 0, out_dir, run_config, run_id=run_id, parent_run_id=args.parent_run_id,
                                  tags={"task": "evaluate"})
                log_to_mlflow(tracker, out, summary, out_dir, args.metric_prefix)
                tracker.finish()
                summary["mlflow_run_id"] = tracker.run_id
                (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print_report(summary, out)
    finally:
        group.close()
    return 0
