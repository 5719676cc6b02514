#!/usr/bin/env python
"""Run a progressive schedule (pretrain -> post-pretrain -> finetune -> evaluate) as one command.

    python launch/progressive.py --config configs/progressive_b.json --launcher "deepspeed --num_gpus 8"
    python launch/progressive.py --config configs/progressive_g.json --launcher "torchrun --nproc_per_node 8"
    python launch/progressive.py --config configs/progressive_tiny.json          # CPU demo, 2 ranks

Each stage runs as its own job under --launcher (a command prefix; the schedule's `launcher`
field by default), as a child MLflow run of one parent run. Run the same command again after
a crash: finished stages are skipped, the unfinished one resumes from its checkpoint, and the
same MLflow runs continue. A changed schedule config is refused unless --allow-config-change.
See docs/progressive.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmaescale.cli import ArgumentParser, add_debug_flag, debug_wanted, report_user_errors  # noqa: E402

PROG = "launch/progressive.py"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--config", required=True, help="JSON schedule config (configs/progressive_*.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a schedule field, e.g. --set output_dir=runs/try2 (repeatable)")
    p.add_argument("--launcher", default="",
                   help="command prefix each stage runs under, e.g. 'deepspeed --num_gpus 8', "
                        "'torchrun --nproc_per_node 8', 'srun python'; default: the schedule's launcher")
    p.add_argument("--allow-config-change", action="store_true",
                   help="go on although the schedule config changed since the first launch (also passed "
                        "to the stage launchers)")
    add_debug_flag(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from vmaescale.progressive import run_schedule
    return run_schedule(args.config, args.set, args.launcher, args.allow_config_change)


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    sys.exit(report_user_errors(PROG, run, arguments, debug=debug_wanted(arguments)))
