"""Model sizes: the VideoMAE family (S/B/L/H/g) and tiny sizes for tests and CPU demos."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    decoder_dim: int
    decoder_heads: int
    tubelet_size: int = 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def decoder_mlp_hidden(self) -> int:
        return int(self.decoder_dim * self.mlp_ratio)


SIZES: dict[str, ModelSize] = {
    "S": ModelSize(16, 384, 12, 6, 4.0, 192, 3),
    "B": ModelSize(16, 768, 12, 12, 4.0, 384, 6),
    "L": ModelSize(16, 1024, 24, 16, 4.0, 512, 8),
    "H": ModelSize(16, 1280, 32, 16, 4.0, 512, 8),
    "g": ModelSize(14, 1408, 40, 16, 48 / 11, 512, 8),
    # Tiny sizes: CPU demos (tiny) and unit tests (nano). Same structure, small widths.
    "tiny": ModelSize(16, 192, 6, 3, 4.0, 96, 3),
    "nano": ModelSize(16, 64, 2, 2, 4.0, 32, 2),
}


def get_size(name: str) -> ModelSize:
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; accepted: {sorted(SIZES)}")
    return SIZES[name]
