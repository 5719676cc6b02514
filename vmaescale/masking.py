"""Token masks for a whole batch, drawn on the model's device from a seedable generator.

Convention: a mask is bool [B, N] over tokens in (t, h, w) order, True = masked.
- Encoder masks (tube / random / frame): True = hidden from the encoder.
- Decoder mask (running cell, VideoMAE V2): True = not reconstructed, as in the official
  code; the decoder predicts the positions where it is False.
Every sample has the same number of masked tokens, so visible tokens gather into
[B, Nv, D] without padding, and the counts are known before any mask is drawn
(`MaskGenerator.counts`): the model needs no host read of a mask to size its gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ENCODER_MASKS = ("tube", "random", "frame")
DECODER_MASKS = ("running_cell", "none")


@dataclass(frozen=True)
class TokenGrid:
    """Token grid of a clip: T' temporal slots x Hp x Wp spatial positions."""

    t: int
    h: int
    w: int

    @property
    def num_tokens(self) -> int:
        return self.t * self.h * self.w

    @property
    def per_slot(self) -> int:
        return self.h * self.w


def token_grid(num_frames: int, image_size: int, patch_size: int, tubelet_size: int = 2) -> TokenGrid:
    for name, value, div in (("num_frames", num_frames, tubelet_size), ("image_size", image_size, patch_size)):
        if value % div:
            raise ValueError(f"{name} {value} is not divisible by {div}")
    side = image_size // patch_size
    return TokenGrid(num_frames // tubelet_size, side, side)


@dataclass(frozen=True)
class MaskCounts:
    """Tokens per sample that the encoder sees and that the decoder predicts."""

    visible: int
    decoded: int


def _first_k_of_random_order(batch: int, n: int, k: int, device, generator) -> torch.Tensor:
    """bool [batch, n] with exactly k True per row at uniformly random positions."""
    noise = torch.rand(batch, n, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < k


def tube_mask(batch: int, grid: TokenGrid, ratio: float, device=None, generator=None) -> torch.Tensor:
    """Mask int(ratio * Hp*Wp) spatial positions, the same ones in every temporal slot."""
    k = int(ratio * grid.per_slot)
    spatial = _first_k_of_random_order(batch, grid.per_slot, k, device, generator)  # [B, HW]
    return spatial.unsqueeze(1).expand(batch, grid.t, grid.per_slot).reshape(batch, -1)


def random_mask(batch: int, grid: TokenGrid, ratio: float, device=None, generator=None) -> torch.Tensor:
    """Mask int(ratio * N) tokens chosen independently of their position."""
    k = int(ratio * grid.num_tokens)
    return _first_k_of_random_order(batch, grid.num_tokens, k, device, generator)


def frame_mask(batch: int, grid: TokenGrid, ratio: float, device=None, generator=None) -> torch.Tensor:
    """Mask int(ratio * T') whole temporal slots."""
    k = int(ratio * grid.t)
    slots = _first_k_of_random_order(batch, grid.t, k, device, generator)  # [B, T']
    return slots.unsqueeze(2).expand(batch, grid.t, grid.per_slot).reshape(batch, -1)


def running_cell_patterns(grid: TokenGrid, ratio: float, device=None) -> torch.Tensor:
    """All 4 running-cell maps, bool [4, N] (True = not reconstructed).

    The 2x2 cell is the queue [1]*int(4*ratio) + [0]*rest; for start offset p and temporal
    slot t it is rotated by (p + t + 1) mod 4, reshaped 2x2 and tiled over the grid.
    """
    n_masked = int(4 * ratio)
    if not 0 < n_masked < 4:
        raise ValueError(f"running cell ratio {ratio} gives {n_masked} of 4 masked; accepted: 0.25 <= ratio < 1")
    if grid.h % 2 or grid.w % 2:
        raise ValueError(f"running cell needs an even token grid, got {grid.h}x{grid.w}")
    queue = torch.tensor([1] * n_masked + [0] * (4 - n_masked), dtype=torch.bool, device=device)
    idx = torch.arange(4, device=device)
    maps = []
    for p in range(4):
        slots = []
        for t in range(grid.t):
            cell = queue[(idx + p + t + 1) % 4].view(2, 2)
            slots.append(cell.repeat(grid.h // 2, grid.w // 2).flatten())  # [HW]
        maps.append(torch.stack(slots).flatten())  # [N]
    return torch.stack(maps)


def running_cell_mask(batch: int, grid: TokenGrid, ratio: float, device=None, generator=None,
                      patterns: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder mask: one of the 4 running-cell maps per sample, chosen uniformly.

    `patterns`: the maps of `running_cell_patterns(grid, ratio, device)`, built once by the
    caller (building them is ~200 tiny launches); None builds them here."""
    if patterns is None:
        patterns = running_cell_patterns(grid, ratio, device)
    choice = torch.randint(0, 4, (batch,), device=device, generator=generator)
    return patterns[choice]


_ENCODER_FNS = {"tube": tube_mask, "random": random_mask, "frame": frame_mask}


def encoder_masked_count(grid: TokenGrid, encoder: str, ratio: float) -> int:
    """Tokens per sample that `encoder` masks (the same k as the mask functions draw)."""
    if encoder == "tube":
        return int(ratio * grid.per_slot) * grid.t
    if encoder == "frame":
        return int(ratio * grid.t) * grid.per_slot
    return int(ratio * grid.num_tokens)


def mask_counts(grid: TokenGrid, encoder: str, encoder_ratio: float, decoder: str,
                decoder_ratio: float) -> MaskCounts:
    """Visible and decoded tokens per sample; v1 decodes every encoder-masked token, the
    running cell decodes the 4 - int(4 * ratio) cells of every 2x2 it leaves open."""
    masked = encoder_masked_count(grid, encoder, encoder_ratio)
    if decoder == "none":
        return MaskCounts(grid.num_tokens - masked, masked)
    open_cells = 4 - int(4 * decoder_ratio)
    return MaskCounts(grid.num_tokens - masked, grid.num_tokens * open_cells // 4)


class MaskGenerator:
    """Draws (encoder_mask, decoder_mask) for a batch; decoder_mask is None for v1."""

    def __init__(self, grid: TokenGrid, encoder: str = "tube", encoder_ratio: float = 0.9,
                 decoder: str = "running_cell", decoder_ratio: float = 0.5,
                 device=None, seed: int = 0):
        if encoder not in _ENCODER_FNS:
            raise ValueError(f"encoder mask {encoder!r}; accepted: {list(ENCODER_MASKS)}")
        if decoder not in DECODER_MASKS:
            raise ValueError(f"decoder mask {decoder!r}; accepted: {list(DECODER_MASKS)}")
        self.grid, self.encoder, self.encoder_ratio = grid, encoder, encoder_ratio
        self.decoder, self.decoder_ratio = decoder, decoder_ratio
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.patterns = (running_cell_patterns(grid, decoder_ratio, self.device)
                         if decoder == "running_cell" else None)  # built once, on the device
        self.counts = mask_counts(grid, encoder, encoder_ratio, decoder, decoder_ratio)

    def __call__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        enc = _ENCODER_FNS[self.encoder](batch, self.grid, self.encoder_ratio, self.device, self.generator)
        if self.decoder == "none":
            return enc, None
        dec = running_cell_mask(batch, self.grid, self.decoder_ratio, self.device, self.generator,
                                self.patterns)
        return enc, dec

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
