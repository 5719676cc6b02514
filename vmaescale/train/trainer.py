"""THE training loop, shared by every stage: DeepSpeed engine, resume, signals, non-finite
handling, gradient accumulation, metrics, checkpoints, `final/`, `best/` and the summary.

    trainer = Trainer(cfg); summary = trainer.train()

What differs per stage lives in a small task object (`vmaescale.train.tasks`): the model,
the loader, batch -> loss, FLOPs per clip, what to evaluate and when, what `final/` holds.
Every rank runs the same loop; rank 0 alone talks to MLflow and prints progress.
"""

from __future__ import annotations

import json
import math
import resource
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vmaescale import __version__
from vmaescale.cluster import stop_deadline
from vmaescale.config import RunConfig
from vmaescale.models.flops import mfu, peak_tflops
from vmaescale.train import checkpoint as ckpt
from vmaescale.train.engine import (build_engine, deepspeed_config, dist_env, init_distributed,
                                    resolve_precision)
from vmaescale.train.optim import scaled_lr
from vmaescale.train.rundir import RunDirError, RunLock, check_resume_config, describe
from vmaescale.train.step_checks import NonFiniteLossError, StepChecks  # noqa: F401 (re-export)
from vmaescale.train.tasks import RunContext, make_task


class StopFlag:
    """SIGTERM / SIGUSR1 set the flag, and so does the deadline (the time budget,
    `vmaescale.cluster.stop_deadline`) when it passes; the loop checkpoints and exits at the next
    step. `reason` says which, for the summary."""

    def __init__(self, deadline: float | None = None):
        self.raised = False
        self.reason = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        if deadline is not None:
            timer = threading.Timer(max(0.0, deadline - time.time()), self._expire)
            timer.daemon = True
            timer.start()

    def _handle(self, signum, frame) -> None:
        self.reason = self.reason or f"signal {signal.Signals(signum).name}"
        self.raised = True

    def _expire(self) -> None:
        self.reason = self.reason or "time budget (train.time_limit_s / train.end_margin_s)"
        self.raised = True


