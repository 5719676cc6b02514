"""The classification task (finetuning and V2 post-pretraining): a classifier initialised
from a run, a checkpoint or nothing; mixup / cutmix and soft-target cross-entropy; an
optional weight EMA; single-view validation (centre clip, centre crop) that picks `best/`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vmaescale.config import ConfigError, RunConfig
from vmaescale.data.mixup import MixupCutmix, soft_target_cross_entropy
from vmaescale.models.classifier import VideoClassifier
from vmaescale.models.flops import clip_macs
from vmaescale.models.sizes import get_size
from vmaescale.train.tasks import EvalResult, Task
from vmaescale.train.tasks.pretrain import train_loader

SYNTHETIC_VAL_BATCHES = 2


@dataclasses.dataclass(frozen=True)
class LabelSet:
    names: tuple[str, ...]  # () when the shards name no classes
    num_classes: int


def target_labels(cfg: RunConfig) -> LabelSet:
    """The class names of the training shards and the head size; ConfigError on a mismatch."""
    names: tuple[str, ...] = ()
    if cfg.data.backend != "synthetic":
        from vmaescale.data.loader import open_shard_set
        shards = open_shard_set(cfg.data.shards)
        names = shards.class_names
        if cfg.finetune.num_classes and names and cfg.finetune.num_classes != len(names):
            raise ConfigError(f"finetune.num_classes: {cfg.finetune.num_classes} disagrees with the "
                              f"{len(names)} class names in {shards.root / 'labels.json'}; set 0 to "
                              "take the count from the shards")
    num_classes = cfg.finetune.num_classes or len(names)
    if num_classes < 1:
        raise ConfigError("finetune.num_classes: 0 and the training shards name no classes "
                          "(no labels.json); set finetune.num_classes")
    return LabelSet(names, num_classes)


def check_finetune_config(cfg: RunConfig) -> None:
    """Everything about a finetune config that can be checked before any process group."""
    from vmaescale.models.pretrained import head_rows, read_label_map, resolve_init

    ft, train = cfg.finetune, cfg.train
    labels = target_labels(cfg)
    if ft.model_ema and train.zero_stage == 3:
        raise ConfigError("finetune.model_ema: the weight EMA needs every parameter whole on each "
                          "rank; accepted with train.zero_stage 0, 1 or 2 (this config has 3)")
    clips = train.videos_per_gpu * cfg.data.num_sample
    if (ft.mixup > 0 or ft.cutmix > 0) and ft.mixup_prob > 0 and clips % 2:
        raise ConfigError(f"train.videos_per_gpu: {train.videos_per_gpu} x data.num_sample "
                          f"{cfg.data.num_sample} = {clips} clips; mixup / cutmix pairs clip i with "
                          "B-1-i and needs an even count")
    if ft.label_map and not ft.init:
        raise ConfigError("finetune.label_map: set without finetune.init (there is no source head to map)")
    if not ft.init:
        return
    try:
        spec = resolve_init(ft.init, ft.init_select)
        if ft.label_map:
            rows = spec.num_classes
            if rows is None:
                raise ValueError(f"finetune.label_map: the source {spec.path} has no classifier head")
            head_rows(labels.names, labels.num_classes, spec.class_names, rows, read_label_map(ft.label_map))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e


class ClassifyTask(Task):
    name = "finetune"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.labels = target_labels(self.cfg)
        self.ema = None
        self.init_report = None

    def build_model(self) -> VideoClassifier:
        cfg = self.cfg
        return VideoClassifier(get_size(cfg.model.size), self.labels.num_classes, cfg.data.num_frames,
                               cfg.data.image_size, cfg.model.drop_path, cfg.finetune.head_dropout,
                               cfg.finetune.init_scale, cfg.model.checkpoint_activations,
                               class_names=self.labels.names, temporal=cfg.model.temporal)

    def setup(self, model, resuming: bool) -> None:
        super().setup(model, resuming)
        ft = self.cfg.finetune
        if ft.init and not resuming:  # on resume the checkpoint holds the weights
            self.init_report = self._load_init(model)
        self.mixup = MixupCutmix(self.labels.num_classes, ft.mixup, ft.cutmix, ft.mixup_prob,
                                 ft.switch_prob, ft.smoothing)

    def _load_init(self, model):
        from vmaescale.models.pretrained import init_classifier, load_source_model, read_label_map, resolve_init

        ft = self.cfg.finetune
        spec = resolve_init(ft.init, ft.init_select)
        source, has_head = load_source_model(spec, ft.allow_pickle)
        label_map = read_label_map(ft.label_map) if ft.label_map else None
        report = init_classifier(model, spec, source, has_head, label_map)
        if self.ctx.rank == 0:
            for line in report.lines():
                print(line, flush=True)
        return report

    def attach_engine(self, engine) -> None:
        super().attach_engine(engine)
        if self.cfg.finetune.model_ema:
            from vmaescale.train.ema import WeightEma
            self.ema = WeightEma(engine.module, self.cfg.finetune.ema_decay)

    def train_loader(self, epoch: int, start_step: int):
        return train_loader(self.cfg, self.ctx.rank, self.ctx.world, epoch, start_step, self.ctx.device,
                            num_classes=self.labels.num_classes)

    def loss(self, engine, batch: dict, run_state: dict) -> torch.Tensor:
        video = batch["video"].to(self.ctx.device, non_blocking=True)
        labels = batch["label"].to(self.ctx.device, non_blocking=True)
        rng = np.random.default_rng([self.cfg.train.seed, self.ctx.rank, run_state["epoch"],
                                     run_state["micro_step_in_epoch"]])  # exact on resume
        video, targets = self.mixup(video, labels, rng)
        logits = engine(video)  # bf16 or fp32 as the parameters are (train.precision)
        return soft_target_cross_entropy(logits, targets)

    def after_optimizer_step(self, engine) -> None:
        if self.ema is not None:
            self.ema.update(engine.module)

    def train_flops_per_clip(self) -> float:
        cfg = self.cfg
        frames = cfg.data.num_frames
        if cfg.model.temporal == "frame_average":  # every frame fills a tubelet of its own
            frames *= self.model.size.tubelet_size
        return clip_macs(self.model.size, frames, cfg.data.image_size, "none", 0.0,
                         "none", 0.0, 0, self.labels.num_classes).training_flops

    # ---- the EMA in checkpoints ---------------------------------------------------------
    def shared_state(self) -> dict[str, torch.Tensor] | None:
        return None if self.ema is None else self.ema.state_dict()

    def load_shared_state(self, tag_dir: Path) -> None:
        if self.ema is None:
            return
        from safetensors.torch import load_file

        from vmaescale.train.checkpoint import SHARED_STATE
        path = tag_dir / SHARED_STATE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint holds no weight EMA "
                                    "(finetune.model_ema was off when it was written)")
        self.ema.load_state_dict({k: v.to(self.ctx.device) for k, v in load_file(str(path)).items()})

    # ---- validation ---------------------------------------------------------------------
    def prepare_evaluation(self, tracker) -> None:
        super().prepare_evaluation(tracker)
        if self.init_report is not None:
            report = dataclasses.asdict(self.init_report)
            tracker.log_dict(report, "init.json")
            tracker.set_tags({"init_source": report["source"],
                              "init_fresh_classes": json.dumps(report["fresh_classes"])[:4000]})

    def evaluation_due(self, step: int, steps_per_epoch: int) -> bool:
        every = self.cfg.finetune.eval_every_epochs
        return every > 0 and step % max(1, round(every * steps_per_epoch)) == 0

    def val_loader(self):
        cfg = self.cfg
        from vmaescale.data.loader import build_loader
        data = dataclasses.replace(cfg.data, shards=cfg.data.val_shards or cfg.data.shards,
                                   test_num_segment=1, test_num_crop=1, short_side=cfg.data.image_size)
        return build_loader(data, cfg.train.videos_per_gpu, self.ctx.rank, self.ctx.world, mode="eval",
                            seed=cfg.train.seed, device=self.ctx.device, num_classes=self.labels.num_classes,
                            steps_per_epoch=SYNTHETIC_VAL_BATCHES)

    def evaluate(self, step: int) -> EvalResult:
        metrics = self.validate("val")
        if self.ema is not None:
            saved = self.ema.swap_into(self.engine.module)
            metrics |= self.validate("val_ema")
            self.engine.module.load_state_dict(saved)
        summary = {k: metrics[k] for k in ("val_top1", "val_top5", "val_ema_top1") if k in metrics}
        return EvalResult(metrics, metrics["val_top1"], "val_top1", summary)

    @torch.no_grad()
    def validate(self, prefix: str) -> dict[str, float]:
        """Single-view top-1 / top-5 (%) and cross-entropy over the validation shards; every
        video counted once across ranks (all ranks take every step: ZeRO-3 needs them all)."""
        model = self.engine.module
        was_training = model.training
        model.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=self.ctx.device)  # loss, n, top1, top5, failed
        k = min(5, self.labels.num_classes)
        loader = self.val_loader()
        for batch in loader:
            video = batch["video"].to(self.ctx.device)
            labels = batch["label"].to(self.ctx.device)
            if video.shape[0] == 0:  # this rank's share ran out: keep the collective schedule
                video = torch.zeros((1, *video.shape[1:]), device=self.ctx.device)
                labels = None
            logits = model(video).float()  # the training forward's precision: no autocast
            if labels is None:
                continue
            top = logits.topk(k, dim=-1).indices
            sums[0] += F.cross_entropy(logits, labels, reduction="sum")
            sums[1] += labels.numel()
            sums[2] += (top[:, 0] == labels).sum()
            sums[3] += (top == labels[:, None]).any(dim=-1).sum()
        sums[4] += len(getattr(loader, "failed", []))
        model.train(was_training)
        dist.all_reduce(sums)
        n = max(1.0, sums[1].item())
        return {f"{prefix}_loss": sums[0].item() / n, f"{prefix}_top1": 100 * sums[2].item() / n,
                f"{prefix}_top5": 100 * sums[3].item() / n, f"{prefix}_videos": sums[1].item(),
                f"{prefix}_failed": sums[4].item()}

    # ---- the multi-view test at the end -------------------------------------------------
    def after_training(self) -> dict:
        """The multi-view test of best/ (else final/) on finetune.test_shards (else the
        validation shards): data.test_num_segment x data.test_num_crop views (+ flips),
        written to <output_dir>/eval/<shard dir name> and logged to this run as test_*."""
        cfg = self.cfg
        if not cfg.finetune.test_at_end or cfg.data.backend == "synthetic":
            return {}
        from vmaescale.eval import multiview
        from vmaescale.eval.source import weights_of_run
        from vmaescale.models.checkpoint import load_model_dir

        shards = cfg.finetune.test_shards or cfg.data.val_shards or cfg.data.shards
        views = multiview.Views(cfg.data.test_num_segment, cfg.data.test_num_crop, cfg.data.test_sampling,
                                cfg.finetune.test_flip)
        weights = weights_of_run(self.ctx.out, "auto")
        model = load_model_dir(weights).to(self.ctx.device)
        data = multiview.eval_data_config(cfg.data, shards, views, cfg.data.num_frames, cfg.data.image_size)
        if self.ctx.rank == 0:
            print(f"multi-view test of {weights} on {shards}: {views.describe()}", flush=True)
        out = multiview.evaluate_model(model, data, views, self.ctx.rank, self.ctx.world, self.ctx.device)
        if out is None:  # not rank 0
            return {}
        out_dir = self.ctx.out / "eval" / Path(shards.rstrip("/")).name
        summary = multiview.write_outputs(out, out_dir, f"vmaescale {weights}", shards)
        multiview.log_to_mlflow(self.tracker, out, summary, out_dir, "test")
        multiview.print_report(summary, out)
        return {"test_top1": summary["top1"], "test_top5": summary["top5"],
                "test_mean_class_accuracy": summary["mean_class_accuracy"], "test": str(out_dir)}

    # ---- final/ and best/ ---------------------------------------------------------------
    def write_model_dir(self, state: dict, out: Path, tag_dir: Path) -> None:
        from vmaescale.models.checkpoint import save_model_dir
        model = self.build_model()
        model.load_state_dict(state, strict=True)
        extra = {"config.json": json.dumps(self.cfg.to_dict(), indent=2)}
        source = f"vmaescale {self.cfg.task} {self.cfg.name}"
        save_model_dir(model, out, source=source, extra_files=extra)
        if self.ema is not None:
            from safetensors.torch import load_file

            from vmaescale.train.checkpoint import SHARED_STATE
            model.load_state_dict(load_file(str(tag_dir / SHARED_STATE)), strict=True)
            save_model_dir(model, out / "ema", source=f"{source} (weight EMA, decay "
                           f"{self.cfg.finetune.ema_decay})", extra_files=extra)
