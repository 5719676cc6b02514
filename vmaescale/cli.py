"""`vmaescale` command line: one subcommand per job, each a thin wrapper over the package.

A user error (bad config, bad argument, missing file) is one line on stderr,
`vmaescale <command>: error: ...`, and exit status 2; `--debug` (or VMAESCALE_DEBUG=1)
shows the traceback instead. The launchers (launch/*.py) and data_tools/*.py use the same
helpers: `ArgumentParser`, `add_debug_flag`, `report_user_errors`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

# ConfigError is a ValueError; OSError covers FileNotFoundError, IsADirectoryError, PermissionError.
USER_ERRORS = (ValueError, OSError, KeyError)
USER_ERROR_EXIT = 2
DEBUG_ENV = "VMAESCALE_DEBUG"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (not None, '' or [], whose help says what happens)
    and keeps the description's own line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default in ("", []):
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help and usage errors in one line (exit status 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(USER_ERROR_EXIT, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"on an error, show the full traceback (also: {DEBUG_ENV}=1)")


def debug_wanted(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines)


def error_text(err: BaseException) -> str:
    """The message of an error in one line (a KeyError's without its repr quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return one_line(text) or type(err).__name__


def report_user_errors(prog: str, func: Callable[..., int | None], *args, debug: bool = False) -> int:
    """func(*args); a user error becomes `prog: error: <one line>` (`prog: config error: ...` for a
    ConfigError) on stderr and exit status 2."""
    from vmaescale.config import ConfigError

    try:
        return func(*args) or 0
    except USER_ERRORS as err:
        if debug or debug_wanted():
            raise
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"{prog}: {kind}: {error_text(err)}", file=sys.stderr)
        return USER_ERROR_EXIT


# ---------------------------------------------------------------- flops


def _add_flops(sub) -> None:
    p = sub.add_parser("flops", help="multiply-accumulates per clip (encoder, decoder, total)",
                       description="Analytic multiply-accumulates per clip and training FLOPs (6 x MACs).")
    p.add_argument("--model", default="B", help="model size: S, B, L, H, g, tiny, nano")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--image-size", type=int, default=224, help="clip side in px")
    p.add_argument("--mask", default="tube:0.9",
                   help="encoder mask NAME:RATIO (tube, random, frame; ratio in [0, 1)), or 'none' (finetune view)")
    p.add_argument("--decoder-mask", default="none", help="running_cell:RATIO (ratio in [0, 1)), or 'none' (v1)")
    p.add_argument("--decoder-depth", type=int, default=4, help="decoder blocks")
    add_debug_flag(p)
    p.set_defaults(func=_run_flops)


def _run_flops(args) -> int:
    from vmaescale.models.flops import clip_macs, parse_mask_arg
    from vmaescale.models.sizes import get_size

    mask, ratio = parse_mask_arg(args.mask)
    dmask, dratio = parse_mask_arg(args.decoder_mask)
    m = clip_macs(get_size(args.model), args.frames, args.image_size, mask, ratio, dmask,
                  dratio, args.decoder_depth)
    print(f"model {args.model}  frames {args.frames}  image {args.image_size}  "
          f"mask {args.mask}  decoder mask {args.decoder_mask}")
    print(f"tokens: visible {m.visible_tokens}  decoder {m.decoder_tokens}  predicted {m.predicted_tokens}")
    print(f"{'part':<10}{'GMACs/clip':>14}")
    for name, value in (("encoder", m.encoder), ("decoder", m.decoder), ("total", m.total)):
        print(f"{name:<10}{value / 1e9:>14.2f}")
    print(f"training FLOPs per clip (6 x MACs): {m.training_flops / 1e9:.1f} G")
    return 0


# ---------------------------------------------------------------- checkpoint interop


