"""Starting weights for a classifier, and moving a head between label sets by class name.

    source = load_init("runs/k710", select="best")     # run dir, checkpoint dir, .pth, HF dir
    report = init_classifier(model, source, target_names, label_map)

Init sources (`resolve_init`, cheap: reads no weights, so a launcher can check a config
before any process group starts):
- a vmaescale run directory: its `final/` or `best/` (`select`);
- a vmaescale checkpoint directory (vmaescale.json + model.safetensors);
- a Hugging Face VideoMAE directory (config.json with model_type "videomae");
- an official VideoMAE / V2 .pth file (pretrain, finetune or encoder only).

The encoder always comes from the source. A classification source's head moves to the
target label set row by row (the official K710 -> K400 move is `head[label_map]`): by
class name, or by a label-map file; a target class with no source row starts from the
finetune init and is listed in the report. fc_norm is carried over with the head.

Label-map files (JSON): a list whose entry i is the source head row of target class i
(the official `label_710to400.json` form), or {target class name: source class name}.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vmaescale.models.checkpoint import META_FILE, load_model_dir, read_meta

@dataclass(frozen=True)
class InitSpec:
    """Where the starting weights are, what kind of source it is, and its class names."""

    kind: str  # "vmaescale" | "huggingface" | "official"
    path: Path
    class_names: tuple[str, ...] | None  # None: the source does not name its classes
    num_classes: int | None  # head rows of a classification source, else None


@dataclass
class InitReport:
    source: str
    kind: str
    head: str  # "re-indexed", "fresh"
    carried: int = 0
    fresh_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [f"init: {self.kind} {self.source}", *self.notes]
        if self.head == "re-indexed":
            lines.append(f"head: {self.carried} class rows carried over, {len(self.fresh_classes)} fresh"
                         + (f": {self.fresh_classes}" if self.fresh_classes else ""))
        else:
            lines.append("head: freshly initialised (the source has no classifier head)")
        return lines


def _vmaescale_spec(path: Path) -> InitSpec:
    meta = read_meta(path)
    names = tuple(meta["class_names"]) if meta.get("class_names") else None
    return InitSpec("vmaescale", path, names, meta.get("num_classes"))


def resolve_init(path: str | Path, select: str = "final", what: str = "finetune.init") -> InitSpec:
    """The init source at `path`, or an error saying what `path` (the value of `what`) is
    and what is accepted."""
    p = Path(path)
    where = f"{what}={str(path)!r}"
    if not p.exists():
        raise FileNotFoundError(f"{where}: no such file or directory")
    if p.is_dir():
        if (p / META_FILE).is_file():
            return _vmaescale_spec(p)
        if (p / select / META_FILE).is_file():
            return _vmaescale_spec(p / select)
        config = p / "config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            if data.get("model_type") == "videomae":
                from vmaescale.models.interop import hf_class_names
                names = hf_class_names(data)
                is_classifier = "VideoMAEForVideoClassification" in (data.get("architectures") or [])
                rows = len(data.get("id2label") or {}) if is_classifier else None
                return InitSpec("huggingface", p, tuple(names) if names else None, rows)
            if "output_dir" in data and "task" in data:  # a vmaescale run dir without that stage's weights
                raise ValueError(f"{where}: a vmaescale run dir without {select}/ (finished runs write "
                                 "final/, validated finetunes best/); set finetune.init_select or wait "
                                 "for the run to finish")
        raise ValueError(f"{where} is a directory but not a checkpoint; accepted: a vmaescale run dir "
                         f"(with {select}/), a vmaescale checkpoint dir ({META_FILE}), or a Hugging Face "
                         "VideoMAE dir (config.json + weights)")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{where} is not a checkpoint file; accepted: an official VideoMAE / V2 .pth "
                         "(torch.save zip), or a directory (vmaescale run / checkpoint, Hugging Face)")
    return InitSpec("official", p, None, None)


def load_source_model(spec: InitSpec, allow_pickle: bool = False) -> tuple[nn.Module, bool]:
    """(the source as a vmaescale model on the CPU, whether it has a trained head).

    An encoder-only source (no decoder, no head) comes back as a classifier whose one-row
    head is not trained, hence False."""
    if spec.kind == "vmaescale":
        model = load_model_dir(spec.path)
        return model, hasattr(model, "head")
    from vmaescale.models.interop import import_hf, import_official, load_official_state_dict
    if spec.kind == "huggingface":
        model = import_hf(spec.path, num_classes=None if spec.num_classes else _encoder_classes(spec)).model
        return model, spec.num_classes is not None
    task = load_official_state_dict(spec.path, allow_pickle).task
    encoder_only = task == "encoder"
    model = import_official(spec.path, num_classes=1 if encoder_only else None,
                            allow_pickle=allow_pickle).model
    return model, hasattr(model, "head") and not encoder_only


def _encoder_classes(spec: InitSpec) -> int | None:
    """import_hf needs a class count for a bare VideoModel (no decoder, no head)."""
    from vmaescale.models.interop import hf_task, read_hf_weights, with_videomae_prefix
    return 1 if hf_task(with_videomae_prefix(read_hf_weights(spec.path))) == "encoder" else None


def read_label_map(path: str | Path) -> list[int] | dict[str, str]:
    """A label-map file: a list of source rows, or {target name: source name}."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in data):
        return data
    if isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return data
    raise ValueError(f"finetune.label_map={str(path)!r}: accepted a JSON list of source head rows "
                     "(entry i for target class i) or an object {target class name: source class name}")


