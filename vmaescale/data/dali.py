"""The DALI input pipeline: `fn.readers.webdataset` + `fn.decoders.video`.

Two pipelines per loader:
- the reader reads the rank's range of samples (`shard_id`, `num_shards`, shuffled through
  an `initial_fill` buffer in train mode, `pad_last_batch`, `stick_to_shard`) and hands
  the encoded video, `.nframes`, `.cls` and the sample's tar and key (from DALI's
  source_info) to the host;
- the decoder gets, per video, the encoded bytes and the parameters drawn on the host by
  `vmaescale.data.transforms` (frame indices; crop boxes or resize size and crop starts),
  decodes only those frames (`device="mixed"` on a GPU, "cpu" otherwise), crops and
  resizes them (one box for every frame of a clip), normalizes, and returns
  [num_views, 3, T, S, S] float32 per video. Train mode decodes a video once and crops it
  num_sample times.

Drawing the parameters on the host (not with DALI's own RNG) gives both backends the same
clips for the same (seed, epoch, video), makes resuming at a step exact, and lets a bad
sample be isolated: DALI's video decoder raises for the whole batch on an empty,
non-video or truncated input ("no longer valid" pipeline), so the loader rebuilds the
decoder (milliseconds, it holds no state), decodes that batch one video at a time, and
reports the videos that fail. The decoder runs with pad_mode="none": indices are clamped
to `.nframes` on the host (edge padding), so an index the decoder cannot reach means the
file holds fewer frames than `.nframes` says (truncated), which raises instead of being
padded silently.

The reader reads `.nframes` as raw bytes (UINT8) and the host parses them: with
dtypes=INT32 a single malformed `.nframes` fails the reader's build for the whole shard set.

The epoch's shard and shuffle: a reader is built per epoch, so train epochs rotate the
shards themselves (shard_id = (rank + epoch) % world_size, what stick_to_shard=False does
inside one long-lived reader) and seed the shuffle from (seed, epoch).
"""

from __future__ import annotations

import itertools
import queue
import re
import threading
from typing import Iterator

import numpy as np
import torch

from vmaescale.config import DataConfig
from vmaescale.data.loader import (BadSample, BadSampleLog, DecodedVideo, EpochPosition, RawSample, SampleInfo,
                                   ShardSet, batches_from_videos, eval_steps_per_epoch,
                                   sample_info, train_steps_per_epoch, view_shape)
from vmaescale.data.augment import MAGNITUDE_BINS, RAND_AUGMENT_OPS, TrainAugment
from vmaescale.data.shards import split_member_name
from vmaescale.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, eval_view, finish_train_clips,
                                       train_view)

PREFETCH_BATCHES = 2


def dali_shard_size(num_samples: int, shard_id: int, num_shards: int) -> int:
    """Samples in DALI's shard `shard_id`: [N * id // shards, N * (id + 1) // shards)."""
    return num_samples * (shard_id + 1) // num_shards - num_samples * shard_id // num_shards


def epoch_reader_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] % 2**31)


def reader_pipeline(shards: ShardSet, batch_size: int, shard_id: int, num_shards: int,
                    shuffle_buffer: int, seed: int):
    """Reader-only pipeline: encoded video, nframes, cls, json bytes per sample."""
    from nvidia.dali import fn, pipeline_def, types

    exts = [";".join(shards.video_exts), "nframes", "cls", "json"]  # "mp4;webm" = either

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=seed)
    def read():
        video, nframes, cls, meta = fn.readers.webdataset(
            paths=[str(t) for t in shards.tars], index_paths=[str(p) for p in shards.index_paths],
            ext=exts, dtypes=[types.UINT8] * len(exts),
            missing_component_behavior="empty", shard_id=shard_id, num_shards=num_shards,
            random_shuffle=shuffle_buffer > 1, initial_fill=max(1, shuffle_buffer),
            pad_last_batch=True, stick_to_shard=True, name="reader")
        return video, nframes, cls, meta

    pipe = read()
    pipe.build()
    return pipe


