#!/usr/bin/env python
"""Supervised post-pretraining (VideoMAE V2): the finetune stage on a labeled hybrid set (K710).

    deepspeed --num_gpus 8 launch/post_pretrain.py --config configs/g_k710_post_pretrain.json

The same task as launch/finetune.py with another config: its final/ or best/ is what a
finetune on the target set (K400, ...) starts from, its head re-indexed by class name.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmaescale.train.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "post-pretrain", __doc__))
