"""With the mask counts given, the pretraining forward is one graph per mask configuration
(no graph breaks under torch.compile); regional compilation gives the eager result."""

from __future__ import annotations

import pytest
import torch

from vmaescale.masking import MaskGenerator, token_grid
from vmaescale.models import VideoClassifier, VideoMAEPretrain, get_size
from vmaescale.models.vit import compile_blocks

NANO = get_size("nano")
FRAMES, SIDE = 4, 64


def generator(decoder: str) -> MaskGenerator:
    return MaskGenerator(token_grid(FRAMES, SIDE, 16), "tube", 0.75, decoder, 0.5, seed=0)


@pytest.mark.parametrize("decoder", ["running_cell", "none"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_pretraining_forward_has_no_graph_breaks_for_fixed_mask_counts(decoder, checkpointing):
    torch._dynamo.reset()
    model = VideoMAEPretrain(NANO, FRAMES, SIDE, decoder_depth=2, use_checkpoint=checkpointing)
    masks = generator(decoder)
    mask, decoder_mask = masks(2)
    video = torch.randn(2, 3, FRAMES, SIDE, SIDE)
    explained = torch._dynamo.explain(model)(video, mask, decoder_mask, masks.counts)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_without_the_counts_the_forward_reads_the_masks_and_breaks():
    torch._dynamo.reset()
    model = VideoMAEPretrain(NANO, FRAMES, SIDE, decoder_depth=2)
    mask, decoder_mask = generator("running_cell")(2)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, FRAMES, SIDE, SIDE), mask, decoder_mask)
    assert explained.graph_break_count > 0


def test_mask_counts_match_every_drawn_mask():
    for encoder in ("tube", "random", "frame"):
        for decoder in ("running_cell", "none"):
            masks = MaskGenerator(token_grid(16, 224, 16), encoder, 0.9 if encoder != "frame" else 0.5,
                                  decoder, 0.5, seed=1)
            mask, decoder_mask = masks(3)
            decoded = mask if decoder_mask is None else ~decoder_mask
            assert ((~mask).sum(1) == masks.counts.visible).all(), (encoder, decoder)
            assert (decoded.sum(1) == masks.counts.decoded).all(), (encoder, decoder)


def test_classifier_forward_has_no_graph_breaks():
    torch._dynamo.reset()
    model = VideoClassifier(NANO, num_classes=5, num_frames=FRAMES, image_size=SIDE)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, FRAMES, SIDE, SIDE))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_regionally_compiled_blocks_give_the_eager_loss():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = VideoMAEPretrain(NANO, FRAMES, SIDE, decoder_depth=2)
    masks = generator("running_cell")
    mask, decoder_mask = masks(2)
    video = torch.randn(2, 3, FRAMES, SIDE, SIDE)
    eager, _ = model(video, mask, decoder_mask, masks.counts)
    assert compile_blocks(model, backend="aot_eager") == NANO.depth + 2
    compiled, _ = model(video, mask, decoder_mask, masks.counts)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
