"""ViT building blocks shared by the pretraining and classification models.

Parameter names follow the official VideoMAE code (patch_embed.proj, blocks.{i}.norm1,
attn.qkv / q_bias / v_bias, attn.proj, norm2, mlp.fc1 / fc2) so official checkpoints load
without renaming. Single-device code: no distributed or tracking imports.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed sinusoid position table [1, N, d]: sin on even j, cos on odd j (interleaved)."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angle = pos / np.power(10000, 2 * (j // 2) / dim)  # [N, d], float64
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return torch.from_numpy(table).float().unsqueeze(0)


class PatchEmbed(nn.Module):
    """Tubelet embedding: Conv3d with kernel = stride = (tubelet, p, p)."""

    def __init__(self, patch_size: int, tubelet_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        # [B, C, T, H, W] -> [B, D, T', Hp, Wp] -> [B, N, D], token order (t, h, w)
        return self.proj(video.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; qkv bias = concat(q_bias, 0, v_bias), SDPA kernel."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())  # [B, N, 3D]
        q, k, v = qkv.view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability `p`."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, drop_path: float = 0.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def make_blocks(depth: int, dim: int, num_heads: int, mlp_hidden: int, drop_path: float,
                norm_eps: float) -> nn.ModuleList:
    """`depth` blocks with drop path rates linspace(0, drop_path, depth)."""
    rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
    return nn.ModuleList(Block(dim, num_heads, mlp_hidden, r, norm_eps) for r in rates)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Apply blocks in order, each under activation checkpointing when asked and training."""
    for blk in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


def compile_blocks(model: nn.Module, **options) -> int:
    """Regional compilation: torch.compile (with `options`) every transformer Block of `model`
    in place (`nn.Module.compile`); blocks of one shape share the compiled code. Returns the
    number of blocks compiled."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(**options)
    return len(blocks)


class OptimizerInterface:
    """What training code needs from a model, so that it never spells a parameter name.

    - `optimizer_layer_id(name)`: the layer-decay id of a parameter, the official rule:
      patch embedding (and position / mask tokens) 0, block k -> k + 1, everything after
      the blocks (final norm, fc_norm, head, the pretraining decoder) `num_layers + 1`;
    - `optimizer_num_layers`: the encoder depth L (layer scale = decay^(L + 1 - id));
    - `no_weight_decay_names`: parameter names (last component) that get no weight decay
      besides 1-D tensors and biases;
    - `zero3_leaf_modules()`: module classes ZeRO-3 must gather whole (Attention reads
      qkv.weight itself, which compiled ZeRO-3 cannot follow).
    Models set `encoder_prefix` ("encoder." for pretraining, "" for classifiers) and `size`.
    """

    encoder_prefix = ""
    no_weight_decay_names: tuple[str, ...] = ("pos_embed",)
    EMBEDDING_NAMES = ("patch_embed", "pos_embed", "cls_token", "mask_token")

    @property
    def optimizer_num_layers(self) -> int:
        return self.size.depth

    def optimizer_layer_id(self, name: str) -> int:
        bare = name.removeprefix(self.encoder_prefix)
        if bare.startswith(self.EMBEDDING_NAMES):
            return 0
        match = re.match(r"blocks\.(\d+)\.", bare)
        if match:
            return int(match.group(1)) + 1
        return self.optimizer_num_layers + 1

    def zero3_leaf_modules(self) -> list[type[nn.Module]]:
        return [Attention]
