"""The typed run config: one JSON file per run, the single source of truth.

Every section is a dataclass. `load_config(path, overrides)` reads JSON, applies
`--set a.b=value` overrides, and validates: unknown keys, wrong types and out-of-range
values raise `ConfigError` naming the field, the value and what is accepted, before any
process group starts. DeepSpeed's config dict is derived from this (see
`vmaescale.train.engine.deepspeed_config`), never kept as a second file.
"""

from __future__ import annotations

import dataclasses
import json
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
    shuffle_buffer: int = _f(1000, lo=0)
    test_num_segment: int = _f(5, lo=1, hi=32)
    test_num_crop: int = _f(3, choices=(1, 3))
    short_side: int = _f(224, lo=16, hi=2048)
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
    peak_tflops: float = _f(0.0, lo=0.0, help="per-device bf16 peak for MFU; 0 = look up the device")


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


@dataclass
class TrackingConfig:
    enabled: bool = _f(True)
    experiment: str = _f("vmaescale")
    run_name: str = _f("")
    tracking_uri: str = _f("", help="empty = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    system_metrics: bool = _f(True)


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
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {list(meta['choices'])}")
    if meta.get("lo") is not None and value < meta["lo"]:
        raise ConfigError(f"{where}: {value!r} is below the minimum {meta['lo']}")
    if meta.get("hi") is not None and value > meta["hi"]:
        raise ConfigError(f"{where}: {value!r} is above the maximum {meta['hi']}")
    return value


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
    data: dict = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)
