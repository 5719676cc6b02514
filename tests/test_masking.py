import pytest
import torch

from vmaescale.masking import (MaskGenerator, frame_mask, random_mask, running_cell_mask,
                               running_cell_patterns, token_grid, tube_mask)

B_GRID = token_grid(16, 224, 16)  # 8 x 14 x 14
G_GRID = token_grid(16, 224, 14)  # 8 x 16 x 16


def test_token_grids_match_the_paper():
    assert (B_GRID.t, B_GRID.h, B_GRID.w, B_GRID.num_tokens) == (8, 14, 14, 1568)
    assert G_GRID.num_tokens == 2048


@pytest.mark.parametrize("grid,masked_per_slot", [(B_GRID, 176), (G_GRID, 230)])
def test_tube_mask_is_constant_over_time_with_equal_counts(grid, masked_per_slot):
    m = tube_mask(6, grid, 0.9, generator=torch.Generator().manual_seed(0))
    per_slot = m.view(6, grid.t, grid.per_slot)
    assert (per_slot == per_slot[:, :1]).all()
    assert (per_slot[:, 0].sum(1) == masked_per_slot).all()
    assert (m.sum(1) == masked_per_slot * grid.t).all()
    assert not (per_slot[0, 0] == per_slot[1, 0]).all()  # samples differ


def test_random_and_frame_masks_have_equal_counts():
    g = torch.Generator().manual_seed(1)
    assert (random_mask(5, B_GRID, 0.9, generator=g).sum(1) == int(0.9 * 1568)).all()
    fm = frame_mask(5, B_GRID, 0.5, generator=g).view(5, 8, 196)
    assert ((fm.all(2) | ~fm.any(2))).all()  # whole slots
    assert (fm.all(2).sum(1) == 4).all()


def test_running_cell_rotates_every_temporal_slot():
    patterns = running_cell_patterns(B_GRID, 0.5).view(4, 8, 14, 14)
    for p in range(4):
        for t in range(8):
            cell = patterns[p, t, :2, :2]
            assert cell.sum() == 2  # int(4 * 0.5) not reconstructed per 2x2 cell
            tiled = cell.repeat(7, 7)
            assert (patterns[p, t] == tiled).all()
            if t:
                assert not (patterns[p, t] == patterns[p, t - 1]).all()
        # the queue [1,1,0,0] rotated by (p + t + 1) mod 4
        queue = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
        expected = queue[(torch.arange(4) + p + 1) % 4].view(2, 2)
        assert (patterns[p, 0, :2, :2] == expected).all()
    # each spatial position is reconstructed in exactly half of the slots
    assert ((~patterns).sum(1) == 4).all()


def test_running_cell_mask_picks_one_of_four_patterns():
    patterns = running_cell_patterns(B_GRID, 0.5)
    m = running_cell_mask(32, B_GRID, 0.5, generator=torch.Generator().manual_seed(0))
    matches = (m.unsqueeze(1) == patterns.unsqueeze(0)).all(-1)  # [32, 4]
    assert (matches.sum(1) == 1).all()
    assert matches.any(0).sum() >= 3


def test_dual_masking_b_decodes_944_tokens_of_which_704_carry_loss():
    enc, dec = MaskGenerator(B_GRID, "tube", 0.9, "running_cell", 0.5, seed=3)(8)
    visible = (~enc).sum(1)
    decoded = (~dec).sum(1)
    assert (visible == 160).all()
    assert (visible + decoded == 944).all()
    assert ((enc & ~dec).sum(1) == 704).all()


def test_mask_generator_is_seedable_and_resumable():
    a = MaskGenerator(B_GRID, seed=7)
    b = MaskGenerator(B_GRID, seed=7)
    assert all((x == y).all() for x, y in zip(a(4), b(4)))
    state = a.state_dict()
    first = a(4)
    a.load_state_dict(state)
    again = a(4)
    assert (first[0] == again[0]).all() and (first[1] == again[1]).all()


def test_v1_generator_has_no_decoder_mask():
    enc, dec = MaskGenerator(B_GRID, decoder="none")(2)
    assert dec is None and (enc.sum(1) == 1408).all()


def test_bad_mask_arguments_name_the_value():
    with pytest.raises(ValueError, match="'blob'"):
        MaskGenerator(B_GRID, encoder="blob")
    with pytest.raises(ValueError, match="even token grid"):
        running_cell_patterns(token_grid(2, 112, 16), 0.5)
