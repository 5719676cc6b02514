"""`vmaescale reconstruct`: fixed clips and masks, masked / whole-clip metrics, --compare."""

from __future__ import annotations

import json

import pytest
import torch

from vmaescale.cli import main
from vmaescale.models import VideoClassifier, VideoMAEPretrain
from vmaescale.models.checkpoint import save_model_dir
from vmaescale.models.sizes import get_size

CLIP, SIDE = 4, 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two different random nano pretraining models, and a classifier."""
    out = tmp_path_factory.mktemp("ckpts")
    dirs = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        dirs[seed] = save_model_dir(VideoMAEPretrain(get_size("nano"), CLIP, SIDE, decoder_depth=1), out / f"m{seed}")
    dirs["classifier"] = save_model_dir(VideoClassifier(get_size("nano"), 4, CLIP, SIDE), out / "cls")
    return dirs


def reconstruct(src, shards, out, *extra) -> dict:
    assert main(["reconstruct", str(src), "--shards", str(shards), "--out", str(out), "--clips", "6",
                 "--backend", "fallback", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


METRICS = ("masked_psnr", "masked_ssim", "masked_mse", "whole_psnr", "whole_ssim", "whole_mse")


def test_compare_puts_two_checkpoints_on_the_same_clips_and_masks(checkpoints, vp9_shards, tmp_path, capsys):
    summary = reconstruct(checkpoints[0], vp9_shards, tmp_path / "a", "--compare", str(checkpoints[1]))
    assert summary["clips"] == 6 and len(summary["models"]) == 2
    src, other = summary["models"]
    assert any(src[k] != other[k] for k in METRICS)  # different weights, different quality
    for row in summary["models"]:
        assert row["whole_psnr"] > row["masked_psnr"]  # visible tokens are kept exactly
        assert row["clips_per_s"] > 0 and row["peak_memory_gb"] > 0
    assert (tmp_path / "a" / "grid_src.png").is_file() and (tmp_path / "a" / "grid_compare.png").is_file()
    table = capsys.readouterr().out
    assert "PSNR m" in table and "src: m0" in table and "compare: m1" in table
    # the same seed gives the same masks: a second run repeats the first exactly
    again = reconstruct(checkpoints[1], vp9_shards, tmp_path / "b")
    assert all(again["models"][0][k] == pytest.approx(other[k], abs=1e-9) for k in METRICS)
    # another seed gives other masks
    reseeded = reconstruct(checkpoints[1], vp9_shards, tmp_path / "c", "--seed", "7")
    assert reseeded["models"][0]["masked_mse"] != pytest.approx(other["masked_mse"], abs=1e-9)


def test_a_hugging_face_dir_is_reconstructed_directly(checkpoints, vp9_shards, tmp_path):
    pytest.importorskip("transformers")
    from vmaescale.models.interop import export_hf
    hf = tmp_path / "hf"
    export_hf(checkpoints[0], hf)
    before = sorted(p.name for p in hf.iterdir())
    summary = reconstruct(checkpoints[0], vp9_shards, tmp_path / "out", "--compare", str(hf),
                          "--decoder-mask", "running_cell:0.5")
    assert sorted(p.name for p in hf.iterdir()) == before
    ours, theirs = summary["models"]
    for k in METRICS:
        assert theirs[k] == pytest.approx(ours[k], rel=1e-5), k


def test_a_classifier_or_bad_mask_is_a_one_line_error(checkpoints, vp9_shards, tmp_path, capsys):
    assert main(["reconstruct", str(checkpoints["classifier"]), "--shards", str(vp9_shards),
                 "--out", str(tmp_path / "o")]) == 2
    assert "without a decoder" in capsys.readouterr().err
    assert main(["reconstruct", str(checkpoints[0]), "--shards", str(vp9_shards), "--out", str(tmp_path / "o"),
                 "--mask", "checker:0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "accepted masks" in err and "\n" not in err