def _normalized(clip, mirror=None):
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W], ImageNet-normalized (mirrored when asked)."""
    from nvidia.dali import fn, types
    kwargs = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(clip, dtype=types.FLOAT, output_layout="CFHW",
                                    mean=[255.0 * m for m in IMAGENET_MEAN],
                                    std=[255.0 * s for s in IMAGENET_STD], **kwargs)


def rand_augment_suite():
    """DALI's RandAugment suite (increasing magnitudes, translations relative to the frame),
    checked against the op order the host draws from."""
    from nvidia.dali.auto_aug import rand_augment as dali_rand_augment

    suite = dali_rand_augment.get_rand_augment_suite(use_shape=True)
    names = tuple(aug.name for aug in suite)
    if names != RAND_AUGMENT_OPS:
        raise RuntimeError(f"DALI's RandAugment suite is {names}; vmaescale draws ops for "
                           f"{RAND_AUGMENT_OPS} (check the pinned nvidia-dali version)")
    return suite


def apply_rand_augment(frames, layers, num_layers: int, frame_hw):
    """RandAugment on uint8 FHWC frames, one op per layer for all frames of a clip.

    layers: int32 [n, 3] per sample, (op index, magnitude bin, sign) drawn on the host by
    `vmaescale.data.augment.rand_augment_params`; frame_hw: [2] float, for translations."""
    from nvidia.dali.auto_aug.core import select, signed_bin

    suite = rand_augment_suite()
    for i in range(num_layers):
        magnitude = signed_bin(layers[i, 1], layers[i, 2])
        frames = select(suite, layers[i, 0], data=frames, magnitude_bin=magnitude,
                        num_magnitude_bins=MAGNITUDE_BINS, shape=frame_hw, fill_value=128)
    return frames


def decode_pipeline(cfg: DataConfig, mode: str, batch_size: int, device_id: int | None):
    """Decoder pipeline fed per video with its bytes and host-drawn parameters."""
    from nvidia.dali import fn, pipeline_def, types

    decode_device = "cpu" if device_id is None else "mixed"
    aug = TrainAugment.from_config(cfg)
    ra = aug.rand_augment if mode == "train" else None

    @pipeline_def(batch_size=batch_size, num_threads=max(1, cfg.num_workers), device_id=device_id,
                  exec_async=False, exec_pipelined=False, prefetch_queue_depth=1,
                  enable_conditionals=ra is not None)
    def decode():
        video = fn.external_source(name="video", dtype=types.UINT8, ndim=1)
        indices = fn.external_source(name="frame_indices", dtype=types.INT32, ndim=1)
        frames = fn.decoders.video(video, device=decode_device, frames=indices,
                                   pad_mode="none")  # uint8 [T or S*T, H, W, 3]
        if mode == "train":
            # [num_sample, 4]: y0, x0, y1, x1 of each clip's box
            boxes = fn.external_source(name="boxes", dtype=types.FLOAT, ndim=2)
            flips = fn.external_source(name="flips", dtype=types.INT32, ndim=1) if aug.flip else None
            if ra is not None:
                layers = fn.external_source(name="rand_augment", dtype=types.INT32, ndim=3)
                frame_hw = fn.external_source(name="frame_hw", dtype=types.FLOAT, ndim=1)
            clips = []
            for k in range(cfg.num_sample):  # each [3, T, S, S]
                clip = frames if ra is None else apply_rand_augment(frames, layers[k], ra.num_layers,
                                                                    frame_hw)
                clip = fn.resize(clip, size=[cfg.image_size] * 2, roi_start=boxes[k, 0:2],
                                 roi_end=boxes[k, 2:4], roi_relative=False)
                clips.append(_normalized(clip, None if flips is None else flips[k]))
        else:
            resized_hw = fn.external_source(name="resized_hw", dtype=types.FLOAT, ndim=1)
            crop_yx = fn.external_source(name="crop_yx", dtype=types.INT32, ndim=2)  # [K, 2]
            resized = fn.resize(frames, size=resized_hw)  # [S*T, h, w, 3]
            clips = [_normalized(fn.slice(resized, start=crop_yx[k], shape=[cfg.image_size] * 2,
                                          axis_names="HW"))
                     for k in range(cfg.test_num_crop)]  # each [3, S*T, C, C]
        # a GPU -> CPU edge needs DALI's dynamic executor: keep the shapes on the frames' device
        return fn.stack(*clips), frames.shape(device="cpu" if device_id is None else "gpu")

    pipe = decode()
    pipe.build()
    return pipe


_SOURCE_INFO = re.compile(r"(?P<path>.*?):(?P<offset>\d+):(?P<member>.*)\Z", re.DOTALL)


def _sample_name(outputs, i: int) -> tuple[str, str]:
    """(tar name, key) of sample i from the source_info ("tar path:offset:member name") of
    its first present component. The key is the member name up to the first dot of its
    file name, as webdataset and wds2idx split it: "../x.webm" -> "../x", never ""."""
    for output in outputs:
        match = _SOURCE_INFO.match(output[i].source_info())
        if match:
            key, _ = split_member_name(match["member"])
            return match["path"].rsplit("/", 1)[-1], key
    return "?", "?"


def reader_samples(pipe) -> Iterator[RawSample]:
    """Endless RawSamples from a reader pipeline (DALI pads and wraps at the shard end)."""
    while True:
        outputs = pipe.run()
        video, nframes, cls, _ = outputs
        for i in range(len(video)):
            shard, key = _sample_name(outputs, i)
            yield RawSample(shard, key, np.array(video[i]), np.array(nframes[i]).tobytes(),
                            np.array(cls[i]).tobytes())


def _dali_error_reason(error: Exception) -> str:
    """The operator's message from a DALI pipeline error, on one line."""
    text = str(error)
    text = text.split("encountered:", 1)[-1]
    text = text.split("C++ context:", 1)[0].split("Current pipeline object", 1)[0]
    return "DALI: " + " ".join(text.split())


