"""The DALI input pipeline: samples read on the host by index, decoded by `fn.decoders.video`.

Built once per loader and kept for the whole run (`set_epoch` only moves the position):
- the reader: the shard set's SampleIndex (`vmaescale.data.shardset`; the tars in order,
  each in the order of its `.idx`, grouped as DALI's webdataset reader groups them), read
  with one seek per component, so an epoch can visit the rank's samples in any order;
- `data.dali_pipelines` decoder pipelines, each run by its own long-lived thread. Chunks of
  videos_per_gpu samples go to them round-robin and come back in order, so the reading and
  decoding of consecutive chunks overlap (up to max(dali_pipelines, prefetch_batches)
  chunks in flight) and the batches are the same whatever the count. A decoder gets, per
  video, the encoded bytes and the parameters drawn on the host by
  `vmaescale.data.transforms` (frame indices; crop boxes or resize size and crop starts),
  decodes only those frames (`device="mixed"` on a GPU, "cpu" otherwise), crops and resizes
  them (one box for every frame of a clip), normalizes, and returns
  [num_views, 3, T, S, S] float32 per video. Train mode decodes a video once and crops it
  num_sample times.

The epoch's order. The reader's N samples are split like DALI's reader shards: shard i
holds positions [N * i // W, N * (i + 1) // W) for W ranks. A train epoch reads shard
(rank + epoch) % W, so the shards rotate across ranks from epoch to epoch, in a permutation
drawn from (seed, epoch, shard) (`data.shuffle_buffer` > 1; else in reader order), and
cycles through that same permutation again when bad samples leave it short of the epoch's
steps. An eval epoch reads shard `rank` once, in reader order: every sample of the set
exactly once over the ranks. The order is a pure function of (seed, epoch, rank, W) and
the shard set, never of what an earlier epoch read, which is why a loader keeps its
pipelines across epochs and a resumed run (a fresh loader at (epoch, start_step)) gets the
uninterrupted run's batches: `start_step` starts at position start_step * videos_per_gpu of
the epoch's order without reading the skipped samples (exact unless a skipped sample was
bad, as in the fallback). DALI's own webdataset reader cannot do this: it reads its shard
sequentially from where the previous epoch left it, its shuffle buffer (`initial_fill`) is
seeded once per pipeline build, and it cannot seek, so it had to be rebuilt every epoch.

Drawing the parameters on the host (not with DALI's own RNG) gives both backends the same
clips for the same (seed, epoch, video), makes resuming at a step exact, and lets a bad
sample be isolated: DALI's video decoder raises for the whole batch on an empty,
non-video or truncated input ("no longer valid" pipeline), so the loader rebuilds that
decoder (milliseconds, it holds no state), decodes the chunk one video at a time, and
reports the videos that fail. The decoder runs with pad_mode="none": indices are clamped
to `.nframes` on the host (edge padding), so an index the decoder cannot reach means the
file holds fewer frames than `.nframes` says (truncated), which raises instead of being
padded silently. `.nframes` and `.cls` are read as raw bytes and parsed on the host, so a
malformed one is a bad sample, not a failed pipeline.
"""

from __future__ import annotations

import collections
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from vmaescale.config import DataConfig
from vmaescale.data.augment import MAGNITUDE_BINS, RAND_AUGMENT_OPS, TrainAugment
from vmaescale.data.samples import (BadSample, BadSampleLog, DecodedVideo, EpochPosition, RawSample,
                                    SampleInfo, batches_from_videos, eval_steps_per_epoch,
                                    sample_info, train_steps_per_epoch, view_shape)
from vmaescale.data.shardset import SampleIndex, ShardSet, index_samples
from vmaescale.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, eval_view, finish_train_clips,
                                       train_view)

ORDER_STREAM = 0x0DE5  # keeps the epoch-order generator apart from transforms.video_rng's


