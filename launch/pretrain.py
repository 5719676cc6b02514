#!/usr/bin/env python
"""Pretrain a VideoMAE / VideoMAE V2 model.

    deepspeed --num_gpus 8 launch/pretrain.py --config configs/b.json
    torchrun --nproc_per_node 8 launch/pretrain.py --config configs/b.json --set train.max_steps=100
    python launch/pretrain.py --config configs/tiny.json          # one process

The config is validated before any process group starts. A run whose output directory
holds a checkpoint resumes from it (a new world size goes through Universal Checkpointing).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmaescale.train.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "pretrain", __doc__))
