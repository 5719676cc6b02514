"""The vmaescale checkpoint format: a directory that rebuilds its model without other input.

    out_dir/
      model.safetensors   the model's state_dict (our key names, contiguous tensors)
      vmaescale.json      {"format": "vmaescale", "version": 1, "task": "pretrain" | "classification",
                           "size": ModelSize.to_dict(), "num_frames", "image_size",
                           "decoder_depth" (pretrain) | "num_classes" and optional
                           "class_names" (classification),
                           "source": free text}

Other files in the directory (a training run's resolved `config.json`, ...) are ignored
when loading. Position tables are not stored: they follow from num_frames and image_size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vmaescale.models.classifier import VideoClassifier
from vmaescale.models.sizes import ModelSize
from vmaescale.models.videomae import VideoMAEPretrain

FORMAT = "vmaescale"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "vmaescale.json"
TASKS = ("pretrain", "classification")


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a torch.compile wrapper (whose state_dict keys carry `_orig_mod.`)."""
    return getattr(model, "_orig_mod", model)


def model_meta(model: nn.Module) -> dict:
    """Everything `build_model` needs to rebuild `model` (without the weights)."""
    model = unwrap(model)
    meta = {"format": FORMAT, "version": VERSION}
    if isinstance(model, VideoMAEPretrain):
        meta["task"] = "pretrain"
    elif isinstance(model, VideoClassifier):
        meta["task"] = "classification"
    else:
        raise TypeError(f"cannot describe a {type(model).__name__}; "
                        "accepted: VideoMAEPretrain, VideoClassifier")
    meta.update(size=model.size.to_dict(), num_frames=model.num_frames, image_size=model.image_size)
    if meta["task"] == "pretrain":
        meta["decoder_depth"] = model.decoder_depth
    else:
        meta["num_classes"] = model.num_classes
        if model.class_names:
            meta["class_names"] = list(model.class_names)
        if model.temporal != "full":
            meta["temporal"] = model.temporal
    return meta


def check_meta(meta: dict) -> None:
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"checkpoint format {meta.get('format')!r} version {meta.get('version')!r}; "
                         f"accepted: {FORMAT!r} version {VERSION}")
    if meta.get("task") not in TASKS:
        raise ValueError(f"checkpoint task {meta.get('task')!r}; accepted: {list(TASKS)}")


def build_model(meta: dict, **model_kwargs) -> nn.Module:
    """A freshly initialised model of the architecture in `meta`.

    `model_kwargs` go to the constructor (drop_path, use_checkpoint, head_dropout, ...):
    training-time settings that are not part of the architecture.
    """
    check_meta(meta)
    size = ModelSize.from_dict(meta["size"])
    shape = dict(num_frames=meta["num_frames"], image_size=meta["image_size"])
    if meta["task"] == "pretrain":
        return VideoMAEPretrain(size, decoder_depth=meta["decoder_depth"], **shape, **model_kwargs)
    return VideoClassifier(size, meta["num_classes"], **shape,
                           class_names=tuple(meta.get("class_names") or ()),
                           temporal=meta.get("temporal", "full"), **model_kwargs)


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Load every weight; missing or unexpected keys are an error that lists them."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"{origin} does not match {type(model).__name__}: "
                         f"missing keys {missing}; unexpected keys {unexpected}")
    model.load_state_dict(state_dict)


def save_model_dir(model: nn.Module, out_dir: str | Path, source: str = "",
                   extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` as a vmaescale checkpoint directory; `extra_files` maps file name -> text."""
    out = Path(out_dir)
    extra_files = extra_files or {}
    for name in extra_files:
        if Path(name).name != name or name in (WEIGHTS_FILE, META_FILE):
            raise ValueError(f"extra file name {name!r}; accepted: a plain file name other than "
                             f"{WEIGHTS_FILE} and {META_FILE}")
    out.mkdir(parents=True, exist_ok=True)
    meta = model_meta(model) | {"source": source}
    tensors = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for name, text in extra_files.items():
        (out / name).write_text(text)
    return out


def read_meta(path: str | Path) -> dict:
    """The validated `vmaescale.json` of a checkpoint directory."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a vmaescale checkpoint directory: no {META_FILE}")
    meta = json.loads(meta_path.read_text())
    check_meta(meta)
    return meta


def load_model_dir(path: str | Path, **model_kwargs) -> nn.Module:
    """Rebuild the model of a checkpoint directory and load its weights strictly (on CPU)."""
    model = build_model(read_meta(path), **model_kwargs)
    weights = Path(path) / WEIGHTS_FILE
    load_state_dict_strict(model, load_file(str(weights)), str(weights))
    return model