def dali_shard_range(num_samples: int, shard_id: int, num_shards: int) -> range:
    """Reader positions of DALI's shard `shard_id`: [N * id // shards, N * (id + 1) // shards)."""
    return range(num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards)


def dali_shard_size(num_samples: int, shard_id: int, num_shards: int) -> int:
    return len(dali_shard_range(num_samples, shard_id, num_shards))


def epoch_order(num_samples: int, shard_id: int, num_shards: int, seed: int, epoch: int,
                shuffle: bool) -> np.ndarray:
    """int64 [shard size]: the reader positions of shard `shard_id`, in the order an epoch
    reads them (a permutation drawn from (seed, epoch, shard) when `shuffle`)."""
    shard = dali_shard_range(num_samples, shard_id, num_shards)
    positions = np.arange(shard.start, shard.stop, dtype=np.int64)
    if shuffle:
        rng = np.random.default_rng([seed, epoch, shard_id, ORDER_STREAM])
        positions = rng.permutation(positions)
    return positions


def read_raw_sample(index: SampleIndex, position: int) -> RawSample | BadSample:
    """The sample at reader `position`: its video (np.uint8 [bytes]), `.nframes` and `.cls`
    as stored (absent components empty), or a BadSample when its tar cannot be read."""
    tar = index.tars[index.tar[position]]
    key = index.key[position]
    parts = []
    try:
        with open(tar, "rb") as file:
            for offset, size in zip(index.offset[position].tolist(), index.size[position].tolist()):
                data = bytearray(max(size, 0))
                if offset >= 0:
                    file.seek(offset)
                    if file.readinto(data) != size:
                        raise OSError(f"the file ends inside the member at byte {offset}")
                parts.append(data)
    except OSError as e:
        return BadSample(tar.name, key, f"tar read error: {e}")
    video, nframes, cls = parts
    return RawSample(tar.name, key, np.frombuffer(video, np.uint8), bytes(nframes), bytes(cls))


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


def _to_torch(tensor_list, device: torch.device, stream=None) -> torch.Tensor:
    """A dense DALI TensorList -> torch tensor on `device` (copied).

    On a GPU the copy is ordered on `stream`, the stream that will read the batch (the
    training loop's current stream, captured when iteration starts): the output is allocated
    on it and `feed_ndarray` makes it wait for DALI's work, then copies on it, so the
    allocator cannot hand the buffer to the trainer while DALI's stream still writes it."""
    from nvidia.dali.plugin.pytorch import feed_ndarray
    dense = tensor_list.as_tensor()
    if stream is None or device.type != "cuda":
        return feed_ndarray(dense, torch.empty(dense.shape(), dtype=torch.float32, device=device))
    with torch.cuda.stream(stream):
        out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        return feed_ndarray(dense, out, cuda_stream=stream)


