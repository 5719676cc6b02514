"""Mixup / cutmix over video batches: one box for every frame, targets = mixed pixel fractions."""

import numpy as np
import pytest
import torch

from vmaescale.data.mixup import MixupCutmix, smoothed_one_hot, soft_target_cross_entropy


def marked_batch(b=4, t=6, h=16, w=20):
    """Clip i is filled with the value i everywhere, so every pixel says where it came from."""
    return torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, 3, t, h, w).clone()


def test_cutmix_cuts_the_same_box_in_every_frame_and_targets_are_the_pixel_fractions():
    video, labels = marked_batch(), torch.tensor([0, 1, 2, 3])
    mix = MixupCutmix(num_classes=4, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.0)
    for seed in range(20):
        mixed, targets = mix(video, labels, np.random.default_rng(seed))
        for i in range(4):
            partner = 3 - i  # sample i mixes with B-1-i
            from_partner = mixed[i] == partner
            frames = from_partner[0]  # [T, H, W] of channel 0
            assert torch.equal(frames, frames[:1].expand_as(frames)), "box differs between frames"
            assert torch.equal(from_partner, from_partner[:1].expand_as(from_partner))
            fraction = frames[0].float().mean().item()
            assert targets[i, partner] == pytest.approx(fraction, abs=1e-6)
            assert targets[i, i] == pytest.approx(1 - fraction, abs=1e-6)
            assert targets[i].sum() == pytest.approx(1.0)


def test_mixup_blends_whole_clips_with_one_lambda_and_smooths_labels():
    video, labels = marked_batch(), torch.tensor([0, 1, 2, 3])
    mix = MixupCutmix(num_classes=4, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.1)
    mixed, targets = mix(video, labels, np.random.default_rng(3))
    lam = 1 - mixed[0].mean().item() / 3  # clip 0 = 0 * lam + 3 * (1 - lam)
    for i in range(4):
        expected = i * lam + (3 - i) * (1 - lam)
        torch.testing.assert_close(mixed[i], torch.full_like(mixed[i], expected))
    smooth = smoothed_one_hot(labels, 4, 0.1)
    torch.testing.assert_close(targets, smooth * lam + smooth.flip(0) * (1 - lam))
    assert smooth[0, 0] == pytest.approx(0.925) and smooth[0, 1] == pytest.approx(0.025)


def test_no_mixing_gives_smoothed_targets_and_soft_ce_equals_cross_entropy():
    labels = torch.tensor([2, 0])
    mix = MixupCutmix(num_classes=3, mixup_alpha=0.0, cutmix_alpha=0.0, smoothing=0.0)
    video = marked_batch(b=2)
    mixed, targets = mix(video, labels, np.random.default_rng(0))
    assert torch.equal(mixed, video) and torch.equal(targets, torch.eye(3)[labels])
    logits = torch.randn(2, 3)
    torch.testing.assert_close(soft_target_cross_entropy(logits, targets),
                               torch.nn.functional.cross_entropy(logits, labels))


def test_an_odd_batch_is_refused_when_mixing():
    mix = MixupCutmix(num_classes=3, prob=1.0)
    with pytest.raises(ValueError, match="even batch"):
        mix(marked_batch(b=3), torch.tensor([0, 1, 2]), np.random.default_rng(0))
