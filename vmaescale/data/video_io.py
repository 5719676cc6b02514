"""Probe, decode and encode videos with PyAV.

Every failure to use an input raises `VideoError` whose `reason` is one of
`REJECT_REASONS`, so the shard builder can report why an input was skipped:

    zero_bytes       the file is empty
    unreadable       not a media file FFmpeg can open or decode
    truncated        a media file that ends early (header present, data cut)
    no_video_stream  a media file without a video stream (audio only, ...)
    too_short        fewer decoded frames than required (raised by callers)

Frame indices always count decoded frames in presentation order, starting at 0.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence, Union

import av
import numpy as np

REJECT_REASONS = ("zero_bytes", "unreadable", "truncated", "no_video_stream", "too_short")

VideoSource = Union[str, Path, bytes]

# A stream whose decoded frame count falls short of the container's own count by more
# than this fraction (and at least _TRUNCATION_SLACK_FRAMES) is reported as truncated.
_TRUNCATION_TOLERANCE = 0.1
_TRUNCATION_SLACK_FRAMES = 2

# File signatures of containers FFmpeg should open; a file that has one but fails to
# open was most likely cut short (e.g. an mp4 whose trailing moov atom is missing).
_MP4_BOX_TYPES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
_MATROSKA_MAGIC = b"\x1a\x45\xdf\xa3"
_AVI_MAGIC = b"RIFF"


class VideoError(Exception):
    """An input video cannot be used; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str):
        if reason not in REJECT_REASONS:
            raise ValueError(f"reason {reason!r} is not one of {REJECT_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class VideoInfo(NamedTuple):
    """What `probe` measures; `frames` is the decoded frame count."""

    frames: int
    fps: float
    width: int
    height: int
    duration: float
    codec: str


@dataclass(frozen=True)
class VideoCodec:
    """An encoder and the container it is stored in."""

    name: str
    encoder: str
    container_format: str
    ext: str
    options: dict = field(default_factory=dict)


CODECS = {
    "h264": VideoCodec("h264", "libx264", "mp4", "mp4", {"preset": "veryfast", "crf": "23"}),
    "vp9": VideoCodec("vp9", "libvpx-vp9", "webm", "webm",
                      {"deadline": "good", "cpu-used": "5", "crf": "32", "b": "0", "row-mt": "1"}),
}

# Makes muxers deterministic (webm otherwise writes a random segment UID).
_BITEXACT = {"fflags": "+bitexact"}

_CAUGHT = (av.FFmpegError, OSError, EOFError, ValueError)


def codec_by_name(name: str) -> VideoCodec:
    """The VideoCodec called `name` ('h264' or 'vp9')."""
    if name not in CODECS:
        raise ValueError(f"codec {name!r} is not supported; use one of {sorted(CODECS)}")
    return CODECS[name]


def _source_size_bytes(src: VideoSource) -> int:
    if isinstance(src, bytes):
        return len(src)
    try:
        return Path(src).stat().st_size
    except OSError as e:
        raise VideoError("unreadable", f"{src}: {e}") from e


def _read_head(src: VideoSource) -> bytes:
    if isinstance(src, bytes):
        return src[:16]
    with open(src, "rb") as f:
        return f.read(16)


def _has_container_signature(head: bytes) -> bool:
    return head[4:8] in _MP4_BOX_TYPES or head.startswith((_MATROSKA_MAGIC, _AVI_MAGIC))


def _open_error(src: VideoSource, error: Exception) -> VideoError:
    """Classify a failure to open: a known container header means the file was cut."""
    name = "<bytes>" if isinstance(src, bytes) else str(src)
    reason = "truncated" if _has_container_signature(_read_head(src)) else "unreadable"
    return VideoError(reason, f"{name}: cannot open ({error})")


def open_container(src: VideoSource) -> av.container.InputContainer:
    """Open a path or in-memory bytes; raises VideoError (zero_bytes, unreadable, truncated)."""
    if _source_size_bytes(src) == 0:
        raise VideoError("zero_bytes", f"{'<bytes>' if isinstance(src, bytes) else src} is empty")
    try:
        return av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src), "r")
    except _CAUGHT as e:
        raise _open_error(src, e) from e


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The first video stream; raises VideoError(no_video_stream) when there is none."""
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoError("no_video_stream", f"streams present: {', '.join(kinds)}")
    return container.streams.video[0]


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _expected_frames(container: av.container.InputContainer,
                     stream: av.video.stream.VideoStream, fps: float) -> int:
    """The frame count the container claims (0 when it does not say)."""
    if stream.frames:
        return stream.frames
    if stream.duration and stream.time_base:
        return round(float(stream.duration * stream.time_base) * fps)
    if container.duration:
        return round(container.duration / av.time_base * fps)
    return 0


def _is_short_of(decoded: int, expected: int) -> bool:
    slack = max(_TRUNCATION_SLACK_FRAMES, _TRUNCATION_TOLERANCE * expected)
    return decoded + slack < expected


class VideoReader:
    """Decodes the first video stream of an open container, frame by frame."""

    def __init__(self, container: av.container.InputContainer):
        self.container = container
        self.stream = video_stream(container)
        self.stream.thread_type = "AUTO"
        self.fps = _stream_fps(self.stream)
        self.width = self.stream.codec_context.width
        self.height = self.stream.codec_context.height
        self.codec = self.stream.codec_context.name
        self.expected_frames = _expected_frames(container, self.stream, self.fps)
        self.decoded = 0

    def info(self) -> VideoInfo:
        """What was measured so far; `frames` is the number of frames decoded."""
        fps = self.fps or float(self.decoded)
        return VideoInfo(self.decoded, fps, self.width, self.height, self.decoded / fps, self.codec)

    def frames(self) -> Iterator[av.VideoFrame]:
        """Every decoded frame; raises VideoError(truncated/unreadable) when decoding stops early."""
        try:
            for frame in self.container.decode(self.stream):
                self.decoded += 1
                yield frame
        except _CAUGHT as e:
            reason = "truncated" if self.decoded else "unreadable"
            raise VideoError(reason, f"decoding stopped after {self.decoded} frames ({e})") from e
        if self.decoded == 0:
            raise VideoError("unreadable", "the video stream decodes to no frames")
        if _is_short_of(self.decoded, self.expected_frames):
            raise VideoError("truncated", f"decoded {self.decoded} of the {self.expected_frames} "
                                          "frames the container announces")


@contextmanager
def open_video(src: VideoSource) -> Iterator[VideoReader]:
    """A VideoReader over `src` (path or bytes), closed on exit."""
    container = open_container(src)
    try:
        yield VideoReader(container)
    finally:
        container.close()


def probe(src: VideoSource) -> VideoInfo:
    """Decode every frame of `src` and report (frames, fps, width, height, duration, codec)."""
    with open_video(src) as reader:
        for _ in reader.frames():
            pass
        return reader.info()


def _video_packets(container: av.container.InputContainer,
                   stream: av.video.stream.VideoStream) -> list[av.Packet]:
    """All packets of `stream` in decode order (flush packets dropped)."""
    try:
        return [p for p in container.demux(stream) if p.size and p.pts is not None]
    except _CAUGHT as e:
        raise VideoError("truncated", f"demuxing failed ({e})") from e


def _first_packet_to_decode(packets: list[av.Packet], first_pts: int) -> int:
    """Decode-order position of the last keyframe at or before presentation time `first_pts`."""
    start = 0
    for i, packet in enumerate(packets):
        if packet.is_keyframe and packet.pts <= first_pts:
            start = i
    return start


def _decode_wanted(stream: av.video.stream.VideoStream, packets: list[av.Packet],
                   wanted_pts: set[int]) -> dict[int, np.ndarray]:
    """Decode packets in order until every presentation time in `wanted_pts` is seen."""
    found: dict[int, np.ndarray] = {}
    for packet in [*packets, None]:
        for frame in stream.codec_context.decode(packet):
            if frame.pts in wanted_pts:
                found[frame.pts] = frame.to_ndarray(format="rgb24")
        if len(found) == len(wanted_pts):
            break
    return found


def frame_count(src: VideoSource) -> int:
    """Frames of the first video stream, counted from its packets (demuxed, not decoded)."""
    with open_video(src) as reader:
        count = len(_video_packets(reader.container, reader.stream))
    if count == 0:
        raise VideoError("unreadable", "the video stream has no packets")
    return count


def decode_frames(src: VideoSource, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at `indices` (repeats allowed, any order) -> uint8 [T, H, W, 3].

    Packets are demuxed once to map frame index -> presentation time; decoding starts
    at the last keyframe before the earliest wanted frame.
    """
    if len(indices) == 0:
        raise ValueError("indices is empty; ask for at least one frame")
    with open_video(src) as reader:
        packets = _video_packets(reader.container, reader.stream)
        display_pts = sorted(p.pts for p in packets)
        bad = [i for i in indices if not 0 <= i < len(display_pts)]
        if bad:
            raise IndexError(f"frame indices {bad[:5]} are outside [0, {len(display_pts)})")
        wanted = {display_pts[i] for i in indices}
        start = _first_packet_to_decode(packets, min(wanted))
        try:
            found = _decode_wanted(reader.stream, packets[start:], wanted)
        except _CAUGHT as e:
            raise VideoError("truncated", f"decoding failed ({e})") from e
    missing = sorted(i for i in set(indices) if display_pts[i] not in found)
    if missing:
        raise VideoError("truncated", f"frames {missing[:5]} did not decode")
    return np.stack([found[display_pts[i]] for i in indices])  # [T, H, W, 3]


