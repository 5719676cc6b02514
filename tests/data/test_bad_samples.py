"""Bad samples inside a shard are skipped, counted and reported; eval never replaces them."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from vmaescale.config import DataConfig
from vmaescale.data.loader import build_loader
from vmaescale.data.shards import MANIFEST_SCHEMA, dali_index_text, shard_name
from vmaescale.data.video_io import VideoError, open_video

BACKENDS = ["fallback", "dali"]
PLANTED_SHARD = 1
# A clip of 4 frames at stride 4 spans 13 frames, so it always needs a frame past the
# first 12: the truncated video below decodes fewer, whichever clip is drawn.
CLIP_SPAN = 13


def decodable_frames(video: bytes) -> int:
    count = 0
    try:
        with open_video(video) as reader:
            for count, _ in enumerate(reader.frames(), 1):
                pass
    except VideoError:
        pass
    return count


def planted_samples(good: dict) -> dict[str, dict]:
    """Bad samples made from a good one: key -> components."""
    truncated = good["webm"][: len(good["webm"]) // 2]
    assert 1 <= decodable_frames(truncated) < CLIP_SPAN
    base = {"nframes": good["nframes"], "cls": good["cls"]}
    return {
        "planted_zero_bytes": {**base, "webm": b""},
        "planted_truncated": {**base, "webm": truncated},
        "planted_not_a_video": {**base, "webm": b"these bytes are text, not a webm file\n" * 8},
        "planted_bad_nframes": {"nframes": b"\x18\x00\x00", "cls": good["cls"],
                                "webm": good["webm"]},
    }


@pytest.fixture(scope="module")
def planted_shards(vp9_shards, tmp_path_factory) -> Path:
    """The VP9 shard set with 4 bad samples appended to one shard (and to the manifest)."""
    out = tmp_path_factory.mktemp("planted_shards")
    for path in vp9_shards.iterdir():
        if path.is_file():
            shutil.copy(path, out)
    tar = out / shard_name(PLANTED_SHARD)
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    planted = planted_samples(samples[0])
    with wds.TarWriter(str(tar)) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if not k.startswith("__url")})
        for key, components in planted.items():
            writer.write({"__key__": key, **components})
    (out / shard_name(PLANTED_SHARD).replace(".tar", ".idx")).write_text(dali_index_text(tar))
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    template = next(r for r in rows if r["shard"] == PLANTED_SHARD)
    rows += [dict(template, key=key) for key in planted]
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out / "manifest.parquet")
    return out


def data_config(shards: Path, backend: str) -> DataConfig:
    return DataConfig(shards=str(shards), backend=backend, num_frames=4, sampling_rate=4,
                      image_size=32, num_sample=2, num_workers=0, shuffle_buffer=4,
                      test_num_segment=2, test_num_crop=1, short_side=32)


def good_and_planted_rows(shards: Path) -> tuple[set[int], set[int]]:
    keys = pq.read_table(shards / "manifest.parquet").column("key").to_pylist()
    planted = {i for i, k in enumerate(keys) if k.startswith("planted_")}
    return set(range(len(keys))) - planted, planted


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_skips_counts_and_logs_every_bad_sample(planted_shards, backend, caplog):
    good, planted = good_and_planted_rows(planted_shards)
    loader = build_loader(data_config(planted_shards, backend), 2, 0, 1)
    with caplog.at_level(logging.WARNING, logger="vmaescale.data.loader"):
        batches = list(loader)
    assert len(batches) == loader.steps_per_epoch == 8  # 16 manifest rows // 2
    seen = [v for b in batches for v in b["video_index"].tolist()]
    assert all(b["video"].shape[0] == 4 for b in batches)  # bad samples were replaced
    assert not set(seen) & planted and set(seen) <= good
    # 16 videos are drawn from 12 good ones, so a rank may read its share again and meet
    # a bad sample twice: every meeting is counted and logged.
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert loader.bad_samples == len(skipped) >= 4
    for key in ("planted_zero_bytes", "planted_truncated", "planted_not_a_video",
                "planted_bad_nframes"):
        assert f"bad sample {key} in shard {shard_name(PLANTED_SHARD)} skipped" in caplog.text
    assert loader.failed == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_reports_failed_videos_and_never_replaces_them(planted_shards, backend):
    good, planted = good_and_planted_rows(planted_shards)
    loader = build_loader(data_config(planted_shards, backend), 3, 0, 1, mode="eval")
    batches = list(loader)
    seen = [v for b in batches for v in b["video_index"].tolist()]
    assert sorted(set(seen)) == sorted(good)
    assert all(seen.count(v) == 2 for v in good)  # 2 segments x 1 crop, each video once
    assert loader.bad_samples == 4
    reasons = dict(loader.failed)
    assert sorted(reasons) == sorted(["planted_zero_bytes", "planted_truncated",
                                      "planted_not_a_video", "planted_bad_nframes"])
    assert "zero-byte" in reasons["planted_zero_bytes"]
    assert ".nframes has 3 bytes" in reasons["planted_bad_nframes"]


def test_decoder_errors_name_the_problem(planted_shards):
    messages = {}
    for backend in BACKENDS:
        loader = build_loader(data_config(planted_shards, backend), 3, 0, 1, mode="eval")
        list(loader)
        messages[backend] = dict(loader.failed)
    assert "truncated" in messages["fallback"]["planted_truncated"]
    assert "out-of-bounds frame index" in messages["dali"]["planted_truncated"]
    assert "unreadable" in messages["fallback"]["planted_not_a_video"]
    assert "Failed to create video decoder" in messages["dali"]["planted_not_a_video"]


def test_a_bad_sample_does_not_change_the_other_videos_clips(planted_shards, vp9_shards):
    def clips(shards: Path) -> dict:
        cfg = dataclasses.replace(data_config(shards, "dali"), shuffle_buffer=0)
        loader = build_loader(cfg, 3, 0, 1, mode="eval")
        return {(v, view): b["video"][i] for b in loader
                for i, (v, view) in enumerate(zip(b["video_index"].tolist(), b["view"].tolist()))}
    clean, planted = clips(vp9_shards), clips(planted_shards)
    assert set(clean) <= set(planted)
    assert all((clean[k] == planted[k]).all() for k in clean)


