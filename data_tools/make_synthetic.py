"""Write synthetic motion-class videos as OUT/<class>/<index>.<ext> (a class-folder dataset).

    python data_tools/make_synthetic.py OUT --videos 200 --codec vp9

The class of a clip is the direction x speed of its moving shapes (left_slow, right_slow,
left_fast, ...); every class shares the same appearance distribution, so only motion tells
classes apart. Output is deterministic in --seed.
"""

from __future__ import annotations

import argparse
import sys
import time

from vmaescale.cli import ArgumentParser, add_debug_flag, debug_wanted, report_user_errors
from vmaescale.data.synthetic import CLASS_NAMES, write_synthetic_videos
from vmaescale.data.video_io import CODECS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="data_tools/make_synthetic.py", description=__doc__)
    p.add_argument("out", help="output folder (one sub-folder per class is created)")
    p.add_argument("--videos", type=int, required=True, help="number of videos to write")
    p.add_argument("--codec", choices=sorted(CODECS), required=True, help="vp9 (.webm) or h264 (.mp4)")
    p.add_argument("--size", type=int, default=160, help="frame width and height in pixels (even)")
    p.add_argument("--frames", type=int, default=48, help="frames per video")
    p.add_argument("--fps", type=float, default=25, help="frame rate")
    p.add_argument("--classes", type=int, default=4, help=f"motion classes, 2 to {len(CLASS_NAMES)}")
    p.add_argument("--gop", type=int, default=16, help="frames between keyframes")
    p.add_argument("--seed", type=int, default=0, help="fixes every video's appearance")
    p.add_argument("--speed", type=float, default=1.0,
                   help="multiplies every class velocity (1 = 0.5%% / 1.5%% of the frame per frame)")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """A user error (bad size, class count, ...) is one line and exit status 2."""
    args = parse_args(argv)
    return report_user_errors("data_tools/make_synthetic.py", write, args, debug=debug_wanted(args))


def write(args: argparse.Namespace) -> int:
    started = time.monotonic()
    paths = write_synthetic_videos(args.out, args.videos, args.codec, args.size, args.frames,
                                   args.fps, args.classes, args.seed, args.gop, args.speed)
    print(f"wrote {len(paths)} {args.codec} videos ({args.classes} classes, {args.size} px, "
          f"{args.frames} frames, speed x{args.speed:g}) to {args.out} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
