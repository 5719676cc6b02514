"""Analytic multiply-accumulates (MACs) per clip, training FLOPs and MFU.

The papers call MACs "FLOPs"; we print MACs and use 6 x MACs (forward 2x, backward 4x) as
training FLOPs. Per block: 4*N*d^2 (qkv + proj) + 2*N*d*h (MLP) + 2*N^2*d (scores and
weighted sum). Norms, biases, softmax and GELU are not counted, as in the papers.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmaescale.masking import TokenGrid, token_grid
from vmaescale.models.sizes import ModelSize

# Dense bf16 peak TFLOP/s per device, matched by substring of the device name (first hit).
PEAK_TFLOPS_BF16 = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16 tensor cores; V100 has no bf16
)


def block_macs(n: int, d: int, h: int) -> float:
    return 4 * n * d * d + 2 * n * d * h + 2 * n * n * d


@dataclass(frozen=True)
class ClipMacs:
    patch_embed: float
    encoder_blocks: float
    decoder: float  # encoder_to_decoder + decoder blocks + head
    head: float     # classifier head (finetune views only)
    visible_tokens: int
    decoder_tokens: int
    predicted_tokens: int

    @property
    def encoder(self) -> float:
        return self.patch_embed + self.encoder_blocks

    @property
    def total(self) -> float:
        return self.encoder + self.decoder + self.head

    @property
    def training_flops(self) -> float:
        return 6.0 * self.total


def visible_count(grid: TokenGrid, mask: str, ratio: float) -> int:
    """Tokens the encoder sees under an encoder mask ('none' = all)."""
    if mask == "none":
        return grid.num_tokens
    if mask == "tube":
        return grid.t * (grid.per_slot - int(ratio * grid.per_slot))
    if mask == "random":
        return grid.num_tokens - int(ratio * grid.num_tokens)
    if mask == "frame":
        return (grid.t - int(ratio * grid.t)) * grid.per_slot
    raise ValueError(f"encoder mask {mask!r}; accepted: none, tube, random, frame")


def predicted_count(grid: TokenGrid, visible: int, decoder_mask: str, ratio: float) -> int:
    """Tokens the decoder predicts: v1 = all masked, running cell = its selected positions."""
    if decoder_mask == "none":
        return grid.num_tokens - visible
    if decoder_mask == "running_cell":
        return grid.num_tokens * (4 - int(4 * ratio)) // 4
    raise ValueError(f"decoder mask {decoder_mask!r}; accepted: none, running_cell")


def clip_macs(size: ModelSize, num_frames: int = 16, image_size: int = 224,
              mask: str = "tube", mask_ratio: float = 0.9, decoder_mask: str = "running_cell",
              decoder_ratio: float = 0.5, decoder_depth: int = 4, num_classes: int = 0) -> ClipMacs:
    """MACs per clip. mask='none' is the finetune view: all tokens, no decoder."""
    grid = token_grid(num_frames, image_size, size.patch_size, size.tubelet_size)
    n, d = grid.num_tokens, size.embed_dim
    tubelet_pixels = 3 * size.tubelet_size * size.patch_size ** 2
    patch_embed = n * d * tubelet_pixels
    nv = visible_count(grid, mask, mask_ratio)
    encoder_blocks = size.depth * block_macs(nv, d, size.mlp_hidden)
    if mask == "none":
        return ClipMacs(patch_embed, encoder_blocks, 0.0, d * num_classes, nv, 0, 0)
    npred = predicted_count(grid, nv, decoder_mask, decoder_ratio)
    dd = size.decoder_dim
    decoder = (nv * d * dd
               + decoder_depth * block_macs(nv + npred, dd, size.decoder_mlp_hidden)
               + npred * dd * tubelet_pixels)
    return ClipMacs(patch_embed, encoder_blocks, decoder, 0.0, nv, nv + npred, npred)


def peak_tflops(device_name: str) -> float:
    """Dense bf16 peak for a device name, 0.0 when unknown (MFU is then not reported)."""
    for key, value in PEAK_TFLOPS_BF16:
        if key in device_name:
            return value
    return 0.0


def mfu(clips_per_s: float, training_flops_per_clip: float, peak_tflops_per_device: float,
        num_devices: int = 1) -> float:
    """Model FLOPs utilization in [0, 1]; 0.0 when the peak is unknown."""
    if peak_tflops_per_device <= 0:
        return 0.0
    return clips_per_s * training_flops_per_clip / (peak_tflops_per_device * 1e12 * num_devices)


def parse_mask_arg(text: str) -> tuple[str, float]:
    """'tube:0.9' -> ('tube', 0.9); 'none' -> ('none', 0.0). The ratio must be in [0, 1)."""
    name, _, ratio_text = text.partition(":")
    try:
        ratio = float(ratio_text) if ratio_text else 0.0
    except ValueError:
        raise ValueError(f"mask {text!r}: expected NAME or NAME:RATIO, e.g. tube:0.9") from None
    if not 0.0 <= ratio < 1.0:  # also refuses nan
        raise ValueError(f"mask {text!r}: ratio {ratio_text} is outside the accepted range [0, 1)")
    return name, ratio
