"""`vmaescale` command line: one subcommand per job, each a thin wrapper over the package."""

from __future__ import annotations

import argparse
import sys


def _add_flops(sub) -> None:
    p = sub.add_parser("flops", help="multiply-accumulates per clip (encoder, decoder, total)")
    p.add_argument("--model", default="B", help="model size: S, B, L, H, g, tiny, nano")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--mask", default="tube:0.9", help="encoder mask NAME:RATIO, or 'none' (finetune view)")
    p.add_argument("--decoder-mask", default="none", help="running_cell:RATIO, or 'none' (v1)")
    p.add_argument("--decoder-depth", type=int, default=4)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmaescale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_flops(sub)
    for add in _extra_commands():
        add(sub)
    return parser


def _extra_commands():
    """Subcommands defined next to the code they wrap."""
    from vmaescale.models import interop
    return [interop.add_import_command, interop.add_export_command]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
