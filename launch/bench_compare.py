"""`launch/benchmark.py --engine torch` and `--compare hf`: the model's own speed with plain
torch AdamW (no DeepSpeed, one process), and side by side with transformers'
VideoMAEForPreTraining on the same size, clip, batch and v1 tube mask, interleaved step by
step in one process so that both see the same machine state."""

from __future__ import annotations

import time

import torch

from vmaescale.data.memory import InMemoryClips
from vmaescale.masking import MaskGenerator, token_grid
from vmaescale.models.sizes import get_size
from vmaescale.models.videomae import VideoMAEPretrain
from vmaescale.train.engine import build_optimizer


def hf_model(cfg):
    """transformers' VideoMAEForPreTraining with vmaescale's size, clip and decoder depth."""
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    size = get_size(cfg.model.size)
    hf_cfg = VideoMAEConfig(
        image_size=cfg.data.image_size, patch_size=size.patch_size, num_frames=cfg.data.num_frames,
        tubelet_size=size.tubelet_size, hidden_size=size.embed_dim, num_hidden_layers=size.depth,
        num_attention_heads=size.num_heads, intermediate_size=size.mlp_hidden,
        decoder_hidden_size=size.decoder_dim, decoder_num_hidden_layers=cfg.model.decoder_depth,
        decoder_num_attention_heads=size.decoder_heads, decoder_intermediate_size=size.decoder_mlp_hidden,
        norm_pix_loss=True, use_mean_pooling=False, attn_implementation="sdpa")
    return VideoMAEForPreTraining(hf_cfg)


class Contender:
    """One model with its optimizer and masks; `step(video)` is one training step."""

    def __init__(self, name: str, model, cfg, decoder: str, hf: bool, device):
        self.name, self.hf = name, hf
        self.model = model.to(device).train()
        self.optimizer = build_optimizer(self.model, cfg) if not hf else torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.base_lr)
        grid = token_grid(cfg.data.num_frames, cfg.data.image_size, get_size(cfg.model.size).patch_size)
        self.masks = MaskGenerator(grid, cfg.mask.encoder, cfg.mask.encoder_ratio, decoder,
                                   cfg.mask.decoder_ratio, device, seed=0)
        self.seconds, self.clips = 0.0, 0

    def step(self, video: torch.Tensor, sync, timed: bool) -> None:
        t0 = time.perf_counter()
        mask, decoder_mask = self.masks(video.shape[0])
        if self.hf:
            loss = self.model(pixel_values=video.transpose(1, 2), bool_masked_pos=mask).loss
        else:
            loss, _ = self.model(video, mask, decoder_mask, self.masks.counts)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        if timed:
            self.seconds += time.perf_counter() - t0
            self.clips += video.shape[0]

    @property
    def clips_per_s(self) -> float:
        return self.clips / max(self.seconds, 1e-9)


def contenders(cfg, compare: str, device) -> list[Contender]:
    """vmaescale with the config's masks; with compare='hf' also vmaescale v1 and HF (v1)."""
    def ours(decoder: str):
        return VideoMAEPretrain(get_size(cfg.model.size), cfg.data.num_frames, cfg.data.image_size,
                                cfg.model.decoder_depth, cfg.model.drop_path, cfg.model.checkpoint_activations)
    torch.manual_seed(0)
    label = "vmaescale-v2" if cfg.mask.decoder == "running_cell" else "vmaescale-v1"
    out = [Contender(label, ours(cfg.mask.decoder), cfg, cfg.mask.decoder, False, device)]
    if compare == "hf":
        if cfg.mask.decoder != "none":
            out.append(Contender("vmaescale-v1", ours("none"), cfg, "none", False, device))
        out.append(Contender("hf-v1", hf_model(cfg), cfg, "none", True, device))
    return out


def measure_torch(cfg, steps: int, warmup: int, compare: str) -> list[dict]:
    """Interleaved timed steps of every contender on the same in-memory clips."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clips = InMemoryClips(cfg.train.videos_per_gpu * cfg.data.num_sample, cfg.data.num_frames,
                          cfg.data.image_size, warmup + steps, cfg.train.seed, 0, device)
    runs = contenders(cfg, compare, device)
    for i, batch in enumerate(clips):
        for run in runs if i % 2 == 0 else runs[::-1]:  # alternate who goes first
            run.step(batch["video"], sync, timed=i >= warmup)
    base = {"model": cfg.model.size, "device": device_name(device), "frames": cfg.data.num_frames,
            "image_size": cfg.data.image_size, "clips_per_step": clips.clips_per_batch,
            "encoder_ratio": cfg.mask.encoder_ratio, "threads": torch.get_num_threads(), "steps": steps}
    return [{**base, "contender": r.name, "clips_per_s": r.clips_per_s} for r in runs]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def print_comparison(rows: list[dict]) -> None:
    """clips/s per contender and, against each vmaescale row, the ratio to hf-v1."""
    hf = next((r["clips_per_s"] for r in rows if r["contender"] == "hf-v1"), None)
    print(f"{'contender':<14}{'clips/s':>10}{'vs hf-v1':>10}")
    for r in rows:
        ratio = f"{r['clips_per_s'] / hf:.2f}x" if hf else "-"
        print(f"{r['contender']:<14}{r['clips_per_s']:>10.2f}{ratio:>10}")

