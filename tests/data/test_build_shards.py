"""Shard builder: format, DALI indices, rejects, CSV inputs, determinism and resuming."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vmaescale.data.shards import (BUILD_DIR, BuildOptions, build_shards, parse_bytes, sample_key,
                                   scaled_size, split_member_name)
from vmaescale.data.synthetic import render_clip, write_synthetic_videos
from vmaescale.data.video_io import encode_video, probe

REPO = Path(__file__).resolve().parents[2]


def manifest(shards: Path) -> list[dict]:
    return pq.read_table(shards / "manifest.parquet").to_pylist()


def rejects(shards: Path) -> dict[str, str]:
    """source file name -> reason."""
    return {Path(r["source"]).name: r["reason"] for r in pq.read_table(shards / "rejects.parquet").to_pylist()}


def tar_samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, ext = split_member_name(member.name)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def shard_bytes(shards: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(shards.glob("shard-*"))}


@pytest.fixture(scope="module")
def small_videos(tmp_path_factory) -> Path:
    """10 tiny VP9 videos in 2 class folders."""
    root = tmp_path_factory.mktemp("small_videos")
    write_synthetic_videos(root, n=10, codec="vp9", size=48, frames=18, fps=25, classes=2, seed=1)
    return root


SMALL = BuildOptions(codec="vp9", short_side=32, shard_size=3, min_frames=8)


# ---------------------------------------------------------------------------- format


@pytest.mark.parametrize("fixture,codec,ext", [("vp9_shards", "vp9", "webm"), ("h264_shards", "h264", "mp4")])
def test_every_sample_holds_video_nframes_cls_and_json(request, fixture, codec, ext):
    shards = request.getfixturevalue(fixture)
    rows = manifest(shards)
    labels = json.loads((shards / "labels.json").read_text())
    assert labels == {"left_fast": 0, "left_slow": 1, "right_fast": 2, "right_slow": 3}
    assert [r["shard"] for r in rows] == [0] * 5 + [1] * 5 + [2] * 2
    for shard in (0, 1, 2):
        samples = tar_samples(shards / f"shard-{shard:06d}.tar")
        assert list(samples) == [r["key"] for r in rows if r["shard"] == shard]
    for row in rows:
        sample = tar_samples(shards / f"shard-{row['shard']:06d}.tar")[row["key"]]
        assert list(sample) == [ext, "nframes", "cls", "json"] and "." not in row["key"]
        (nframes,) = struct.unpack("<i", sample["nframes"])
        info = probe(sample[ext])
        assert nframes == info.frames == row["frames"] == 24
        assert (info.width, info.height, info.fps) == (row["width"], row["height"], row["fps"]) == (64, 64, 25.0)
        assert int(sample["cls"].decode("ascii")) == row["label"]
        assert Path(row["source"]).parent.name == {v: k for k, v in labels.items()}[row["label"]]
        meta = json.loads(sample["json"])
        assert meta["source"] == row["source"] and meta["codec"] == codec == info.codec
        assert (meta["fps"], meta["width"], meta["height"], meta["duration"]) == (25.0, 64, 64, 0.96)
        assert row["bytes"] == len(sample[ext])


def test_index_files_equal_what_wds2idx_writes(vp9_shards, tmp_path):
    for tar in sorted(vp9_shards.glob("shard-*.tar")):
        theirs = tmp_path / tar.with_suffix(".idx").name
        subprocess.run([sys.executable, "-m", "wds2idx", str(tar), str(theirs)], check=True,
                       capture_output=True)
        assert tar.with_suffix(".idx").read_text() == theirs.read_text()


def test_dali_reads_the_shards_through_their_index_files(vp9_shards):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    tars = sorted(str(p) for p in vp9_shards.glob("shard-*.tar"))

    @dali.pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def reader():
        video, nframes, cls = fn.readers.webdataset(
            paths=tars, index_paths=[t.replace(".tar", ".idx") for t in tars],
            ext=["webm", "nframes", "cls"], dtypes=[types.UINT8, types.INT32, types.UINT8],
            missing_component_behavior="error", name="reader")
        return fn.decoders.video(video, device="cpu"), nframes, cls

    pipe = reader()
    pipe.build()
    assert pipe.epoch_size("reader") == 12
    rows = manifest(vp9_shards)
    seen = []
    for _ in range(3):
        frames, nframes, cls = pipe.run()
        for i in range(4):
            n = int(np.array(nframes[i])[0])
            assert np.array(frames[i]).shape == (n, 64, 64, 3)
            seen.append((n, int(bytes(np.array(cls[i])).decode())))
    assert seen == [(r["frames"], r["label"]) for r in rows]


def test_dataset_summary_describes_the_build(vp9_shards):
    dataset = json.loads((vp9_shards / "dataset.json").read_text())
    assert dataset["codec"] == "vp9" and dataset["video_exts"] == ["webm"]
    assert dataset["samples"] == 12 and dataset["classes"] == 4 and dataset["labeled"]
    assert dataset["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert dataset["rejects"] == 0 and dataset["options"]["shard_size"] == 5
    assert dataset["total_bytes"] == sum(r["bytes"] for r in manifest(vp9_shards))


# ---------------------------------------------------------------------------- bad inputs


def audio_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(render_clip("left_slow", 0, 32, 1)[0]).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def planted_build(tmp_path_factory) -> Path:
    """4 good videos plus one of every kind of bad input, built into shards."""
    root = tmp_path_factory.mktemp("planted")
    write_synthetic_videos(root, n=4, codec="h264", size=48, frames=20, classes=2, seed=2)
    bad = root / "left_slow"
    mp4 = encode_video(root / "whole.mp4", render_clip("left_slow", 5, 48, 20), 25, "h264")
    webm = encode_video(root / "whole.webm", render_clip("left_slow", 5, 48, 20), 25, "vp9")
    (bad / "zero.mp4").write_bytes(b"")
    (bad / "half_mp4.mp4").write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    (bad / "half_webm.webm").write_bytes(webm.read_bytes()[: webm.stat().st_size // 2])
    (bad / "text.mp4").write_text("not a video, just some text renamed to .mp4\n" * 20)
    (bad / "audio_only.mp4").write_bytes(audio_only_mp4())
    (bad / "image_only.mp4").write_bytes(png_bytes())
    encode_video(bad / "short.webm", render_clip("left_slow", 6, 48, 6), 25, "vp9")
    mp4.unlink()
    webm.unlink()
    out = tmp_path_factory.mktemp("planted_shards")
    build_shards(root, out, BuildOptions(codec="h264", short_side=32, shard_size=2, min_frames=8),
                 workers=2, progress=False)
    return out


def test_bad_inputs_land_in_rejects_with_their_reason(planted_build):
    assert rejects(planted_build) == {
        "zero.mp4": "zero_bytes", "half_mp4.mp4": "truncated", "half_webm.webm": "truncated",
        "text.mp4": "unreadable", "audio_only.mp4": "no_video_stream",
        "image_only.mp4": "too_short", "short.webm": "too_short",
    }
    rows = manifest(planted_build)
    assert sorted(Path(r["source"]).name for r in rows) == [f"00000{i}.mp4" for i in range(4)]
    assert [r["shard"] for r in rows] == [0, 0, 1, 1]
    dataset = json.loads((planted_build / "dataset.json").read_text())
    assert dataset["rejects_by_reason"] == {"zero_bytes": 1, "truncated": 2, "unreadable": 1,
                                            "no_video_stream": 1, "too_short": 2}


def test_transcoding_sets_short_side_and_constant_rate(tmp_path):
    clip = render_clip("right_fast", 0, 64, 30)[:, 8:56]  # [30, 48, 64, 3]: 30 frames at 30 fps = 1 s
    encode_video(tmp_path / "videos" / "clip.mp4", np.ascontiguousarray(clip), 30, "h264")
    options = BuildOptions(codec="vp9", short_side=32, fps=15, gop=4, min_frames=8)
    build_shards(tmp_path / "videos", tmp_path / "shards", options, workers=1, progress=False)
    (row,) = manifest(tmp_path / "shards")
    assert (row["width"], row["height"], row["fps"], row["frames"], row["label"]) == (42, 32, 15.0, 15, -1)
    assert scaled_size(64, 48, 32) == (42, 32) and scaled_size(427, 240, 0) == (428, 240)


# ---------------------------------------------------------------------------- CSV inputs


@pytest.mark.parametrize("listing,labels", [
    ("path,label\n{a},left_slow\n{b},right_slow\n{c},left_slow\n", {"left_slow": 0, "right_slow": 1}),
    ("{a} 7\n{b} 3\n{c} 7\n", {"3": 3, "7": 7}),
    ("{a},7\n{b},3\n{c},7\n", {"3": 3, "7": 7}),
    ("path\n{a}\n{b}\n{c}\n", {}),
])
def test_csv_lists_with_or_without_header_and_label(small_videos, tmp_path, listing, labels):
    videos = sorted(small_videos.rglob("*.webm"))[:3]
    relative = [p.relative_to(small_videos).as_posix() for p in videos]
    (small_videos / "list.csv").write_text(listing.format(a=relative[0], b=relative[1], c=relative[2]))
    options = BuildOptions(passthrough=True, shard_size=2, min_frames=8)
    build_shards(small_videos / "list.csv", tmp_path, options, workers=1, progress=False)
    assert json.loads((tmp_path / "labels.json").read_text()) == labels
    rows = sorted(manifest(tmp_path), key=lambda r: r["key"])
    expected = [labels[v] for v in (["left_slow", "right_slow", "left_slow"] if "label" in listing
                                    else ["7", "3", "7"])] if labels else [-1] * 3
    assert [r["label"] for r in rows] == expected
    assert [r["source"] for r in rows] == [str(p) for p in videos]
    for row in rows:  # passthrough keeps the source bytes and extension
        sample = tar_samples(tmp_path / f"shard-{row['shard']:06d}.tar")[row["key"]]
        assert sample["webm"] == Path(row["source"]).read_bytes() and ("cls" in sample) == bool(labels)


def test_csv_labels_outside_a_given_label_map_are_refused(small_videos, tmp_path):
    path = sorted(small_videos.rglob("*.webm"))[0]
    (tmp_path / "list.csv").write_text(f"{path},jumping\n")
    with pytest.raises(ValueError, match=r"labels \['jumping'\] are not in the given label map"):
        build_shards(tmp_path / "list.csv", tmp_path / "out", label_map={"running": 0}, progress=False)


# ---------------------------------------------------------------------------- order and resume


def test_same_seed_gives_the_same_shards_in_serial_and_parallel_builds(small_videos, tmp_path):
    build_shards(small_videos, tmp_path / "serial", SMALL, workers=1, progress=False)
    build_shards(small_videos, tmp_path / "parallel", SMALL, workers=2, progress=False)
    other = BuildOptions(**{**SMALL.__dict__, "seed": 1})
    build_shards(small_videos, tmp_path / "other", other, workers=1, progress=False)
    assert manifest(tmp_path / "serial") == manifest(tmp_path / "parallel")
    assert shard_bytes(tmp_path / "serial") == shard_bytes(tmp_path / "parallel")
    keys = [r["key"] for r in manifest(tmp_path / "serial")]
    other_keys = [r["key"] for r in manifest(tmp_path / "other")]
    assert other_keys != keys and sorted(other_keys) == sorted(keys)
    assert len(set(keys)) == 10


def test_resume_after_losing_uncommitted_shards_matches_uninterrupted_run(small_videos, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    build_shards(small_videos, full, SMALL, workers=1, progress=False)
    shutil.copytree(full, resumed)
    # The state a kill leaves after shard 0 was committed while shard 1 was being renamed
    # and shard 2 written: no sidecars after 0, no manifest, a stale tar and temp files.
    for name in ("manifest.parquet", "rejects.parquet", "dataset.json", "labels.json"):
        (resumed / name).unlink()
    for sidecar in sorted((resumed / BUILD_DIR).glob("shard-*.json"))[1:]:
        sidecar.unlink()
    for path in sorted(resumed.glob("shard-*"))[4:]:
        path.unlink()
    stale = resumed / "shard-000001.tar"
    stale.write_bytes(stale.read_bytes()[:1000])
    (resumed / "shard-000002.tar.tmp").write_bytes(b"partial")

    summary = build_shards(small_videos, resumed, SMALL, workers=1, progress=False)
    assert summary.processed == 10 - 3 and summary.samples == 10
    assert manifest(resumed) == manifest(full)
    assert shard_bytes(resumed) == shard_bytes(full)
    assert not list(resumed.glob("*.tmp"))


def test_rerunning_with_other_options_is_refused(small_videos, tmp_path):
    build_shards(small_videos, tmp_path, SMALL, workers=1, progress=False)
    changed = BuildOptions(**{**SMALL.__dict__, "shard_size": 4})
    with pytest.raises(ValueError, match="different options.shard_size"):
        build_shards(small_videos, tmp_path, changed, workers=1, progress=False)


@pytest.mark.slow
def test_cli_killed_mid_build_finishes_on_rerun_with_every_sample_once(small_videos, tmp_path):
    command = [sys.executable, "data_tools/build_shards.py", str(small_videos), str(tmp_path / "out"),
               "--codec", "vp9", "--short-side", "32", "--shard-size", "1", "--min-frames", "8",
               "--workers", "2", "--no-progress"]
    build = subprocess.Popen(command, cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_sidecar = tmp_path / "out" / BUILD_DIR / "shard-000000.json"
    deadline = time.monotonic() + 60
    while not first_sidecar.exists() and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(build.pid, signal.SIGKILL)
    build.wait()
    assert not (tmp_path / "out" / "manifest.parquet").exists(), "the build finished before the kill"

    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    assert "samples   10 in 10 shards" in done.stdout
    build_shards(small_videos, tmp_path / "uninterrupted", BuildOptions(**{**SMALL.__dict__, "shard_size": 1}),
                 workers=1, progress=False)
    assert manifest(tmp_path / "out") == manifest(tmp_path / "uninterrupted")
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "uninterrupted")


# ---------------------------------------------------------------------------- helpers and CLI


def test_keys_are_stable_and_dot_free():
    assert sample_key(3, "/data/a b/clip.v2 (1).mp4", 6) == "000003_clip_v2_1_"
    assert sample_key(1234567, "x.webm", 7) == "1234567_x"


def test_byte_sizes_parse_with_suffixes():
    assert [parse_bytes(s) for s in ("1048576", "500M", "2G", "1.5k")] == [1048576, 500_000_000, 2_000_000_000, 1500]
    with pytest.raises(ValueError, match="size 'lots' is not a byte count"):
        parse_bytes("lots")


def test_bad_options_name_the_value_and_what_is_accepted():
    with pytest.raises(ValueError, match="short_side=33 is not accepted; use an even number"):
        BuildOptions(short_side=33)
    with pytest.raises(ValueError, match="codec 'av1' is not supported; use one of"):
        BuildOptions(codec="av1")


def test_cli_prints_a_summary_with_rejects_by_reason(small_videos, tmp_path):
    (tmp_path / "videos").mkdir()
    shutil.copy(sorted(small_videos.rglob("*.webm"))[0], tmp_path / "videos" / "good.webm")
    (tmp_path / "videos" / "empty.mp4").write_bytes(b"")
    done = subprocess.run([sys.executable, "data_tools/build_shards.py", str(tmp_path / "videos"),
                           str(tmp_path / "out"), "--codec", "vp9", "--short-side", "32",
                           "--min-frames", "8", "--workers", "1", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert "samples   1 in 1 shards, 0 classes" in done.stdout
    assert "zero_bytes      1" in done.stdout and "videos/s" in done.stdout
