"""Check a shard set and print its statistics; exit status 1 if any shard is unusable
(2 if DIR is not a shard set).

    python data_tools/inspect_shards.py shards/

Reports counts, codecs, frame-count / fps / resolution / size statistics, the label
histogram (class names from labels.json) and rejects, and decodes the first sample of
every shard with PyAV.
"""

from __future__ import annotations

import argparse
import sys

from vmaescale.data.inspect import format_report, inspect_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="shard set folder (with manifest.parquet)")
    p.add_argument("--no-decode", action="store_true", help="skip decoding a sample per shard")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = inspect_shards(args.directory, decode=not args.no_decode)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
