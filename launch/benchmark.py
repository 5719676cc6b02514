#!/usr/bin/env python
"""Training throughput: clips/s per device, MFU and peak memory, with in-memory input and
with the real loader, so the cost of data loading is visible.

    python launch/benchmark.py --config configs/b.json --input synthetic --steps 20
    python launch/benchmark.py --config configs/tiny.json --input both --shards demo/shards
    torchrun --nproc_per_node 8 launch/benchmark.py --config configs/g.json --input synthetic

Runs the real DeepSpeed engine (same set-up as launch/pretrain.py, no checkpoints, no
tracking). `--input both` runs one process per input kind and prints both rows.

    python launch/benchmark.py --config configs/tiny.json --engine torch --compare hf

`--engine torch` times the model with plain torch AdamW, no DeepSpeed (one process, in-memory
clips); `--compare hf` adds transformers' VideoMAEForPreTraining of the same size, clip,
batch and v1 tube mask, interleaved step by step, and prints the ratios (launch/bench_compare.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmaescale.cli import ArgumentParser, add_debug_flag, debug_wanted, report_user_errors  # noqa: E402
from vmaescale.config import load_config  # noqa: E402

PROG = "launch/benchmark.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--config", required=True, help="JSON run config (see configs/ and docs/configs.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--input", choices=("synthetic", "loader", "both"), default="synthetic",
                   help="in-memory clips, the real loader, or one process for each")
    p.add_argument("--shards", default="", help="shards for --input loader (default: the config's)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--json", default="", help="append the result as one JSON line to this file")
    p.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed",
                   help="deepspeed = the training engine; torch = the model with plain AdamW")
    p.add_argument("--compare", choices=("none", "hf"), default="none",
                   help="hf = also time transformers' VideoMAEForPreTraining (implies --engine torch)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_debug_flag(p)
    return p.parse_args(argv)


def run_both(args) -> int:
    """One fresh process per input kind (an engine per process), then both rows."""
    rows = []
    for kind in ("synthetic", "loader"):
        with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as out:
            cmd = [sys.executable, __file__, "--config", args.config, "--input", kind,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", out.name,
                   "--shards", args.shards, *[a for s in args.set for a in ("--set", s)],
                   *(["--debug"] if debug_wanted(args) else [])]
            done = subprocess.run(cmd)
            if done.returncode:  # the child printed its error
                return done.returncode
            rows += [json.loads(line) for line in out.read().splitlines()]
    print_table(rows)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


def measure(args) -> dict:
    import torch

    from vmaescale.train.engine import silence_library_deprecations
    from vmaescale.train.trainer import Trainer

    overrides = ["tracking.enabled=false", f"output_dir={tempfile.mkdtemp(prefix='vmaescale-bench-')}",
                 *args.set]
    if args.input == "synthetic":
        overrides.append("data.backend=synthetic")
    elif args.shards:
        overrides.append(f"data.shards={args.shards}")
    cfg = load_config(args.config, overrides)
    silence_library_deprecations()
    run = Trainer(cfg)
    it = iter(run.loader)
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    data_s = 0.0
    clips = 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync()
            if run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start, data_s, clips = time.perf_counter(), 0.0, 0
        for _ in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch, it = run._next_batch(it)
            data_s += time.perf_counter() - t0
            run.forward_backward(batch)
            clips += batch["video"].shape[0]
    sync()
    elapsed = time.perf_counter() - start
    from vmaescale.train.trainer import peak_memory_gb

    per_device = clips / elapsed
    return {"model": cfg.model.size, "input": args.input, "backend": getattr(run.loader, "backend", "?"),
            "device": run._device_name(), "world_size": run.world, "precision": run.precision,
            "zero_stage": cfg.train.zero_stage, "clips_per_step": cfg.train.videos_per_gpu * cfg.data.num_sample,
            "frames": cfg.data.num_frames, "image_size": cfg.data.image_size,
            "checkpointing": cfg.model.checkpoint_activations,
            "clips_per_s_per_device": per_device,
            "mfu": run.model_flops_utilization(per_device),
            "train_tflops_per_clip": run.train_flops_per_clip / 1e12,
            "data_wait_frac": data_s / elapsed, "peak_mem_gb": peak_memory_gb(run.device),
            "steps": args.steps}


def print_table(rows: list[dict]) -> None:
    from vmaescale.train.trainer import mfu_text
    header = f"{'model':<6}{'input':<10}{'backend':<10}{'device':<24}{'prec':<6}{'clips/s/dev':>12}{'MFU %':>8}{'data %':>8}{'peak GB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<6}{r['input']:<10}{r['backend']:<10}{r['device'][:23]:<24}{r['precision']:<6}"
              f"{r['clips_per_s_per_device']:>12.2f}{mfu_text(r['mfu']):>8}{r['data_wait_frac'] * 100:>8.1f}"
              f"{r['peak_mem_gb']:>9.2f}")


def main(argv=None) -> int:
    """A user error (bad config, missing shards) is one line and exit status 2."""
    args = parse_args(argv)
    return report_user_errors(PROG, run, args, debug=debug_wanted(args))


def run_torch(args: argparse.Namespace) -> int:
    """--engine torch / --compare hf: one process, no DeepSpeed (see launch/bench_compare.py)."""
    from bench_compare import measure_torch, print_comparison

    cfg = load_config(args.config, ["tracking.enabled=false", *args.set])
    rows = measure_torch(cfg, args.steps, args.warmup, args.compare)
    print_comparison(rows)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.engine == "torch" or args.compare != "none":
        return run_torch(args)
    if args.input == "both":
        return run_both(args)
    row = measure(args)
    import torch.distributed as dist
    if dist.get_rank() == 0:
        print_table([row])
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
