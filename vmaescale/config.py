"""The typed run config: one JSON file per run, the single source of truth.

Every section is a dataclass. `load_config(path, overrides)` reads JSON, applies
`--set a.b=value` overrides, and validates: unknown keys, wrong types, out-of-range values,
NaN / Infinity, and `deepspeed` pass-through keys that the run config derives raise
`ConfigError` naming the field, the value and what is accepted, before any process group
starts. DeepSpeed's config dict is derived from this (see
`vmaescale.train.engine.deepspeed_config`), never kept as a second file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A run config field has a bad value; the message names field, value and what is accepted."""


def _f(default: Any, *, choices: tuple | None = None, lo: float | None = None,
       hi: float | None = None, help: str = "") -> Any:
    """A config field with its accepted values (choices or an inclusive [lo, hi] range)."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    size: str = _f("B", help="model size: S, B, L, H, g, or a tiny size (see vmaescale.models.sizes)")
    decoder_depth: int = _f(4, lo=1, hi=64)
    drop_path: float = _f(0.0, lo=0.0, hi=1.0)
    checkpoint_activations: bool = _f(False, help="per-block activation checkpointing")
    compile: bool = _f(False, help="torch.compile the model")
    temporal: str = _f("full", choices=("full", "frame_average"),
                       help="classifiers: full = space-time tokens; frame_average = a control that sees "
                            "no motion: each frame encoded alone, features averaged over frames")
    compile_scope: str = _f("model", choices=("model", "blocks"),
                            help="model = one graph (DeepSpeed engine.compile); blocks = each "
                                 "transformer block compiled on its own (regional: g's 40 blocks "
                                 "share one compiled graph, so start-up is far shorter)")


@dataclass
class MaskConfig:
    encoder: str = _f("tube", choices=("tube", "random", "frame"))
    encoder_ratio: float = _f(0.9, lo=0.0, hi=0.99)
    decoder: str = _f("running_cell", choices=("running_cell", "none"),
                      help="'none' = VideoMAE v1 (decode every masked token)")
    decoder_ratio: float = _f(0.5, lo=0.0, hi=1.0)


@dataclass
class DataConfig:
    shards: str = _f("", help="directory of WebDataset shards (with manifest.parquet), or a glob")
    val_shards: str = _f("", help="shards for reconstruction / validation clips; default = shards")
    backend: str = _f("auto", choices=("auto", "dali", "fallback", "synthetic"),
                     help="synthetic = in-memory random clips (benchmarks: no decoding)")
    num_frames: int = _f(16, lo=2, hi=128)
    sampling_rate: int = _f(4, lo=1, hi=32)
    image_size: int = _f(224, lo=16, hi=1024)
    num_sample: int = _f(4, lo=1, hi=32, help="repeated sampling: clips per decoded video")
    num_workers: int = _f(4, lo=0, hi=64)
    shuffle_buffer: int = _f(1000, lo=0, help="fallback: samples mixed in its shuffle buffer; DALI: "
                                             "> 1 = each train epoch in a fresh permutation")
    prefetch_batches: int = _f(2, lo=1, hi=64, help="batches each loader prepares ahead (DALI: chunks of "
                                                    "videos_per_gpu videos in flight, at least "
                                                    "dali_pipelines; fallback: per DataLoader worker)")
    dali_pipelines: int = _f(1, lo=1, hi=16, help="DALI decoder pipelines per loader (per GPU), each "
                                                  "built once and run by its own thread; consecutive "
                                                  "chunks of videos go to them round-robin; the "
                                                  "batches are the same whatever the count")
    test_num_segment: int = _f(5, lo=1, hi=32)
    test_num_crop: int = _f(3, choices=(1, 3))
    test_sampling: str = _f("stride", choices=("stride", "segment"),
                            help="eval clips: stride = test_num_segment clips at sampling_rate spread "
                                 "over the video; segment = SSv2-style segment sampling")
    short_side: int = _f(224, lo=16, hi=2048)
    bad_shards: str = _f("refuse", choices=("refuse", "skip"),
                         help="a corrupt, truncated or non-tar shard found when the loader is built: "
                              "refuse = the run does not start, naming it; skip = left out, named")
    # Train-mode augmentation. Pretraining: multi_scale crop, nothing else. Finetuning
    # (official V2 recipe): random_resized crop, flip, RandAugment, random erasing.
    train_crop: str = _f("multi_scale", choices=("multi_scale", "random_resized"),
                         help="multi_scale = GroupMultiScaleCrop (pretraining); random_resized = "
                              "RandomResizedCrop with crop_scale / crop_ratio (finetuning)")
    crop_scale: list = _f([0.08, 1.0], help="random_resized: area fraction range")
    crop_ratio: list = _f([0.75, 1.3333], help="random_resized: aspect ratio range (w / h)")
    flip: bool = _f(False, help="horizontal flip with p 0.5 (off for SSv2-like sets)")
    rand_augment: str = _f("none", help="'none' or timm-style 'rand-m7-n4-mstd0.5-inc1' "
                                        "(DALI backend; one op and magnitude per clip)")
    erase_prob: float = _f(0.0, lo=0.0, hi=1.0, help="random erasing (pixel mode), one box per clip")


@dataclass
class OptimConfig:
    base_lr: float = _f(1e-3, lo=0.0, hi=1.0, help="lr = base_lr * global_batch / 256")
    min_lr: float = _f(1e-5, lo=0.0, hi=1.0, help="also scaled by global_batch / 256")
    warmup_lr: float = _f(0.0, lo=0.0, hi=1.0)
    weight_decay: float = _f(0.05, lo=0.0, hi=10.0)
    betas: list = _f([0.9, 0.95])
    eps: float = _f(1e-8, lo=0.0, hi=1.0)
    layer_decay: float = _f(1.0, lo=0.0, hi=1.0, help="1.0 = off (pretraining)")
    clip_grad: float = _f(0.0, lo=0.0, help="0 = no clipping")


@dataclass
class TrainConfig:
    epochs: float = _f(1.0, lo=0.0)
    warmup_epochs: float = _f(0.0, lo=0.0)
    max_steps: int = _f(0, lo=0, help="stop after this many optimizer steps; 0 = epochs decide")
    warmup_steps: int = _f(0, lo=0, help="overrides warmup_epochs when > 0")
    run_steps: int = _f(0, lo=0, help="stop this launch after this many steps (checkpoint, exit; "
                                      "the next launch resumes); 0 = run to the end")
    steps_per_epoch: int = _f(0, lo=0, help="0 = derived from the manifest sample count")
    videos_per_gpu: int = _f(32, lo=1, help="decoded videos per GPU per micro step")
    grad_accum: int = _f(1, lo=1)
    precision: str = _f("auto", choices=("auto", "bf16", "fp32"),
                        help="auto = bf16 on GPU, fp32 on CPU")
    zero_stage: int = _f(1, choices=(0, 1, 2, 3))
    seed: int = _f(0, lo=0)
    log_every: int = _f(10, lo=1)
    checkpoint_every: int = _f(1000, lo=1)
    keep_checkpoints: int = _f(2, lo=1)
    recon_every: int = _f(0, lo=0, help="log reconstructions every M steps; 0 = only at the end")
    max_bad_steps: int = _f(5, lo=1, help="stop after this many non-finite losses in a row")
    check_every: int = _f(10, lo=1, help="optimizer steps between the loop's one host sync (stop "
                                         "flag, non-finite counts); also at log, eval and "
                                         "checkpoint steps")
    peak_tflops: float = _f(0.0, lo=0.0, help="per-device bf16 peak for MFU; 0 = look up the device")
    time_limit_s: float = _f(0.0, lo=0.0, help="wall-clock budget of one launch: after this many seconds "
                                               "checkpoint and exit 75 (requeue me); 0 = none")
    end_margin_s: float = _f(0.0, lo=0.0, help="under Slurm: checkpoint and exit 75 this many seconds "
                                               "before the job's end time (squeue %e); 0 = off")
    dist_timeout_s: float = _f(600.0, lo=10.0, help="process-group timeout: a collective waiting this "
                                                    "long on a dead or hung rank fails, naming it")


@dataclass
class FinetuneConfig:
    num_classes: int = _f(0, lo=0, help="0 = the number of classes in the training shards' labels.json")
    init: str = _f("", help="vmaescale run dir or checkpoint dir, official .pth, Hugging Face dir; "
                            "'' = from scratch")
    init_select: str = _f("final", choices=("final", "best"),
                          help="which weights of a vmaescale run dir to start from")
    label_map: str = _f("", help="JSON file: a list (entry i = the source head row of class i, "
                                 "the official label_710to400.json form) or {target name: source name}")
    allow_pickle: bool = _f(False, help="official .pth files a weights-only load refuses (trusted files only)")
    head_dropout: float = _f(0.0, lo=0.0, hi=1.0)
    init_scale: float = _f(0.001, lo=0.0, hi=1.0, help="head weight and bias scale at init")
    mixup: float = _f(0.8, lo=0.0, hi=100.0, help="mixup alpha; 0 = off")
    cutmix: float = _f(1.0, lo=0.0, hi=100.0, help="cutmix alpha; 0 = off")
    mixup_prob: float = _f(1.0, lo=0.0, hi=1.0, help="probability of mixing a batch at all")
    switch_prob: float = _f(0.5, lo=0.0, hi=1.0, help="probability of cutmix instead of mixup")
    smoothing: float = _f(0.1, lo=0.0, hi=1.0, help="label smoothing")
    model_ema: bool = _f(False, help="keep an EMA of the weights (ZeRO stages 0-2)")
    ema_decay: float = _f(0.9999, lo=0.0, hi=1.0)
    eval_every_epochs: float = _f(1.0, lo=0.0, help="single-view validation every N epochs; 0 = at the end only")
    test_at_end: bool = _f(True, help="multi-view test of best/ (else final/) when the run completes: "
                                      "data.test_num_segment x data.test_num_crop views")
    test_shards: str = _f("", help="shards of the end-of-run test; '' = data.val_shards, else data.shards")
    test_flip: bool = _f(False, help="end-of-run test: add the horizontal flip of every view")


@dataclass
class TrackingConfig:
    enabled: bool = _f(True)
    experiment: str = _f("vmaescale")
    run_name: str = _f("")
    tracking_uri: str = _f("", help="empty = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    system_metrics: bool = _f(True)
    parent_run_id: str = _f("", help="a new run becomes a child of this MLflow run (a schedule's "
                                     "stage; launch/progressive.py sets it); '' = no parent")
    tags: dict = _f({}, help="extra MLflow tags of the run, {name: value}")


@dataclass
class RunConfig:
    name: str = _f("run")
    task: str = _f("pretrain", choices=("pretrain", "finetune"))
    output_dir: str = _f("runs/run")
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: dict = _f({}, help="advanced DeepSpeed keys merged over the derived config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(where: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number; accepted: {_accepted_range(meta)}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {list(meta['choices'])}")
    if meta.get("lo") is not None and value < meta["lo"]:
        raise ConfigError(f"{where}: {value!r} is below the minimum {meta['lo']}")
    if meta.get("hi") is not None and value > meta["hi"]:
        raise ConfigError(f"{where}: {value!r} is above the maximum {meta['hi']}")
    return value


def _accepted_range(meta: dict) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        return f"a number in [{lo}, {hi}]"
    if lo is not None:
        return f"a number >= {lo}"
    if hi is not None:
        return f"a number <= {hi}"
    return "a finite number"


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and bad values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; accepted: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, path)
        else:
            kwargs[name] = _check_value(path, fields[name], tp, value)
    obj = cls(**kwargs)
    _validate_cross_fields(obj, where)
    return obj


def _validate_cross_fields(obj: Any, where: str) -> None:
    if isinstance(obj, ModelConfig):
        from vmaescale.models.sizes import SIZES
        if obj.size not in SIZES:
            raise ConfigError(f"{where}.size: {obj.size!r} is not one of {sorted(SIZES)}")
    if isinstance(obj, OptimConfig):
        if len(obj.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in obj.betas):
            raise ConfigError(f"{where}.betas: {obj.betas!r} must be two numbers in [0, 1)")
    if isinstance(obj, DataConfig):
        _validate_data(obj, where)
    if isinstance(obj, RunConfig):
        _validate_deepspeed(obj.deepspeed)


def _validate_data(obj: "DataConfig", where: str) -> None:
    if obj.num_frames % 2:
        raise ConfigError(f"{where}.num_frames: {obj.num_frames} must be even (tubelet size 2)")
    for name, hi in (("crop_scale", 1.0), ("crop_ratio", 100.0)):
        value = getattr(obj, name)
        if (len(value) != 2 or not all(isinstance(v, (int, float)) and 0 < v <= hi for v in value)
                or value[0] > value[1]):
            raise ConfigError(f"{where}.{name}: {value!r} must be [low, high] with 0 < low <= high <= {hi}")
    if obj.rand_augment != "none":
        from vmaescale.data.augment import parse_rand_augment
        try:
            parse_rand_augment(obj.rand_augment)
        except ValueError as e:
            raise ConfigError(f"{where}.rand_augment: {e}") from e


# DeepSpeed keys that `vmaescale.train.engine.deepspeed_config` derives from the run config
# (or that the engine's client optimizer / schedule make meaningless): the `deepspeed`
# pass-through cannot set them. Key path -> what it comes from and what to set instead.
_PRECISION = "precision comes from train.precision (auto, bf16, fp32); set that instead"
DERIVED_DEEPSPEED_KEYS: dict[tuple[str, ...], str] = {
    ("train_batch_size",): "derived from train.videos_per_gpu x data.num_sample x train.grad_accum "
                           "x world size; set those instead",
    ("train_micro_batch_size_per_gpu",): "derived from train.videos_per_gpu x data.num_sample; "
                                         "set those instead",
    ("gradient_accumulation_steps",): "derived from train.grad_accum; set that instead",
    ("gradient_clipping",): "derived from optim.clip_grad; set that instead",
    ("zero_optimization", "stage"): "derived from train.zero_stage; set that instead",
    ("bf16", "enabled"): _PRECISION,
    ("bf16", "check_grad_overflow"): "always on under bf16 (train.max_bad_steps counts the skipped "
                                     "steps); set train.precision / train.max_bad_steps instead",
    ("bfloat16", "enabled"): _PRECISION,
    ("fp16", "enabled"): _PRECISION,
    ("amp", "enabled"): _PRECISION,
    ("torch_autocast", "enabled"): _PRECISION,
    ("optimizer",): "the optimizer is AdamW built from optim.* (base_lr, betas, eps, weight_decay, "
                    "layer_decay); set those instead",
    ("scheduler",): "the lr schedule is warmup + cosine from optim.base_lr / min_lr / warmup_lr and "
                    "train.warmup_steps / warmup_epochs; set those instead",
}


def _validate_deepspeed(ds: dict) -> None:
    """Refuse pass-through keys the run config derives, sections that are not objects, NaN / Inf."""
    for path, reason in DERIVED_DEEPSPEED_KEYS.items():
        node = ds
        for depth, key in enumerate(path):
            if not isinstance(node, dict) or key not in node:
                break
            where = "deepspeed." + ".".join(path[:depth + 1])
            if depth + 1 == len(path):
                raise ConfigError(f"{where}: {reason}")
            if not isinstance(node[key], dict):
                raise ConfigError(f"{where}: expected an object, got {node[key]!r}")
            node = node[key]
    _refuse_non_finite(ds, "deepspeed")


def _refuse_non_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _refuse_non_finite(item, f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]")


def flat_fields(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"model.size": "B", "optim.betas": [0.9, 0.95], ...}: non-empty
    dicts are walked, every other value is kept as it is."""
    flat = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flat_fields(value, name))
        else:
            flat[name] = value
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value); value is parsed as JSON, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a JSON run config, apply `--set` overrides, validate, return a RunConfig."""
    data = {} if path is None else read_config_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of config sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


def read_config_file(path: str | Path) -> Any:
    """The parsed JSON of a config file; ConfigError (one line) when missing, a directory or not JSON."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {path}: not found; expected a JSON run config (see configs/)")
    if p.is_dir():
        raise ConfigError(f"config file {path}: is a directory; expected a JSON run config file")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from e
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror or e})") from e
