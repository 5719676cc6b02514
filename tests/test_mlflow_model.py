"""A classifier logged as an MLflow model and registered, on a real sqlite store: loaded back
through mlflow.pyfunc (by run and by registered name) and through transformers."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

from vmaescale.config import TrackingConfig
from vmaescale.models.checkpoint import load_model_dir, save_model_dir
from vmaescale.models.classifier import VideoClassifier
from vmaescale.models.sizes import get_size
from vmaescale.tracking import MODEL_URI_TAG, Tracker, log_classifier_model

CLASSES = ("left", "right", "still", "up")


@pytest.fixture
def classifier_dir(tmp_path):
    torch.manual_seed(0)
    model = VideoClassifier(get_size("nano"), num_classes=4, num_frames=4, image_size=32,
                            init_scale=1.0, class_names=CLASSES)
    return save_model_dir(model, tmp_path / "final", source="test")


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run on a fresh sqlite store, which MLflow's fluent API (pyfunc.load_model) also uses
    for this test only."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    tracker = Tracker(TrackingConfig(experiment="models", tracking_uri=uri, system_metrics=False),
                      rank=0, output_dir="schedule", run_config={})
    return uri, tracker.run_id


def test_a_logged_classifier_loads_back_through_pyfunc_with_the_same_predictions(classifier_dir, run):
    import mlflow.pyfunc

    uri, run_id = run
    logged = log_classifier_model(uri, run_id, classifier_dir)
    assert logged == {"model_uri": f"runs:/{run_id}/model", "registered": None}
    assert MlflowClient(uri).get_run(run_id).data.tags[MODEL_URI_TAG] == logged["model_uri"]
    model = mlflow.pyfunc.load_model(logged["model_uri"])
    assert model.metadata.metadata["class_names"] == list(CLASSES)
    video = torch.randn(3, 3, 4, 32, 32)
    got = model.predict(video.numpy())
    with torch.no_grad():
        expected = load_model_dir(classifier_dir).eval()(video).softmax(-1)
    assert list(got.columns) == [*CLASSES, "label"]
    torch.testing.assert_close(torch.tensor(got[list(CLASSES)].to_numpy()), expected, rtol=1e-5, atol=1e-6)
    assert list(got["label"]) == [CLASSES[i] for i in expected.argmax(-1)]


def test_a_registered_classifier_is_found_by_name_and_its_hf_export_loads_in_transformers(
        classifier_dir, run, tmp_path):
    import mlflow.artifacts
    import mlflow.pyfunc
    import transformers

    uri, run_id = run
    first = log_classifier_model(uri, run_id, classifier_dir, registry_name="tiny-motion")
    assert first["registered"] == "tiny-motion/1"
    assert log_classifier_model(uri, run_id, classifier_dir, "tiny-motion")["registered"] == "tiny-motion/2"
    client = MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions("name = 'tiny-motion'")
    assert sorted(int(v.version) for v in versions) == [1, 2] and {v.run_id for v in versions} == {run_id}
    by_name = mlflow.pyfunc.load_model("models:/tiny-motion/1")
    assert list(by_name.predict(torch.zeros(1, 3, 4, 32, 32).numpy()).columns)[:4] == list(CLASSES)
    local = mlflow.artifacts.download_artifacts(f"{first['model_uri']}/artifacts", dst_path=str(tmp_path / "dl"),
                                                tracking_uri=uri)
    hf = transformers.VideoMAEForVideoClassification.from_pretrained(f"{local}/hf")
    assert [hf.config.id2label[i] for i in range(4)] == list(CLASSES)
    assert json.loads((tmp_path / "dl" / "artifacts" / "class_names.json").read_text()) == list(CLASSES)


def test_a_pretraining_checkpoint_is_refused_naming_what_is_accepted(tmp_path, run):
    from vmaescale.models.videomae import VideoMAEPretrain

    pretrain = save_model_dir(VideoMAEPretrain(get_size("nano"), num_frames=4, image_size=32), tmp_path / "p")
    with pytest.raises(ValueError, match="'pretrain' checkpoint; accepted: a classifier"):
        log_classifier_model(run[0], run[1], pretrain)
