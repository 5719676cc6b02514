"""What every training launcher does: parse, validate before any process group, train, summarize.

    launch/pretrain.py       -> main(argv, stage="pretrain")
    launch/finetune.py       -> main(argv, stage="finetune")
    launch/post_pretrain.py  -> main(argv, stage="post-pretrain")   (the finetune task on a hybrid set)
"""

from __future__ import annotations

import argparse
import sys

from vmaescale.config import ConfigError, load_config

TASK_OF_STAGE = {"pretrain": "pretrain", "finetune": "finetune", "post-pretrain": "finetune"}


def parse_args(argv, doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="JSON run config (see configs/ and docs/configs.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def checked_config(args: argparse.Namespace, stage: str):
    """The validated run config, or a ConfigError naming the field (before any process group)."""
    cfg = load_config(args.config, args.set)
    task = TASK_OF_STAGE[stage]
    if cfg.task != task:
        raise ConfigError(f"task: {cfg.task!r}; launch/{stage.replace('-', '_')}.py runs task {task!r}")
    if task == "finetune":
        from vmaescale.train.tasks.classify import check_finetune_config
        check_finetune_config(cfg)
    return cfg


def main(argv, stage: str, doc: str = "") -> int:
    args = parse_args(argv, doc)
    try:
        cfg = checked_config(args, stage)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from vmaescale.train.engine import silence_library_deprecations
    from vmaescale.train.trainer import Trainer, print_summary

    silence_library_deprecations()
    trainer = Trainer(cfg)
    summary = trainer.train()
    if trainer.rank == 0:
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
