"""inspect_shards: statistics of a sound shard set, non-zero exit on a broken one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmaescale.data.inspect import format_report, inspect_shards

REPO = Path(__file__).resolve().parents[2]


def run_cli(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "data_tools/inspect_shards.py", str(directory)],
                          cwd=REPO, capture_output=True, text=True)


def first_video_component(index_path: Path) -> tuple[int, int]:
    """(offset, size) of the first sample's video in a DALI index file."""
    fields = index_path.read_text().splitlines()[1].split()
    return int(fields[1]), int(fields[2])


@pytest.fixture
def broken_copy(h264_shards, tmp_path) -> Path:
    shutil.copytree(h264_shards, tmp_path / "shards")
    return tmp_path / "shards"


def test_report_counts_codecs_stats_and_named_labels(vp9_shards):
    report = inspect_shards(vp9_shards)
    assert report.ok and report.samples == 12 and len(report.shards) == 3
    assert report.video_exts == {"webm": 12}
    assert report.stats["frames"] == (24, 24.0, 24) and report.stats["width"] == (64, 64.0, 64)
    assert report.labels == [("left_fast", 0, 3), ("left_slow", 1, 3), ("right_fast", 2, 3),
                             ("right_slow", 3, 3)]
    text = format_report(report)
    assert "12 samples in 3 shards (codec vp9; videos: webm 12)" in text
    assert "3/3 shards OK" in text and "rejects: 0" in text


def test_cli_exits_zero_on_a_sound_shard_set(h264_shards):
    done = run_cli(h264_shards)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "right_slow" in done.stdout and "3/3 shards OK" in done.stdout


def test_cli_exits_non_zero_when_a_video_does_not_decode(broken_copy):
    tar = broken_copy / "shard-000001.tar"
    offset, size = first_video_component(tar.with_suffix(".idx"))
    data = bytearray(tar.read_bytes())
    data[offset:offset + size] = b"\0" * size  # same size: the index still matches
    tar.write_bytes(bytes(data))
    done = run_cli(broken_copy)
    assert done.returncode == 1
    assert "FAILED shard-000001.tar: sample" in done.stdout and "does not decode" in done.stdout
    assert "2/3 shards OK -- shard set is NOT usable" in done.stdout


def test_missing_index_or_shard_fails_the_check(broken_copy):
    (broken_copy / "shard-000000.idx").unlink()
    (broken_copy / "shard-000002.tar").unlink()
    errors = {s.name: s.error for s in inspect_shards(broken_copy).shards}
    assert errors == {"shard-000000.tar": "shard-000000.idx is missing", "shard-000001.tar": None,
                      "shard-000002.tar": "shard-000002.tar is in the manifest but missing"}
