"""Official and Hugging Face checkpoint interop: exact imports, exact round trips, strict keys."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vmaescale.cli import main
from vmaescale.models import SIZES, VideoClassifier, VideoMAEPretrain
from vmaescale.models.checkpoint import load_model_dir, save_model_dir
from vmaescale.models.interop import export_hf, import_checkpoint, import_hf, import_official

transformers = pytest.importorskip("transformers")

FRAMES, IMAGE = 8, 64  # nano clip: 4 x 4 x 4 = 64 tokens
NANO = SIZES["nano"]   # dim 64, depth 2, heads 2, mlp 256, decoder 32 / 2 heads / mlp 128
NUM_TOKENS = 64
NUM_CLASSES = 5


def hf_config(**overrides):
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                  patch_size=16, num_frames=FRAMES, image_size=IMAGE, decoder_hidden_size=32,
                  decoder_num_hidden_layers=2, decoder_num_attention_heads=2, decoder_intermediate_size=128,
                  layer_norm_eps=1e-6, use_mean_pooling=False)
    return transformers.VideoMAEConfig(**(fields | overrides))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (biases, q / v biases and norms included): nothing trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def clip_and_mask(batch: int = 2, num_tokens: int = NUM_TOKENS, masked: int = 48, frames: int = FRAMES,
                  image: int = IMAGE):
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(batch, 3, frames, image, image, generator=gen)  # ours: [B, C, T, H, W]
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool)
    for b in range(batch):
        mask[b, torch.randperm(num_tokens, generator=gen)[:masked]] = True
    return video, mask


def hf_pretrain_outputs(hf_model, video, mask):
    with torch.no_grad():
        out = hf_model(video.transpose(1, 2), bool_masked_pos=mask)  # HF: [B, T, C, H, W]
    return out.loss, out.logits


def our_pretrain_outputs(model, video, mask):
    with torch.no_grad():
        return model.eval()(video, mask)  # v1 mode: decoder_mask None decodes every masked token


def hf_logits(hf_model, video):
    with torch.no_grad():
        return hf_model(video.transpose(1, 2)).logits


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def assert_loads_cleanly(cls, path):
    hf_model, info = cls.from_pretrained(path, output_loading_info=True)
    assert all(not v for v in info.values()), info
    return hf_model.eval()


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def hf_pretrain_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_pretrain")
    randomize(transformers.VideoMAEForPreTraining(hf_config())).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_classifier_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_classifier")
    config = hf_config(use_mean_pooling=True, num_labels=NUM_CLASSES)
    randomize(transformers.VideoMAEForVideoClassification(config), seed=2).save_pretrained(path)
    return path


# ---------------------------------------------------------------- Hugging Face import


def test_hf_pretraining_import_reproduces_hf_loss_and_logits(hf_pretrain_dir):
    hf_model = transformers.VideoMAEForPreTraining.from_pretrained(hf_pretrain_dir).eval()
    result = import_hf(hf_pretrain_dir)
    video, mask = clip_and_mask()
    hf_loss, hf_pred = hf_pretrain_outputs(hf_model, video, mask)
    loss, pred = our_pretrain_outputs(result.model, video, mask)
    assert_close(pred, hf_pred)
    assert_close(loss, hf_loss)
    assert result.model.size.norm_eps == 1e-6 and result.model.size.head_norm_eps == 1e-5


def test_hf_classifier_import_reproduces_hf_logits(hf_classifier_dir):
    hf_model = transformers.VideoMAEForVideoClassification.from_pretrained(hf_classifier_dir).eval()
    model = import_hf(hf_classifier_dir).model.eval()
    video, _ = clip_and_mask()
    assert isinstance(model, VideoClassifier) and model.num_classes == NUM_CLASSES
    with torch.no_grad():
        assert_close(model(video), hf_logits(hf_model, video))


def test_hf_import_accepts_in_memory_bias_names_and_zero_key_bias(hf_pretrain_dir, tmp_path):
    state = load_file(str(hf_pretrain_dir / "model.safetensors"))
    renamed = {}
    for key, value in state.items():
        key = key.replace("attention.q_bias", "attention.query.bias")
        key = key.replace("attention.v_bias", "attention.value.bias")
        renamed[key] = value
        if key.endswith("attention.query.bias"):
            renamed[key.replace("query.bias", "key.bias")] = torch.zeros_like(value)
    save_file(renamed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_pretrain_dir / "config.json").read_text())
    expected = import_hf(hf_pretrain_dir).model.state_dict()
    assert state_dicts_equal(import_hf(tmp_path).model.state_dict(), expected)


def test_hf_import_rejects_nonzero_key_bias(hf_pretrain_dir, tmp_path):
    state = load_file(str(hf_pretrain_dir / "model.safetensors"))
    state["videomae.encoder.layer.0.attention.attention.key.bias"] = torch.ones(64)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_pretrain_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="key.bias is nonzero"):
        import_hf(tmp_path)


def test_hf_import_without_qv_bias_matches_hf(tmp_path):
    hf_model = randomize(transformers.VideoMAEForPreTraining(hf_config(qv_bias=False)))
    hf_model.save_pretrained(tmp_path)
    result = import_hf(tmp_path)
    video, mask = clip_and_mask()
    assert_close(our_pretrain_outputs(result.model, video, mask)[1],
                 hf_pretrain_outputs(hf_model, video, mask)[1])
    assert "qv_bias=false" in result.summary()


def test_hf_bare_encoder_imports_into_a_classifier_with_a_fresh_head(tmp_path):
    hf_model = randomize(transformers.VideoMAEModel(hf_config()))
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--num-classes"):
        import_hf(tmp_path)
    result = import_hf(tmp_path, num_classes=3)
    model = result.model.eval()
    video, _ = clip_and_mask()
    with torch.no_grad():
        hf_tokens = hf_model.encoder(hf_model.embeddings(video.transpose(1, 2), None)).last_hidden_state
        assert_close(model.forward_features(video), model.fc_norm(hf_tokens.mean(1)))
    assert "dropped the final encoder norm" in result.summary()


def test_hf_first_token_classifier_is_rejected(tmp_path):
    config = hf_config(use_mean_pooling=False, num_labels=NUM_CLASSES)
    transformers.VideoMAEForVideoClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_mean_pooling=false"):
        import_hf(tmp_path)


def test_hf_import_with_missing_weight_lists_it(hf_pretrain_dir, tmp_path):
    state = load_file(str(hf_pretrain_dir / "model.safetensors"))
    del state["decoder.norm.weight"]
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_pretrain_dir / "config.json").read_text())
    listed = r"missing keys \['decoder.norm.weight'\]; unexpected keys \['decoder.extra.weight'\]"
    with pytest.raises(ValueError, match=listed):
        import_hf(tmp_path)


# ---------------------------------------------------------------- Hugging Face export


def our_models(head_norm_eps: float = 1e-5):
    size = dataclasses.replace(NANO, head_norm_eps=head_norm_eps)
    pretrain = randomize(VideoMAEPretrain(size, FRAMES, IMAGE, decoder_depth=2), seed=3)
    classifier = randomize(VideoClassifier(size, NUM_CLASSES, FRAMES, IMAGE), seed=4)
    return pretrain, classifier


@pytest.mark.parametrize("task", ["pretrain", "classification"])
def test_export_then_import_is_bitwise_exact(task, tmp_path):
    model = our_models()[task == "classification"]
    notes = export_hf(model, tmp_path / "hf")
    back = import_hf(tmp_path / "hf").model
    assert state_dicts_equal(back.state_dict(), model.state_dict())
    assert back.size == model.size and back.num_frames == FRAMES and back.image_size == IMAGE
    assert not any("not expressible" in n for n in notes)


def test_exported_pretrain_model_loads_into_transformers_and_matches(tmp_path):
    model = our_models()[0]
    export_hf(model, tmp_path)
    hf_model = assert_loads_cleanly(transformers.VideoMAEForPreTraining, tmp_path)
    video, mask = clip_and_mask()
    hf_loss, hf_pred = hf_pretrain_outputs(hf_model, video, mask)
    loss, pred = our_pretrain_outputs(model, video, mask)
    assert_close(pred, hf_pred)
    assert_close(loss, hf_loss)


def test_exported_classifier_loads_into_transformers_and_matches(tmp_path):
    model = our_models()[1]
    export_hf(model, tmp_path)
    hf_model = assert_loads_cleanly(transformers.VideoMAEForVideoClassification, tmp_path)
    assert hf_model.config.num_labels == NUM_CLASSES
    video, _ = clip_and_mask()
    with torch.no_grad():
        assert_close(model(video), hf_logits(hf_model, video))


def test_export_of_official_head_eps_is_reported(tmp_path):
    notes = export_hf(our_models(head_norm_eps=1e-6)[0], tmp_path)
    assert any("decoder.norm eps 1e-06 is not expressible" in n for n in notes)
    assert json.loads((tmp_path / "config.json").read_text())["layer_norm_eps"] == 1e-6


def test_vit_g_widths_export_into_transformers(tmp_path):
    size = dataclasses.replace(SIZES["g"], depth=1)  # patch 14, dim 1408, mlp 6144, decoder 512/8/2234
    model = randomize(VideoMAEPretrain(size, num_frames=2, image_size=28, decoder_depth=1), seed=5)
    export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    widths = (config["patch_size"], config["intermediate_size"], config["decoder_intermediate_size"])
    assert widths == (14, 6144, 2234)
    hf_model = assert_loads_cleanly(transformers.VideoMAEForPreTraining, tmp_path)
    video, mask = clip_and_mask(batch=1, num_tokens=4, masked=2, frames=2, image=28)
    assert_close(our_pretrain_outputs(model, video, mask)[1], hf_pretrain_outputs(hf_model, video, mask)[1])


# ---------------------------------------------------------------- official checkpoints


def official_finetune_keys(classifier_state: dict, prefix: str = "") -> dict:
    return {(k if k.startswith(("fc_norm.", "head.")) else prefix + k): v
            for k, v in classifier_state.items()}


def compiled(state: dict) -> dict:
    """How a torch.compile'd model's state dict is saved: `_orig_mod.` after the wrapper prefix."""
    return {"_orig_mod." + k: v for k, v in state.items()}


PRETRAIN_LAYOUTS = {
    "model": lambda sd: {"model": sd, "args": argparse.Namespace(lr=1e-3), "epoch": 3},
    "module (deepspeed)": lambda sd: {"module": sd, "global_steps": 10},
    "compiled": lambda sd: {"model": compiled(sd)},
    "ddp top level": lambda sd: {"module." + k: v for k, v in sd.items()},
}
FINETUNE_LAYOUTS = {
    "bare": lambda sd: {"model": official_finetune_keys(sd)},
    "backbone.": lambda sd: {"module": official_finetune_keys(sd, "backbone.")},
    "encoder.": lambda sd: {"state_dict": official_finetune_keys(sd, "encoder.")},
    "compiled module": lambda sd: {"module": compiled(official_finetune_keys(sd))},
}


@pytest.mark.parametrize("layout", sorted(PRETRAIN_LAYOUTS))
def test_official_pretrain_layouts_import_exactly(layout, tmp_path):
    model = our_models(head_norm_eps=1e-6)[0]
    torch.save(PRETRAIN_LAYOUTS[layout](model.state_dict()), tmp_path / "ckpt.pth")
    result = import_official(tmp_path / "ckpt.pth", num_frames=FRAMES, image_size=IMAGE)
    assert isinstance(result.model, VideoMAEPretrain)
    assert result.model.size == NANO and result.model.decoder_depth == 2
    assert state_dicts_equal(result.model.state_dict(), model.state_dict())


@pytest.mark.parametrize("layout", sorted(FINETUNE_LAYOUTS))
def test_official_finetune_layouts_import_exactly(layout, tmp_path):
    model = our_models(head_norm_eps=1e-6)[1]
    torch.save(FINETUNE_LAYOUTS[layout](model.state_dict()), tmp_path / "ckpt.pth")
    imported = import_official(tmp_path / "ckpt.pth", num_frames=FRAMES, image_size=IMAGE).model
    assert isinstance(imported, VideoClassifier) and imported.num_classes == NUM_CLASSES
    assert dataclasses.replace(imported.size, decoder_dim=32, decoder_heads=2, decoder_mlp_hidden=128) == NANO
    assert state_dicts_equal(imported.state_dict(), model.state_dict())


def test_official_detection_uses_standard_heads_and_overrides(tmp_path):
    size = dataclasses.replace(NANO, embed_dim=96, num_heads=4, mlp_hidden=384, decoder_dim=48,
                               decoder_heads=4)
    model = VideoMAEPretrain(size, FRAMES, IMAGE, decoder_depth=1)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="no standard head count for width 96.*--num-heads"):
        import_official(tmp_path / "ckpt.pth", num_frames=FRAMES, image_size=IMAGE)
    with pytest.raises(ValueError, match="width 48.*--decoder-heads"):
        import_official(tmp_path / "ckpt.pth", num_frames=FRAMES, image_size=IMAGE, num_heads=4)
    result = import_official(tmp_path / "ckpt.pth", num_frames=FRAMES, image_size=IMAGE, num_heads=4,
                             decoder_heads=4)
    assert result.model.size == size
    assert "heads 4 (--num-heads 4)" in result.summary()


def test_official_default_clip_is_16_frames_at_224(tmp_path):
    model = our_models(head_norm_eps=1e-6)[1]
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    result = import_official(tmp_path / "ckpt.pth")
    assert (result.model.num_frames, result.model.image_size, result.model.num_tokens) == (16, 224, 1568)


@pytest.mark.parametrize("edit, listed", [
    (lambda sd: sd.pop("encoder.blocks.1.attn.q_bias"), "missing keys ['encoder.blocks.1.attn.q_bias']"),
    (lambda sd: sd.__setitem__("encoder.blocks.0.gamma_1", torch.ones(64)),
     "unexpected keys ['encoder.blocks.0.gamma_1']"),
])
def test_official_key_mismatch_is_an_error_listing_the_keys(edit, listed, tmp_path):
    state = dict(our_models()[0].state_dict())
    edit(state)
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError) as err:
        import_official(tmp_path / "ckpt.pth", num_frames=FRAMES, image_size=IMAGE)
    assert listed in str(err.value)


def test_official_file_with_arbitrary_objects_needs_allow_pickle(tmp_path):
    model = our_models()[1]
    torch.save({"model": model.state_dict(), "saved": datetime.date(2024, 1, 1)}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="datetime.date.*--allow-pickle"):
        import_official(tmp_path / "ckpt.pth", num_frames=FRAMES, image_size=IMAGE)
    imported = import_official(tmp_path / "ckpt.pth", num_frames=FRAMES, image_size=IMAGE,
                               allow_pickle=True).model
    assert state_dicts_equal(imported.state_dict(), model.state_dict())


def test_official_encoder_only_checkpoint_needs_num_classes(tmp_path):
    pretrain = our_models()[0]
    encoder = {k[len("encoder."):]: v for k, v in pretrain.state_dict().items() if k.startswith("encoder.")}
    torch.save({"model": encoder}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="--num-classes"):
        import_official(tmp_path / "ckpt.pth", num_frames=FRAMES, image_size=IMAGE)
    model = import_official(tmp_path / "ckpt.pth", num_frames=FRAMES, image_size=IMAGE, num_classes=7).model
    assert model.num_classes == 7
    assert torch.equal(model.blocks[1].mlp.fc2.weight, pretrain.encoder.blocks[1].mlp.fc2.weight)


def test_classifier_takes_the_encoder_of_an_imported_pretraining_checkpoint(tmp_path):
    pretrain = our_models(head_norm_eps=1e-6)[0]
    torch.save({"model": compiled(pretrain.state_dict())}, tmp_path / "ckpt.pth")
    assert main(["import-checkpoint", str(tmp_path / "ckpt.pth"), str(tmp_path / "imported"),
                 "--num-frames", str(FRAMES), "--image-size", str(IMAGE)]) == 0
    imported = load_model_dir(tmp_path / "imported")
    classifier = VideoClassifier(NANO, NUM_CLASSES, FRAMES, IMAGE)
    classifier.load_pretrained_encoder(imported.state_dict())
    ours = classifier.state_dict()
    for key, value in pretrain.encoder.state_dict().items():
        if not key.startswith("norm."):
            assert torch.equal(ours[key], value), key


# ---------------------------------------------------------------- command line


def test_cli_import_then_export_round_trips_through_transformers(hf_pretrain_dir, tmp_path, capsys):
    assert main(["import-checkpoint", str(hf_pretrain_dir), str(tmp_path / "ckpt")]) == 0
    printed = capsys.readouterr().out
    assert "task: pretrain" in printed and "64 tokens" in printed
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    original = transformers.VideoMAEForPreTraining.from_pretrained(hf_pretrain_dir).state_dict()
    exported = assert_loads_cleanly(transformers.VideoMAEForPreTraining, tmp_path / "hf").state_dict()
    assert state_dicts_equal(exported, original)


def test_cli_imports_official_file_and_prints_detection(tmp_path, capsys):
    model = our_models()[1]
    torch.save({"module": model.state_dict()}, tmp_path / "ft.pth")
    assert main(["import-checkpoint", str(tmp_path / "ft.pth"), str(tmp_path / "ckpt"), "--num-frames", "8",
                 "--image-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "task: classification" in printed and "heads 2 (standard for width 64" in printed
    assert "8 frames (--num-frames)" in printed and f"classes: {NUM_CLASSES}" in printed
    assert state_dicts_equal(load_model_dir(tmp_path / "ckpt").state_dict(), model.state_dict())
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0  # no decoder: widths 0
    assert_loads_cleanly(transformers.VideoMAEForVideoClassification, tmp_path / "hf")


def test_training_final_dir_exports_to_transformers(tmp_path):
    model = our_models()[0]
    save_model_dir(model, tmp_path / "final", source="run test", extra_files={"config.json": "{}"})
    assert main(["export-hf", str(tmp_path / "final"), str(tmp_path / "hf")]) == 0
    assert_loads_cleanly(transformers.VideoMAEForPreTraining, tmp_path / "hf")


def test_import_refuses_a_vmaescale_dir(tmp_path):
    save_model_dir(our_models()[1], tmp_path)
    with pytest.raises(ValueError, match="already a vmaescale checkpoint"):
        import_checkpoint(tmp_path)


def test_cli_reports_a_bad_source_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    assert main(["import-checkpoint", str(tmp_path / "notes.pth"), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vmaescale import-checkpoint: error: ") and err.count("\n") == 1
    assert "notes.pth" in err and not (tmp_path / "ckpt").exists()
