import pytest

from vmaescale.cli import main
from vmaescale.models.flops import clip_macs, mfu
from vmaescale.models.sizes import get_size


@pytest.mark.parametrize("size,mask,decoder,paper_g", [
    ("B", "tube", "none", 35.48),
    ("B", "tube", "running_cell", 25.87),
    ("g", "tube", "none", 263.9),
    ("g", "tube", "running_cell", 241.6),
    ("B", "none", "none", 180.0),
    ("g", "none", "none", 2544.0),
])
def test_macs_match_the_papers_within_one_percent(size, mask, decoder, paper_g):
    m = clip_macs(get_size(size), 16, 224, mask, 0.9, decoder, 0.5)
    assert abs(m.total / 1e9 - paper_g) / paper_g < 0.01


def test_pretrain_token_counts_and_parts():
    m = clip_macs(get_size("B"), 16, 224, "tube", 0.9, "running_cell", 0.5)
    assert (m.visible_tokens, m.decoder_tokens, m.predicted_tokens) == (160, 944, 784)
    assert abs(m.patch_embed / 1e9 - 1.85) < 0.01
    assert abs(m.encoder_blocks / 1e9 - 14.1) < 0.1
    assert m.training_flops == 6 * m.total


def test_mfu_is_zero_for_unknown_peak_and_a_fraction_otherwise():
    assert mfu(100.0, 1e12, 0.0) == 0.0
    assert mfu(100.0, 1e12, 1000.0, num_devices=1) == pytest.approx(0.1)


def test_flops_command_prints_encoder_decoder_total(capsys):
    assert main(["flops", "--model", "B", "--frames", "16", "--image-size", "224",
                 "--mask", "tube:0.9", "--decoder-mask", "running_cell:0.5"]) == 0
    out = capsys.readouterr().out
    total = [line for line in out.splitlines() if line.startswith("total")][0]
    assert abs(float(total.split()[1]) - 25.87) / 25.87 < 0.01
    assert "encoder" in out and "decoder" in out
