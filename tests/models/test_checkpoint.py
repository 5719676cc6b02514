"""The vmaescale checkpoint directory: exact round trips, strict loading, readable metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vmaescale.models import SIZES, VideoClassifier, VideoMAEPretrain
from vmaescale.models.checkpoint import (build_model, load_model_dir, model_meta, read_meta,
                                         save_model_dir)

NANO = SIZES["nano"]


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def pretrain_model() -> VideoMAEPretrain:
    return randomized(VideoMAEPretrain(NANO, num_frames=8, image_size=64, decoder_depth=3))


def classifier_model() -> VideoClassifier:
    return randomized(VideoClassifier(NANO, num_classes=7, num_frames=4, image_size=32))


@pytest.mark.parametrize("make", [pretrain_model, classifier_model])
def test_save_then_load_is_bitwise_exact(make, tmp_path):
    model = make()
    save_model_dir(model, tmp_path / "ckpt", source="unit test")
    loaded = load_model_dir(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_meta_describes_the_architecture(tmp_path):
    save_model_dir(pretrain_model(), tmp_path, source="run 42")
    meta = json.loads((tmp_path / "vmaescale.json").read_text())
    assert meta == {"format": "vmaescale", "version": 1, "task": "pretrain", "size": NANO.to_dict(),
                    "num_frames": 8, "image_size": 64, "decoder_depth": 3, "source": "run 42"}
    assert model_meta(classifier_model())["num_classes"] == 7
    assert "decoder_depth" not in model_meta(classifier_model())


def test_position_tables_are_not_stored(tmp_path):
    save_model_dir(pretrain_model(), tmp_path)
    assert not any("pos_embed" in k for k in load_file(str(tmp_path / "model.safetensors")))


def test_extra_files_are_written_and_ignored_on_load(tmp_path):
    save_model_dir(classifier_model(), tmp_path, extra_files={"config.json": '{"lr": 1}'})
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1}
    assert isinstance(load_model_dir(tmp_path), VideoClassifier)
    with pytest.raises(ValueError, match="extra file name 'a/b.txt'"):
        save_model_dir(classifier_model(), tmp_path, extra_files={"a/b.txt": ""})


def test_compiled_model_saves_without_orig_mod_prefix(tmp_path):
    save_model_dir(torch.compile(classifier_model()), tmp_path)  # compiles lazily: never run here
    assert not any("_orig_mod" in k for k in load_file(str(tmp_path / "model.safetensors")))
    assert read_meta(tmp_path)["task"] == "classification"


def test_missing_and_unexpected_weights_are_listed(tmp_path):
    save_model_dir(classifier_model(), tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["fc_norm.bias"]
    weights["extra.weight"] = torch.zeros(1)
    save_file(weights, str(tmp_path / "model.safetensors"))
    listed = r"missing keys \['fc_norm.bias'\]; unexpected keys \['extra.weight'\]"
    with pytest.raises(ValueError, match=listed):
        load_model_dir(tmp_path)


def test_wrong_format_is_refused(tmp_path):
    save_model_dir(classifier_model(), tmp_path)
    meta = json.loads((tmp_path / "vmaescale.json").read_text()) | {"version": 2}
    (tmp_path / "vmaescale.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 2; accepted: 'vmaescale' version 1"):
        load_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no vmaescale.json"):
        load_model_dir(tmp_path / "missing")


def test_build_model_passes_training_settings(tmp_path):
    save_model_dir(classifier_model(), tmp_path)
    model = load_model_dir(tmp_path, drop_path=0.2, use_checkpoint=True)
    assert model.blocks[-1].drop_path.p == pytest.approx(0.2) and model.use_checkpoint
    assert isinstance(build_model(model_meta(pretrain_model())), VideoMAEPretrain)


def test_classifier_takes_the_encoder_of_a_pretraining_checkpoint(tmp_path):
    pretrain = pretrain_model()
    save_model_dir(pretrain, tmp_path)
    classifier = VideoClassifier(NANO, num_classes=3, num_frames=8, image_size=64)
    classifier.load_pretrained_encoder(load_model_dir(tmp_path).state_dict())
    assert torch.equal(classifier.patch_embed.proj.weight, pretrain.encoder.patch_embed.proj.weight)
    assert torch.equal(classifier.blocks[1].attn.v_bias, pretrain.encoder.blocks[1].attn.v_bias)
