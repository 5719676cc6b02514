"""What every training launcher does: parse, validate before any process group, train, summarize.

    launch/pretrain.py       -> main(argv, stage="pretrain")
    launch/finetune.py       -> main(argv, stage="finetune")
    launch/post_pretrain.py  -> main(argv, stage="post-pretrain")   (the finetune task on a hybrid set)

Exit status, the same on every rank: 0 completed (or paused by train.run_steps); 75
(`vmaescale.cluster.EXIT_REQUEUE`) checkpointed on SIGTERM / SIGUSR1 or the time budget, run
it again to resume (launch/slurm/*.sbatch requeue on it); 1 a collective failed because a rank
died or hangs (the message names it); 2 a user error (bad config, busy run directory).
"""

from __future__ import annotations

import argparse
import os
import sys

from vmaescale.cli import ArgumentParser, add_debug_flag, debug_wanted, report_user_errors
from vmaescale.cluster import (EXIT_REQUEUE, is_collective_failure, single_process_accelerate_note,
                               write_status_file)
from vmaescale.config import ConfigError, load_config

EXIT_PEER_FAILED = 1
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
    elif cfg.model.temporal != "full":
        raise ConfigError(f"model.temporal: {cfg.model.temporal!r} is a classifier control; pretraining "
                          "accepts only 'full'")
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
    warn_single_process_accelerate()
    try:
        trainer = Trainer(cfg, allow_config_change=args.allow_config_change)
        summary = trainer.train()
    except RuntimeError as err:
        return report_peer_failure(launcher_name(stage), err)
    code = exit_code(summary["status"])
    if trainer.rank == 0:
        print_summary(summary)
        print_where_things_are(summary, cfg, trainer.stop.reason)
        write_status_file(summary["status"], code)
    return code


def exit_code(status: str) -> int:
    """0 when the run completed or paused (train.run_steps); EXIT_REQUEUE (75) when it
    checkpointed on a signal or the time budget: the batch scripts requeue on 75."""
    return EXIT_REQUEUE if status == "preempted" else 0


def warn_single_process_accelerate() -> None:
    import torch

    note = single_process_accelerate_note(os.environ, torch.cuda.device_count())
    if note:
        print(note, file=sys.stderr, flush=True)


def report_peer_failure(prog: str, err: RuntimeError) -> int:
    """A collective failed because a rank died or hangs: name the silent ranks and hosts in one
    line and exit 1 (the relaunch resumes); any other RuntimeError propagates."""
    from vmaescale.train.engine import peers

    group = peers()
    if group is None or group.world < 2 or not is_collective_failure(err):
        raise err
    print(f"{prog}: error: {group.describe_failure(err)}", file=sys.stderr, flush=True)
    if group.rank == 0:
        write_status_file("failed", EXIT_PEER_FAILED)
    return EXIT_PEER_FAILED


def print_where_things_are(summary: dict, cfg, stop_reason: str = "") -> None:
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
        print(f"stopped by {stop_reason or 'a signal'} after checkpointing (exit status {EXIT_REQUEUE}): "
              f"run the same command again to resume")
    if summary["status"] == "paused":
        print(f"stopped after train.run_steps at step {summary['step']}: run the same command again to resume")
