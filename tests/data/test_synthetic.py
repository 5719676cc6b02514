"""Synthetic motion-class videos: real encoded files, class visible only in the motion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vmaescale.data.synthetic import (CLASS_NAMES, class_names, class_velocity, render_clip,
                                      write_synthetic_videos)
from vmaescale.data.video_io import decode_frames, encode_video, probe


REPO = Path(__file__).resolve().parents[2]


def global_flow(clip: np.ndarray) -> np.ndarray:
    """Least-squares (Lucas-Kanade over the whole frame) motion (vx, vy) in pixels per frame."""
    gray = clip.astype(np.float64).mean(-1)  # [T, H, W]
    it = np.diff(gray, axis=0)
    ix, iy = np.gradient(gray, axis=2)[:-1], np.gradient(gray, axis=1)[:-1]
    a = np.array([[(ix * ix).sum(), (ix * iy).sum()], [(ix * iy).sum(), (iy * iy).sum()]])
    return np.linalg.solve(a, -np.array([(ix * it).sum(), (iy * it).sum()]))


def test_first_frame_is_identical_for_every_class():
    clips = [render_clip(name, seed=7, size=48, frames=12) for name in CLASS_NAMES]
    for clip in clips[1:]:
        np.testing.assert_array_equal(clip[0], clips[0][0])
    last_frames = {clip[-1].tobytes() for clip in clips}
    assert len(last_frames) == len(CLASS_NAMES)  # the motion makes them diverge


def test_measured_motion_follows_the_class_direction_and_speed():
    size, seeds = 64, range(3)
    flows = {name: np.mean([global_flow(render_clip(name, s, size, 16)) for s in seeds], axis=0)
             for name in CLASS_NAMES}
    for name, flow in flows.items():
        expected = np.array(class_velocity(name, size))
        axis = int(np.argmax(abs(expected)))
        assert np.sign(flow[axis]) == np.sign(expected[axis]), (name, flow)
        assert abs(flow[axis]) > 2 * abs(flow[1 - axis]), (name, flow)
    for direction in ("left", "right", "up", "down"):
        assert np.linalg.norm(flows[f"{direction}_fast"]) > 1.5 * np.linalg.norm(flows[f"{direction}_slow"])


def test_speed_scales_every_class_velocity_and_keeps_the_first_frame():
    assert class_velocity("left_fast", 64, speed=8) == tuple(8 * v for v in class_velocity("left_fast", 64))
    slow, fast = render_clip("right_slow", 3, 64, 8), render_clip("right_slow", 3, 64, 8, speed=8)
    np.testing.assert_array_equal(slow[0], fast[0])
    assert global_flow(fast)[0] > 2 * global_flow(slow)[0] > 0  # least squares underestimates large shifts
    with pytest.raises(ValueError, match="speed=0"):
        render_clip("right_slow", 3, 64, 8, speed=0)


@pytest.mark.parametrize("codec,ext", [("vp9", "webm"), ("h264", "mp4")])
def test_written_videos_are_class_folders_of_decodable_files(tmp_path, codec, ext):
    paths = write_synthetic_videos(tmp_path, n=4, codec=codec, size=48, frames=16, fps=25,
                                   classes=2, seed=0)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        f"left_slow/000000.{ext}", f"right_slow/000001.{ext}",
        f"left_slow/000002.{ext}", f"right_slow/000003.{ext}"]
    for path in paths:
        info = probe(path)
        assert (info.frames, info.width, info.height, info.fps, info.codec) == (16, 48, 48, 25.0, codec)


def test_same_seed_writes_identical_bytes_and_another_seed_does_not(tmp_path):
    first = write_synthetic_videos(tmp_path / "a", 2, "vp9", 48, 8, classes=2, seed=3)
    again = write_synthetic_videos(tmp_path / "b", 2, "vp9", 48, 8, classes=2, seed=3)
    other = write_synthetic_videos(tmp_path / "c", 2, "vp9", 48, 8, classes=2, seed=4)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert first[0].read_bytes() != other[0].read_bytes()


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_encode_then_decode_frames_round_trips_selected_frames(tmp_path, codec):
    clip = render_clip("right_fast", seed=1, size=64, frames=20)
    path = encode_video(tmp_path / f"clip.{codec}", clip, fps=25, codec=codec, gop=4)
    indices = [17, 2, 2, 9, 19, 0]
    frames = decode_frames(path.read_bytes(), indices)
    assert frames.shape == (6, 64, 64, 3) and frames.dtype == np.uint8
    error = np.abs(frames[:, None].astype(np.float64) - clip[None]).mean(axis=(2, 3, 4))  # [6, T]
    assert error.argmin(axis=1).tolist() == indices  # lossy, but each is the frame asked for
    np.testing.assert_array_equal(frames[1], frames[2])


def test_class_count_outside_the_supported_range_is_refused():
    assert class_names(3) == ["left_slow", "right_slow", "left_fast"]
    with pytest.raises(ValueError, match="classes=9 is not supported; use 2 to 8"):
        class_names(9)


def test_cli_writes_the_requested_videos(tmp_path):
    done = subprocess.run([sys.executable, "data_tools/make_synthetic.py", str(tmp_path), "--videos", "3",
                           "--codec", "h264", "--size", "32", "--frames", "8", "--classes", "3"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert sorted(p.parent.name for p in tmp_path.rglob("*.mp4")) == ["left_fast", "left_slow", "right_slow"]
    assert "wrote 3 h264 videos" in done.stdout


def plane_fit_r2(patches: np.ndarray) -> np.ndarray:
    """Variance explained by the best plane a + b*x + c*y, per 16x16 patch [K, 256] -> [K]."""
    y, x = np.mgrid[0:16, 0:16].reshape(2, -1).astype(np.float64)
    design = np.stack([np.ones(256), x, y], axis=1)
    coef, *_ = np.linalg.lstsq(design, patches.T, rcond=None)
    residual = patches.T - design @ coef
    return 1 - residual.var(axis=0) / np.maximum(patches.var(axis=1), 1e-9)


def test_patches_are_smooth_so_a_tiny_mae_can_learn_them():
    """The loss normalizes each patch per channel, so noise or fine texture within a patch is
    unpredictable after normalization and a tiny model stalls at the mean (loss ~1.0). Most
    patches must be smooth: a plane explains nearly all their variance."""
    frames = np.stack([render_clip("left_slow", seed, 80, 1)[0] for seed in range(20)])
    patches = frames.reshape(20, 5, 16, 5, 16, 3).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 256)
    assert np.median(plane_fit_r2(patches.astype(np.float64))) > 0.95