class DaliVideoDecoder:
    """One decoder pipeline, built on first use and kept: decodes a list of videos for an
    epoch; isolates and reports bad ones. Not thread-safe: one thread runs it."""

    def __init__(self, cfg: DataConfig, mode: str, batch_size: int, device: torch.device | None,
                 seed: int):
        self.cfg, self.mode, self.batch_size, self.seed = cfg, mode, batch_size, seed
        self.device_id = cuda_device_id(device)
        self.device = device if self.device_id is not None else torch.device("cpu")
        self.aug = TrainAugment.from_config(cfg)
        self.pipe = None

    def __call__(self, items: list[tuple[RawSample, SampleInfo]], epoch: int,
                 stream=None) -> list[DecodedVideo | BadSample]:
        """`stream`: the consumer's CUDA stream (see `_to_torch`)."""
        if not items:
            return []
        try:
            clips, shapes, views = self._run(items, epoch, stream)
        except RuntimeError as e:
            self.pipe = None  # a failed DALI pipeline is no longer valid
            if len(items) == 1:
                sample = items[0][0]
                return [BadSample(sample.shard, sample.key, _dali_error_reason(e))]
            return [result for item in items for result in self([item], epoch, stream)]
        return [self._checked(sample, info, clips[i], shapes[i], views[i])
                for i, (sample, info) in enumerate(items)]

    def _run(self, items: list[tuple[RawSample, SampleInfo]], epoch: int, stream):
        if self.pipe is None:
            self.pipe = decode_pipeline(self.cfg, self.mode, self.batch_size, self.device_id)
        feeds, views = zip(*(self._feed(sample, info, epoch) for sample, info in items))
        for name in feeds[0]:
            self.pipe.feed_input(name, [f[name] for f in feeds])
        clips, shapes = self.pipe.run()
        shapes = shapes if self.device_id is None else shapes.as_cpu()
        # train [n, num_sample, 3, T, S, S]; eval [n, K, 3, S*T, C, C]
        clips = _to_torch(clips, self.device, stream)
        return clips, [np.array(shapes[i]) for i in range(len(items))], views

    def _feed(self, sample: RawSample, info: SampleInfo, epoch: int):
        """(the pipeline's inputs for one video, its TrainView or None in eval)."""
        cfg = self.cfg
        if self.mode == "train":
            view = train_view(self.seed, epoch, info.video_index, info.nframes, info.width,
                              info.height, cfg.num_frames, cfg.sampling_rate, cfg.image_size,
                              cfg.num_sample, self.aug)
            boxes = np.array([[b.y, b.x, b.y + b.h, b.x + b.w] for b in view.boxes], np.float32)
            feed = {"video": sample.video, "frame_indices": view.frame_indices, "boxes": boxes}
            if self.aug.flip:
                feed["flips"] = np.asarray(view.flips, np.int32)
            if view.rand_augment is not None:
                feed["rand_augment"] = view.rand_augment
                feed["frame_hw"] = np.array([info.height, info.width], np.float32)
            return feed, view
        view = eval_view(info.nframes, info.width, info.height, cfg.num_frames, cfg.sampling_rate,
                         cfg.test_num_segment, cfg.test_num_crop, cfg.short_side, cfg.image_size,
                         cfg.test_sampling)
        width, height = view.resized_wh
        return {"video": sample.video, "frame_indices": view.frame_indices,
                "resized_hw": np.array([height, width], np.float32),
                "crop_yx": np.array([[b.y, b.x] for b in view.boxes], np.int32)}, None

    def _checked(self, sample: RawSample, info: SampleInfo, clips: torch.Tensor,
                 shape: np.ndarray, view) -> DecodedVideo | BadSample:
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
            clips = finish_train_clips(clips, view)  # erasing
        return DecodedVideo(clips, info.label, info.video_index)


