"""VideoMAE pretraining model: v1 (tube mask, decode every masked token) and V2 dual masking.

    video [B, 3, T, H, W] --patch_embed--> tokens [B, N, D] + sinusoid
      --gather visible (encoder mask False)--> [B, Nv, D] --blocks, norm--> latent
      --encoder_to_decoder--> [B, Nv, Dd] + decoder sinusoid at visible positions
      ++ mask_token + decoder sinusoid at decoded positions --> [B, Nv + Nd, Dd]
      --decoder blocks--> norm + head on the Nd decoded tokens --> pred [B, Nd, 3*2*p*p]

Decoded positions: v1 = the encoder-masked tokens; V2 = where the running-cell decoder
mask is False. The loss counts decoded tokens that are also encoder-masked (SPEC section 3).
Parameter names match the official checkpoints. Single-device code only.

Host syncs: every sample has the same number of visible and decoded tokens, so the counts
are known before the masks are drawn (`vmaescale.masking.MaskCounts`). A caller that passes
them (the training loop) gets a forward that reads no tensor value on the host, and so
compiles to one graph per mask configuration; without them the counts are read from the
first row of each mask (one host sync each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vmaescale.masking import MaskCounts
from vmaescale.models.sizes import ModelSize
from vmaescale.models.vit import OptimizerInterface, PatchEmbed, make_blocks, run_blocks, sinusoid_table

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def true_indices(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Positions of True per row, ascending, as long [B, K]; every row must have K True.

    `count` = K when the caller knows it; None reads it from row 0 (a host sync)."""
    if count is None:
        count = int(mask[0].sum())
    order = torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)
    return order[:, :count]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def unnormalize(video: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized [B, 3, T, H, W] back to [0, 1] pixels."""
    mean = video.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = video.new_tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return video * std + mean


def patchify(video: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, N, tubelet*p*p, C], tokens in (t, h, w) order, channel innermost."""
    b, c, t, h, w = video.shape
    p, tt = patch_size, tubelet_size
    x = video.reshape(b, c, t // tt, tt, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, T', Hp, Wp, tt, p, p, C]
    return x.reshape(b, (t // tt) * (h // p) * (w // p), tt * p * p, c)


def reconstruction_target(video: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """Per-token, per-channel normalized pixels [B, N, tubelet*p*p*C] (SPEC section 3)."""
    with torch.autocast(device_type=video.device.type, enabled=False):
        patches = patchify(unnormalize(video.float()), patch_size, tubelet_size)  # [B, N, P, C]
        mean = patches.mean(dim=-2, keepdim=True)
        std = patches.var(dim=-2, unbiased=True, keepdim=True).sqrt()
        normed = (patches - mean) / (std + 1e-6)
        return normed.flatten(2)


class Encoder(nn.Module):
    """Patch embedding, blocks and final norm over the visible tokens."""

    def __init__(self, size: ModelSize, num_tokens: int, drop_path: float = 0.0,
                 use_checkpoint: bool = False):
        super().__init__()
        self.patch_embed = PatchEmbed(size.patch_size, size.tubelet_size, size.embed_dim)
        self.blocks = make_blocks(size.depth, size.embed_dim, size.num_heads, size.mlp_hidden,
                                  drop_path, size.norm_eps)
        self.norm = nn.LayerNorm(size.embed_dim, eps=size.norm_eps)
        self.register_buffer("pos_embed", sinusoid_table(num_tokens, size.embed_dim), persistent=False)
        self.use_checkpoint = use_checkpoint

    def forward(self, video: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(video)
        x = x + self.pos_embed.to(x.dtype)  # [B, N, D]
        x = gather_tokens(x, visible_idx)  # [B, Nv, D]
        x = run_blocks(self.blocks, x, self.use_checkpoint and self.training)
        return self.norm(x)


class Decoder(nn.Module):
    """Decoder blocks, then norm and head on the last `num_predicted` tokens."""

    def __init__(self, size: ModelSize, depth: int, use_checkpoint: bool = False):
        super().__init__()
        self.blocks = make_blocks(depth, size.decoder_dim, size.decoder_heads,
                                  size.decoder_mlp_hidden, 0.0, size.norm_eps)
        self.norm = nn.LayerNorm(size.decoder_dim, eps=size.head_norm_eps)
        out_dim = 3 * size.tubelet_size * size.patch_size ** 2
        self.head = nn.Linear(size.decoder_dim, out_dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, num_predicted: int) -> torch.Tensor:
        x = run_blocks(self.blocks, x, self.use_checkpoint and self.training)
        return self.head(self.norm(x[:, -num_predicted:]))


class VideoMAEPretrain(OptimizerInterface, nn.Module):
    """The VideoMAE / VideoMAE V2 pretraining model (encoder, decoder, loss)."""

    encoder_prefix = "encoder."
    no_weight_decay_names = ("pos_embed", "mask_token")

    def __init__(self, size: ModelSize, num_frames: int = 16, image_size: int = 224,
                 decoder_depth: int = 4, drop_path: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        self.size, self.num_frames, self.image_size = size, num_frames, image_size
        self.decoder_depth = decoder_depth
        n = (num_frames // size.tubelet_size) * (image_size // size.patch_size) ** 2
        self.num_tokens = n
        self.encoder = Encoder(size, n, drop_path, use_checkpoint)
        self.encoder_to_decoder = nn.Linear(size.embed_dim, size.decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, size.decoder_dim))
        self.decoder = Decoder(size, decoder_depth, use_checkpoint)
        self.register_buffer("decoder_pos_embed", sinusoid_table(n, size.decoder_dim), persistent=False)
        self.apply(_init_pretrain_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward_encoder(self, video: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        return self.encoder(video, visible_idx)  # [B, Nv, D]

    def forward_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """The encoder over every token, final norm included: [B, N, D] (HF's
        last_hidden_state of a pretraining checkpoint's VideoModel)."""
        every = torch.arange(self.num_tokens, device=video.device).expand(video.shape[0], -1)
        return self.forward_encoder(video, every)

    def forward_decoder(self, latent: torch.Tensor, visible_idx: torch.Tensor,
                        decoded_idx: torch.Tensor) -> torch.Tensor:
        """latent [B, Nv, D] -> predictions [B, Nd, 3*tubelet*p*p] at the decoded positions."""
        x = self.encoder_to_decoder(latent)  # [B, Nv, Dd]
        pos = self.decoder_pos_embed.to(x.dtype).expand(x.shape[0], -1, -1)
        x_vis = x + gather_tokens(pos, visible_idx)
        dec_pos = gather_tokens(pos, decoded_idx)  # [B, Nd, Dd]
        x_full = torch.cat([x_vis, self.mask_token.to(x.dtype) + dec_pos], dim=1)
        return self.decoder(x_full, dec_pos.shape[1])

    def forward_loss(self, video: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                     decoded_idx: torch.Tensor) -> torch.Tensor:
        """MSE per token over the decoded tokens that the encoder did not see."""
        target = reconstruction_target(video, self.size.patch_size, self.size.tubelet_size)
        idx = decoded_idx
        target = gather_tokens(target, idx)  # [B, Nd, P*C]
        weight = torch.gather(mask, 1, idx).float()  # [B, Nd], encoder-masked & decoded
        per_token = F.mse_loss(pred.float(), target, reduction="none").mean(dim=-1)
        return (per_token * weight).sum() / weight.sum()

    def forward(self, video: torch.Tensor, mask: torch.Tensor,
                decoder_mask: torch.Tensor | None = None,
                counts: MaskCounts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, 3, T, H, W]; mask / decoder_mask bool [B, N], True = masked; `counts`:
        visible and decoded tokens per sample (None: read from the masks, a host sync).

        Returns (loss, pred [B, Nd, 3*tubelet*p*p]).
        """
        decoded = decoded_positions(mask, decoder_mask)
        visible_idx = true_indices(~mask, None if counts is None else counts.visible)  # [B, Nv]
        decoded_idx = true_indices(decoded, None if counts is None else counts.decoded)  # [B, Nd]
        latent = self.forward_encoder(video, visible_idx)
        pred = self.forward_decoder(latent, visible_idx, decoded_idx)
        return self.forward_loss(video, pred, mask, decoded_idx), pred


def decoded_positions(mask: torch.Tensor, decoder_mask: torch.Tensor | None) -> torch.Tensor:
    """v1 decodes the encoder-masked tokens; V2 decodes where the decoder mask is False."""
    return mask if decoder_mask is None else ~decoder_mask


def _init_pretrain_weights(m: nn.Module) -> None:
    """Official pretraining init: Linear xavier_uniform / bias 0, LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
