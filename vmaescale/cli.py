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


# ---------------------------------------------------------------- main


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="vmaescale", description=__doc__)
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_flops, _add_import, _add_export):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors(f"vmaescale {args.command}", args.func, args, debug=debug_wanted(args))


if __name__ == "__main__":
    sys.exit(main())