def _add_import(sub) -> None:
    from vmaescale.models.interop import DEFAULT_IMAGE_SIZE, DEFAULT_NUM_FRAMES

    p = sub.add_parser(
        "import-checkpoint", help="official VideoMAE/V2 .pth or Hugging Face dir -> vmaescale checkpoint dir",
        description="Import an official VideoMAE / V2 checkpoint (.pth: pretrain, finetune or encoder only) "
                    "or a Hugging Face VideoMAE dir into a vmaescale checkpoint dir, and print what was "
                    "detected. Official files carry no clip shape or head counts: see the flags.")
    p.add_argument("src", help="official .pth file or Hugging Face dir (config.json + weights)")
    p.add_argument("out", help="output vmaescale checkpoint dir")
    p.add_argument("--num-frames", type=int, default=None,
                   help=f"clip frames (official default {DEFAULT_NUM_FRAMES}; HF: config.json)")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"clip side in px (official default {DEFAULT_IMAGE_SIZE}; HF: config.json)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="encoder heads (official default: standard count for the width)")
    p.add_argument("--decoder-heads", type=int, default=None,
                   help="decoder heads (official default: standard count for the width)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="for encoder-only sources: classes of the freshly initialised head")
    p.add_argument("--allow-pickle", action="store_true",
                   help="official files that a weights-only load refuses; only for files you trust")
    add_debug_flag(p)
    p.set_defaults(func=_run_import)


def _run_import(args) -> int:
    from vmaescale.models.checkpoint import save_model_dir
    from vmaescale.models.interop import import_checkpoint

    result = import_checkpoint(args.src, num_frames=args.num_frames, image_size=args.image_size,
                               num_heads=args.num_heads, decoder_heads=args.decoder_heads,
                               num_classes=args.num_classes, allow_pickle=args.allow_pickle)
    out = save_model_dir(result.model, args.out, source=result.summary())
    print(result.summary())
    print(f"wrote {out}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export-hf", help="vmaescale checkpoint dir -> Hugging Face transformers dir",
        description="Write config.json + model.safetensors for transformers' VideoMAEForPreTraining "
                    "(pretrain checkpoints) or VideoMAEForVideoClassification (classifiers).")
    p.add_argument("ckpt", help="vmaescale checkpoint dir, e.g. a training run's final/")
    p.add_argument("out_dir", help="output Hugging Face dir")
    add_debug_flag(p)
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from vmaescale.models.interop import export_hf

    for note in export_hf(args.ckpt, args.out_dir):
        print(note)
    print(f"wrote {args.out_dir}")
    return 0


# ---------------------------------------------------------------- runs


def _add_runs(sub) -> None:
    p = sub.add_parser("runs", help="look at MLflow runs: `runs compare`",
                       description="Look at MLflow runs without writing code.")
    runs_sub = p.add_subparsers(dest="runs_command", required=True, metavar="RUNS_COMMAND")
    c = runs_sub.add_parser(
        "compare", help="params that differ, final metrics, stages as a tree, metric curves",
        description="Compare MLflow runs: the parameters that differ between them and their final "
                    "metrics; a parent run (a schedule) shows its stages as a tree under it.\n\n"
                    "  vmaescale runs compare --experiment vit-g\n"
                    "  vmaescale runs compare RUN_ID RUN_ID --metric val_top1 --format csv\n"
                    "  vmaescale runs compare --experiment demo --metric loss --plot curves.png",
        formatter_class=HelpFormatter)
    c.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to compare (with their child runs)")
    c.add_argument("--experiment", default="", help="compare every run of this experiment")
    c.add_argument("--metric", action="append", default=[], metavar="M",
                   help="a metric to show and plot (repeatable); default: those of loss, val_loss, "
                        "val_top1, val_top5, test_top1, test_top5, test_mean_class_accuracy, "
                        "recon_psnr the runs have")
    c.add_argument("--format", default="table", choices=("table", "csv", "json"), help="output format")
    c.add_argument("--plot", default="", metavar="PNG",
                   help="write the chosen metrics' full histories against step to this PNG")
    c.add_argument("--tracking-uri", default="",
                   help="MLflow store or server; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    add_debug_flag(c)
    c.set_defaults(func=_run_runs_compare)


def _run_runs_compare(args) -> int:
    from vmaescale.runs import compare, plot_curves, render

    comp = compare(args.tracking_uri or None, args.experiment or None, args.run_ids, args.metric)
    print(render(comp, args.format))
    if args.plot:
        print(f"wrote {plot_curves(comp, args.plot)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- evaluation


def _add_weights_flags(p) -> None:
    """--select and --allow-pickle: which weights of SRC, and whether a pickled .pth may load."""
    p.add_argument("--select", default="auto", choices=("auto", "best", "final"),
                   help="which weights of a run dir (auto: best/ when present, else final/)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="official .pth files that a weights-only load refuses; only for files you trust")


def _add_source_flags(p) -> None:
    p.add_argument("src", help="vmaescale run dir (best/, else final/), vmaescale checkpoint dir, "
                               "official .pth or Hugging Face VideoMAE dir (imported on the fly)")
    p.add_argument("--shards", required=True, help="shard dir (with manifest.parquet) or a glob of its tars")
    p.add_argument("--backend", default="auto", choices=("auto", "dali", "fallback"),
                   help="decoder: DALI, or PyAV (fallback); auto picks DALI when it can decode the shards here")
    p.add_argument("--num-workers", type=int, default=2, help="decoding threads / loader workers")
    p.add_argument("--bad-shards", default="refuse", choices=("refuse", "skip"),
                   help="a corrupt or truncated tar: refuse to start, or leave it out (named)")
    _add_weights_flags(p)


def _add_tracking_flags(p) -> None:
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--tracking-uri", default="",
                   help="MLflow store (default: the run's, else $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="", help="MLflow experiment (default: the run's, else vmaescale)")
    p.add_argument("--run-id", default="", help="log into this MLflow run (default: the run dir's own run)")
    p.add_argument("--parent-run-id", default="", help="log into a new child run of this MLflow run")


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="multi-view test of a classifier: top-1 / top-5 / per class, confusion, predictions",
        description="Multi-view test (SPEC section 4): CLIPSxCROPS views per video (short side resized to "
                    "the crop size, crops at the left / centre / right of the long side, optionally "
                    "flipped), softmax averaged per video. Writes summary.json, per_class.csv, "
                    "predictions.parquet, failed.csv and confusion.png, and logs them to MLflow. Runs "
                    "on one process or under torchrun / deepspeed (each video counted once).")
    _add_source_flags(p)
    p.add_argument("--out", default=None, help="output dir (default for a run dir: <run>/eval/<shard dir name>)")
    p.add_argument("--views", default="",
                   help="CLIPSxCROPS: 5x3 for Kinetics / UCF / HMDB, 2x3 for SSv2 (default: the run's "
                        "data.test_num_segment x data.test_num_crop, else 5x3)")
    p.add_argument("--sampling", default="", choices=("", "stride", "segment"),
                   help="stride: clips of T frames at --sampling-rate spread over the video; segment: "
                        "SSv2-style segment sampling (default: the run's data.test_sampling, else stride)")
    p.add_argument("--sampling-rate", type=int, default=0, help="frame stride (default: the run's, else 4)")
    p.add_argument("--flip", action="store_true", help="add the horizontal flip of every view")
    p.add_argument("--short-side", type=int, default=0, help="resize the short side to this (default: the crop size)")
    p.add_argument("--batch-videos", type=int, default=2, help="videos per forward batch (each with all its views)")
    p.add_argument("--exclude-failed", action="store_true",
                   help="leave videos that fail to decode out of the metrics (default: count them as misses)")
    p.add_argument("--metric-prefix", default="test", help="MLflow metric names: <prefix>_top1, ...")
    _add_tracking_flags(p)
    add_debug_flag(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from vmaescale.eval.multiview import run_evaluate
    return run_evaluate(args)


def _add_features(sub) -> None:
    p = sub.add_parser(
        "extract-features", help="frozen-encoder features over windows of every video -> parquet",
        description="For every video: windows of --window frames every --stride frames, the model's clip "
                    "length sampled uniformly in each (linspace), short side resized and centre-cropped "
                    "to the model's size, encoder tokens mean-pooled (fc_norm applied for classifiers "
                    "unless --no-fc-norm). Parquet columns: key, label, window_start, window_frames, "
                    "embedding (float32 list).")
    p.add_argument("src", help="vmaescale run dir / checkpoint dir, official .pth or Hugging Face dir")
    p.add_argument("--shards", required=True, help="shard dir, folder of video files, or CSV list (path[,label])")
    p.add_argument("--out", required=True, help="output parquet file")
    p.add_argument("--window", type=int, default=0, help="frames per window (default: the model's clip length)")
    p.add_argument("--stride", type=int, default=0, help="frames between window starts (default: --window)")
    p.add_argument("--short", default="pad", choices=("pad", "skip"),
                   help="a video shorter than one window: one window padded with its last frame, or skipped (listed)")
    p.add_argument("--no-fc-norm", action="store_true", help="classifiers: the plain token mean, without fc_norm")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--decoder", default="auto", choices=("auto", "pyav", "dali"),
                   help="auto: DALI on a GPU when it imports, else PyAV")
    p.add_argument("--device", default="", help="torch device (default: cuda when there is one, else cpu)")
    _add_weights_flags(p)
    add_debug_flag(p)
    p.set_defaults(func=_run_features)


def _run_features(args) -> int:
    from vmaescale.eval.features import run_extract_features
    return run_extract_features(args)


def _add_reconstruct(sub) -> None:
    p = sub.add_parser(
        "reconstruct", help="reconstruction PSNR / SSIM / MSE of pretraining checkpoints on held-out clips",
        description="Reconstruct the centre clips of the first --clips videos under masks drawn from --seed "
                    "(the same clips and masks for every checkpoint): PSNR, SSIM and MSE over the masked "
                    "region and the whole clip, inference clips/s, peak memory and a grid PNG per model. "
                    "--compare puts a second checkpoint beside SRC in one table.")
    p.add_argument("src", help="pretraining checkpoint: vmaescale run / checkpoint dir, official pretrain .pth, "
                               "or Hugging Face VideoMAEForPreTraining dir")
    p.add_argument("--shards", required=True, help="held-out shard dir (with manifest.parquet) or a glob of its tars")
    p.add_argument("--compare", default="", help="a second pretraining checkpoint, on the same clips and masks")
    p.add_argument("--out", default="", help="output dir (default for a run dir: <run>/reconstruct)")
    p.add_argument("--clips", type=int, default=16, help="clips: one centre clip of each of the first N videos")
    p.add_argument("--seed", type=int, default=0, help="mask seed")
    p.add_argument("--mask", default="tube:0.9", help="encoder mask NAME:RATIO (tube, random, frame)")
    p.add_argument("--decoder-mask", default="none",
                   help="none = decode every masked token; running_cell:0.5 = as V2 trains")
    p.add_argument("--sampling-rate", type=int, default=0, help="frame stride (default: the run's, else 4)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per forward")
    p.add_argument("--backend", default="auto", choices=("auto", "dali", "fallback"), help="decoder")
    p.add_argument("--device", default="", help="torch device (default: cuda when there is one, else cpu)")
    _add_weights_flags(p)
    add_debug_flag(p)
    p.set_defaults(func=_run_reconstruct)


def _run_reconstruct(args) -> int:
    from vmaescale.eval.reconstruct import run_reconstruct
    return run_reconstruct(args)


# ---------------------------------------------------------------- doctor


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="what a run on this node would use (GPUs, NCCL, DeepSpeed, DALI, MLflow)",
                       description="Check this node for a run: GPUs, driver, CUDA, NCCL, torch, DeepSpeed and "
                                   "its ops, DALI and libnvcuvid, the SDPA kernel of the B and g attention "
                                   "shapes, the launch environment, MLflow. Each check is ok / warn / fail "
                                   "with the fix; exit status 1 when any fails.")
    p.add_argument("--config", default=None, help="a run config: check its tracking.tracking_uri")
    p.add_argument("--tracking-uri", default="", help="MLflow URI to check (default: the config's, "
                                                      "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    add_debug_flag(p)
    p.set_defaults(func=_run_doctor)


def _run_doctor(args) -> int:
    from vmaescale.config import load_config
    from vmaescale.doctor import print_report, run_checks

    uri = args.tracking_uri or (load_config(args.config).tracking.tracking_uri if args.config else "")
    checks = run_checks(uri)
    print_report(checks)
    return 1 if any(c.level == "fail" for c in checks) else 0


# ---------------------------------------------------------------- main


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="vmaescale", description=__doc__)
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_flops, _add_import, _add_export, _add_runs, _add_evaluate, _add_features,
                _add_reconstruct, _add_doctor):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors(f"vmaescale {args.command}", args.func, args, debug=debug_wanted(args))


if __name__ == "__main__":
    sys.exit(main())
