"""vmaescale: VideoMAE v1/V2 pretraining and finetuning at cluster scale."""

__version__ = "0.1.0"
