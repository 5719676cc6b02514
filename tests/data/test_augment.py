"""Finetuning augmentation is one parameter set per clip, applied to every frame, in both loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vmaescale.config import load_config
from vmaescale.data.augment import EraseBox, apply_erasing, parse_rand_augment, rand_augment_params
from vmaescale.data.loader import build_loader
from vmaescale.data.shards import BuildOptions, build_shards
from vmaescale.data.video_io import encode_video

FRAMES, SIZE = 16, 64


@pytest.fixture(scope="module")
def static_shards(tmp_path_factory) -> Path:
    """4 VP9 videos whose frames are all the same picture: any per-frame choice would show."""
    root = tmp_path_factory.mktemp("static")
    rng = np.random.default_rng(0)
    for i in range(4):
        y, x = np.mgrid[0:SIZE, 0:SIZE]
        picture = np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8)
        picture[rng.integers(0, 40):][:20, 10:30] = 255  # an off-centre block: flips and crops show
        encode_video(root / "videos" / f"class{i % 2}" / f"v{i}.webm",
                     np.repeat(picture[None], FRAMES, 0), fps=25, codec="vp9", gop=FRAMES)
    out = root / "shards"
    build_shards(root / "videos", out, BuildOptions(codec="vp9", short_side=SIZE, shard_size=2, seed=0),
                 workers=1, progress=False)
    return out


def finetune_data(shards: Path, backend: str, *extra: str):
    return load_config(None, [f"data.shards={shards}", f"data.backend={backend}", "data.num_frames=8",
                              "data.sampling_rate=1", "data.image_size=32", "data.num_sample=2",
                              "data.num_workers=0", "data.train_crop=random_resized", "data.flip=true",
                              *extra]).data


def first_batch(data, seed=0) -> torch.Tensor:
    loader = build_loader(data, 2, 0, 1, mode="train", seed=seed, num_classes=2)
    return next(iter(loader))["video"]  # [4, 3, T, S, S]


def max_frame_difference(video: torch.Tensor) -> float:
    return (video - video[:, :, :1]).abs().max().item()


@pytest.mark.parametrize("backend", ["dali", "fallback"])
def test_crop_and_flip_are_the_same_in_every_frame(static_shards, backend):
    video = first_batch(finetune_data(static_shards, backend))
    assert max_frame_difference(video) < 0.15  # VP9 noise on a static picture, normalized units
    assert (video[0] - video[1]).abs().mean() > 0.05  # the two clips of a video differ


def test_dali_rand_augment_applies_one_op_to_every_frame(static_shards):
    plain = first_batch(finetune_data(static_shards, "dali"))
    augmented = first_batch(finetune_data(static_shards, "dali", "data.rand_augment=rand-m9-n4-mstd0.5-inc1"))
    assert max_frame_difference(augmented) < 0.15
    assert (augmented - plain).abs().mean() > 0.05  # the ops did something


def test_the_fallback_loader_refuses_rand_augment_naming_the_option(static_shards):
    with pytest.raises(ValueError, match="data.rand_augment"):
        first_batch(finetune_data(static_shards, "fallback", "data.rand_augment=rand-m7-n4-mstd0.5-inc1"))


def clips_by_view(data, seed=0) -> dict:
    """(video_index, view) -> clip over one epoch: the backends' epoch orders differ."""
    loader = build_loader(data, 2, 0, 1, mode="train", seed=seed, num_classes=2)
    return {(v, view): clip for batch in loader
            for v, view, clip in zip(batch["video_index"].tolist(), batch["view"].tolist(), batch["video"])}


def test_both_loaders_draw_the_same_crops_flips_and_erasing(static_shards):
    extra = ("data.erase_prob=1.0",)
    dali, fallback = (clips_by_view(finetune_data(static_shards, b, *extra)) for b in ("dali", "fallback"))
    assert dali.keys() == fallback.keys()
    assert all((dali[k] - fallback[k]).abs().mean() < 0.1 for k in dali)


def test_erasing_is_one_box_for_every_frame_with_fresh_noise_per_frame():
    clip = torch.zeros(3, 4, 16, 16)
    out = apply_erasing(clip, EraseBox(x=3, y=5, w=6, h=4, noise_seed=7))
    changed = out != 0
    assert torch.equal(changed, changed[:, :1].expand_as(changed))  # same box in every frame
    assert changed[0, 0, 5:9, 3:9].all() and changed.sum() == 3 * 4 * 4 * 6
    assert not torch.equal(out[:, 0], out[:, 1])  # pixel mode: new noise per frame
    assert torch.equal(out, apply_erasing(clip, EraseBox(3, 5, 6, 4, 7)))  # seeded


def test_rand_augment_spec_and_draws():
    spec = parse_rand_augment("rand-m7-n4-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_layers, spec.magnitude_std) == (7, 4, 0.5)
    draws = np.concatenate([rand_augment_params(np.random.default_rng(s), spec) for s in range(200)])
    identity = (draws[:, 0] == 13).mean()
    assert 0.4 < identity < 0.65  # each layer fires with p 0.5 (and may draw identity-free ops)
    assert 55 <= draws[:, 1].mean() <= 85  # magnitude 7 +- noise, in bins of 0.1
    with pytest.raises(ValueError, match="accepted"):
        parse_rand_augment("auto-v0")


@pytest.mark.parametrize("backend", ["dali", "fallback"])
def test_labels_outside_the_class_range_are_reported_bad_samples(vp9_shards, backend):
    data = load_config(None, [f"data.shards={vp9_shards}", f"data.backend={backend}", "data.num_frames=4",
                              "data.image_size=32", "data.short_side=64", "data.num_workers=0",
                              "data.test_num_segment=1", "data.test_num_crop=1"]).data
    loader = build_loader(data, 4, 0, 1, mode="eval", num_classes=2)  # the shards hold labels 0..3
    labels = torch.cat([b["label"] for b in loader])
    assert labels.numel() == 6 and set(labels.tolist()) == {0, 1}  # 12 videos, round-robin classes
    assert len(loader.failed) == 6 and all("outside the class range [0, 2)" in r for _, r in loader.failed)
