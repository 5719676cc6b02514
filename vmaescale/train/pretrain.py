"""The pretraining loop: DeepSpeed engine, masks on device, metrics, checkpoints, resume.

    run = Pretraining(cfg); summary = run.train()

Every rank runs the same loop; rank 0 alone talks to MLflow and prints progress.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vmaescale import __version__
from vmaescale.config import RunConfig
from vmaescale.masking import MaskGenerator, token_grid
from vmaescale.models.flops import clip_macs, mfu, peak_tflops
from vmaescale.models.sizes import get_size
from vmaescale.models.videomae import VideoMAEPretrain
from vmaescale.train import checkpoint as ckpt
from vmaescale.train.engine import (build_engine, deepspeed_config, dist_env, init_distributed,
                                    resolve_precision)
from vmaescale.train.optim import scaled_lr


class NonFiniteLossError(RuntimeError):
    """Raised after `train.max_bad_steps` non-finite losses (or skipped steps) in a row."""


class BadInARow:
    """Counts one kind of bad event in a row; the `limit`-th in a row stops the run.

    Two kinds: a non-finite loss (the micro batch is skipped on every rank) and a finite loss
    whose gradients are not (DeepSpeed's overflow check skips the optimizer step; a NaN pixel
    in a token the encoder never sees does this through the patch embedding's gradient).
    Either, repeated, means the run is no longer training.
    """

    def __init__(self, kind: str, action: str, limit: int):
        self.kind, self.action, self.limit, self.count = kind, action, limit, 0

    def add(self, step: int) -> str:
        """Count one; return the line to log, or raise at the limit."""
        self.count += 1
        if self.count >= self.limit:
            raise NonFiniteLossError(
                f"{self.count} {self.kind} in a row at step {step} (train.max_bad_steps="
                f"{self.limit}); stopping. Check the data for NaN/Inf pixels, lower optim.base_lr "
                f"or set optim.clip_grad, then resume from the last checkpoint.")
        return f"step {step}: {self.action} ({self.count} in a row, limit {self.limit})"

    def reset(self) -> None:
        self.count = 0


def build_model(cfg: RunConfig) -> VideoMAEPretrain:
    return VideoMAEPretrain(get_size(cfg.model.size), cfg.data.num_frames, cfg.data.image_size,
                            cfg.model.decoder_depth, cfg.model.drop_path,
                            cfg.model.checkpoint_activations)


def build_train_loader(cfg: RunConfig, rank: int, world_size: int, epoch: int, start_step: int,
                       device: torch.device):
    """The configured loader for one epoch, starting at micro step `start_step`."""
    if cfg.data.backend == "synthetic":
        from vmaescale.data.memory import InMemoryClips
        steps = cfg.train.steps_per_epoch or 100
        return InMemoryClips(cfg.train.videos_per_gpu * cfg.data.num_sample, cfg.data.num_frames,
                             cfg.data.image_size, steps, cfg.train.seed, rank, device,
                             start_step=start_step)
    from vmaescale.data.loader import build_loader
    return build_loader(cfg.data, cfg.train.videos_per_gpu, rank, world_size, mode="train",
                        seed=cfg.train.seed, epoch=epoch, start_step=start_step, device=device)


def validation_clips(cfg: RunConfig, device: torch.device, count: int = 4) -> torch.Tensor:
    """A fixed set of centre clips for reconstructions, the same on every rank."""
    if cfg.data.backend == "synthetic":
        from vmaescale.data.memory import InMemoryClips
        batch = next(iter(InMemoryClips(count, cfg.data.num_frames, cfg.data.image_size, 1,
                                        seed=12345, device=device)))
        return batch["video"]
    from vmaescale.data.loader import build_loader
    data = dataclasses.replace(cfg.data, shards=cfg.data.val_shards or cfg.data.shards,
                               test_num_segment=1, test_num_crop=1, short_side=cfg.data.image_size,
                               num_workers=0)
    loader = build_loader(data, count, 0, 1, mode="eval", seed=0, epoch=0, start_step=0, device=device)
    return next(iter(loader))["video"][:count].to(device)


class StopFlag:
    """SIGTERM / SIGUSR1 set the flag; the loop checkpoints and exits at the next step."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True


class Pretraining:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.env = dist_env()
        self.rank, self.world = self.env.rank, self.env.world_size
        self.device = init_distributed(self.env)
        self.precision = resolve_precision(cfg, self.device)
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        torch.manual_seed(cfg.train.seed + self.rank)
        self.stop = StopFlag()
        self.first_loss: tuple[int, float] | None = None  # (step, loss) of this run's first log
        self.last_metrics: dict = {}
        self.last_recon: dict | None = None
        self._setup()

    # ---- set-up -------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        self.model = build_model(cfg).to(self.device)
        self.grid = token_grid(cfg.data.num_frames, cfg.data.image_size, self.model.size.patch_size)
        self.masks = MaskGenerator(self.grid, cfg.mask.encoder, cfg.mask.encoder_ratio,
                                   cfg.mask.decoder, cfg.mask.decoder_ratio, self.device,
                                   seed=cfg.train.seed * 1000 + self.rank)
        self.run_state = {"step": 0, "epoch": 0, "micro_step_in_epoch": 0, "mlflow_run_id": None,
                          "bad_samples": 0, "nonfinite_skipped": 0}
        resume = self._resume_point()
        if resume:
            self.run_state.update(resume["meta"]["run_state"])
        self.loader = build_train_loader(cfg, self.rank, self.world, self.run_state["epoch"],
                                         self.run_state["micro_step_in_epoch"], self.device)
        self.steps_per_epoch = self._updates_per_epoch(self.loader)
        self.total_steps = cfg.train.max_steps or max(1, round(cfg.train.epochs * self.steps_per_epoch))
        warmup = cfg.train.warmup_steps or round(cfg.train.warmup_epochs * self.steps_per_epoch)
        global_videos = cfg.train.videos_per_gpu * cfg.train.grad_accum * self.world
        self.peak_lr = scaled_lr(cfg.optim.base_lr, global_videos)
        schedule = {"peak_lr": self.peak_lr, "min_lr": scaled_lr(cfg.optim.min_lr, global_videos),
                    "warmup_steps": min(warmup, self.total_steps), "total_steps": self.total_steps,
                    "warmup_lr": scaled_lr(cfg.optim.warmup_lr, global_videos)}
        self.ds_config = deepspeed_config(cfg, self.world, self.precision)
        if resume and resume["universal"]:
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.engine, self.optimizer, self.scheduler = build_engine(
            self.model, cfg, self.ds_config, schedule, self.model.size.depth)
        if resume:
            self._load(resume)
        macs = clip_macs(self.model.size, cfg.data.num_frames, cfg.data.image_size,
                         cfg.mask.encoder, cfg.mask.encoder_ratio, cfg.mask.decoder,
                         cfg.mask.decoder_ratio, cfg.model.decoder_depth)
        self.train_flops_per_clip = macs.training_flops
        self.peak_tflops = cfg.train.peak_tflops or peak_tflops(self._device_name())
        self.tracker = self._tracker()
        self.val_clips = validation_clips(cfg, self.device)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.json")

    def _updates_per_epoch(self, loader) -> int:
        micro = self.cfg.train.steps_per_epoch or loader.steps_per_epoch
        return max(1, micro // self.cfg.train.grad_accum)

    def model_flops_utilization(self, clips_per_s_per_device: float) -> float | None:
        """Model FLOPs utilization, or None on a device with no known peak (a CPU): no MFU
        rather than a misleading 0. train.peak_tflops supplies one."""
        if self.peak_tflops <= 0:
            return None
        return mfu(clips_per_s_per_device, self.train_flops_per_clip, self.peak_tflops)

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def _resume_point(self) -> dict | None:
        """The checkpoint to resume from, converted to Universal format on a new world size."""
        tag = ckpt.resume_tag(self.ckpt_dir)
        if tag is None:
            return None
        meta = ckpt.checkpoint_meta(self.ckpt_dir, tag)
        universal = meta["world_size"] != self.world
        if universal:
            if self.rank == 0:
                self.log(f"checkpoint {tag} was written by {meta['world_size']} ranks, this run has "
                         f"{self.world}: converting to DeepSpeed Universal Checkpointing")
                ckpt.to_universal(self.ckpt_dir, tag)
            dist.barrier()
            tag = f"{tag}_universal"
        return {"tag": tag, "meta": meta, "universal": universal}

    def _load(self, resume: dict) -> None:
        tag = resume["tag"]
        self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag, load_module_strict=True)
        rank_file = self.ckpt_dir / tag / f"rank_state_{self.rank}.pt"
        if rank_file.is_file() and not resume["universal"]:
            state = torch.load(rank_file, weights_only=False)
            ckpt.set_rng_state(state["rng"])
            self.masks.load_state_dict(state["masks"])
        self.log(f"resumed from {self.ckpt_dir / tag} at step {self.run_state['step']}")

    def _tracker(self):
        from vmaescale.tracking import Tracker
        tags = {"world_size": str(self.world), "device": self._device_name(),
                "precision": self.precision, "vmaescale_version": __version__,
                "zero_stage": str(self.cfg.train.zero_stage)}
        tracker = Tracker(self.cfg.tracking, self.rank, self.out, self.cfg.to_dict(),
                          run_id=self.run_state["mlflow_run_id"], tags=tags)
        self.run_state["mlflow_run_id"] = tracker.run_id
        return tracker

    # ---- one step -----------------------------------------------------------------------
    def forward_backward(self, batch: dict) -> torch.Tensor | None:
        """One micro step; returns the detached loss, or None when it was non-finite."""
        video = batch["video"].to(self.device, non_blocking=True)
        mask, decoder_mask = self.masks(video.shape[0])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss, _ = self.engine(video, mask, decoder_mask)
        if not self._all_finite(loss):
            return None
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """True when the loss is finite on every rank (so all ranks skip together)."""
        bad = (~torch.isfinite(loss.detach())).float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.stop.raised else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _next_batch(self, it):
        """The next batch, moving to the next epoch when the loader runs out."""
        try:
            return next(it), it
        except StopIteration:
            self.run_state["epoch"] += 1
            self.run_state["micro_step_in_epoch"] = 0
            self.run_state["bad_samples"] += getattr(self.loader, "bad_samples", 0)
            self.loader = build_train_loader(self.cfg, self.rank, self.world,
                                             self.run_state["epoch"], 0, self.device)
            it = iter(self.loader)
            return next(it), it

    # ---- the loop -----------------------------------------------------------------------
    def train(self) -> dict:
        cfg, rs = self.cfg, self.run_state
        accum = cfg.train.grad_accum
        clips_per_micro = cfg.train.videos_per_gpu * cfg.data.num_sample
        window = Window()
        bad_losses = BadInARow("non-finite losses", "non-finite loss, micro batch skipped", cfg.train.max_bad_steps)
        skipped = BadInARow("optimizer steps skipped by DeepSpeed (non-finite gradients)",
                            "DeepSpeed skipped the optimizer step", cfg.train.max_bad_steps)
        progress = self._progress()
        it = iter(self.loader)
        t_start = time.time()
        start_step = rs["step"]
        status = "completed"
        stop_step = min(self.total_steps, start_step + cfg.train.run_steps) if cfg.train.run_steps else self.total_steps
        while rs["step"] < stop_step:
            if self._stop_requested():
                status = "preempted"
                break
            t0 = time.perf_counter()
            skipped_before = self.engine.skipped_steps
            # A skipped micro batch is replaced by the next one: every optimizer step averages
            # `accum` good micro batches and DeepSpeed's accumulation boundary stays ours.
            good = 0
            while good < accum:
                t_data = time.perf_counter()
                batch, it = self._next_batch(it)
                window.data_s += time.perf_counter() - t_data
                rs["micro_step_in_epoch"] += 1
                loss = self.forward_backward(batch)
                if loss is None:
                    rs["nonfinite_skipped"] += 1
                    self.log(bad_losses.add(rs["step"]))
                    continue
                bad_losses.reset()
                good += 1
                window.add_loss(loss)
                window.clips += clips_per_micro
            if self.engine.skipped_steps > skipped_before:  # finite loss, non-finite gradients
                self.log(skipped.add(rs["step"]))
            else:
                skipped.reset()
            rs["step"] += 1
            window.step_s += time.perf_counter() - t0
            progress.update(1)
            if rs["step"] % cfg.train.log_every == 0 or rs["step"] == self.total_steps:
                self._log_window(window, progress)
                window = Window()
            if cfg.train.recon_every and rs["step"] % cfg.train.recon_every == 0:
                self.log_reconstructions()
            if rs["step"] % cfg.train.checkpoint_every == 0 and rs["step"] < self.total_steps:
                self.save()
        progress.close()
        self.save()
        if status == "completed" and rs["step"] < self.total_steps:
            status = "paused"
        if status == "completed":
            self.log_reconstructions()
            self.write_final()
        summary = self._summary(status, rs["step"] - start_step, time.time() - t_start)
        self.tracker.log_dict(summary, "summary.json")
        self.tracker.finish({"completed": "FINISHED", "paused": "FINISHED"}.get(status, "KILLED"))
        return summary

    def _progress(self):
        from tqdm import tqdm
        return tqdm(total=self.total_steps, initial=self.run_state["step"], desc="pretrain",
                    unit="step", disable=self.rank != 0, dynamic_ncols=True, file=sys.stdout)

    def _log_window(self, window: "Window", progress) -> None:
        """All-reduce the window's loss and counters, then rank 0 logs them."""
        stats = torch.tensor([window.loss_sum_value(), float(window.losses),
                              float(getattr(self.loader, "bad_samples", 0) + self.run_state["bad_samples"])],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        loss = stats[0].item() / max(1.0, stats[1].item())
        clips_per_s = window.clips * self.world / max(window.step_s, 1e-9)
        per_device = clips_per_s / self.world
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "loss": loss,
            "lr": self.scheduler.lr(),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "skipped_steps": float(self.engine.skipped_steps + self.run_state["nonfinite_skipped"]),
            "clips_per_s": clips_per_s,
            "clips_per_s_per_device": per_device,
            "data_wait_frac": window.data_s / max(window.step_s, 1e-9),
            "peak_mem_gb": peak_memory_gb(self.device),
            "bad_samples": stats[2].item(),
            "epoch": float(self.run_state["epoch"]),
        }
        utilization = self.model_flops_utilization(per_device)
        if utilization is not None:  # not logged at all where the peak is unknown
            metrics["mfu"] = utilization
        self.last_metrics = metrics
        if self.first_loss is None:
            self.first_loss = (self.run_state["step"], loss)
        if self.rank == 0:
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}",
                                 clips_s=f"{clips_per_s:.1f}")
            progress.write(f"step {self.run_state['step']:>6}  loss {loss:.4f}  lr {metrics['lr']:.3e}  "
                           f"grad {metrics['grad_norm']:.3f}  clips/s {clips_per_s:.1f}  "
                           f"mfu {mfu_text(metrics.get('mfu'))}  data {metrics['data_wait_frac'] * 100:.0f}%")
        self.tracker.log_metrics(metrics, self.run_state["step"])
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.run_state["step"], **metrics}) + "\n")

    # ---- outputs ------------------------------------------------------------------------
    def save(self) -> str:
        rank_state = {"rng": ckpt.rng_state(), "masks": self.masks.state_dict()}
        tag = ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.run_state["step"],
                                   dict(self.run_state), rank_state, self.rank, self.world,
                                   self.cfg.train.keep_checkpoints)
        self.last_tag = tag
        return tag

    def log_reconstructions(self) -> None:
        """Reconstruct the fixed validation clips (every rank: ZeRO-3 needs all), rank 0 logs.

        The forward runs eagerly under model.compile: torch.compile guards on eval mode and
        no_grad, so a compiled call would build (and keep) a second graph for this rare call.
        """
        from vmaescale.eval.reconstruction import (masked_input, reconstruct_clip, region_metrics,
                                                   save_reconstruction_grid)
        from vmaescale.models.videomae import decoded_positions, unnormalize

        model = self.engine.module
        size = model.size
        gen = MaskGenerator(self.grid, self.cfg.mask.encoder, self.cfg.mask.encoder_ratio,
                            self.cfg.mask.decoder, self.cfg.mask.decoder_ratio, self.device, seed=4321)
        video = self.val_clips
        mask, decoder_mask = gen(video.shape[0])
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            _, pred = model(video, mask, decoder_mask)
        model.train(was_training)
        if self.rank != 0:
            return
        decoded = decoded_positions(mask, decoder_mask)
        recon = reconstruct_clip(video.float(), pred.float(), mask, decoded, size.patch_size, size.tubelet_size)
        original = unnormalize(video.float()).clamp(0, 1)
        region = mask & decoded
        metrics = region_metrics(original, recon, region, size.patch_size, size.tubelet_size)
        step = self.run_state["step"]
        path = save_reconstruction_grid(original, masked_input(video.float(), mask, size.patch_size, size.tubelet_size),
                                        recon, self.out / "reconstructions" / f"step_{step:08d}.png")
        self.last_recon = {"path": str(path), **metrics}
        self.tracker.log_image(path)
        self.tracker.log_metrics({f"recon_{k}": v for k, v in metrics.items()}, step)

    def write_final(self) -> None:
        """final/: consolidated fp32 weights (safetensors) and the resolved config (rank 0)."""
        state = ckpt.fp32_state_dict(self.ckpt_dir, self.last_tag, self.engine) if self.rank == 0 else None
        dist.barrier()
        if self.rank != 0:
            return
        from vmaescale.models.checkpoint import save_model_dir
        model = build_model(self.cfg)
        model.load_state_dict(state, strict=True)
        save_model_dir(model, self.out / "final", source=f"vmaescale pretraining {self.cfg.name}",
                       extra_files={"config.json": json.dumps(self.cfg.to_dict(), indent=2)})
        self.tracker.log_artifact(self.out / "config.json")

    def _summary(self, status: str, steps: int, elapsed_s: float) -> dict:
        summary = {"status": status, "steps_this_run": steps, "step": self.run_state["step"],
                   "total_steps": self.total_steps, "elapsed_s": round(elapsed_s, 1),
                   "checkpoint": str(self.ckpt_dir / self.last_tag),
                   "final": str(self.out / "final") if status == "completed" else None,
                   "mlflow_run_id": self.tracker.run_id,
                   "world_size": self.world, "precision": self.precision}
        if self.first_loss is not None:  # metrics were logged in this run
            summary["first_logged"] = f"step {self.first_loss[0]}: loss {self.first_loss[1]:.4f}"
            summary.update({k: self.last_metrics.get(k) for k in ("loss", "clips_per_s", "mfu")})
        if self.last_recon:
            summary["reconstruction"] = self.last_recon
        return summary

    def log(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)


class Window:
    """Accumulators between two log points (losses stay on device until logged)."""

    def __init__(self):
        self.loss_sum: torch.Tensor | None = None
        self.losses = 0
        self.clips = 0
        self.step_s = 0.0
        self.data_s = 0.0

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum = loss.float() if self.loss_sum is None else self.loss_sum + loss.float()
        self.losses += 1

    def loss_sum_value(self) -> float:
        return 0.0 if self.loss_sum is None else float(self.loss_sum.item())


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def mfu_text(value: float | None) -> str:
    """'41.3%', or 'n/a' where the device's peak is unknown (set train.peak_tflops)."""
    return "n/a" if value is None else f"{value * 100:.1f}%"


def summary_text(key: str, value) -> str:
    if key == "mfu":
        return mfu_text(value)
    if key == "reconstruction" and isinstance(value, dict):
        return (f"{value['path']}  (masked regions: PSNR {value['psnr']:.2f} dB, "
                f"SSIM {value['ssim']:.3f}, MSE {value['mse']:.4g})")
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    print("\n== pretraining summary " + "=" * 40)
    for key, value in summary.items():
        if value is not None or key == "mfu":  # mfu None: unknown peak, printed as n/a
            print(f"{key:<{width}}  {summary_text(key, value)}")