class DecoderPool:
    """Decoder pipelines, each with one long-lived thread of its own (DALI releases the GIL).

    `in_order` hands chunk j to pipeline j % count and yields the results in chunk order,
    keeping `ahead` chunks in flight."""

    def __init__(self, decoders: list[DaliVideoDecoder]):
        self.decoders = decoders
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"dali-decoder-{i}")
                         for i in range(len(decoders))]

    def in_order(self, job: Callable, chunks: Iterable, ahead: int) -> Iterator:
        """job(decoder, chunk) for every chunk, run on the decoder's thread, results in order.

        When the consumer stops early, the chunks not yet started are dropped; a running one
        finishes on its thread before that thread takes the next epoch's first chunk."""
        pending: collections.deque = collections.deque()
        chunks = iter(chunks)
        try:
            for j in itertools.count():
                while len(pending) < ahead and (chunk := next(chunks, None)) is not None:
                    i = (j + len(pending)) % len(self.decoders)
                    pending.append(self._threads[i].submit(job, self.decoders[i], chunk))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class DaliLoader(EpochPosition):
    """DALI loader with the batch contract; see the module docstring."""

    backend = "dali"

    def __init__(self, shards: ShardSet, data_cfg: DataConfig, videos_per_gpu: int, rank: int,
                 world_size: int, mode: str, seed: int, epoch: int, start_step: int,
                 device: torch.device | None, num_classes: int | None = None):
        self.shards, self.cfg, self.mode, self.device = shards, data_cfg, mode, device
        self.videos_per_gpu, self.rank, self.world_size = videos_per_gpu, rank, world_size
        self.seed, self.num_classes = seed, num_classes
        self.index = index_samples(shards)  # the reader
        self.pool = DecoderPool([DaliVideoDecoder(data_cfg, mode, videos_per_gpu, device, seed)
                                 for _ in range(data_cfg.dali_pipelines)])
        if mode == "train":
            self.steps_per_epoch = train_steps_per_epoch(shards.num_videos, world_size,
                                                         videos_per_gpu)
        else:
            shares = [dali_shard_size(len(self.index), r, world_size) for r in range(world_size)]
            self.steps_per_epoch = eval_steps_per_epoch(shares, videos_per_gpu)
        self._bad = BadSampleLog(mode, self.backend)
        self.set_epoch(epoch, start_step)

    @property
    def decoders(self) -> list[DaliVideoDecoder]:
        return self.pool.decoders

    def __iter__(self) -> Iterator[dict]:
        stream = torch.cuda.current_stream(self.device) if self._on_gpu() else None
        videos = self._decoded_videos(self.epoch_positions(), self.epoch, stream)
        return batches_from_videos(videos, self._bad, self.videos_per_gpu, len(self),
                                   view_shape(self.cfg), finite=self.mode == "eval")

    def _on_gpu(self) -> bool:
        return cuda_device_id(self.device) is not None

    def _shard_id(self) -> int:
        return (self.rank + self.epoch) % self.world_size if self.mode == "train" else self.rank

    def epoch_positions(self) -> Iterator[int]:
        """Reader positions of this epoch from start_step on (see the module docstring):
        train cycles through the epoch's order, eval reads its shard once."""
        shuffle = self.mode == "train" and self.cfg.shuffle_buffer > 1
        order = epoch_order(len(self.index), self._shard_id(), self.world_size, self.seed,
                            self.epoch, shuffle)
        if self.mode == "eval":
            return iter(order.tolist())
        if not len(order):
            raise ValueError(f"rank {self.rank}: DALI shard {self._shard_id()} of "
                             f"{self.world_size} holds none of the {len(self.index)} samples "
                             f"in {self.shards.root}")
        return itertools.islice(itertools.cycle(order.tolist()),
                                self.start_step * self.videos_per_gpu, None)

    def _decoded_videos(self, positions: Iterator[int], epoch: int,
                        stream) -> Iterator[DecodedVideo | BadSample]:
        """The videos at `positions`, decoded in chunks of videos_per_gpu by the pool."""
        chunks = iter(lambda: list(itertools.islice(positions, self.videos_per_gpu)), [])
        ahead = max(self.cfg.dali_pipelines, self.cfg.prefetch_batches)

        def job(decoder: DaliVideoDecoder, chunk: list[int]) -> list[DecodedVideo | BadSample]:
            return self._decode_chunk(decoder, chunk, epoch, stream)

        for results in self.pool.in_order(job, chunks, ahead):
            yield from results

    def _decode_chunk(self, decoder: DaliVideoDecoder, positions: list[int], epoch: int,
                      stream) -> list[DecodedVideo | BadSample]:
        """Read, check and decode the samples at `positions` (on the decoder's thread)."""
        bad, ready = [], []
        for position in positions:
            sample = read_raw_sample(self.index, position)
            if isinstance(sample, BadSample):
                bad.append(sample)
                continue
            try:
                ready.append((sample, sample_info(sample, self.shards, self.num_classes)))
            except ValueError as e:
                bad.append(BadSample(sample.shard, sample.key, str(e)))
        return bad + decoder(ready, epoch, stream)
