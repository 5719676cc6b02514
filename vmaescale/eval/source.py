"""The model an evaluation command reads: a run dir, a checkpoint dir, an official .pth or a
Hugging Face dir, loaded on the CPU without writing anything next to the source.

    source = open_source("runs/k400_ft")          # best/ if the run has one, else final/
    source = open_source("hf/videomae-base")      # imported on the fly (transformers dir)

A run directory also gives its run config (clip stride, tracking) and its MLflow run id,
so results are logged to the run that made the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vmaescale.models.checkpoint import META_FILE

SELECTS = ("auto", "best", "final")


@dataclass
class ModelSource:
    """A loaded model and where it came from."""

    model: nn.Module
    kind: str  # "vmaescale" | "huggingface" | "official"
    path: Path  # the weights: checkpoint dir, HF dir or .pth
    has_head: bool  # a trained classifier head (False for pretraining and encoder-only sources)
    run_dir: Path | None = None  # the vmaescale run that wrote them
    run_config: dict | None = None  # that run's config.json

    @property
    def is_classifier(self) -> bool:
        return hasattr(self.model, "head")

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(getattr(self.model, "class_names", ()) or ())

    def describe(self) -> str:
        return f"{self.kind} {self.path}"

    def mlflow_run_id(self) -> str | None:
        """The MLflow run of the run dir (its newest checkpoint's run state), if any."""
        if self.run_dir is None:
            return None
        from vmaescale.train.checkpoint import checkpoint_meta, latest_tag
        ckpt_dir = self.run_dir / "checkpoints"
        tag = latest_tag(ckpt_dir)
        if tag is None:
            return None
        try:
            return checkpoint_meta(ckpt_dir, tag)["run_state"].get("mlflow_run_id")
        except (OSError, KeyError, ValueError):
            return None

    def run_field(self, section: str, name: str, default):
        """A field of the run's config (e.g. data.sampling_rate), else `default`."""
        return ((self.run_config or {}).get(section) or {}).get(name, default)


def is_run_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file() or (path / META_FILE).is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "output_dir" in data and "task" in data


def weights_of_run(run_dir: Path, select: str) -> Path:
    """best/ or final/ of a run dir (`select` auto: best/ when it exists, else final/)."""
    if select not in SELECTS:
        raise ValueError(f"select={select!r}: accepted values are {list(SELECTS)}")
    names = ("best", "final") if select == "auto" else (select,)
    for name in names:
        if (run_dir / name / META_FILE).is_file():
            return run_dir / name
    raise FileNotFoundError(f"{run_dir} is a vmaescale run dir without {' or '.join(n + '/' for n in names)}"
                            "; finished runs write final/ (validated finetunes also best/)")


def open_source(src: str | Path, select: str = "auto", allow_pickle: bool = False,
                what: str = "SRC") -> ModelSource:
    """Load the model at `src` (see the module doc); errors name `src` and what is accepted."""
    from vmaescale.models.pretrained import load_source_model, resolve_init

    path = Path(src)
    run_dir = None
    if path.is_dir() and is_run_dir(path):
        run_dir, path = path, weights_of_run(path, select)
    elif path.is_dir() and (path / META_FILE).is_file() and is_run_dir(path.parent):
        run_dir = path.parent
    spec = resolve_init(path, "final", what=what)
    model, has_head = load_source_model(spec, allow_pickle)
    run_config = json.loads((run_dir / "config.json").read_text()) if run_dir else None
    return ModelSource(model.eval(), spec.kind, spec.path, has_head, run_dir, run_config)


def compute_device(name: str = "") -> torch.device:
    """--device, else cuda when there is a GPU, else the CPU."""
    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")
