"""A bad finetune config is refused before any process group starts, naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmaescale.models import VideoClassifier, get_size
from vmaescale.models.checkpoint import save_model_dir
from vmaescale.train.launch import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    """The launcher must refuse before it builds the trainer (which starts the process group)."""
    import vmaescale.train.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the launcher built a Trainer: a process group would have started")

    monkeypatch.setattr(trainer.Trainer, "__init__", refuse)


def launch(shards: Path, tmp_path: Path, *overrides: str, capsys=None) -> tuple[int, str]:
    sets = [f"data.shards={shards}", f"output_dir={tmp_path / 'run'}", "finetune.init=", *overrides]
    code = main(["--config", str(REPO / "configs" / "tiny_finetune.json"),
                 *[a for s in sets for a in ("--set", s)]], "finetune")
    return code, capsys.readouterr().err


def test_num_classes_disagreeing_with_the_label_names_is_refused(vp9_shards, tmp_path, capsys):
    code, err = launch(vp9_shards, tmp_path, "finetune.num_classes=5", capsys=capsys)
    assert code == 2 and "finetune.num_classes: 5 disagrees with the 4 class names" in err


def test_an_init_path_that_is_not_a_checkpoint_is_refused(vp9_shards, tmp_path, capsys):
    (tmp_path / "weights.txt").write_text("not weights")
    code, err = launch(vp9_shards, tmp_path, f"finetune.init={tmp_path / 'weights.txt'}", capsys=capsys)
    assert code == 2 and "finetune.init=" in err and "not a checkpoint" in err
    code, err = launch(vp9_shards, tmp_path, f"finetune.init={tmp_path / 'nowhere'}", capsys=capsys)
    assert code == 2 and "no such file or directory" in err


def test_a_label_map_naming_unknown_classes_is_refused(vp9_shards, tmp_path, capsys):
    source = VideoClassifier(get_size("nano"), 2, 4, 32, class_names=("jump", "run"))
    save_model_dir(source, tmp_path / "src")
    names = list(json.loads((vp9_shards / "labels.json").read_text()))
    (tmp_path / "map.json").write_text(json.dumps({names[0]: "swim"}))
    code, err = launch(vp9_shards, tmp_path, f"finetune.init={tmp_path / 'src'}",
                       f"finetune.label_map={tmp_path / 'map.json'}", capsys=capsys)
    assert code == 2 and "finetune.label_map names unknown classes" in err and "swim" in err


def test_ema_under_zero3_and_odd_mixup_batches_are_refused(vp9_shards, tmp_path, capsys):
    code, err = launch(vp9_shards, tmp_path, "finetune.model_ema=true", "train.zero_stage=3", capsys=capsys)
    assert code == 2 and "finetune.model_ema" in err
    code, err = launch(vp9_shards, tmp_path, "train.videos_per_gpu=3", "data.num_sample=1", capsys=capsys)
    assert code == 2 and "train.videos_per_gpu" in err and "even" in err
