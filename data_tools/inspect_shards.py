"""Check a shard set and print its statistics; exit status 1 if any shard is unusable
(2 if DIR is not a shard set).

    python data_tools/inspect_shards.py shards/ [--decode-all | --no-decode]

Reports counts, codecs, frame-count / fps / resolution / size statistics, the label
histogram (class names from labels.json) and rejects, and one FAILED line for every problem
of every shard: a tar that is empty, truncated or not a tar, an .idx that is missing or
stale, keys that differ from the manifest, unsafe member names ('..', absolute paths),
missing or malformed components, labels outside the class range, and a video that does not
decode to .nframes frames of the manifest's size (the first sample of every shard, or all
with --decode-all). Memory stays bounded by one sample whatever its .nframes says.
"""

from __future__ import annotations

import argparse
import sys

from vmaescale.cli import ArgumentParser, add_debug_flag, debug_wanted, report_user_errors
from vmaescale.data.inspect import format_report, inspect_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="data_tools/inspect_shards.py", description=__doc__)
    p.add_argument("directory", help="shard set folder (with manifest.parquet)")
    decoding = p.add_mutually_exclusive_group()
    decoding.add_argument("--no-decode", action="store_true", help="skip decoding a sample per shard")
    decoding.add_argument("--decode-all", action="store_true",
                          help="decode every sample, not only the first of each shard")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 = usable, 1 = a shard is unusable, 2 = a user error (one line)."""
    args = parse_args(argv)
    return report_user_errors("data_tools/inspect_shards.py", check, args, debug=debug_wanted(args))


def check(args: argparse.Namespace) -> int:
    report = inspect_shards(args.directory, decode=not args.no_decode, decode_all=args.decode_all)
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
