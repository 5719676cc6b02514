"""Our encoders have exactly the parameters of a transformers VideoMAEModel of the same shape."""

from __future__ import annotations

import pytest
import torch

from vmaescale.models import SIZES, VideoMAEPretrain

transformers = pytest.importorskip("transformers")


# Parameters do not depend on the clip shape; one token keeps the position tables trivial.
ONE_TOKEN_FRAMES = 2


def our_encoder_params(name: str) -> int:
    """patch_embed + blocks + encoder.norm, built on the meta device (no memory, no init)."""
    size = SIZES[name]
    with torch.device("meta"):
        model = VideoMAEPretrain(size, num_frames=ONE_TOKEN_FRAMES, image_size=size.patch_size)
    return sum(p.numel() for p in model.encoder.parameters())


def hf_encoder_params(name: str) -> int:
    size = SIZES[name]
    config = transformers.VideoMAEConfig(
        patch_size=size.patch_size, hidden_size=size.embed_dim, num_hidden_layers=size.depth,
        num_attention_heads=size.num_heads, intermediate_size=size.mlp_hidden, use_mean_pooling=False,
        num_frames=ONE_TOKEN_FRAMES, image_size=size.patch_size)
    with torch.device("meta"):
        model = transformers.VideoMAEModel(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, approx", [("B", 86e6), ("g", 1.0e9)])
def test_encoder_parameter_count_matches_transformers(name, approx):
    ours = our_encoder_params(name)
    assert ours == hf_encoder_params(name)
    assert ours == pytest.approx(approx, rel=0.02)
