"""A vmaescale classifier as an MLflow model (pyfunc flavour), with its Hugging Face export.

    model = mlflow.pyfunc.load_model("models:/vit-b-k400/1")        # or runs:/<run id>/model
    probs = model.predict(videos)      # float32 [B, 3, T, H, W], normalized like training
    probs["label"]                     # top-1 class name per video; one column per class

The logged model directory holds, next to MLflow's MLmodel file:

    artifacts/checkpoint/   the vmaescale checkpoint dir (vmaescale.json, model.safetensors)
    artifacts/hf/           `vmaescale export-hf` of it: transformers'
                            VideoMAEForVideoClassification.from_pretrained(...) loads it
    artifacts/class_names.json
    code/vmaescale/         this package, so mlflow.pyfunc.load_model needs only torch and
                            safetensors beside MLflow
    model_code.py           the model as code (MLflow "models from code"): nothing is pickled

`save_classifier_model` writes such a directory; `vmaescale.tracking.log_classifier_model`
logs it to a run and registers it.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import mlflow.pyfunc

CLASS_NAMES_FILE = "class_names.json"
MODEL_CODE = """import mlflow.models
from vmaescale.mlflow_model import VideoClassifierModel

mlflow.models.set_model(VideoClassifierModel())
"""


class VideoClassifierModel(mlflow.pyfunc.PythonModel):
    """predict: videos [B, 3, T, H, W] -> a DataFrame of class probabilities and `label`."""

    def load_context(self, context) -> None:
        from vmaescale.models.checkpoint import load_model_dir

        self.model = load_model_dir(context.artifacts["checkpoint"]).eval()
        self.class_names = json.loads(Path(context.artifacts["class_names"]).read_text())

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        video = torch.as_tensor(model_input, dtype=torch.float32)  # [B, 3, T, H, W]
        with torch.no_grad():
            probs = self.model(video).softmax(dim=-1).numpy()  # [B, classes]
        frame = pd.DataFrame(probs, columns=self.class_names)
        frame["label"] = [self.class_names[i] for i in probs.argmax(axis=1)]
        return frame


def class_names_of(checkpoint_dir: Path) -> list[str]:
    """The classifier's class names (vmaescale.json), or 'class_<i>' when it has none."""
    from vmaescale.models.checkpoint import read_meta

    meta = read_meta(checkpoint_dir)
    if meta["task"] != "classification":
        raise ValueError(f"{checkpoint_dir} holds a {meta['task']!r} checkpoint; accepted: a "
                         "classifier (a finetune or post-pretrain run's final/ or best/)")
    return list(meta.get("class_names") or [f"class_{i}" for i in range(meta["num_classes"])])


def save_classifier_model(checkpoint_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write the MLflow model directory of a classifier checkpoint dir; returns its class names."""
    from vmaescale.models.interop import export_hf

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    names = class_names_of(checkpoint_dir)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, names_file, code = Path(tmp) / "hf", Path(tmp) / CLASS_NAMES_FILE, Path(tmp) / "model_code.py"
        export_hf(checkpoint_dir, hf_dir)
        names_file.write_text(json.dumps(names))
        code.write_text(MODEL_CODE)
        artifacts = {"checkpoint": checkpoint_dir, "hf": hf_dir, "class_names": names_file}
        save_pyfunc(out_dir, code, artifacts, {"class_names": names, "source": str(checkpoint_dir.resolve())})
    return names


def save_pyfunc(out_dir: Path, code: Path, artifacts: dict[str, Path], metadata: dict) -> None:
    """mlflow.pyfunc.save_model of the model code, with this package as its code path and
    explicit requirements (no inference: it would load the model in a subprocess)."""
    import mlflow

    with warnings.catch_warnings():  # "add type hints to predict": the input is a plain array
        warnings.filterwarnings("ignore", message=".*type hints.*")
        mlflow.pyfunc.save_model(
            out_dir, python_model=str(code), artifacts={k: str(v) for k, v in artifacts.items()},
            code_paths=[str(Path(__file__).resolve().parent)],
            pip_requirements=["torch", "safetensors", "pandas", f"mlflow=={mlflow.__version__}"],
            metadata=metadata)
