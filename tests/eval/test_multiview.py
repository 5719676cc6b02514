"""`vmaescale evaluate`: multi-view testing on real VP9 shards, one process and two ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from vmaescale.cli import main
from vmaescale.data.loader import open_shard_set
from vmaescale.data.shards import MANIFEST_SCHEMA, BuildOptions, build_shards, dali_index_text, shard_name
from vmaescale.data.synthetic import class_names, clip_seed, render_clip
from vmaescale.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, eval_frame_indices, segment_sampled_indices,
                                       short_side_resize_wh, spatial_crop_boxes)
from vmaescale.data.video_io import decode_frames, encode_video
from vmaescale.eval.multiview import Views, parse_views
from vmaescale.models import VideoClassifier
from vmaescale.models.checkpoint import save_model_dir
from vmaescale.models.sizes import get_size

REPO = Path(__file__).resolve().parents[2]
VIDEOS, CLASSES, FRAMES, HEIGHT, WIDTH = 7, 4, 20, 48, 64  # an odd count; frames wider than tall
CLIP_FRAMES, CROP = 4, 32


@pytest.fixture(scope="module")
def wide_shards(tmp_path_factory) -> Path:
    """7 labeled VP9 videos of 64x48 in tars of 3, 3 and 1 (sizes kept: short_side 0)."""
    videos = tmp_path_factory.mktemp("wide_videos")
    names = class_names(CLASSES)
    for i in range(VIDEOS):
        clip = render_clip(names[i % CLASSES], clip_seed(0, i), WIDTH, FRAMES, 4.0)[:, 8:8 + HEIGHT]
        encode_video(videos / names[i % CLASSES] / f"{i:06d}.webm", np.ascontiguousarray(clip), 25, "vp9")
    out = tmp_path_factory.mktemp("wide_shards")
    build_shards(videos, out, BuildOptions(codec="vp9", short_side=0, shard_size=3, min_frames=8, seed=0),
                 workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def classifier_dir(wide_shards, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = VideoClassifier(get_size("nano"), CLASSES, CLIP_FRAMES, CROP, drop_path=0.0, init_scale=1.0,
                            class_names=open_shard_set(str(wide_shards)).class_names)
    return save_model_dir(model.eval(), tmp_path_factory.mktemp("ckpt") / "classifier", source="test")


@pytest.fixture(scope="module")
def broken_shards(wide_shards, tmp_path_factory) -> Path:
    """The wide shard set with a not-a-video sample added to its last tar (and manifest)."""
    out = tmp_path_factory.mktemp("broken_shards")
    for path in wide_shards.iterdir():
        if path.is_file():
            shutil.copy(path, out)
    tar = out / shard_name(2)
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    with wds.TarWriter(str(tar)) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if not k.startswith("__url")})
        writer.write({"__key__": "broken_video", "webm": b"not a webm file\n" * 16,
                      "nframes": samples[0]["nframes"], "cls": samples[0]["cls"]})
    tar.with_suffix(".idx").write_text(dali_index_text(tar))
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    rows.append(dict(next(r for r in rows if r["shard"] == 2), key="broken_video"))
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out / "manifest.parquet")
    return out


def evaluate(src, shards, out, *extra) -> dict:
    assert main(["evaluate", str(src), "--shards", str(shards), "--out", str(out), "--no-track",
                 "--backend", "fallback", "--num-workers", "0", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def predictions(out: Path) -> dict[str, dict]:
    return {row["key"]: row for row in pq.read_table(out / "predictions.parquet").to_pylist()}


def reference_probs(model: VideoClassifier, video: bytes, nframes: int, flip: bool = False) -> np.ndarray:
    """The 5 x 3 test of one video written out by hand: clips spread at stride 4, short side
    to the crop size, left / centre / right crops, softmax averaged."""
    indices = eval_frame_indices(nframes, CLIP_FRAMES, 4, 5)
    frames = torch.from_numpy(decode_frames(video, indices.tolist())).permute(0, 3, 1, 2).float() / 255
    w, h = short_side_resize_wh(WIDTH, HEIGHT, CROP)
    frames = torch.nn.functional.interpolate(frames, size=(h, w), mode="bilinear", antialias=True,
                                             align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    frames = (frames - mean) / std
    clips = []
    for seg in frames.split(CLIP_FRAMES):
        for box in spatial_crop_boxes(w, h, CROP, 3):
            clips.append(seg[:, :, box.y:box.y + CROP, box.x:box.x + CROP].transpose(0, 1))
    batch = torch.stack(clips)
    if flip:
        batch = torch.cat([batch, batch.flip(-1)])
    with torch.no_grad():
        return model(batch).softmax(-1).mean(0).numpy()


def test_five_by_three_views_average_softmax_per_video(wide_shards, classifier_dir, tmp_path):
    summary = evaluate(classifier_dir, wide_shards, tmp_path / "out")
    assert (summary["videos"], summary["scored"], summary["failed"]) == (VIDEOS, VIDEOS, 0)
    assert summary["views_per_video"] == 15
    rows = predictions(tmp_path / "out")
    assert len(rows) == VIDEOS and all(r["views"] == 15 for r in rows.values())
    # one video checked against the protocol written out by hand
    from vmaescale.models.checkpoint import load_model_dir
    model = load_model_dir(classifier_dir).eval()
    tar = next(iter(sorted(wide_shards.glob("*.tar"))))
    sample = next(iter(wds.WebDataset(str(tar), shardshuffle=False)))
    expected = reference_probs(model, sample["webm"], int.from_bytes(sample["nframes"], "little"))
    row = rows[sample["__key__"]]
    order = np.argsort(-expected, kind="stable")[:4]
    assert row["top5_ids"] == order.tolist()
    np.testing.assert_allclose(row["top5_scores"], expected[order], atol=2e-3)  # resize kernels differ slightly
    # top-1 / top-5 follow from the predictions
    hits = [r["pred"] == r["label"] for r in rows.values()]
    assert summary["top1"] == pytest.approx(100 * sum(hits) / VIDEOS)
    assert summary["top5"] == pytest.approx(100.0)  # 4 classes: the label is always in the top 4
    per_class = (tmp_path / "out" / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,name,videos,top1,top5,failed" and len(per_class) == 1 + CLASSES
    assert (tmp_path / "out" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "failed.csv").read_text().strip() == "key,shard,label,reason"


def test_flip_adds_the_mirror_of_every_view(wide_shards, classifier_dir, tmp_path):
    summary = evaluate(classifier_dir, wide_shards, tmp_path / "out", "--flip", "--views", "5x3")
    assert summary["views_per_video"] == 30 and summary["flip"] is True
    assert all(r["views"] == 30 for r in predictions(tmp_path / "out").values())


def test_two_ranks_get_exactly_the_one_rank_result_on_an_odd_video_count(wide_shards, classifier_dir, tmp_path):
    one = evaluate(classifier_dir, wide_shards, tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vmaescale.cli", "evaluate", str(classifier_dir), "--shards", str(wide_shards),
           "--out", str(tmp_path / "two"), "--no-track", "--backend", "fallback", "--num-workers", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for key in ("videos", "scored", "failed", "top1", "top5", "mean_class_accuracy"):
        assert two[key] == one[key], key
    a, b = predictions(tmp_path / "one"), predictions(tmp_path / "two")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key]["top5_ids"] == b[key]["top5_ids"] and a[key]["views"] == b[key]["views"] == 15
        np.testing.assert_allclose(a[key]["top5_scores"], b[key]["top5_scores"], atol=1e-6)


def test_a_video_that_fails_to_decode_is_listed_and_counted_as_a_miss(broken_shards, classifier_dir, tmp_path):
    counted = evaluate(classifier_dir, broken_shards, tmp_path / "counted")
    assert (counted["videos"], counted["scored"], counted["failed"]) == (VIDEOS + 1, VIDEOS, 1)
    assert counted["failed_policy"] == "counted as misses"
    failed = (tmp_path / "counted" / "failed.csv").read_text().splitlines()
    assert len(failed) == 2 and failed[1].startswith(f"broken_video,{shard_name(2)},")
    assert "broken_video" not in predictions(tmp_path / "counted")  # never replaced by another video
    excluded = evaluate(classifier_dir, broken_shards, tmp_path / "excluded", "--exclude-failed")
    assert (excluded["videos"], excluded["failed"], excluded["failed_policy"]) == (VIDEOS, 1, "excluded")
    hits = counted["top1"] * (VIDEOS + 1)
    assert excluded["top1"] * VIDEOS == pytest.approx(hits)  # the same hits over one video fewer


def test_segment_sampling_is_the_official_ssv2_test_sampling():
    n, frames = 37, 16
    tick = n / frames
    official = sorted([int(tick / 2 + tick * x) for x in range(frames)] + [int(tick * x) for x in range(frames)])
    got = segment_sampled_indices(n, frames, 2)
    assert got[:frames].tolist() == official[0::2] and got[frames:].tolist() == official[1::2]
    assert segment_sampled_indices(5, 16, 2).max() == 4  # short videos repeat frames, never overrun


def test_segment_sampling_two_by_three(wide_shards, classifier_dir, tmp_path):
    summary = evaluate(classifier_dir, wide_shards, tmp_path / "out", "--views", "2x3", "--sampling", "segment")
    assert summary["views_per_video"] == 6 and summary["sampling"] == "segment"


def test_a_hugging_face_dir_is_evaluated_directly_and_left_untouched(wide_shards, classifier_dir, tmp_path):
    pytest.importorskip("transformers")
    from vmaescale.models.interop import export_hf
    hf = tmp_path / "hf"
    export_hf(classifier_dir, hf)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in hf.iterdir())
    ours = evaluate(classifier_dir, wide_shards, tmp_path / "ours")
    theirs = evaluate(hf, wide_shards, tmp_path / "theirs")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in hf.iterdir()) == before
    assert theirs["top1"] == ours["top1"]
    a, b = predictions(tmp_path / "ours"), predictions(tmp_path / "theirs")
    for key in a:
        assert a[key]["top5_ids"] == b[key]["top5_ids"]
        np.testing.assert_allclose(a[key]["top5_scores"], b[key]["top5_scores"], atol=1e-5)


def test_results_are_logged_to_mlflow(wide_shards, classifier_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(classifier_dir), "--shards", str(wide_shards), "--out", str(tmp_path / "out"),
                 "--backend", "fallback", "--num-workers", "0", "--tracking-uri", uri,
                 "--experiment", "eval-test"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["test_top1"] == pytest.approx(summary["top1"])
    assert run.data.metrics["test_videos"] == VIDEOS
    names = {a.path for a in client.list_artifacts(run.info.run_id, "test")}
    assert {"test/summary.json", "test/predictions.parquet", "test/confusion.png", "test/per_class.csv",
            "test/failed.csv"} <= names


def test_bad_views_and_sources_are_one_line_errors(wide_shards, tmp_path, capsys):
    with pytest.raises(ValueError, match="CLIPSxCROPS"):
        parse_views("five")
    with pytest.raises(ValueError, match="crops"):
        Views(5, 2)
    assert main(["evaluate", str(tmp_path / "missing"), "--shards", str(wide_shards), "--out",
                 str(tmp_path / "o"), "--no-track"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vmaescale evaluate: error: SRC=") and "\n" not in err


def test_an_official_finetune_pth_is_evaluated(wide_shards, tmp_path):
    """Official finetune files carry no clip shape: they are read as 16 frames at 224 px."""
    torch.manual_seed(0)
    model = VideoClassifier(get_size("nano"), CLASSES, 16, 224, drop_path=0.0, init_scale=1.0)
    torch.save({"module": model.state_dict()}, tmp_path / "official_ft.pth")
    summary = evaluate(tmp_path / "official_ft.pth", wide_shards, tmp_path / "out", "--views", "1x1")
    assert summary["source"] == f"official {tmp_path / 'official_ft.pth'}"
    assert (summary["videos"], summary["views_per_video"]) == (VIDEOS, 1)
