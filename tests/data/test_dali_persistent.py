"""The DALI loader keeps its reader and decoder pipelines for the whole run: set_epoch only
moves the position, every epoch equals a freshly built loader's, resume stays exact, and
the number of decoder pipelines (data.dali_pipelines) never changes the batches."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import webdataset as wds

from vmaescale.config import ConfigError, DataConfig, from_dict
from vmaescale.data.loader import build_loader
from vmaescale.data.shards import dali_index_text, shard_name

pytest.importorskip("nvidia.dali")

VIDEOS = 12  # tests/conftest.py shard sets: shards of 5, 5, 2


def data_config(shards: Path, **overrides) -> DataConfig:
    base = DataConfig(shards=str(shards), backend="dali", num_frames=4, sampling_rate=2,
                      image_size=32, num_sample=2, num_workers=1, shuffle_buffer=4,
                      test_num_segment=2, test_num_crop=1, short_side=32)
    return dataclasses.replace(base, **overrides)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def pipeline_objects(loader) -> list:
    return [loader.index, loader.pool, *loader.decoders, *(d.pipe for d in loader.decoders),
            *loader.pool._threads]


def decoder_threads(loader) -> set:
    return {t for executor in loader.pool._threads for t in executor._threads}


def test_the_pipelines_are_built_once_and_kept_across_epochs(vp9_shards):
    loader = build_loader(data_config(vp9_shards, dali_pipelines=2), 3, 0, 1, seed=1)
    list(loader)
    objects, threads = pipeline_objects(loader), decoder_threads(loader)
    assert all(d.pipe is not None for d in loader.decoders) and len(threads) == 2
    loader.set_epoch(1)
    assert len(list(loader)) == loader.steps_per_epoch
    assert all(a is b for a, b in zip(objects, pipeline_objects(loader), strict=True))
    assert decoder_threads(loader) == threads and all(t.is_alive() for t in threads)


@pytest.mark.parametrize("world_size", [1, 2])
def test_each_epoch_of_a_kept_loader_equals_a_fresh_loader_for_that_epoch(vp9_shards, world_size):
    cfg = data_config(vp9_shards)
    kept = build_loader(cfg, 2, world_size - 1, world_size, seed=4, epoch=0)
    for epoch in range(3):
        kept.set_epoch(epoch)
        fresh = build_loader(cfg, 2, world_size - 1, world_size, seed=4, epoch=epoch)
        assert_same_batches(list(kept), list(fresh))


def test_resume_mid_epoch_1_equals_the_uninterrupted_run(vp9_shards):
    cfg = data_config(vp9_shards)
    uninterrupted = build_loader(cfg, 2, 0, 1, seed=3, epoch=0)
    list(uninterrupted)
    uninterrupted.set_epoch(1)
    epoch_1 = list(uninterrupted)
    resumed = build_loader(cfg, 2, 0, 1, seed=3, epoch=1, start_step=2)
    assert_same_batches(epoch_1[2:], list(resumed))


def test_an_epoch_left_midway_does_not_leak_into_the_next(vp9_shards):
    cfg = data_config(vp9_shards, dali_pipelines=2, prefetch_batches=3)
    loader = build_loader(cfg, 2, 0, 1, seed=2)
    batches = iter(loader)
    next(batches)
    batches.close()  # chunks are still in flight on the decoder threads
    loader.set_epoch(1)
    assert_same_batches(list(loader), list(build_loader(cfg, 2, 0, 1, seed=2, epoch=1)))


def test_train_epochs_rotate_the_shards_across_ranks_and_reshuffle(vp9_shards):
    cfg = data_config(vp9_shards, num_sample=1)
    loaders = [build_loader(cfg, 1, rank, 3, seed=0) for rank in range(3)]

    def videos(loader, epoch: int) -> list[int]:
        loader.set_epoch(epoch)
        return [v for batch in loader for v in batch["video_index"].tolist()]

    seen = {(rank, epoch): videos(loaders[rank], epoch) for rank in range(3) for epoch in range(3)}
    for epoch in range(3):
        assert sorted(v for rank in range(3) for v in seen[rank, epoch]) == list(range(VIDEOS))
    for epoch in range(1, 3):
        for rank in range(3):  # shard (rank + epoch) % 3: rank + 1's shard of the last epoch
            assert sorted(seen[rank, epoch]) == sorted(seen[(rank + 1) % 3, epoch - 1])
    assert seen[0, 0] != seen[2, 1]  # the same shard, in another epoch's order


@pytest.fixture(scope="module")
def planted_shards(vp9_shards, tmp_path_factory) -> Path:
    """The VP9 set with a not-a-video sample and a zero-byte one appended to shard 1 (not in
    the manifest, so both are bad twice over; the loaders report the first reason)."""
    out = tmp_path_factory.mktemp("persistent_planted")
    for path in vp9_shards.iterdir():
        if path.is_file():
            shutil.copy(path, out)
    tar = out / shard_name(1)
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    with wds.TarWriter(str(tar)) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if not k.startswith("__url")})
        base = {"nframes": samples[0]["nframes"], "cls": samples[0]["cls"]}
        writer.write({"__key__": "planted_not_a_video", **base, "webm": b"not a webm\n" * 64})
        writer.write({"__key__": "planted_zero_bytes", **base, "webm": b""})
    tar.with_suffix(".idx").write_text(dali_index_text(tar))
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_one_and_two_decoder_pipelines_give_identical_batches(planted_shards, mode):
    runs = []
    for pipelines in (1, 2):
        loader = build_loader(data_config(planted_shards, dali_pipelines=pipelines), 3, 0, 1,
                              mode=mode, seed=7, epoch=1)
        assert len(loader.decoders) == pipelines
        runs.append((list(loader), loader.bad_samples, loader.failed))
    assert_same_batches(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:] and runs[0][1] >= 2
    if mode == "eval":
        assert sorted(k for k, _ in runs[0][2]) == ["planted_not_a_video", "planted_zero_bytes"]
        assert sorted(v for b in runs[0][0] for v in b["video_index"].tolist()[::2]) == list(range(VIDEOS))


def test_dali_pipelines_must_be_at_least_one():
    assert from_dict(DataConfig, {"dali_pipelines": 2}).dali_pipelines == 2
    with pytest.raises(ConfigError, match="dali_pipelines: 0 is below the minimum 1"):
        from_dict(DataConfig, {"dali_pipelines": 0}, "data")