def head_rows(target_names: tuple[str, ...], num_classes: int, source_names: tuple[str, ...] | None,
              source_rows: int, label_map: list[int] | dict[str, str] | None) -> list[int | None]:
    """Per target class, the source head row it starts from (None = fresh).

    Raises ValueError for a label map that names unknown classes or rows out of range."""
    if isinstance(label_map, list):
        if len(label_map) != num_classes:
            raise ValueError(f"finetune.label_map has {len(label_map)} entries; the target has "
                             f"{num_classes} classes")
        bad = [r for r in label_map if not 0 <= r < source_rows]
        if bad:
            raise ValueError(f"finetune.label_map rows {bad[:5]} are outside the source head's "
                             f"[0, {source_rows})")
        return list(label_map)
    if label_map is not None:
        if not target_names:
            raise ValueError("finetune.label_map names classes, but the target shards have no labels.json")
        if source_names is None:
            raise ValueError("finetune.label_map names classes, but the source does not name its "
                             "classes; use the list form (entry i = source row of target class i)")
        unknown_target = sorted(set(label_map) - set(target_names))
        unknown_source = sorted(set(label_map.values()) - set(source_names))
        if unknown_target or unknown_source:
            raise ValueError(f"finetune.label_map names unknown classes: target {unknown_target[:5]}, "
                             f"source {unknown_source[:5]}")
        row_of = {name: i for i, name in enumerate(source_names)}
        return [row_of[label_map[name]] if name in label_map else
                row_of.get(name) for name in target_names]
    if source_names is not None and target_names:
        row_of = {name: i for i, name in enumerate(source_names)}
        return [row_of.get(name) for name in target_names]
    if source_rows == num_classes:
        return list(range(num_classes))  # unnamed on one side: same classes in the same order
    return [None] * num_classes


def encoder_state(source: nn.Module) -> dict[str, torch.Tensor]:
    """The source's encoder weights in classifier names (no final norm, decoder or head)."""
    state = source.state_dict()
    prefix = getattr(source, "encoder_prefix", "")
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        bare = key[len(prefix):]
        if bare.startswith(("patch_embed.", "blocks.")):
            out[bare] = value
    return out


@torch.no_grad()
def init_classifier(model: nn.Module, spec: InitSpec, source: nn.Module, has_head: bool,
                    label_map: list[int] | dict[str, str] | None = None) -> InitReport:
    """Load the source's encoder into `model`; carry its head rows over by class name."""
    report = InitReport(str(spec.path), spec.kind, "fresh")
    model.load_pretrained_encoder(encoder_state(source))
    if not has_head:
        return report
    rows = head_rows(model.class_names, model.num_classes, spec.class_names,
                     source.head.weight.shape[0], label_map)
    report.head = "re-indexed"
    for target, row in enumerate(rows):
        if row is None:
            report.fresh_classes.append(model.class_names[target] if model.class_names else str(target))
            continue
        model.head.weight[target] = source.head.weight[row].to(model.head.weight)
        model.head.bias[target] = source.head.bias[row].to(model.head.bias)
        report.carried += 1
    model.fc_norm.load_state_dict(source.fc_norm.state_dict())
    return report
