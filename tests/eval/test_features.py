"""`vmaescale extract-features`: windows, linspace sampling, pooled tokens equal to transformers'."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vmaescale.cli import main
from vmaescale.data.synthetic import write_synthetic_videos
from vmaescale.data.video_io import decode_frames
from vmaescale.eval.features import preprocess, video_windows, window_indices, window_starts
from vmaescale.models import VideoClassifier, VideoMAEPretrain
from vmaescale.models.checkpoint import save_model_dir
from vmaescale.models.interop import export_hf
from vmaescale.models.sizes import get_size

transformers = pytest.importorskip("transformers")

CLIP, SIDE, WINDOW, STRIDE = 4, 32, 10, 6
LENGTHS = (24, 16, 7)  # two long videos and one shorter than a window


def test_window_count_and_linspace_indices():
    assert window_starts(24, WINDOW, STRIDE) == [0, 6, 12]  # 1 + (24 - 10) // 6
    for n in (10, 11, 57, 180):
        assert len(window_starts(n, WINDOW, STRIDE)) == 1 + (n - WINDOW) // STRIDE
    assert window_indices(12, 180, 16, 400).tolist() == (12 + torch.linspace(0, 179, 16).long()).tolist()
    padded = video_windows(7, WINDOW, STRIDE, CLIP, "pad")
    assert len(padded) == 1 and padded[0].frames == 7 and padded[0].indices.tolist() == [0, 3, 6, 6]
    assert video_windows(7, WINDOW, STRIDE, CLIP, "skip") == []
    with pytest.raises(ValueError, match="accepted values"):
        video_windows(7, WINDOW, STRIDE, CLIP, "drop")


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """A folder of VP9 files (class sub-folders) of 24, 16 and 7 frames."""
    root = tmp_path_factory.mktemp("videos")
    for i, n in enumerate(LENGTHS):
        write_synthetic_videos(root / f"part{i}", n=1, codec="vp9", size=48, frames=n, seed=i)
    return root


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """(pretraining HF dir, classifier HF dir) exported from random nano models."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf")
    pretrain = VideoMAEPretrain(get_size("nano"), CLIP, SIDE, decoder_depth=1)
    classifier = VideoClassifier(get_size("nano"), 3, CLIP, SIDE, drop_path=0.0, init_scale=1.0)
    for p in classifier.fc_norm.parameters():  # a visible fc_norm
        torch.nn.init.normal_(p, 1.0, 0.5)
    dirs = []
    for name, model in (("pretrain", pretrain), ("classifier", classifier)):
        ckpt = save_model_dir(model, out / f"{name}_ckpt")
        export_hf(ckpt, out / name)
        dirs.append(out / name)
    return dirs


def extract(src, inputs, out, *extra) -> dict:
    assert main(["extract-features", str(src), "--shards", str(inputs), "--out", str(out), "--window",
                 str(WINDOW), "--stride", str(STRIDE), "--decoder", "pyav", *extra]) == 0
    return pq.read_table(out).to_pydict()


def hf_embeddings(hf_dir, video_path, starts) -> np.ndarray:
    """transformers' VideoMAEModel(...).last_hidden_state.mean(1) for the same clips."""
    model = transformers.VideoMAEModel.from_pretrained(hf_dir).eval()
    clips = []
    for start in starts:
        frames = torch.from_numpy(decode_frames(video_path, window_indices(start, WINDOW, CLIP, LENGTHS[0]).tolist()))
        clips.append(preprocess(frames, SIDE).transpose(0, 1))  # [T, 3, S, S], HF's layout
    with torch.no_grad():
        return model(pixel_values=torch.stack(clips)).last_hidden_state.mean(1).numpy()


@pytest.mark.parametrize("kind", ["pretrain", "classifier"])
def test_embeddings_equal_transformers_last_hidden_state_mean(kind, hf_dirs, video_folder, tmp_path):
    hf_dir = dict(zip(("pretrain", "classifier"), hf_dirs))[kind]
    before = sorted(p.name for p in hf_dir.iterdir())
    table = extract(hf_dir, video_folder, tmp_path / "f.parquet", "--no-fc-norm")
    assert sorted(p.name for p in hf_dir.iterdir()) == before  # imported on the fly, nothing written
    first = [i for i, key in enumerate(table["key"]) if key.startswith("part0/")]
    assert [table["window_start"][i] for i in first] == [0, 6, 12]
    video = next((video_folder / "part0").rglob("*.webm"))
    ours = np.array([table["embedding"][i] for i in first], np.float32)
    theirs = hf_embeddings(hf_dir, video, [0, 6, 12])
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_windows_short_videos_and_fc_norm(hf_dirs, video_folder, tmp_path):
    classifier = hf_dirs[1]
    padded = extract(classifier, video_folder, tmp_path / "pad.parquet")
    per_video = {}
    for key, start, frames in zip(padded["key"], padded["window_start"], padded["window_frames"]):
        per_video.setdefault(key.split("/")[0], []).append((start, frames))
    assert per_video == {"part0": [(0, 10), (6, 10), (12, 10)], "part1": [(0, 10), (6, 10)], "part2": [(0, 7)]}
    assert all(len(e) == 64 for e in padded["embedding"])
    assert pq.read_schema(tmp_path / "pad.parquet").field("embedding").type.list_size == 64
    skipped = extract(classifier, video_folder, tmp_path / "skip.parquet", "--short", "skip")
    assert not any(k.startswith("part2/") for k in skipped["key"]) and len(skipped["key"]) == 5
    plain = extract(classifier, video_folder, tmp_path / "plain.parquet", "--no-fc-norm")
    assert not np.allclose(padded["embedding"][0], plain["embedding"][0])  # fc_norm applied by default


def test_shards_and_csv_inputs_give_the_same_windows(hf_dirs, video_folder, vp9_shards, tmp_path):
    csv = tmp_path / "list.csv"
    videos = sorted(video_folder.rglob("*.webm"))
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in videos))
    from_csv = extract(hf_dirs[0], csv, tmp_path / "csv.parquet")
    assert len(from_csv["key"]) == 6
    from_shards = extract(hf_dirs[0], vp9_shards, tmp_path / "shards.parquet")
    assert len(set(from_shards["key"])) == 12  # every sample of the shard set, labels from .cls
    assert set(from_shards["label"]) == {0, 1, 2, 3}


def test_dali_decoder_gives_the_same_windows_as_pyav(hf_dirs, video_folder, tmp_path):
    pytest.importorskip("nvidia.dali")
    pyav = extract(hf_dirs[0], video_folder, tmp_path / "pyav.parquet")
    assert main(["extract-features", str(hf_dirs[0]), "--shards", str(video_folder), "--out",
                 str(tmp_path / "dali.parquet"), "--window", str(WINDOW), "--stride", str(STRIDE),
                 "--decoder", "dali"]) == 0  # DALI's CPU decoder: VP9
    dali = pq.read_table(tmp_path / "dali.parquet").to_pydict()
    for column in ("key", "label", "window_start", "window_frames"):
        assert dali[column] == pyav[column]
    # the two decoders convert YUV to RGB slightly differently: close, not equal
    a, b = np.array(dali["embedding"]), np.array(pyav["embedding"])
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.999
