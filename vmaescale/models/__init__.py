"""Single-device model code: no deepspeed, DALI or mlflow imports anywhere in this package."""

from vmaescale.models.classifier import VideoClassifier
from vmaescale.models.sizes import SIZES, ModelSize, get_size
from vmaescale.models.videomae import VideoMAEPretrain

__all__ = ["SIZES", "ModelSize", "VideoClassifier", "VideoMAEPretrain", "get_size"]
