"""The pretraining task: masks drawn on the device, the reconstruction loss, and
reconstructions of fixed validation clips (PSNR / SSIM / MSE, a PNG grid) as its evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from vmaescale.masking import MaskGenerator, token_grid
from vmaescale.models.flops import clip_macs
from vmaescale.models.sizes import get_size
from vmaescale.models.videomae import VideoMAEPretrain
from vmaescale.train.tasks import EvalResult, Task

RECON_MASK_SEED = 4321


def train_loader(cfg, rank: int, world_size: int, epoch: int, start_step: int,
                 device: torch.device, num_classes: int | None = None):
    """The configured loader for one epoch, starting at micro step `start_step`."""
    from vmaescale.data.loader import build_loader
    return build_loader(cfg.data, cfg.train.videos_per_gpu, rank, world_size, mode="train",
                        seed=cfg.train.seed, epoch=epoch, start_step=start_step, device=device,
                        num_classes=num_classes, steps_per_epoch=cfg.train.steps_per_epoch)


def validation_clips(cfg, device: torch.device, count: int = 4) -> torch.Tensor:
    """A fixed set of centre clips for reconstructions, the same on every rank."""
    from vmaescale.data.loader import build_loader
    data = dataclasses.replace(cfg.data, shards=cfg.data.val_shards or cfg.data.shards,
                               test_num_segment=1, test_num_crop=1, short_side=cfg.data.image_size,
                               num_workers=0)
    loader = build_loader(data, count, 0, 1, mode="eval", seed=0, epoch=0, start_step=0, device=device,
                          steps_per_epoch=1)
    return next(iter(loader))["video"][:count].to(device)


class PretrainTask(Task):
    name = "pretrain"

    def build_model(self) -> VideoMAEPretrain:
        cfg = self.cfg
        return VideoMAEPretrain(get_size(cfg.model.size), cfg.data.num_frames, cfg.data.image_size,
                                cfg.model.decoder_depth, cfg.model.drop_path,
                                cfg.model.checkpoint_activations)

    def setup(self, model, resuming: bool) -> None:
        super().setup(model, resuming)
        cfg = self.cfg
        self.grid = token_grid(cfg.data.num_frames, cfg.data.image_size, model.size.patch_size)
        self.masks = self.mask_generator(seed=cfg.train.seed * 1000 + self.ctx.rank)
        self.counts = self.masks.counts  # fixed per run: the forward reads no mask on the host

    def mask_generator(self, seed: int) -> MaskGenerator:
        m = self.cfg.mask
        return MaskGenerator(self.grid, m.encoder, m.encoder_ratio, m.decoder, m.decoder_ratio,
                             self.ctx.device, seed=seed)

    def train_loader(self, epoch: int, start_step: int):
        return train_loader(self.cfg, self.ctx.rank, self.ctx.world, epoch, start_step, self.ctx.device)

    def loss(self, engine, batch: dict, run_state: dict) -> torch.Tensor:
        video = batch["video"].to(self.ctx.device, non_blocking=True)
        mask, decoder_mask = self.masks(video.shape[0])
        loss, _ = engine(video, mask, decoder_mask, self.counts)
        return loss

    def train_flops_per_clip(self) -> float:
        cfg = self.cfg
        macs = clip_macs(self.model.size, cfg.data.num_frames, cfg.data.image_size,
                         cfg.mask.encoder, cfg.mask.encoder_ratio, cfg.mask.decoder,
                         cfg.mask.decoder_ratio, cfg.model.decoder_depth)
        return macs.training_flops

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state["masks"])

    # ---- evaluation: reconstructions ----------------------------------------------------
    def prepare_evaluation(self, tracker) -> None:
        super().prepare_evaluation(tracker)
        self.val_clips = validation_clips(self.cfg, self.ctx.device)

    def evaluation_due(self, step: int, steps_per_epoch: int) -> bool:
        every = self.cfg.train.recon_every
        return bool(every) and step % every == 0

    def evaluate(self, step: int) -> EvalResult | None:
        """Reconstruct the fixed validation clips (every rank: ZeRO-3 needs all), rank 0 logs.

        The forward runs eagerly under model.compile: torch.compile guards on eval mode and
        no_grad, so a compiled call would build (and keep) a second graph for this rare call.
        No autocast, here or in training: precision is DeepSpeed's bf16 section alone
        (`vmaescale.train.engine.deepspeed_config`), so both compute alike.
        """
        from vmaescale.eval.reconstruction import (masked_input, reconstruct_clip, region_metrics,
                                                   save_reconstruction_grid)
        from vmaescale.models.videomae import decoded_positions, unnormalize

        model = self.engine.module
        size = model.size
        video = self.val_clips
        mask, decoder_mask = self.mask_generator(RECON_MASK_SEED)(video.shape[0])
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            _, pred = model(video, mask, decoder_mask, self.counts)
        model.train(was_training)
        if self.ctx.rank != 0:
            return None
        decoded = decoded_positions(mask, decoder_mask)
        recon = reconstruct_clip(video.float(), pred.float(), mask, decoded, size.patch_size, size.tubelet_size)
        original = unnormalize(video.float()).clamp(0, 1)
        metrics = region_metrics(original, recon, mask & decoded, size.patch_size, size.tubelet_size)
        path = save_reconstruction_grid(original, masked_input(video.float(), mask, size.patch_size, size.tubelet_size),
                                        recon, self.ctx.out / "reconstructions" / f"step_{step:08d}.png")
        self.tracker.log_image(path)
        self.tracker.log_metrics({f"recon_{k}": v for k, v in metrics.items()}, step)
        return EvalResult({}, summary={"reconstruction": {"path": str(path), **metrics}})

    # ---- final/ -------------------------------------------------------------------------
    def write_model_dir(self, state: dict, out: Path, tag_dir: Path) -> None:
        from vmaescale.models.checkpoint import save_model_dir
        model = self.build_model()
        model.load_state_dict(state, strict=True)
        save_model_dir(model, out, source=f"vmaescale pretraining {self.cfg.name}",
                       extra_files={"config.json": json.dumps(self.cfg.to_dict(), indent=2)})
