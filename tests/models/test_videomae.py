import math
import subprocess
import sys

import pytest
import torch

from vmaescale.masking import MaskGenerator, token_grid
from vmaescale.models import VideoClassifier, VideoMAEPretrain, get_size
from vmaescale.models.videomae import IMAGENET_MEAN, IMAGENET_STD, reconstruction_target, true_indices
from vmaescale.models.vit import sinusoid_table

NANO = get_size("nano")
FRAMES, SIDE = 4, 64  # 2 x 4 x 4 = 32 tokens


def make_clip(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 3, FRAMES, SIDE, SIDE, generator=g)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return (pixels - mean) / std, pixels


def masks(batch=2, decoder="running_cell", seed=0):
    return MaskGenerator(token_grid(FRAMES, SIDE, 16), "tube", 0.75, decoder, 0.5, seed=seed)(batch)


def reference_target(pixels, p=16, tt=2):
    """Token by token, following SPEC section 3 literally."""
    b, c, t, h, w = pixels.shape
    out = []
    for bi in range(b):
        tokens = []
        for ti in range(t // tt):
            for hi in range(h // p):
                for wi in range(w // p):
                    cube = pixels[bi, :, ti * tt:(ti + 1) * tt, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p]
                    x = cube.permute(1, 2, 3, 0).reshape(tt * p * p, c)  # pixels x channels
                    x = (x - x.mean(0)) / (x.var(0, unbiased=True).sqrt() + 1e-6)
                    tokens.append(x.reshape(-1))  # channel innermost
        out.append(torch.stack(tokens))
    return torch.stack(out)


def test_sinusoid_table_is_interleaved_sin_cos():
    table = sinusoid_table(10, 6)
    assert table.shape == (1, 10, 6)
    for pos in (0, 3, 9):
        for j in range(6):
            angle = pos / 10000 ** (2 * (j // 2) / 6)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[0, pos, j].item() == pytest.approx(expected, abs=1e-7)


def test_reconstruction_target_normalizes_each_token_and_channel():
    video, pixels = make_clip()
    got = reconstruction_target(video, 16, 2)
    assert got.shape == (2, 32, 2 * 16 * 16 * 3)
    torch.testing.assert_close(got, reference_target(pixels), rtol=1e-4, atol=1e-4)


def official_style_loss(model, video, mask, decoder_mask):
    """The official V2 engine's loss: boolean indexing, weighted by the loss mask."""
    b = video.shape[0]
    target = reconstruction_target(video, 16, 2)
    decoded = mask if decoder_mask is None else ~decoder_mask
    _, pred = model(video, mask, decoder_mask)
    labels = target[decoded].reshape(b, -1, target.shape[-1])
    per_token = ((pred - labels) ** 2).mean(-1)
    weight = mask[decoded].reshape(b, -1).float()
    return (per_token * weight).sum() / weight.sum()


@pytest.mark.parametrize("decoder", ["running_cell", "none"])
def test_loss_matches_the_official_formula(decoder):
    torch.manual_seed(0)
    model = VideoMAEPretrain(NANO, FRAMES, SIDE).eval()
    video, _ = make_clip()
    enc, dec = masks(decoder=decoder)
    loss, pred = model(video, enc, dec)
    expected_tokens = (~dec).sum(1)[0] if dec is not None else enc.sum(1)[0]
    assert pred.shape == (2, expected_tokens, 1536)
    torch.testing.assert_close(loss, official_style_loss(model, video, enc, dec))


def test_v2_loss_ignores_decoded_tokens_the_encoder_saw():
    torch.manual_seed(0)
    model = VideoMAEPretrain(NANO, FRAMES, SIDE).eval()
    video, _ = make_clip()
    enc, dec = masks()
    _, pred = model(video, enc, dec)
    decoded = ~dec
    target = reconstruction_target(video, 16, 2)
    labels = target[decoded].reshape(2, -1, target.shape[-1])
    seen = ~enc[decoded].reshape(2, -1)
    assert seen.any()
    # Replace the predictions at visible-and-decoded tokens: the loss must not change.
    model_out = pred.detach().clone()
    model_out[seen] = 1e3
    per_token = ((model_out - labels) ** 2).mean(-1)
    weight = (~seen).float()
    loss_a = (per_token * weight).sum() / weight.sum()
    loss_b = model.forward_loss(video, model_out, enc, true_indices(decoded))
    torch.testing.assert_close(loss_a, loss_b)


def test_decoder_sees_visible_plus_decoded_tokens():
    model = VideoMAEPretrain(NANO, FRAMES, SIDE).eval()
    video, _ = make_clip()
    enc, dec = masks()
    seen = {}

    def record(module, inputs, output):
        seen["n"] = inputs[0].shape[1]

    model.decoder.blocks[0].register_forward_hook(record)
    model(video, enc, dec)
    assert seen["n"] == int((~enc).sum(1)[0] + (~dec).sum(1)[0])


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    torch.manual_seed(0)
    model = VideoMAEPretrain(NANO, FRAMES, SIDE).eval()
    video, _ = make_clip()
    enc, dec = masks()
    loss32, _ = model(video, enc, dec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, pred16 = model(video, enc, dec)
    assert pred16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    video, _ = make_clip()
    enc, dec = masks()
    results = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = VideoMAEPretrain(NANO, FRAMES, SIDE, use_checkpoint=use_checkpoint).train()
        loss, _ = model(video, enc, dec)
        loss.backward()
        results.append((loss.detach(), model.encoder.blocks[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_drop_path_is_random_in_training_and_off_in_eval():
    torch.manual_seed(0)
    model = VideoMAEPretrain(NANO, FRAMES, SIDE, drop_path=0.5)
    video, _ = make_clip(batch=4)
    enc, dec = masks(batch=4)
    model.train()
    a, _ = model(video, enc, dec)
    b, _ = model(video, enc, dec)
    assert a.item() != b.item()
    model.eval()
    c, _ = model(video, enc, dec)
    d, _ = model(video, enc, dec)
    assert c.item() == d.item()


def test_sdpa_attention_matches_explicit_softmax():
    from vmaescale.models.vit import Attention
    torch.manual_seed(0)
    attn = Attention(64, 4)
    torch.nn.init.normal_(attn.q_bias)
    torch.nn.init.normal_(attn.v_bias)
    x = torch.randn(2, 10, 64)
    bias = torch.cat([attn.q_bias, torch.zeros(64), attn.v_bias])
    q, k, v = (x @ attn.qkv.weight.T + bias).view(2, 10, 3, 4, 16).permute(2, 0, 3, 1, 4)
    weights = ((q * 16 ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 10, 64))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_parameter_counts_match_the_papers():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for n, p in VideoMAEPretrain(get_size(name)).named_parameters()
                            if n.startswith("encoder."))
                  for name in ("B", "L", "H", "g")}
    assert abs(counts["B"] / 1e6 - 86) < 1.5
    assert abs(counts["L"] / 1e6 - 304) < 5
    assert abs(counts["H"] / 1e6 - 632) < 10
    assert abs(counts["g"] / 1e9 - 1.01) < 0.02


def test_classifier_head_init_scale_and_logits():
    torch.manual_seed(0)
    clf = VideoClassifier(NANO, num_classes=7, num_frames=FRAMES, image_size=SIDE, init_scale=0.001)
    assert clf.head.weight.std().item() < 1e-4
    video, _ = make_clip()
    assert clf.eval()(video).shape == (2, 7)


def test_classifier_loads_the_encoder_of_a_pretraining_model():
    pre = VideoMAEPretrain(NANO, FRAMES, SIDE)
    clf = VideoClassifier(NANO, num_classes=3, num_frames=FRAMES, image_size=SIDE)
    clf.load_pretrained_encoder(pre.state_dict())
    torch.testing.assert_close(clf.blocks[1].mlp.fc2.weight, pre.encoder.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(clf.patch_embed.proj.bias, pre.encoder.patch_embed.proj.bias)
    broken = {k: v for k, v in pre.state_dict().items() if "blocks.0.norm1" not in k}
    with pytest.raises(KeyError, match="blocks.0.norm1"):
        clf.load_pretrained_encoder(broken)
    extra = {**pre.state_dict(), "encoder.blocks.0.gamma_1": torch.ones(64)}
    with pytest.raises(KeyError, match="gamma_1"):
        clf.load_pretrained_encoder(extra)


def test_model_package_imports_no_deepspeed_dali_or_mlflow():
    code = ("import sys, vmaescale.models, vmaescale.models.videomae, vmaescale.models.classifier, "
            "vmaescale.models.flops, vmaescale.masking; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'mlflow') "
            "or m.startswith('nvidia.dali')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_frame_average_classifier_ignores_frame_order_and_round_trips(tmp_path):
    """The control of docs/results.md: each frame encoded alone, so no order, no motion."""
    from vmaescale.models.checkpoint import load_model_dir, save_model_dir
    from vmaescale.models.interop import export_hf
    torch.manual_seed(0)
    model = VideoClassifier(get_size("nano"), 3, 8, 32, drop_path=0.0, init_scale=1.0,
                            temporal="frame_average").eval()
    video = torch.randn(2, 3, 8, 32, 32)
    shuffled = video[:, :, torch.randperm(8)]
    with torch.no_grad():
        torch.testing.assert_close(model(shuffled), model(video), atol=1e-5, rtol=1e-5)
        # one frame alone, repeated into a tubelet, is what the encoder sees
        single = VideoClassifier(get_size("nano"), 3, 2, 32, drop_path=0.0).eval()
        single.load_state_dict(model.state_dict())
        frame = video[:1, :, :1].expand(-1, -1, 2, -1, -1)
        torch.testing.assert_close(model.forward_tokens(video[:1, :, :1]), single.forward_tokens(frame))
        full = VideoClassifier(get_size("nano"), 3, 8, 32, drop_path=0.0).eval()
        full.load_state_dict(model.state_dict())
        assert not torch.allclose(full(shuffled), full(video), atol=1e-4)  # the full model sees order
    loaded = load_model_dir(save_model_dir(model, tmp_path / "fa"))
    assert loaded.temporal == "frame_average"
    with pytest.raises(ValueError, match="no transformers equivalent"):
        export_hf(tmp_path / "fa", tmp_path / "hf")
