"""Reconstruction pixels, region metrics (PSNR / SSIM / MSE) and the PNG grid."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vmaescale.eval.reconstruction import (
    GRID_LABEL_WIDTH, GRID_PAD, grid_size, masked_input, reconstruct_clip, region_metrics,
    save_reconstruction_grid, ssim, ssim_map, token_mask_to_pixels, unpatchify,
)
from vmaescale.masking import MaskGenerator, token_grid
from vmaescale.models.videomae import (
    IMAGENET_MEAN, IMAGENET_STD, gather_tokens, patchify, reconstruction_target, true_indices,
    unnormalize,
)

P, TT, FRAMES, SIDE = 4, 2, 4, 16  # 2 x 4 x 4 = 32 tokens


def make_clip(batch=2, seed=0, lo=0.0, hi=1.0):
    """(ImageNet-normalized video, its [0, 1] pixels), smooth gradients plus noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, SIDE)
    base = (ramp[None, :] + ramp[:, None]) / 2  # [H, W]
    noise = torch.rand(batch, 3, FRAMES, SIDE, SIDE, generator=g)
    pixels = lo + (hi - lo) * (0.6 * base + 0.4 * noise)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return (pixels - mean) / std, pixels


def dual_masks(batch=2, decoder="running_cell", seed=0):
    """(encoder mask, decoded positions) with tube 0.75 and running cell 0.5."""
    gen = MaskGenerator(token_grid(FRAMES, SIDE, P, TT), "tube", 0.75, decoder, 0.5, seed=seed)
    mask, decoder_mask = gen(batch)
    return mask, (mask if decoder_mask is None else ~decoder_mask)


def perfect_prediction(video, decoded):
    return gather_tokens(reconstruction_target(video, P, TT), true_indices(decoded))


def test_unpatchify_inverts_patchify():
    video = torch.randn(2, 3, FRAMES, SIDE, SIDE)
    assert torch.equal(unpatchify(patchify(video, P, TT), video.shape, P, TT), video)


def test_perfect_prediction_reproduces_the_original_pixels():
    video, pixels = make_clip()
    mask, decoded = dual_masks()
    recon = reconstruct_clip(video, perfect_prediction(video, decoded), mask, decoded, P, TT)
    assert recon.shape == pixels.shape
    torch.testing.assert_close(recon, pixels, atol=1e-5, rtol=0)
    metrics = region_metrics(pixels, recon, mask & decoded, P, TT)
    assert metrics["psnr"] > 90
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["mse"] < 1e-10


def test_noisier_prediction_gives_lower_psnr_and_ssim():
    video, pixels = make_clip()
    mask, decoded = dual_masks()
    pred = perfect_prediction(video, decoded)
    g = torch.Generator().manual_seed(1)
    results = []
    for sigma in (0.1, 0.5, 2.0):
        noisy = pred + sigma * torch.randn(pred.shape, generator=g)
        recon = reconstruct_clip(video, noisy, mask, decoded, P, TT)
        results.append(region_metrics(pixels, recon, mask & decoded, P, TT))
    psnrs = [m["psnr"] for m in results]
    assert psnrs == sorted(psnrs, reverse=True) and psnrs[0] < 60
    assert [m["ssim"] for m in results] == sorted((m["ssim"] for m in results), reverse=True)
    assert results[-1]["ssim"] < 0.9 and results[-1]["mse"] > results[0]["mse"]


def test_only_masked_and_decoded_tokens_change():
    video, _ = make_clip()
    pixels = unnormalize(video)
    mask, decoded = dual_masks()
    assert (decoded & ~mask).any() and (mask & ~decoded).any()  # both kinds of token exist
    garbage = 100 * torch.randn(perfect_prediction(video, decoded).shape)
    recon = reconstruct_clip(video, garbage, mask, decoded, P, TT)
    changed = token_mask_to_pixels(mask & decoded, pixels.shape, P, TT).expand_as(pixels)
    assert torch.equal(recon[~changed], pixels[~changed])
    assert not torch.allclose(recon[changed], pixels[changed], atol=0.1)
    assert recon.min() >= 0 and recon.max() <= 1


def test_v1_reconstructs_every_masked_token():
    video, _ = make_clip()
    pixels = unnormalize(video)
    mask, decoded = dual_masks(decoder="none")
    garbage = torch.full(perfect_prediction(video, decoded).shape, 50.0)
    recon = reconstruct_clip(video, garbage, mask, decoded, P, TT)
    hidden = token_mask_to_pixels(mask, pixels.shape, P, TT).expand_as(pixels)
    assert torch.equal(recon[~hidden], pixels[~hidden])
    assert torch.all(recon[hidden] == 1.0)  # clamped


def test_prediction_for_the_wrong_token_count_is_rejected():
    video, _ = make_clip()
    mask, decoded = dual_masks()
    pred = perfect_prediction(video, decoded)[:, :-1]
    with pytest.raises(ValueError, match="must match"):
        reconstruct_clip(video, pred, mask, decoded, P, TT)


