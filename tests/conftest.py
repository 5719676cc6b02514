"""Shared fixtures: small real shard sets built from synthetic videos."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmaescale.data.shards import BuildOptions, build_shards
from vmaescale.data.synthetic import write_synthetic_videos

SHARD_SET_VIDEOS = 12
SHARD_SET_CLASSES = 4
SHARD_SET_FRAMES = 24
SHARD_SET_SIZE = 64
SHARD_SET_SAMPLES_PER_SHARD = 5  # 12 videos -> shards of 5, 5, 2


def _synthetic_shard_set(tmp_path_factory: pytest.TempPathFactory, codec: str) -> Path:
    """Labeled shards of 12 synthetic videos (4 classes, 64 px, 24 frames) in `codec`."""
    videos = tmp_path_factory.mktemp(f"{codec}_videos")
    write_synthetic_videos(videos, n=SHARD_SET_VIDEOS, codec=codec, size=SHARD_SET_SIZE,
                           frames=SHARD_SET_FRAMES, fps=25, classes=SHARD_SET_CLASSES, seed=0)
    shards = tmp_path_factory.mktemp(f"{codec}_shards")
    options = BuildOptions(codec=codec, short_side=SHARD_SET_SIZE,
                           shard_size=SHARD_SET_SAMPLES_PER_SHARD, seed=0)
    build_shards(videos, shards, options, workers=1, progress=False)
    return shards


@pytest.fixture(scope="session")
def vp9_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a labeled VP9 (.webm) shard set: 12 samples, 4 classes, 3 shards."""
    return _synthetic_shard_set(tmp_path_factory, "vp9")


@pytest.fixture(scope="session")
def h264_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a labeled H.264 (.mp4) shard set: 12 samples, 4 classes, 3 shards."""
    return _synthetic_shard_set(tmp_path_factory, "h264")