class VideoEncoder:
    """Encodes frames of one size at a constant rate into `codec`'s container."""

    def __init__(self, dst: Union[str, Path, io.BytesIO], codec: str, fps: float,
                 width: int, height: int, gop: int = 16):
        if width % 2 or height % 2:
            raise ValueError(f"frame size {width}x{height} must be even for yuv420p")
        if gop < 1:
            raise ValueError(f"gop {gop} must be >= 1 (frames between keyframes)")
        spec = codec_by_name(codec)
        self.container = av.open(str(dst) if isinstance(dst, (str, Path)) else dst, "w",
                                 format=spec.container_format, options=_BITEXACT)
        rate = Fraction(fps).limit_denominator(1001)
        self.stream = self.container.add_stream(spec.encoder, rate=rate)
        self.time_base = 1 / rate
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.gop_size = gop
        self.stream.options = dict(spec.options)
        self.frames = 0

    def add(self, frame: Union[np.ndarray, av.VideoFrame]) -> None:
        """Append one frame: uint8 [H, W, 3] RGB or an av.VideoFrame of the stream's size."""
        if isinstance(frame, np.ndarray):
            frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        frame.pts = self.frames
        frame.time_base = self.time_base
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the container."""
        self.container.mux(self.stream.encode(None))
        self.container.close()


def encode_video(path: Union[str, Path], frames: np.ndarray, fps: float, codec: str,
                 gop: int = 16) -> Path:
    """Write uint8 [T, H, W, 3] RGB `frames` to `path` as h264 (.mp4) or vp9 (.webm)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    encoder = VideoEncoder(path, codec, fps, frames.shape[2], frames.shape[1], gop)
    for frame in frames:
        encoder.add(frame)
    encoder.close()
    return Path(path)


def encode_to_bytes(frames: Iterator[av.VideoFrame], codec: str, fps: float, width: int,
                    height: int, gop: int) -> bytes:
    """Encode a stream of frames (already `width` x `height` yuv420p) -> container bytes."""
    buffer = io.BytesIO()
    encoder = VideoEncoder(buffer, codec, fps, width, height, gop)
    for frame in frames:
        encoder.add(frame)
    encoder.close()
    return buffer.getvalue()