def test_masked_input_greys_hidden_tokens_and_keeps_visible_pixels():
    video, pixels = make_clip()
    mask, _ = dual_masks()
    shown = masked_input(video, mask, P, TT, fill=0.5)
    hidden = token_mask_to_pixels(mask, pixels.shape, P, TT).expand_as(pixels)
    assert torch.all(shown[hidden] == 0.5)
    torch.testing.assert_close(shown[~hidden], pixels[~hidden], atol=1e-6, rtol=0)


def reference_ssim_valid(x, y):
    """Textbook SSIM map (Wang et al. 2004), 'valid' 11x11 Gaussian window, sigma 1.5."""
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords ** 2 / 4.5)
    window = (torch.outer(g, g) / torch.outer(g, g).sum())[None, None].repeat(x.shape[1], 1, 1, 1)
    conv = lambda z: F.conv2d(z, window, groups=x.shape[1])  # noqa: E731
    mx, my = conv(x), conv(y)
    vx, vy, cxy = conv(x * x) - mx ** 2, conv(y * y) - my ** 2, conv(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def test_ssim_map_matches_the_textbook_definition_away_from_borders():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float64)).clamp(0, 1)
    interior = ssim_map(x, y)[:, :, 5:-5, 5:-5]
    torch.testing.assert_close(interior, reference_ssim_valid(x, y), atol=1e-10, rtol=0)


def test_ssim_is_one_for_identical_images_and_low_for_an_inverted_image():
    _, pixels = make_clip()
    frames = pixels[:, :, 0]
    assert ssim(frames, frames) == pytest.approx(1.0, abs=1e-12)
    assert ssim(frames, 1 - frames) < 0.1


def test_region_metrics_ignore_pixels_outside_the_region():
    _, pixels = make_clip(lo=0.2, hi=0.8)
    mask, decoded = dual_masks()
    region = mask & decoded
    recon = pixels.clone()
    inside = token_mask_to_pixels(region, pixels.shape, P, TT).expand_as(pixels)
    recon[inside] += 0.1
    before = region_metrics(pixels, recon, region, P, TT)
    g = torch.Generator().manual_seed(3)
    other_original, other_recon = pixels.clone(), recon.clone()
    other_original[~inside] = torch.rand(int((~inside).sum()), generator=g)
    other_recon[~inside] = torch.rand(int((~inside).sum()), generator=g)
    after = region_metrics(other_original, other_recon, region, P, TT)
    assert after == pytest.approx(before, abs=1e-12)
    assert before["mse"] == pytest.approx(0.01, rel=1e-5)
    assert before["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert 0 < before["ssim"] < 1


def test_region_metrics_reject_an_empty_region():
    _, pixels = make_clip()
    empty = torch.zeros(pixels.shape[0], 32, dtype=torch.bool)
    with pytest.raises(ValueError, match="no token"):
        region_metrics(pixels, pixels, empty, P, TT)


def test_grid_png_has_three_rows_per_clip_in_order(tmp_path):
    video, pixels = make_clip(batch=3)
    mask, decoded = dual_masks(batch=3)
    shown = masked_input(video, mask, P, TT)
    recon = reconstruct_clip(video, perfect_prediction(video, decoded) + 1.0, mask, decoded, P, TT)
    path = save_reconstruction_grid(pixels, shown, recon, tmp_path / "sub" / "grid.png",
                                    max_clips=2, frames=(0, 1, 3))
    image = Image.open(path)
    image.load()
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == grid_size(2, 3, SIDE, SIDE) == (64 + 3 * 18 + 2, 2 * 3 * 18 + 2)
    array = torch.from_numpy(np.array(image))  # [H, W, 3] uint8
    for clip in range(2):
        for row, source in enumerate((pixels, shown, recon)):
            for col, frame in enumerate((0, 1, 3)):
                top = GRID_PAD + (clip * 3 + row) * (SIDE + GRID_PAD)
                left = GRID_LABEL_WIDTH + GRID_PAD + col * (SIDE + GRID_PAD)
                tile = array[top:top + SIDE, left:left + SIDE].permute(2, 0, 1).float() / 255
                torch.testing.assert_close(tile, source[clip, :, frame], atol=0.5 / 255 + 1e-6, rtol=0)


def test_grid_defaults_to_evenly_spaced_frames_and_rejects_bad_indices(tmp_path):
    _, pixels = make_clip(batch=1)
    path = save_reconstruction_grid(pixels, pixels, pixels, tmp_path / "grid.png")
    assert Image.open(path).size == grid_size(1, FRAMES, SIDE, SIDE)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        save_reconstruction_grid(pixels, pixels, pixels, tmp_path / "bad.png", frames=(0, 4))
    with pytest.raises(ValueError, match="same shape"):
        save_reconstruction_grid(pixels, pixels[:, :, :2], pixels, tmp_path / "bad.png")


def test_psnr_is_capped_for_an_exact_reconstruction():
    _, pixels = make_clip()
    mask, decoded = dual_masks()
    metrics = region_metrics(pixels, pixels, mask & decoded, P, TT)
    assert metrics["mse"] == 0
    assert math.isfinite(metrics["psnr"]) and metrics["psnr"] == pytest.approx(100.0)
