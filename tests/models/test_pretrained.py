"""Classifier init from another label set: head rows by class name, label maps, init sources."""

import json

import pytest
import torch

from vmaescale.models import VideoClassifier, VideoMAEPretrain, get_size
from vmaescale.models.checkpoint import save_model_dir
from vmaescale.models.pretrained import (head_rows, init_classifier, load_source_model, read_label_map,
                                         resolve_init)


def classifier(names, seed=0):
    torch.manual_seed(seed)
    return VideoClassifier(get_size("nano"), len(names), 4, 32, class_names=tuple(names))


def test_head_rows_move_by_class_name_and_unmatched_classes_start_fresh(tmp_path):
    source = classifier(["archery", "bowling", "cooking", "diving"], seed=1)
    with torch.no_grad():
        source.head.weight.normal_()
        source.head.bias.normal_()
    save_model_dir(source, tmp_path / "src")
    target = classifier(["diving", "surfing", "archery"], seed=2)
    fresh_row = target.head.weight[1].clone()
    spec = resolve_init(tmp_path / "src")
    model, has_head = load_source_model(spec)
    report = init_classifier(target, spec, model, has_head)
    torch.testing.assert_close(target.head.weight[0], source.head.weight[3])
    torch.testing.assert_close(target.head.weight[2], source.head.weight[0])
    torch.testing.assert_close(target.head.bias[2], source.head.bias[0])
    torch.testing.assert_close(target.head.weight[1], fresh_row)
    assert report.fresh_classes == ["surfing"] and report.carried == 2
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_official_list_label_map_is_head_of_label_map():
    rows = head_rows(("a", "b"), 2, None, 5, [4, 1])  # label_710to400.json form
    assert rows == [4, 1]
    with pytest.raises(ValueError, match="outside"):
        head_rows(("a", "b"), 2, None, 3, [4, 1])
    with pytest.raises(ValueError, match="unknown classes"):
        head_rows(("a", "b"), 2, ("x", "y"), 2, {"a": "nope"})


def test_a_pretraining_source_gives_the_encoder_and_a_fresh_head(tmp_path):
    pre = VideoMAEPretrain(get_size("nano"), 4, 32)
    save_model_dir(pre, tmp_path / "run" / "final")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"output_dir": "x", "task": "pretrain"}))
    target = classifier(["a", "b"])
    spec = resolve_init(tmp_path / "run", "final")
    model, has_head = load_source_model(spec)
    report = init_classifier(target, spec, model, has_head)
    assert report.head == "fresh" and not has_head
    torch.testing.assert_close(target.patch_embed.proj.weight, pre.encoder.patch_embed.proj.weight)
    with pytest.raises(ValueError, match="without best/"):
        resolve_init(tmp_path / "run", "best")


def test_paths_that_are_not_checkpoints_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a checkpoint file"):
        resolve_init(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="not a checkpoint"):
        resolve_init(tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_init(tmp_path / "missing")
    (tmp_path / "map.json").write_text('{"a": 3}')
    with pytest.raises(ValueError, match="accepted a JSON list"):
        read_label_map(tmp_path / "map.json")
