#!/usr/bin/env python
"""Pretrain a VideoMAE / VideoMAE V2 model.

    deepspeed --num_gpus 8 launch/pretrain.py --config configs/b.json
    torchrun --nproc_per_node 8 launch/pretrain.py --config configs/b.json --set train.max_steps=100
    python launch/pretrain.py --config configs/tiny.json          # one process

The config is validated before any process group starts. A run whose output directory
holds a checkpoint resumes from it (a new world size goes through Universal Checkpointing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmaescale.config import ConfigError, load_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="JSON run config (see configs/ and docs/configs.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.task != "pretrain":
        print(f"config error: task: {cfg.task!r}; launch/pretrain.py runs task 'pretrain'", file=sys.stderr)
        return 2
    from vmaescale.train.engine import silence_library_deprecations
    from vmaescale.train.pretrain import Pretraining, print_summary

    silence_library_deprecations()
    run = Pretraining(cfg)
    summary = run.train()
    if run.rank == 0:
        print_summary(summary)
        print_where_things_are(summary, cfg)
    return 0


def print_where_things_are(summary: dict, cfg) -> None:
    print(f"\ncheckpoint      {summary['checkpoint']}")
    if summary.get("final"):
        print(f"final weights   {summary['final']}  (vmaescale export-hf {summary['final']} OUT_DIR)")
    if summary.get("reconstruction"):
        print(f"reconstruction  {summary['reconstruction']['path']}")
    if summary.get("mlflow_run_id"):
        uri = cfg.tracking.tracking_uri or "sqlite:///mlflow.db"
        print(f"mlflow run      {summary['mlflow_run_id']} in experiment '{cfg.tracking.experiment}'")
        print(f"open the UI     mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
    if summary["status"] == "preempted":
        print("stopped by a signal after checkpointing: run the same command again to resume")
    if summary["status"] == "paused":
        print(f"stopped after train.run_steps at step {summary['step']}: run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