def cuda_device_id(device: torch.device | None) -> int | None:
    """The CUDA device index DALI should use, or None for a CPU-only pipeline."""
    if device is None or device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList -> torch tensor on `device` (copied)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray
    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    return feed_ndarray(dense, out)


class DaliVideoDecoder:
    """Runs the decoder pipeline on a list of videos; isolates and reports bad ones."""

    def __init__(self, cfg: DataConfig, mode: str, batch_size: int, device: torch.device | None,
                 seed: int, epoch: int):
        self.cfg, self.mode, self.batch_size = cfg, mode, batch_size
        self.seed, self.epoch = seed, epoch
        self.device_id = cuda_device_id(device)
        self.device = device if self.device_id is not None else torch.device("cpu")
        self.aug = TrainAugment.from_config(cfg)
        self.views: dict = {}  # video_index -> TrainView of the batch being decoded
        self.pipe = None

    def __call__(self, items: list[tuple[RawSample, SampleInfo]]) -> list[DecodedVideo | BadSample]:
        if not items:
            return []
        try:
            clips, shapes = self._run(items)
        except RuntimeError as e:
            self.pipe = None  # a failed DALI pipeline is no longer valid
            if len(items) == 1:
                sample = items[0][0]
                return [BadSample(sample.shard, sample.key, _dali_error_reason(e))]
            return [result for item in items for result in self(([item]))]
        return [self._checked(sample, info, clips[i], shapes[i])
                for i, (sample, info) in enumerate(items)]

    def _run(self, items: list[tuple[RawSample, SampleInfo]]):
        if self.pipe is None:
            self.pipe = decode_pipeline(self.cfg, self.mode, self.batch_size, self.device_id)
        self.views = {}
        feeds = [self._feed(sample, info) for sample, info in items]
        for name in feeds[0]:
            self.pipe.feed_input(name, [f[name] for f in feeds])
        clips, shapes = self.pipe.run()
        shapes = shapes if self.device_id is None else shapes.as_cpu()
        # train [n, num_sample, 3, T, S, S]; eval [n, K, 3, S*T, C, C]
        clips = _to_torch(clips, self.device)
        return clips, [np.array(shapes[i]) for i in range(len(items))]

    def _feed(self, sample: RawSample, info: SampleInfo) -> dict[str, np.ndarray]:
        cfg = self.cfg
        if self.mode == "train":
            view = self.views[info.video_index] = train_view(
                self.seed, self.epoch, info.video_index, info.nframes, info.width, info.height,
                cfg.num_frames, cfg.sampling_rate, cfg.image_size, cfg.num_sample, self.aug)
            boxes = np.array([[b.y, b.x, b.y + b.h, b.x + b.w] for b in view.boxes], np.float32)
            feed = {"video": sample.video, "frame_indices": view.frame_indices, "boxes": boxes}
            if self.aug.flip:
                feed["flips"] = np.asarray(view.flips, np.int32)
            if view.rand_augment is not None:
                feed["rand_augment"] = view.rand_augment
                feed["frame_hw"] = np.array([info.height, info.width], np.float32)
            return feed
        view = eval_view(info.nframes, info.width, info.height, cfg.num_frames, cfg.sampling_rate,
                         cfg.test_num_segment, cfg.test_num_crop, cfg.short_side, cfg.image_size)
        width, height = view.resized_wh
        return {"video": sample.video, "frame_indices": view.frame_indices,
                "resized_hw": np.array([height, width], np.float32),
                "crop_yx": np.array([[b.y, b.x] for b in view.boxes], np.int32)}

    def _checked(self, sample: RawSample, info: SampleInfo, clips: torch.Tensor,
                 shape: np.ndarray) -> DecodedVideo | BadSample:
        height, width = int(shape[1]), int(shape[2])
        if (width, height) != (info.width, info.height):
            reason = (f"decoded frames are {width}x{height}; the manifest says "
                      f"{info.width}x{info.height}")
            return BadSample(sample.shard, sample.key, reason)
        if self.mode == "eval":
            segments, frames = self.cfg.test_num_segment, self.cfg.num_frames
            clips = clips.unflatten(2, (segments, frames))  # [K, 3, S, T, C, C]
            clips = clips.permute(2, 0, 1, 3, 4, 5).flatten(0, 1)  # [S*K, 3, T, C, C]
        else:
            clips = finish_train_clips(clips, self.views[info.video_index])  # erasing
        return DecodedVideo(clips, info.label, info.video_index)


