"""What every training launcher does: parse, validate before any process group, train, summarize.

    launch/pretrain.py       -> main(argv, stage="pretrain")
    launch/finetune.py       -> main(argv, stage="finetune")
    launch/post_pretrain.py  -> main(argv, stage="post-pretrain")   (the finetune task on a hybrid set)
"""

from __future__ import annotations

import argparse

from vmaescale.cli import ArgumentParser, add_debug_flag, debug_wanted, report_user_errors
from vmaescale.config import ConfigError, load_config

TASK_OF_STAGE = {"pretrain": "pretrain", "finetune": "finetune", "post-pretrain": "finetune"}


def parse_args(argv, doc: str, prog: str | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog=prog, description=doc)
    p.add_argument("--config", required=True, help="JSON run config (see configs/ and docs/configs.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config changed in a way that alters the model, "
                        "data order or optimisation (the change is logged and tagged in MLflow)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_debug_flag(p)
    return p.parse_args(argv)


def checked_config(args: argparse.Namespace, stage: str):
    """The validated run config, or a ConfigError naming the field (before any process group)."""
    cfg = load_config(args.config, args.set)
    task = TASK_OF_STAGE[stage]
    if cfg.task != task:
        raise ConfigError(f"task: {cfg.task!r}; {launcher_name(stage)} runs task {task!r}")
    if task == "finetune":
        from vmaescale.train.tasks.classify import check_finetune_config
        check_finetune_config(cfg)
    return cfg


def launcher_name(stage: str) -> str:
    return f"launch/{stage.replace('-', '_')}.py"


def main(argv, stage: str, doc: str = "") -> int:
    """Parse and run; a user error (bad config, missing file) is one line and exit status 2
    (`--debug` or VMAESCALE_DEBUG=1: the traceback)."""
    args = parse_args(argv, doc, launcher_name(stage))
    return report_user_errors(launcher_name(stage), run, args, stage, debug=debug_wanted(args))


def run(args: argparse.Namespace, stage: str) -> int:
    cfg = checked_config(args, stage)
    from vmaescale.train.engine import silence_library_deprecations
    from vmaescale.train.trainer import Trainer, print_summary

    silence_library_deprecations()
    trainer = Trainer(cfg, allow_config_change=args.allow_config_change)
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
