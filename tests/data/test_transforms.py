"""Clip sampling and crop parameters: the official VideoMAE rules, pinned on worked examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vmaescale.data.transforms import (CropBox, clip_frame_indices, crop_resize, eval_frame_indices,
                                       eval_view, fixed_crop_offsets, multi_scale_crop_params,
                                       multi_scale_crop_sizes, normalize_clip, sample_clip_start,
                                       segment_starts, short_side_resize_wh, spatial_crop_boxes,
                                       train_view, unnormalize_video)


def test_multi_scale_crop_sizes_follow_group_multi_scale_crop():
    # 340x256 frame, output 224: base 256 -> int(256 * [1, .875, .75, .66]) = 256, 224, 192, 168;
    # pairs (w, h) with |i - j| <= 1, rows by the height's scale, as in the official code.
    assert multi_scale_crop_sizes(340, 256, 224) == [
        (256, 256), (224, 256),
        (256, 224), (224, 224), (192, 224),
        (224, 192), (192, 192), (168, 192),
        (192, 168), (168, 168)]


def test_crop_sizes_within_3px_of_the_output_snap_to_it():
    # base 226: int(226 * scale) = 226 (within 3 px of 224, so 224), 197, 169, 149
    sizes = {w for w, _ in multi_scale_crop_sizes(226, 300, 224)}
    assert sizes == {224, 197, 169, 149}


def test_fixed_offsets_are_the_13_official_positions():
    # w_step = (340 - 224) // 4 = 29, h_step = (256 - 192) // 4 = 16
    assert fixed_crop_offsets(340, 256, 224, 192) == [
        (0, 0), (116, 0), (0, 64), (116, 64), (58, 32),
        (0, 32), (116, 32), (58, 64), (58, 0),
        (29, 16), (87, 16), (29, 48), (87, 48)]


def test_multi_scale_crop_draws_only_official_boxes_and_all_of_them():
    rng = np.random.default_rng(0)
    boxes = [multi_scale_crop_params(rng, 340, 256, 224) for _ in range(4000)]
    allowed = {CropBox(x, y, w, h) for w, h in multi_scale_crop_sizes(340, 256, 224)
               for x, y in fixed_crop_offsets(340, 256, w, h)}
    assert set(boxes) <= allowed
    assert {(b.w, b.h) for b in boxes} == set(multi_scale_crop_sizes(340, 256, 224))
    assert len(set(boxes)) > 0.9 * len(allowed)
    assert all(b.x + b.w <= 340 and b.y + b.h <= 256 for b in boxes)


def test_clip_start_covers_zero_to_last_full_start():
    rng = np.random.default_rng(0)
    starts = {sample_clip_start(rng, nframes=24, num_frames=4, stride=2) for _ in range(2000)}
    assert starts == set(range(0, 24 - 7 + 1))  # span (4 - 1) * 2 + 1 = 7


def test_short_videos_start_at_zero_and_repeat_their_last_frame():
    rng = np.random.default_rng(0)
    assert sample_clip_start(rng, nframes=5, num_frames=4, stride=2) == 0
    assert clip_frame_indices(0, nframes=5, num_frames=4, stride=2).tolist() == [0, 2, 4, 4]


def test_eval_segments_are_evenly_spaced_and_one_segment_is_centred():
    assert segment_starts(nframes=24, num_frames=4, stride=2, num_segments=3) == [0, 8, 17]
    assert segment_starts(nframes=24, num_frames=4, stride=2, num_segments=1) == [8]
    assert eval_frame_indices(24, 4, 2, 2).tolist() == [0, 2, 4, 6, 17, 19, 21, 23]


def test_short_side_resize_truncates_the_long_side():
    assert short_side_resize_wh(340, 256, 224) == (297, 224)
    assert short_side_resize_wh(48, 64, 32) == (32, 42)


def test_three_crops_run_along_the_long_side():
    assert spatial_crop_boxes(297, 224, 224, 3) == [
        CropBox(0, 0, 224, 224), CropBox(36, 0, 224, 224), CropBox(73, 0, 224, 224)]
    assert spatial_crop_boxes(32, 42, 32, 3) == [CropBox(0, 0, 32, 32), CropBox(0, 5, 32, 32),
                                                 CropBox(0, 10, 32, 32)]
    assert spatial_crop_boxes(297, 256, 224, 1) == [CropBox(36, 16, 224, 224)]


def test_bad_crop_requests_name_the_value():
    with pytest.raises(ValueError, match="num_crops=2"):
        spatial_crop_boxes(64, 64, 32, 2)
    with pytest.raises(ValueError, match="crop_size=80"):
        spatial_crop_boxes(64, 64, 80, 1)


def test_train_view_is_a_function_of_seed_epoch_and_video():
    args = dict(nframes=240, width=340, height=256, num_frames=16, stride=4, image_size=224,
                num_sample=4)
    a = train_view(1, 2, 3, **args)
    b = train_view(1, 2, 3, **args)
    assert a.frame_indices.tolist() == b.frame_indices.tolist() and a.boxes == b.boxes
    others = [train_view(1, epoch, 3, **args) for epoch in range(3, 8)]
    assert any(o.boxes != a.boxes or o.frame_indices.tolist() != a.frame_indices.tolist()
               for o in others)
    assert len(a.boxes) == 4


def test_eval_view_lists_segment_major_frames_and_crops_in_the_resized_frame():
    view = eval_view(nframes=24, width=64, height=48, num_frames=4, stride=2, num_segments=2,
                     num_crops=3, short_side=32, image_size=32)
    assert view.resized_wh == (42, 32)
    assert view.frame_indices.tolist() == [0, 2, 4, 6, 17, 19, 21, 23]
    assert [b.x for b in view.boxes] == [0, 5, 10]


def test_crop_resize_applies_one_box_to_every_frame():
    # Frames share one texture and differ only by a per-frame brightness step, so the
    # difference between two output frames is flat exactly when the box is the same.
    texture = torch.randint(20, 200, (48, 64, 3), dtype=torch.uint8)
    frames = torch.stack([texture + 5 * t for t in range(4)])  # [4, 48, 64, 3]
    out = crop_resize(frames, CropBox(8, 4, 40, 36), 32)  # [4, 3, 32, 32]
    assert out.shape == (4, 3, 32, 32)
    for t in range(1, 4):
        step = out[t] - out[0]
        assert torch.allclose(step, torch.full_like(step, 5 * t / 255), atol=1e-5)


def test_normalize_then_unnormalize_round_trips():
    frames = torch.rand(4, 3, 8, 8)  # [T, 3, H, W]
    clip = normalize_clip(frames)  # [3, T, H, W]
    assert clip.shape == (3, 4, 8, 8)
    assert torch.allclose(unnormalize_video(clip[None])[0], frames.permute(1, 0, 2, 3), atol=1e-6)
