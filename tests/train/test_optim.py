import math

import pytest
import torch

from vmaescale.models import VideoClassifier, VideoMAEPretrain, get_size
from vmaescale.train.optim import WarmupCosineSchedule, param_groups, scaled_lr, warmup_cosine


def test_linear_scaling_rule():
    assert scaled_lr(1e-3, 32 * 32) == pytest.approx(4e-3)  # B: 32 GPUs x 32 videos


def test_no_decay_for_1d_params_biases_and_mask_token():
    model = VideoMAEPretrain(get_size("nano"), 4, 32)
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "mask_token" in no_decay
    assert "encoder.blocks.0.attn.q_bias" in no_decay and "encoder.blocks.0.norm1.weight" in no_decay
    assert "encoder.patch_embed.proj.bias" in no_decay
    assert "encoder.blocks.0.attn.qkv.weight" not in no_decay
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def official_layer_id(name: str, num_max_layer: int) -> int:
    """VideoMAEv2 optim_factory.get_num_layer_for_vit, transcribed (num_max_layer = depth + 2)."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_max_layer - 1


def test_layer_decay_scales_per_parameter_match_the_official_formula():
    clf = VideoClassifier(get_size("nano"), 5, 4, 32)  # depth 2
    depth, decay = 2, 0.75
    groups = param_groups(clf, 0.05, layer_decay=decay)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, param in clf.named_parameters():
        # official: LayerDecayValueAssigner([decay ** (num_layers + 1 - i) for i in range(num_layers + 2)])
        expected = decay ** (depth + 1 - official_layer_id(name, depth + 2))
        assert scale_of[id(param)] == pytest.approx(expected), name
    assert scale_of[id(clf.patch_embed.proj.weight)] == pytest.approx(decay ** 3)
    assert scale_of[id(clf.head.weight)] == scale_of[id(clf.fc_norm.weight)] == 1.0


def test_models_say_which_layer_and_decay_each_parameter_has():
    pre = VideoMAEPretrain(get_size("nano"), 4, 32)
    assert pre.optimizer_layer_id("encoder.blocks.1.attn.qkv.weight") == 2
    assert pre.optimizer_layer_id("encoder.patch_embed.proj.weight") == 0
    assert pre.optimizer_layer_id("decoder.blocks.0.mlp.fc1.weight") == 3
    assert "mask_token" in pre.no_weight_decay_names
    assert pre.zero3_leaf_modules() and pre.optimizer_num_layers == 2


def test_warmup_then_cosine_to_min_lr():
    lrs = [warmup_cosine(s, 1.0, 0.01, 10, 110) for s in range(110)]
    assert lrs[0] == 0.0 and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] > 0.01 and warmup_cosine(110, 1.0, 0.01, 10, 110) == pytest.approx(0.01)


def test_schedule_applies_lr_scale_and_round_trips_its_state():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p1], "lr_scale": 1.0}, {"params": [p2], "lr_scale": 0.5}])
    sched = WarmupCosineSchedule(opt, peak_lr=1.0, min_lr=0.0, warmup_steps=2, total_steps=10)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    state = sched.state_dict()
    other = WarmupCosineSchedule(opt, 1.0, 0.0, 2, 10)
    other.load_state_dict(state)
    assert other.last_step == 1 and opt.param_groups[1]["lr"] == 0.5
