"""Input pipeline throughput: clips/s and decoded frames/s of each available loader backend.

    python data_tools/bench_loader.py                      # builds a small VP9 shard set
    python data_tools/bench_loader.py --shards DIR          # your shards
    python data_tools/bench_loader.py --write docs/benchmarks.md

Every backend reads the same shards in train mode (random clip, num_sample multi-scale
crops per video, resize, normalize) for --steps steps after one warm-up step. Without
--shards, --videos synthetic clips are rendered, VP9-encoded and sharded with
vmaescale's own tools (data_tools/build_shards.py does the same from the command line).

Columns: clips/s = training clips delivered per second (videos x num_sample); frames/s =
decoded frames per second (videos x num_frames: a video is decoded once for all its
clips; frames decoded only to reach a keyframe are not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from vmaescale.cli import ArgumentParser, add_debug_flag, debug_wanted, report_user_errors
from vmaescale.config import DataConfig
from vmaescale.data.loader import build_loader, dali_unavailable_reason, open_shard_set
from vmaescale.data.shards import BuildOptions, build_shards
from vmaescale.data.synthetic import write_synthetic_videos

SECTION = "## Input pipeline"


@dataclasses.dataclass(frozen=True)
class BenchResult:
    backend: str
    decode_device: str
    threads: int
    steps: int
    seconds: float
    videos: int
    clips: int
    frames: int

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="data_tools/bench_loader.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="shard directory; default: build a synthetic VP9 set")
    p.add_argument("--videos", type=int, default=40, help="synthetic videos to build")
    p.add_argument("--video-size", type=int, default=160, help="synthetic video side (px)")
    p.add_argument("--video-frames", type=int, default=64, help="synthetic video length")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--sampling-rate", type=int, default=4)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--num-sample", type=int, default=4)
    p.add_argument("--videos-per-gpu", type=int, default=4)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="DataLoader workers (fallback) / decoder threads (DALI)")
    p.add_argument("--steps", type=int, default=15, help="timed steps per backend")
    p.add_argument("--backends", default="dali,fallback", help="comma-separated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: DALI decodes on the GPU ('mixed')")
    p.add_argument("--write", metavar="MARKDOWN",
                   help=f"write the table into this file's '{SECTION}' section")
    add_debug_flag(p)
    return p.parse_args(argv)


def build_synthetic_shards(out_dir: Path, args: argparse.Namespace) -> Path:
    videos, shards = out_dir / "videos", out_dir / "shards"
    write_synthetic_videos(videos, n=args.videos, codec="vp9", size=args.video_size,
                           frames=args.video_frames, fps=25, classes=4, seed=0)
    build_shards(videos, shards, BuildOptions(codec="vp9", short_side=args.video_size,
                                              shard_size=max(1, args.videos // 4)),
                 workers=args.workers, progress=False)
    return shards


def data_config(shards: Path, backend: str, args: argparse.Namespace) -> DataConfig:
    return DataConfig(shards=str(shards), backend=backend, num_frames=args.num_frames,
                      sampling_rate=args.sampling_rate, image_size=args.image_size,
                      num_sample=args.num_sample, num_workers=args.workers, shuffle_buffer=16)


def train_batches(loader) -> Iterator[dict]:
    """Batches of epoch 0, 1, 2, ... without end."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def bench_backend(shards: Path, backend: str, args: argparse.Namespace,
                  device: torch.device) -> BenchResult:
    """Time `args.steps` train steps after one warm-up step (pipeline build, first decode)."""
    cfg = data_config(shards, backend, args)
    loader = build_loader(cfg, args.videos_per_gpu, 0, 1, mode="train", device=device)
    batches = train_batches(loader)
    next(batches)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = next(batches)
    if batch["video"].is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    videos = args.steps * args.videos_per_gpu
    on_gpu = backend == "dali" and device.type == "cuda"
    threads = loader.num_workers if backend == "fallback" else max(1, args.workers)
    return BenchResult(backend, "gpu (mixed)" if on_gpu else "cpu", threads, args.steps, seconds,
                       videos, videos * args.num_sample, videos * args.num_frames)


def available_backends(requested: list[str], codec: str, device: torch.device) -> list[str]:
    chosen = []
    for backend in requested:
        reason = dali_unavailable_reason(codec, device) if backend == "dali" else None
        if reason:
            print(f"skipping dali: {reason}", file=sys.stderr)
        else:
            chosen.append(backend)
    return chosen


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def results_table(results: list[BenchResult]) -> str:
    rows = ["| backend | decode | workers/threads | timed steps | videos | clips/s | frames/s |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| {r.backend} | {r.decode_device} | {r.threads} | {r.steps} | {r.videos} | "
             f"{r.clips_per_s:.1f} | {r.frames_per_s:.1f} |" for r in results]
    return "\n".join(rows)


def report(results: list[BenchResult], args: argparse.Namespace, shards_note: str,
           device: torch.device) -> str:
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu_model()}, {os.cpu_count()} cores "
                  f"(1-min load average {os.getloadavg()[0]:.1f} at the end)")
    setup = (f"clips of {args.num_frames} frames at stride {args.sampling_rate}, "
             f"{args.image_size} px, {args.num_sample} clips per video, "
             f"{args.videos_per_gpu} videos per step")
    return "\n".join([
        f"Device: {where}. Date: {datetime.date.today().isoformat()}. Commit: {git_commit()}.",
        f"Shards: {shards_note}. Setup: {setup}.",
        f"Command: `{' '.join(['python data_tools/bench_loader.py', *sys.argv[1:]])}`.",
        "clips/s = training clips delivered (videos x num_sample); frames/s = frames decoded "
        "(videos x num_frames, one decode per video), after one warm-up step.",
        "",
        results_table(results),
    ])


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the '## Input pipeline' section, keeping the other sections."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").split("\n")
    if SECTION in lines:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines[start:end] = [SECTION, "", *body.split("\n"), ""]
    else:
        lines += ["", SECTION, "", *body.split("\n")]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    """A user error (missing shards, unknown backend, ...) is one line and exit status 2."""
    args = parse_args(argv)
    return report_user_errors("data_tools/bench_loader.py", bench, args, debug=debug_wanted(args))


def bench(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        if args.shards:
            shards, note = Path(args.shards), args.shards
        else:
            started = time.perf_counter()
            shards = build_synthetic_shards(Path(tmp), args)
            note = (f"{args.videos} synthetic VP9 videos, {args.video_size} px, "
                    f"{args.video_frames} frames, GOP 16 (built in "
                    f"{time.perf_counter() - started:.0f} s)")
        codec = open_shard_set(str(shards)).codec
        requested = [b.strip() for b in args.backends.split(",") if b.strip()]
        results = [bench_backend(shards, backend, args, device)
                   for backend in available_backends(requested, codec, device)]
    body = report(results, args, note, device)
    print(body)
    if args.write:
        write_section(Path(args.write), body)
        print(f"wrote the '{SECTION}' section of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