def _in_background(batches: Iterator[dict], depth: int) -> Iterator[dict]:
    """Produce `batches` in a thread (DALI releases the GIL), `depth` batches ahead."""
    done = object()
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        """Queue `item` unless the consumer has gone; False when it has."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    thread = threading.Thread(target=produce, name="dali-loader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class DaliLoader(EpochPosition):
    """DALI loader with the batch contract; see the module docstring."""

    backend = "dali"

    def __init__(self, shards: ShardSet, data_cfg: DataConfig, videos_per_gpu: int, rank: int,
                 world_size: int, mode: str, seed: int, epoch: int, start_step: int,
                 device: torch.device | None, num_classes: int | None = None):
        self.shards, self.cfg, self.mode, self.device = shards, data_cfg, mode, device
        self.videos_per_gpu, self.rank, self.world_size = videos_per_gpu, rank, world_size
        self.seed, self.num_classes = seed, num_classes
        self.decoder: DaliVideoDecoder | None = None
        probe = reader_pipeline(shards, 1, 0, 1, 0, 0)
        self.reader_samples = int(probe.reader_meta("reader")["epoch_size"])
        del probe
        if mode == "train":
            self.steps_per_epoch = train_steps_per_epoch(shards.num_videos, world_size,
                                                         videos_per_gpu)
        else:
            shares = [dali_shard_size(self.reader_samples, r, world_size)
                      for r in range(world_size)]
            self.steps_per_epoch = eval_steps_per_epoch(shares, videos_per_gpu)
        self._bad = BadSampleLog(mode, self.backend)
        self.set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[dict]:
        return _in_background(self._batches(), PREFETCH_BATCHES)

    def _shard_id(self) -> int:
        return (self.rank + self.epoch) % self.world_size if self.mode == "train" else self.rank

    def _raw_samples(self) -> Iterator[RawSample]:
        """This epoch's samples for this rank, the first start_step batches skipped undecoded."""
        shuffle_buffer = self.cfg.shuffle_buffer if self.mode == "train" else 0
        pipe = reader_pipeline(self.shards, self.videos_per_gpu, self._shard_id(), self.world_size,
                               shuffle_buffer, epoch_reader_seed(self.seed, self.epoch))
        samples = reader_samples(pipe)
        if self.mode == "eval":
            return itertools.islice(samples, dali_shard_size(self.reader_samples, self.rank,
                                                             self.world_size))
        return itertools.islice(samples, self.start_step * self.videos_per_gpu, None)

    def _decoded_videos(self) -> Iterator[DecodedVideo | BadSample]:
        if self.decoder is None:  # built once: its pipeline holds no per-epoch state
            self.decoder = DaliVideoDecoder(self.cfg, self.mode, self.videos_per_gpu, self.device,
                                            self.seed, self.epoch)
        decoder = self.decoder
        decoder.epoch = self.epoch
        samples = self._raw_samples()
        while chunk := list(itertools.islice(samples, self.videos_per_gpu)):
            ready = []
            for sample in chunk:
                try:
                    ready.append((sample, sample_info(sample, self.shards, self.num_classes)))
                except ValueError as e:
                    yield BadSample(sample.shard, sample.key, str(e))
            yield from decoder(ready)

    def _batches(self) -> Iterator[dict]:
        return batches_from_videos(self._decoded_videos(), self._bad, self.videos_per_gpu,
                                   len(self), view_shape(self.cfg), finite=self.mode == "eval")
