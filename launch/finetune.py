#!/usr/bin/env python
"""Finetune a VideoMAE classifier (mean pooling, fc_norm, head) on a labeled shard set.

    deepspeed --num_gpus 8 launch/finetune.py --config configs/b_k400_ft.json
    torchrun --nproc_per_node 8 launch/finetune.py --config configs/g_k710_to_k400_ft.json
    deepspeed --num_gpus 2 launch/finetune.py --config configs/tiny_finetune.json   # CPU demo

finetune.init names the starting weights: a vmaescale run dir (its final/ or best/, see
finetune.init_select), a vmaescale checkpoint dir, an official VideoMAE / V2 .pth, a
Hugging Face dir, or '' for a random init. The config (labels, init, label map) is checked
before any process group starts; a run with a checkpoint in its output dir resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmaescale.train.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "finetune", __doc__))
