"""VideoMAE classifier for finetuning: encoder over all tokens, mean pool, fc_norm, head.

Parameter names match official finetune checkpoints (patch_embed, blocks, fc_norm, head).
`load_pretrained_encoder` takes the encoder of any pretraining state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from vmaescale.models.sizes import ModelSize
from vmaescale.models.vit import OptimizerInterface, PatchEmbed, make_blocks, run_blocks, sinusoid_table


# Pretraining / finetune keys that are not part of the classifier's encoder.
NOT_ENCODER_PREFIXES = ("decoder.", "encoder_to_decoder.", "mask_token", "norm.", "fc_norm.", "head.")


# "full": the video transformer (space-time tokens). "frame_average": a control that cannot
# see motion or frame order: every frame alone, repeated to fill one tubelet, through the
# same encoder; the mean over all tokens is then the mean over frames of per-frame features.
TEMPORAL = ("full", "frame_average")


class VideoClassifier(OptimizerInterface, nn.Module):
    def __init__(self, size: ModelSize, num_classes: int, num_frames: int = 16,
                 image_size: int = 224, drop_path: float = 0.1, head_dropout: float = 0.0,
                 init_scale: float = 0.001, use_checkpoint: bool = False,
                 class_names: tuple[str, ...] | list[str] = (), temporal: str = "full"):
        super().__init__()
        if class_names and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for a {num_classes}-class head")
        if temporal not in TEMPORAL:
            raise ValueError(f"temporal={temporal!r}: accepted values are {list(TEMPORAL)}")
        self.size, self.num_classes = size, num_classes
        self.class_names = tuple(class_names)  # () when the label set is unnamed
        self.num_frames, self.image_size = num_frames, image_size
        self.temporal = temporal
        per_slot = (image_size // size.patch_size) ** 2
        n = per_slot if temporal == "frame_average" else (num_frames // size.tubelet_size) * per_slot
        self.num_tokens = n  # tokens per encoder input (one frame for frame_average)
        self.patch_embed = PatchEmbed(size.patch_size, size.tubelet_size, size.embed_dim)
        self.blocks = make_blocks(size.depth, size.embed_dim, size.num_heads, size.mlp_hidden,
                                  drop_path, size.norm_eps)
        self.fc_norm = nn.LayerNorm(size.embed_dim, eps=size.head_norm_eps)
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(size.embed_dim, num_classes)
        self.register_buffer("pos_embed", sinusoid_table(n, size.embed_dim), persistent=False)
        self.use_checkpoint = use_checkpoint
        self.apply(_init_finetune_weights)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)
            self.head.bias.mul_(init_scale)

    def forward_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> the last block's tokens [B, N, D] (no norm: HF's VideoModel with
        mean pooling returns these as last_hidden_state). frame_average: [B, T * HW/p^2, D],
        every frame encoded on its own."""
        b, t = video.shape[0], video.shape[2]
        if self.temporal == "frame_average":
            frames = video.transpose(1, 2).flatten(0, 1).unsqueeze(2)  # [B*T, 3, 1, H, W]
            video = frames.expand(-1, -1, self.size.tubelet_size, -1, -1)
        x = self.patch_embed(video)
        x = x + self.pos_embed.to(x.dtype)  # [B, N, D] (frame_average: [B*T, HW, D])
        x = run_blocks(self.blocks, x, self.use_checkpoint and self.training)
        return x.reshape(b, -1, x.shape[-1]) if self.temporal == "frame_average" else x

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> pooled features [B, D]."""
        return self.fc_norm(self.forward_tokens(video).mean(dim=1))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(self.forward_features(video)))  # [B, classes]

    def load_pretrained_encoder(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the encoder of a pretraining (or finetune) state dict; the head stays as is.

        Accepts `encoder.`-prefixed pretraining keys or bare finetune keys. Decoder,
        mask_token, encoder_to_decoder, encoder.norm and any head are ignored; a missing
        encoder weight is an error that lists the missing keys.
        """
        wanted = {k for k in self.state_dict() if not k.startswith(("fc_norm.", "head."))}
        encoder, unexpected = {}, []
        for key, value in state_dict.items():
            bare = key[len("encoder."):] if key.startswith("encoder.") else key
            if bare in wanted:
                encoder[bare] = value
            elif not bare.startswith(NOT_ENCODER_PREFIXES):
                unexpected.append(key)
        missing = sorted(wanted - set(encoder))
        if missing or unexpected:
            raise KeyError(f"pretrained state dict does not fit the encoder: missing {missing}, "
                           f"unexpected {sorted(unexpected)}")
        self.load_state_dict(encoder, strict=False)


def _init_finetune_weights(m: nn.Module) -> None:
    """Official finetune init: Linear trunc_normal std 0.02 / bias 0, LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
