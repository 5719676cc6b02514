"""Synthetic videos whose class is a motion: direction x speed of moving shapes.

Each clip shows 1-3 coloured discs or squares over a static colour-ramp background. All
shapes move with the class velocity and wrap around the frame edges. Appearance (the
ramp, the shapes, their start positions) comes from the clip's seed alone, so clips of
every class with the same seed have identical first frames: no single frame tells the
class, only the motion does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vmaescale.data.video_io import codec_by_name, encode_video

# Interleaved so that the first K classes differ in direction first, then in speed.
CLASS_NAMES = ("left_slow", "right_slow", "left_fast", "right_fast",
               "up_slow", "down_slow", "up_fast", "down_fast")
_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_SPEEDS_PER_FRAME = {"slow": 0.005, "fast": 0.015}  # fraction of the frame size per frame


def class_names(classes: int) -> list[str]:
    """The first `classes` motion classes (2 to 8)."""
    if not 2 <= classes <= len(CLASS_NAMES):
        raise ValueError(f"classes={classes} is not supported; use 2 to {len(CLASS_NAMES)}")
    return list(CLASS_NAMES[:classes])


def class_velocity(class_name: str, size: int, speed: float = 1.0) -> tuple[float, float]:
    """(vx, vy) in pixels per frame for a class such as 'left_slow', times `speed`."""
    direction, _, pace = class_name.partition("_")
    if direction not in _DIRECTIONS or pace not in _SPEEDS_PER_FRAME:
        raise ValueError(f"class {class_name!r} is not one of {CLASS_NAMES}")
    dx, dy = _DIRECTIONS[direction]
    step = _SPEEDS_PER_FRAME[pace] * size * speed
    return dx * step, dy * step


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A static, strongly lit colour ramp in a random direction -> float32 [H, W, 3].

    The pretraining loss normalizes every patch per channel (SPEC section 3), so a patch of
    flat colour or fine noise becomes unit-variance noise nobody can predict, and a tiny
    model stalls at the mean-prediction loss (about 1.0). A ramp of 100-140 grey levels per
    channel across the frame keeps every background patch structured and continuous with
    its neighbours: a tiny MAE learns it within a few hundred CPU steps, and what remains
    of the loss is mostly the moving shapes.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(theta) * (x - 0.5) + np.sin(theta) * (y - 0.5)  # [H, W] in [-0.71, 0.71]
    mid = rng.uniform(100, 155, 3).astype(np.float32)  # mid +- 0.71 * span stays in [0, 255]
    span = (rng.uniform(100, 140, 3) * rng.choice([-1.0, 1.0], 3)).astype(np.float32)
    return mid + ramp[..., None] * span


def _shape_alpha(dx: np.ndarray, dy: np.ndarray, radius: float, is_square: bool) -> np.ndarray:
    """Anti-aliased coverage of a disc or square at offsets dx [W], dy [H] -> [H, W, 1]."""
    if is_square:
        edge = np.maximum(abs(dx)[None, :], abs(dy)[:, None])
    else:
        edge = np.sqrt(dx[None, :] ** 2 + dy[:, None] ** 2)
    return np.clip(radius + 0.5 - edge, 0, 1)[..., None]


def _draw_shape(frames: np.ndarray, rng: np.random.Generator, velocity: tuple[float, float]) -> None:
    """Draw one disc or square moving at `velocity` into frames [T, H, W, 3], wrapping at edges."""
    size = frames.shape[1]
    x0, y0 = rng.uniform(0, size, 2)
    radius = rng.uniform(0.08, 0.15) * size
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    is_square = rng.random() < 0.5
    half = int(np.ceil(radius)) + 2
    window = np.arange(-half, half + 1)
    for t, frame in enumerate(frames):
        cx, cy = x0 + velocity[0] * t, y0 + velocity[1] * t
        ix, iy = int(np.floor(cx)), int(np.floor(cy))
        alpha = _shape_alpha(ix + window - cx, iy + window - cy, radius, is_square)
        rows, cols = np.ix_((iy + window) % size, (ix + window) % size)
        frame[rows, cols] = frame[rows, cols] * (1 - alpha) + alpha * colour


def render_clip(class_name: str, seed: int, size: int = 160, frames: int = 48,
                speed: float = 1.0) -> np.ndarray:
    """One clip of `class_name` -> uint8 [T, H, W, 3]; appearance depends on `seed` only.

    `speed` multiplies every class velocity: at small frame sizes the default motion is a
    pixel or less per frame, which a tiny classifier trained for minutes cannot see.
    """
    if size < 16 or size % 2:
        raise ValueError(f"size={size} must be even and >= 16")
    if frames < 1:
        raise ValueError(f"frames={frames} must be >= 1")
    if speed <= 0:
        raise ValueError(f"speed={speed} must be > 0")
    velocity = class_velocity(class_name, size, speed)
    rng = np.random.default_rng(seed)
    clip = np.repeat(_background(rng, size)[None], frames, axis=0)  # [T, H, W, 3]
    for _ in range(rng.integers(1, 4)):
        _draw_shape(clip, rng, velocity)
    return np.clip(clip, 0, 255).astype(np.uint8)


def clip_seed(seed: int, index: int) -> int:
    """Appearance seed of video `index` in a set generated with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_synthetic_videos(out_dir: str | Path, n: int, codec: str = "vp9", size: int = 160,
                           frames: int = 48, fps: float = 25, classes: int = 4, seed: int = 0,
                           gop: int = 16, speed: float = 1.0) -> list[Path]:
    """Write `n` videos as OUT/<class>/<index>.<ext>, classes assigned round-robin."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    ext = codec_by_name(codec).ext
    names = class_names(classes)
    paths = []
    for index in range(n):
        name = names[index % classes]
        path = Path(out_dir) / name / f"{index:06d}.{ext}"
        clip = render_clip(name, clip_seed(seed, index), size, frames, speed)
        paths.append(encode_video(path, clip, fps, codec, gop))
    return paths
