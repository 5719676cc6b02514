"""Model sizes: the VideoMAE family (S/B/L/H/g) and tiny sizes for tests and CPU demos.

A `ModelSize` fully describes the transformer widths; checkpoints store it (as a dict) so a
checkpoint can be rebuilt without knowing which named size it came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    decoder_dim: int
    decoder_heads: int
    decoder_mlp_hidden: int
    tubelet_size: int = 2
    norm_eps: float = 1e-6       # encoder / decoder blocks and encoder.norm
    head_norm_eps: float = 1e-6  # fc_norm and decoder.norm (Hugging Face uses 1e-5 there)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSize":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelSize field(s) {unknown}; accepted: {sorted(names)}")
        return cls(**data)


def _size(patch: int, dim: int, depth: int, heads: int, mlp_ratio: float, dec_dim: int,
          dec_heads: int) -> ModelSize:
    """The decoder MLP uses the encoder's mlp ratio (g: int(512 * 48/11) = 2234)."""
    return ModelSize(patch, dim, depth, heads, int(dim * mlp_ratio), dec_dim, dec_heads,
                     int(dec_dim * mlp_ratio))


SIZES: dict[str, ModelSize] = {
    "S": _size(16, 384, 12, 6, 4.0, 192, 3),
    "B": _size(16, 768, 12, 12, 4.0, 384, 6),
    "L": _size(16, 1024, 24, 16, 4.0, 512, 8),
    "H": _size(16, 1280, 32, 16, 4.0, 512, 8),
    "g": _size(14, 1408, 40, 16, 48 / 11, 512, 8),
    # Tiny sizes: CPU demos (tiny) and unit tests (nano). Same structure, small widths.
    "tiny": _size(16, 192, 6, 3, 4.0, 96, 3),
    "nano": _size(16, 64, 2, 2, 4.0, 32, 2),
}


def get_size(name: str) -> ModelSize:
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; accepted: {sorted(SIZES)}")
    return SIZES[name]