class Trainer:
    def __init__(self, cfg: RunConfig, allow_config_change: bool = False):
        self.cfg = cfg
        self.env = dist_env()
        self.rank, self.world = self.env.rank, self.env.world_size
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        # Before any process group: a busy directory or a refused config change ends the
        # launch at once, on every rank, in one line.
        self.lock = RunLock(self.out) if self.rank == 0 else None
        self.config_changes = self._check_resume_config(allow_config_change)
        self._refuse_bad_shards()
        self.device = init_distributed(self.env, cfg.train.dist_timeout_s)
        self.precision = resolve_precision(cfg, self.device)
        torch.manual_seed(cfg.train.seed + self.rank)
        self.stop = StopFlag(stop_deadline(cfg.train.time_limit_s,
                                           cfg.train.end_margin_s if self.rank == 0 else 0.0,
                                           time.time(), os.environ))
        self.first_loss: tuple[int, float] | None = None  # (step, loss) of this run's first log
        self.last_metrics: dict = {}
        self.last_eval = None  # the last EvalResult
        self.improved = False  # the last evaluation set a new best; best/ follows the next save
        self.task = make_task(RunContext(cfg, self.rank, self.world, self.device, self.precision,
                                         self.out))
        self._setup()

    # ---- set-up -------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        self.model = self.task.build_model().to(self.device)
        self.run_state = {"step": 0, "epoch": 0, "micro_step_in_epoch": 0, "mlflow_run_id": None,
                          "bad_samples": 0, "nonfinite_skipped": 0, "best": None}
        candidates = self._usable_checkpoints()
        resume = self._resume_point(candidates.pop(0)) if candidates else None
        self.task.setup(self.model, resuming=resume is not None)
        if resume:
            self.run_state.update(resume["meta"]["run_state"])
        self.loader = self.task.train_loader(self.run_state["epoch"],
                                             self.run_state["micro_step_in_epoch"])
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
        self.engine, self.optimizer, self.scheduler = build_engine(self.model, cfg, self.ds_config,
                                                                   schedule)
        self.task.attach_engine(self.engine)
        self._refuse_unguarded_optimizer()
        if resume:
            self._load_or_fall_back(resume, candidates)
        self.train_flops_per_clip = self.task.train_flops_per_clip()
        self.peak_tflops = cfg.train.peak_tflops or peak_tflops(self._device_name())
        self.tracker = self._tracker()
        self.task.prepare_evaluation(self.tracker)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.json")

    def _refuse_unguarded_optimizer(self) -> None:
        """Non-finite losses are skipped by DeepSpeed's overflow check (see step_checks); a
        plain fp32 optimizer without ZeRO has none, so NaN would be trained on."""
        if not hasattr(self.engine.optimizer, "overflow"):
            raise ValueError(f"train.zero_stage={self.cfg.train.zero_stage} with precision "
                             f"{self.precision!r}: DeepSpeed has no overflow check there, so a "
                             "non-finite loss would be trained on; use train.zero_stage 1, 2 or 3, "
                             "or train.precision='bf16'")

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

    def _check_resume_config(self, allow_change: bool) -> dict | None:
        """On resume, the changes to the stored resolved config that are accepted (RunDirError
        for one that alters the model, data order or optimisation, unless allowed)."""
        if not ckpt.complete_tags(self.ckpt_dir):
            return None
        changes = check_resume_config(self.out / "config.json", self.cfg.to_dict(), allow_change)
        if self.rank == 0:
            if changes["harmless"]:
                self.log(f"resuming with changed settings: {describe(changes['harmless'])}")
            if changes["allowed"]:
                self.log(f"resuming with config changes allowed by --allow-config-change: "
                         f"{describe(changes['allowed'])}")
        return changes

    def _refuse_bad_shards(self) -> None:
        """data.bad_shards='refuse': a corrupt, truncated or non-tar shard ends the launch here,
        before any process group (ShardSetError naming it). 'skip' is left to the loader."""
        data = self.cfg.data
        if data.backend == "synthetic" or data.bad_shards != "refuse":
            return
        from vmaescale.data.loader import open_shard_set
        for spec in dict.fromkeys(s for s in (data.shards, data.val_shards) if s):
            open_shard_set(spec, bad_shards="refuse")

    def _usable_checkpoints(self) -> list[str]:
        """Complete tags whose files are all as recorded, best first; each unusable one is
        named. RunDirError when checkpoints exist but none is usable (no silent restart)."""
        usable, problems = [], []
        for tag in ckpt.resume_candidates(self.ckpt_dir):
            problem = ckpt.checkpoint_problem(self.ckpt_dir, tag)
            if problem is None:
                usable.append(tag)
            else:
                problems.append(f"{tag}: {problem}")
                self.log(f"checkpoint {tag} cannot be resumed from: {problem}; trying the next older one")
        if problems and not usable:
            raise RunDirError(f"no usable checkpoint in {self.ckpt_dir} ({'; '.join(problems)}); "
                              "move the directory away to start the run over")
        return usable

    def _resume_point(self, tag: str) -> dict:
        """Where to resume: `tag`, converted to Universal format on a new world size."""
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

    def _load_or_fall_back(self, resume: dict, older: list[str]) -> None:
        """Load `resume`; when it fails to load on any rank, name it and try the older ones
        (same world size: a Universal load is not retried)."""
        while True:
            error = self._try_load(resume)
            if error is None:
                return
            if resume["universal"] or not older:
                raise RunDirError(f"checkpoint {self.ckpt_dir / resume['tag']} failed to load: {error}")
            self.log(f"checkpoint {resume['tag']} failed to load ({error}); trying the next older one")
            resume = self._resume_point(older.pop(0))
            self.run_state.update(resume["meta"]["run_state"])
            self.loader = self.task.train_loader(self.run_state["epoch"],
                                                 self.run_state["micro_step_in_epoch"])

    def _try_load(self, resume: dict) -> str | None:
        """Load a checkpoint on every rank; None, or the first rank's error when any failed."""
        error = None
        try:
            self._load(resume)
        except Exception as e:  # noqa: BLE001 - any failure to read files means "try older"
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        failed = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() == 0:
            return None
        return error or "failed on another rank"

    def _load(self, resume: dict) -> None:
        tag = resume["tag"]
        with ckpt.weights_only_loads():
            self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag, load_module_strict=True)
        if not resume["universal"]:  # a new world size starts every rank's RNG afresh
            state = ckpt.load_rank_state(self.ckpt_dir, tag, self.rank)
            ckpt.set_rng_state(state["rng"])
            self.task.load_state_dict(state)
        self.task.load_shared_state(self.ckpt_dir / tag)
        self.last_tag = tag
        self.log(f"resumed from {self.ckpt_dir / tag} at step {self.run_state['step']}")

    def _tracker(self):
        from vmaescale.tracking import Tracker
        tags = {"world_size": str(self.world), "device": self._device_name(),
                "precision": self.precision, "vmaescale_version": __version__,
                "zero_stage": str(self.cfg.train.zero_stage), "task": self.cfg.task,
                **self.cfg.tracking.tags}
        tracker = Tracker(self.cfg.tracking, self.rank, self.out, self.cfg.to_dict(),
                          run_id=self.run_state["mlflow_run_id"], tags=tags,
                          parent_run_id=self.cfg.tracking.parent_run_id or None)
        self.run_state["mlflow_run_id"] = tracker.run_id
        if self.config_changes and any(self.config_changes.values()):
            tracker.set_tags({f"resume_config_{kind}": describe(changes)[:4000]
                              for kind, changes in self.config_changes.items() if changes})
        return tracker

    # ---- one step -----------------------------------------------------------------------
    def forward_backward(self, batch: dict) -> torch.Tensor:
        """One micro step with no host sync; returns the detached loss. A non-finite loss goes
        through backward too: DeepSpeed's overflow check skips its optimizer step (step_checks)."""
        loss = self.task.loss(self.engine, batch, self.run_state)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def _check(self, checks: StepChecks, window: "Window | None" = None):
        """The loop's one sync (see step_checks); at a log point it carries the window's sums."""
        extra = [] if window is None else [*window.sums(self._bad_samples_so_far()),
                                           self._grad_norm_share()]
        result = checks.check(self.stop.raised, self.run_state["step"], extra)
        if result.nonfinite:
            self.run_state["nonfinite_skipped"] += result.nonfinite
            self.log(f"step {self.run_state['step']}: {result.nonfinite} non-finite loss(es) since the "
                     f"last check; DeepSpeed skipped their optimizer steps (limit "
                     f"{self.cfg.train.max_bad_steps} in a row)")
        if result.error is not None:
            raise result.error
        return result

    def _grad_norm_share(self) -> torch.Tensor:
        """DeepSpeed's global grad norm (a device tensor, equal on every rank) / world size, so
        that the check's sum over ranks gives it back without a read of its own; NaN if none."""
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float64)
        return norm.to(self.device, torch.float64) / self.world

    def _bad_samples_so_far(self) -> int:
        return getattr(self.loader, "bad_samples", 0) + self.run_state["bad_samples"]

    def _next_batch(self, it):
        """The next batch, moving to the next epoch when the loader runs out."""
        try:
            return next(it), it
        except StopIteration:
            self.run_state["epoch"] += 1
            self.run_state["micro_step_in_epoch"] = 0
            self.run_state["bad_samples"] += getattr(self.loader, "bad_samples", 0)
            if hasattr(self.loader, "set_epoch"):  # keeps its pipelines (DALI builds are slow)
                self.loader.set_epoch(self.run_state["epoch"], 0)
            else:
                self.loader = self.task.train_loader(self.run_state["epoch"], 0)
            it = iter(self.loader)
            return next(it), it

    # ---- the loop -----------------------------------------------------------------------
    def train(self) -> dict:
        cfg, rs = self.cfg, self.run_state
        accum = cfg.train.grad_accum
        window = Window(self.device)
        checks = StepChecks(self.device, cfg.train.max_bad_steps, cfg.train.check_every)
        progress = self._progress()
        it = iter(self.loader)
        t_start = time.time()
        start_step = rs["step"]
        status = "completed"
        stop_step = min(self.total_steps, start_step + cfg.train.run_steps) if cfg.train.run_steps else self.total_steps
        while rs["step"] < stop_step:
            t0 = time.perf_counter()
            skipped_before = self.engine.skipped_steps
            for _ in range(accum):
                t_data = time.perf_counter()
                batch, it = self._next_batch(it)
                window.data_s += time.perf_counter() - t_data
                rs["micro_step_in_epoch"] += 1
                loss = self.forward_backward(batch)
                window.add_loss(loss, checks.add_loss(loss))
                window.clips += batch["video"].shape[0]
            checks.add_step(self.engine.skipped_steps > skipped_before)
            self.task.after_optimizer_step(self.engine)
            rs["step"] += 1
            window.step_s += time.perf_counter() - t0
            progress.update(1)
            log_due = rs["step"] % cfg.train.log_every == 0 or rs["step"] == self.total_steps
            eval_due = rs["step"] < self.total_steps and self.task.evaluation_due(rs["step"], self.steps_per_epoch)
            save_due = rs["step"] % cfg.train.checkpoint_every == 0 and rs["step"] < self.total_steps
            if log_due or eval_due or save_due or rs["step"] == stop_step or checks.due(rs["step"]):
                result = self._check(checks, window if log_due else None)
                if log_due:
                    self._log_window(window, result.extra, progress)
                    window = Window(self.device)
                if result.stop:
                    status = "preempted"
                    break
            if eval_due:
                self.evaluate()
            if save_due:
                self.save()
        progress.close()
        if status == "completed" and rs["step"] < self.total_steps:
            status = "paused"
        if status == "completed":
            self.evaluate(save=False)
        self.save()
        after = {}
        if status == "completed":
            self.write_final()
            if self.improved:
                self.write_best()
            after = self.task.after_training()
        summary = self._summary(status, rs["step"] - start_step, time.time() - t_start) | after
        self.tracker.log_dict(summary, "summary.json")
        self.tracker.finish({"completed": "FINISHED", "paused": "FINISHED"}.get(status, "KILLED"))
        if self.lock is not None:
            self.lock.release()
        return summary

    def _progress(self):
        from tqdm import tqdm
        return tqdm(total=self.total_steps, initial=self.run_state["step"], desc=self.cfg.task,
                    unit="step", disable=self.rank != 0, dynamic_ncols=True, file=sys.stdout)

    def _log_window(self, window: "Window", sums: list[float], progress) -> None:
        """Log the window; `sums` = its (loss sum, finite losses, bad samples, grad norm) over
        all ranks, all-reduced by the check that preceded this."""
        loss_sum, losses, bad_samples, grad_norm = sums
        loss = loss_sum / losses if losses else float("nan")
        clips_per_s = window.clips * self.world / max(window.step_s, 1e-9)
        per_device = clips_per_s / self.world
        metrics = {
            "loss": loss,
            "lr": self.scheduler.lr(),
            "grad_norm": grad_norm,
            "skipped_steps": float(self.engine.skipped_steps),  # non-finite losses skip steps too
            "clips_per_s": clips_per_s,
            "clips_per_s_per_device": per_device,
            "data_wait_frac": window.data_s / max(window.step_s, 1e-9),
            "peak_mem_gb": peak_memory_gb(self.device),
            "bad_samples": bad_samples,
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
        self.append_metrics(metrics)

    def append_metrics(self, metrics: dict) -> None:
        """One line of `metrics.jsonl` (rank 0)."""
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.run_state["step"], **metrics}) + "\n")

    # ---- evaluation, best/ --------------------------------------------------------------
    def evaluate(self, save: bool = True) -> None:
        """The task's evaluation (every rank); a new best is checkpointed and written to best/.

        With save=False (the end of the run) the caller's final checkpoint is the one best/
        is consolidated from.
        """
        result = self.task.evaluate(self.run_state["step"])
        if result is None:
            return
        self.last_eval = result
        step = self.run_state["step"]
        self.tracker.log_metrics(result.metrics, step)
        if result.metrics:
            self.append_metrics(result.metrics)
            self.log(f"step {step:>6}  " + "  ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
        best = self.run_state["best"]
        self.improved = result.score is not None and (best is None or result.score > best["score"])
        if self.improved:
            self.run_state["best"] = {"score": result.score, "step": step, "metric": result.score_name}
            if save:
                self.save()
                self.write_best()

    def write_best(self) -> None:
        """best/: the weights of the checkpoint just saved, consolidated like final/."""
        self._write_model_dir("best")
        self.improved = False
        self.log(f"best/ updated: {self.run_state['best']['metric']} {self.run_state['best']['score']:.4g} "
                 f"at step {self.run_state['best']['step']}")

    # ---- outputs ------------------------------------------------------------------------
    def save(self) -> str:
        rank_state = {"rng": ckpt.rng_state(), **self.task.state_dict()}
        tag = ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.run_state["step"],
                                   dict(self.run_state), rank_state, self.rank, self.world,
                                   self.cfg.train.keep_checkpoints,
                                   shared_state=self.task.shared_state())
        self.last_tag = tag
        return tag

    def write_final(self) -> None:
        """final/: consolidated fp32 weights (safetensors) and the resolved config (rank 0)."""
        self._write_model_dir("final")
        self.tracker.log_artifact(self.out / "config.json")

    def _write_model_dir(self, name: str) -> None:
        state = ckpt.fp32_state_dict(self.ckpt_dir, self.last_tag, self.engine) if self.rank == 0 else None
        dist.barrier()
        if self.rank == 0:
            self.task.write_model_dir(state, self.out / name, self.ckpt_dir / self.last_tag)
        dist.barrier()

    def _summary(self, status: str, steps: int, elapsed_s: float) -> dict:
        summary = {"task": self.cfg.task, "status": status, "steps_this_run": steps,
                   "step": self.run_state["step"], "total_steps": self.total_steps,
                   "elapsed_s": round(elapsed_s, 1),
                   "checkpoint": str(self.ckpt_dir / self.last_tag),
                   "final": str(self.out / "final") if status == "completed" else None,
                   "mlflow_run_id": self.tracker.run_id,
                   "world_size": self.world, "precision": self.precision}
        if self.first_loss is not None:  # metrics were logged in this run
            summary["first_logged"] = f"step {self.first_loss[0]}: loss {self.first_loss[1]:.4f}"
            summary.update({k: self.last_metrics.get(k) for k in ("loss", "clips_per_s", "mfu")})
        if self.last_eval is not None:
            summary.update(self.last_eval.summary)
        if self.run_state["best"] is not None and (self.out / "best").is_dir():
            best = self.run_state["best"]
            summary["best"] = f"{self.out / 'best'}  ({best['metric']} {best['score']:.4g} at step {best['step']})"
        return summary

    def log(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)


class Window:
    """Accumulators between two log points (losses stay on device until the check sums them)."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.losses = torch.zeros((), dtype=torch.float64, device=device)  # finite ones
        self.clips = 0
        self.step_s = 0.0
        self.data_s = 0.0

    def add_loss(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        """`finite`: 1.0 or 0.0 on the device; a non-finite loss adds nothing to the mean."""
        self.loss_sum = self.loss_sum + torch.where(finite > 0, loss.double(), 0.0)
        self.losses = self.losses + finite.double()

    def sums(self, bad_samples: int) -> list[torch.Tensor]:
        """What a log point all-reduces (summed over ranks): loss sum, losses, bad samples."""
        return [self.loss_sum, self.losses, torch.tensor(float(bad_samples), dtype=torch.float64)]


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
    print(f"\n== {summary.get('task', 'training')} summary " + "=" * 40)
    for key, value in summary.items():
        if key == "task":
            continue
        if value is not None or key == "mfu":  # mfu None: unknown peak, printed as n/a
            print(f"{key:<{width}}  {summary_text(key, value)}")
