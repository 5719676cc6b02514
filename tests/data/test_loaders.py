"""Both input pipelines on the same VP9 shards: the batch contract, crops, resume, ranks."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vmaescale.config import DataConfig
from vmaescale.data.loader import build_loader
from vmaescale.data.shards import BuildOptions, build_shards
from vmaescale.data.transforms import unnormalize_video
from vmaescale.data.video_io import encode_video

BACKENDS = ["fallback", "dali"]
VIDEOS = 12  # tests/conftest.py shard sets
EPS = 1e-4


def data_config(shards: Path, backend: str, **overrides) -> DataConfig:
    """Tiny clips: 4 frames at stride 2, 32 px, 2 clips per video, 2 x 3 eval views."""
    base = DataConfig(shards=str(shards), backend=backend, num_frames=4, sampling_rate=2,
                      image_size=32, num_sample=2, num_workers=0, shuffle_buffer=4,
                      test_num_segment=2, test_num_crop=3, short_side=32)
    return dataclasses.replace(base, **overrides)


def manifest_labels(shards: Path) -> np.ndarray:
    return np.asarray(pq.read_table(shards / "manifest.parquet").column("label").to_pylist())


def views_by_video(batches: list[dict]) -> dict[tuple[int, int], torch.Tensor]:
    """(video_index, view) -> un-normalized clip [3, T, H, W]."""
    out = {}
    for batch in batches:
        clips = unnormalize_video(batch["video"])
        ids = zip(batch["video_index"].tolist(), batch["view"].tolist())
        for i, (video, view) in enumerate(ids):
            out[(video, view)] = clips[i]
    return out


def check_contract(batch: dict, clips_per_batch: int, labels: np.ndarray) -> None:
    video = batch["video"]
    assert video.dtype == torch.float32
    assert tuple(video.shape) == (clips_per_batch, 3, 4, 32, 32)
    pixels = unnormalize_video(video)
    assert pixels.min() >= -EPS and pixels.max() <= 1 + EPS
    for key in ("label", "video_index", "view"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (clips_per_batch,)
    assert batch["label"].tolist() == labels[batch["video_index"].numpy()].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_follow_the_contract(vp9_shards, backend):
    labels = manifest_labels(vp9_shards)
    loader = build_loader(data_config(vp9_shards, backend), videos_per_gpu=3, rank=0, world_size=1)
    batches = list(loader)
    assert loader.backend == backend
    assert loader.steps_per_epoch == VIDEOS // 3 == len(batches) == len(loader)
    for batch in batches:
        check_contract(batch, 3 * 2, labels)
        assert batch["view"].tolist() == [0, 1] * 3
        assert batch["video_index"][0::2].tolist() == batch["video_index"][1::2].tolist()
    seen = sorted(v for b in batches for v in b["video_index"][0::2].tolist())
    assert seen == list(range(VIDEOS))
    assert loader.bad_samples == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_gives_segments_x_crops_views_of_every_video_once(vp9_shards, backend):
    labels = manifest_labels(vp9_shards)
    cfg = data_config(vp9_shards, backend)
    loaders = [build_loader(cfg, 2, rank, 2, mode="eval") for rank in range(2)]
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch
    seen = []
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch
        for batch in batches:
            n = batch["video"].shape[0]
            assert n % 6 == 0
            if n:
                check_contract(batch, n, labels)
            videos = batch["video_index"].view(-1, 6)  # 2 segments x 3 crops per video
            assert (videos == videos[:, :1]).all()
            assert batch["view"].view(-1, 6).tolist() == [list(range(6))] * (n // 6)
            seen += videos[:, 0].tolist()
        assert loader.failed == []
    assert sorted(seen) == list(range(VIDEOS))


@pytest.fixture(scope="module")
def brightness_shards(tmp_path_factory) -> Path:
    """Two 64x48 VP9 videos: one static texture, each frame 3 levels brighter than the last."""
    videos = tmp_path_factory.mktemp("brightness_videos")
    y, x = np.mgrid[0:48, 0:64].astype(np.float32)
    for i in range(2):
        texture = 110 + 30 * np.sin(x / (3 + i)) + 25 * np.cos(y / 4 + x / 7)
        frames = np.stack([texture + 3 * t for t in range(24)])
        frames = np.repeat(frames[..., None], 3, axis=-1).clip(0, 255).astype(np.uint8)
        (videos / "steps").mkdir(exist_ok=True)
        encode_video(videos / "steps" / f"v{i}.webm", frames, fps=25, codec="vp9")
    shards = tmp_path_factory.mktemp("brightness_shards")
    build_shards(videos, shards, BuildOptions(codec="vp9", short_side=48, shard_size=2),
                 workers=1, progress=False)
    return shards


@pytest.mark.parametrize("backend", BACKENDS)
def test_crops_are_the_same_for_every_frame_of_a_clip(brightness_shards, backend):
    # Frames differ only by a uniform brightness step, so frame t minus frame 0 of a clip
    # is flat when every frame was cropped with the same box, and textured otherwise.
    cfg = data_config(brightness_shards, backend, num_sample=8)
    for mode in ("train", "eval"):
        batch = next(iter(build_loader(cfg, 2, 0, 1, mode=mode)))
        clips = unnormalize_video(batch["video"])  # [B, 3, T, H, W]
        steps = clips[:, :, 1:] - clips[:, :, :1]  # [B, 3, T-1, H, W]
        assert steps.flatten(3).std(dim=-1).max() < 0.01
        assert (steps.flatten(1).mean(dim=-1) > 0).all()
        shifted = (clips[:, :, 1:].roll(1, dims=-1) - clips[:, :, :1])[..., 1:]
        assert shifted.flatten(3).std(dim=-1).min() > 0.02  # what a box 1 px off would give


def test_both_backends_draw_the_same_clips(vp9_shards):
    for mode in ("train", "eval"):
        clips = [views_by_video(list(build_loader(data_config(vp9_shards, backend), 3, 0, 1,
                                                  mode=mode, seed=5, epoch=2)))
                 for backend in BACKENDS]
        assert clips[0].keys() == clips[1].keys()
        diffs = torch.stack([(clips[0][k] - clips[1][k]).abs().mean() for k in clips[0]])
        # PyAV's rgb24 conversion and DALI's (BT.601, bilinear chroma) differ by ~2/255.
        assert diffs.max() < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_at_a_step_repeats_the_uninterrupted_tail(vp9_shards, backend):
    cfg = data_config(vp9_shards, backend)
    full = list(build_loader(cfg, 2, 0, 1, seed=3, epoch=1))
    resumed = build_loader(cfg, 2, 0, 1, seed=3, epoch=1, start_step=4)
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed, strict=True):
        assert torch.equal(a["video_index"], b["video_index"])
        assert torch.equal(a["video"], b["video"])
    resumed.set_epoch(2)
    next_epoch = list(resumed)
    assert len(next_epoch) == len(full)
    order = [b["video_index"].tolist() for b in full]
    assert [b["video_index"].tolist() for b in next_epoch] != order


@pytest.mark.parametrize("backend,world_size", [("fallback", 2), ("fallback", 5), ("dali", 2),
                                                ("dali", 5)])
def test_every_rank_runs_the_same_number_of_train_steps(vp9_shards, backend, world_size):
    cfg = data_config(vp9_shards, backend, num_sample=1)
    loaders = [build_loader(cfg, 1, rank, world_size) for rank in range(world_size)]
    counts = [len(list(loader)) for loader in loaders]
    assert counts == [VIDEOS // world_size] * world_size
    assert {loader.steps_per_epoch for loader in loaders} == {VIDEOS // world_size}


def test_fallback_workers_give_a_deterministic_stream(vp9_shards):
    cfg = data_config(vp9_shards, "fallback", num_workers=2)
    runs = [[b["video_index"].tolist() for b in build_loader(cfg, 2, 0, 1, seed=1)]
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(runs[0]) == VIDEOS // 2


def test_auto_picks_dali_for_vp9_on_cpu_and_says_why(vp9_shards, caplog):
    with caplog.at_level(logging.INFO, logger="vmaescale.data.loader"):
        loader = build_loader(data_config(vp9_shards, "auto"), 2, 0, 1)
    assert loader.backend == "dali"
    assert "dali backend, because auto: DALI imports and decodes vp9 on the CPU" in caplog.text


def test_h264_without_a_gpu_uses_the_fallback(h264_shards, caplog):
    with caplog.at_level(logging.INFO, logger="vmaescale.data.loader"):
        loader = build_loader(data_config(h264_shards, "auto"), 2, 0, 1)
    assert loader.backend == "fallback"
    assert "'h264' needs DALI's GPU decoder" in caplog.text
    check_contract(next(iter(loader)), 4, manifest_labels(h264_shards))
    with pytest.raises(ValueError, match="data.backend='dali' cannot run here: codec 'h264'"):
        build_loader(data_config(h264_shards, "dali"), 2, 0, 1)


def test_bad_arguments_name_the_value(vp9_shards, tmp_path):
    cfg = data_config(vp9_shards, "fallback")
    with pytest.raises(ValueError, match="mode='test'"):
        build_loader(cfg, 2, 0, 1, mode="test")
    with pytest.raises(ValueError, match="rank=2"):
        build_loader(cfg, 2, 2, 2)
    with pytest.raises(ValueError, match="cannot fill one step"):
        build_loader(cfg, 7, 0, 2)
    with pytest.raises(ValueError, match="image_size=64 > data.short_side=32"):
        build_loader(dataclasses.replace(cfg, image_size=64), 2, 0, 1, mode="eval")
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        build_loader(dataclasses.replace(cfg, shards=str(tmp_path)), 2, 0, 1)
