"""Build WebDataset shards (+ DALI indices, manifest, labels, rejects) from videos.

    python data_tools/build_shards.py videos/ shards/ --codec vp9 --shard-size 500
    python data_tools/build_shards.py train.csv shards/ --root /data/kinetics

SOURCE is a folder of videos (a sub-folder name is the class) or a CSV list: `path,label`
with or without a header, or header-less `path label`. Videos are transcoded to a constant
frame rate, a fixed short side and a short keyframe interval (or stored as they are with
--passthrough). Inputs that cannot be used are listed in rejects.parquet with the reason.
Re-running the same command after an interruption finishes the build.
"""

from __future__ import annotations

import argparse
import json
import sys

from vmaescale.cli import ArgumentParser, add_debug_flag, debug_wanted, report_user_errors
from vmaescale.data.shards import BuildOptions, build_shards, default_workers, format_summary, parse_bytes
from vmaescale.data.video_io import CODECS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="data_tools/build_shards.py", description=__doc__)
    p.add_argument("source", help="folder of videos (class sub-folders optional) or CSV list")
    p.add_argument("out", help="output folder for the shard set")
    p.add_argument("--codec", choices=sorted(CODECS), default="h264",
                   help="codec to transcode to: h264 (.mp4) or vp9 (.webm; DALI decodes it on CPU)")
    p.add_argument("--short-side", type=int, default=320, help="resize to this short side (even), 0 keeps size")
    p.add_argument("--fps", type=float, default=None, help="constant output frame rate (default: source rate rounded)")
    p.add_argument("--gop", type=int, default=16, help="frames between keyframes")
    p.add_argument("--passthrough", action="store_true", help="store source bytes unchanged (no transcoding)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--shard-max-bytes", type=parse_bytes, default=None,
                   help="also close a shard before it exceeds this size, e.g. 1G or 500M")
    p.add_argument("--min-frames", type=int, default=16, help="reject videos with fewer decoded frames")
    p.add_argument("--seed", type=int, default=0, help="fixes the shuffle and the shard assignment")
    p.add_argument("--workers", type=int, default=default_workers(), help="decode/transcode processes")
    p.add_argument("--root", default=None, help="base folder of relative CSV paths (default: the CSV's folder)")
    p.add_argument("--labels", default=None,
                   help="labels.json (class name -> index) to use, e.g. the train split's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """A user error (missing source, bad labels file, ...) is one line and exit status 2."""
    args = parse_args(argv)
    return report_user_errors("data_tools/build_shards.py", build, args, debug=debug_wanted(args))


def build(args: argparse.Namespace) -> int:
    options = BuildOptions(codec=args.codec, short_side=args.short_side, fps=args.fps, gop=args.gop,
                           passthrough=args.passthrough, shard_size=args.shard_size,
                           shard_max_bytes=args.shard_max_bytes, min_frames=args.min_frames,
                           seed=args.seed)
    label_map = json.loads(open(args.labels).read()) if args.labels else None
    summary = build_shards(args.source, args.out, options, workers=args.workers, root=args.root,
                           label_map=label_map, progress=not args.no_progress)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
