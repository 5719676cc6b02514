"""Reconstruction quality of pretraining checkpoints on held-out clips (seeds/000).

    vmaescale reconstruct runs/pretrain_b --shards /data/k400_val --clips 64
    vmaescale reconstruct runs/pretrain_b --shards /data/k400_val --compare hf/videomae-base

Clips: the first `clips` videos of the shard set, one centre clip each (the validation
view). Masks: drawn once from `seed` for the whole clip set, so every checkpoint sees the
same patterns on the same clips. By default every masked token is decoded (decoder mask
"none"): the masked-region metrics then cover every hidden token, and the whole-clip
metrics compare the clip with its visible tokens kept and its hidden tokens predicted.
`decoder_mask="running_cell:0.5"` reproduces V2 training instead (undecoded hidden tokens
then keep their original pixels in the whole clip).

Per checkpoint: PSNR / SSIM / MSE over the masked region and the whole clip, inference
clips/s (forward only, batched, after one untimed warm-up batch), peak memory (CUDA allocator peak on a GPU; the process's
peak resident set on the CPU) and a PNG grid of the first clips.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vmaescale.config import DataConfig

GRID_CLIPS = 4


@dataclass(frozen=True)
class MaskSpec:
    encoder: str = "tube"
    encoder_ratio: float = 0.9
    decoder: str = "none"
    decoder_ratio: float = 0.0


def parse_mask(text: str, what: str) -> tuple[str, float]:
    """'tube:0.9' -> ('tube', 0.9); 'none' -> ('none', 0.0)."""
    from vmaescale.masking import DECODER_MASKS, ENCODER_MASKS
    from vmaescale.models.flops import parse_mask_arg

    name, ratio = parse_mask_arg(text)
    accepted = DECODER_MASKS if what == "--decoder-mask" else ENCODER_MASKS
    if name not in accepted:
        raise ValueError(f"{what} {text!r}: accepted masks are {list(accepted)} (NAME:RATIO)")
    return name, ratio


def held_out_clips(shards: str, count: int, num_frames: int, image_size: int, stride: int,
                   backend: str = "auto") -> torch.Tensor:
    """[count, 3, T, S, S] normalized centre clips of the first `count` videos (fewer if
    the set is smaller)."""
    from vmaescale.data.loader import build_loader

    data = DataConfig(shards=shards, backend=backend, num_frames=num_frames, image_size=image_size,
                      sampling_rate=stride, test_num_segment=1, test_num_crop=1, short_side=image_size,
                      num_workers=0)
    clips = []
    for batch in build_loader(data, min(count, 8), 0, 1, mode="eval"):
        clips.append(batch["video"])
        if sum(c.shape[0] for c in clips) >= count:
            break
    video = torch.cat(clips)[:count]
    if video.shape[0] == 0:
        raise ValueError(f"--shards {shards!r}: no video decoded")
    return video


def fixed_masks(model, count: int, spec: MaskSpec, seed: int):
    """(encoder mask, decoder mask or None, counts) for `count` clips, drawn from `seed`."""
    from vmaescale.masking import MaskGenerator, token_grid

    grid = token_grid(model.num_frames, model.image_size, model.size.patch_size, model.size.tubelet_size)
    generator = MaskGenerator(grid, spec.encoder, spec.encoder_ratio, spec.decoder, spec.decoder_ratio,
                              seed=seed)
    mask, decoder_mask = generator(count)
    return mask, decoder_mask, generator.counts


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "CUDA allocator peak"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2 ** 20, "process peak RSS"


@torch.no_grad()
def reconstruct_all(model, video: torch.Tensor, masks, batch_size: int, device: torch.device):
    """(reconstructions [N, 3, T, H, W] in [0, 1] on the CPU, forward seconds)."""
    from vmaescale.eval.reconstruction import reconstruct_clip
    from vmaescale.models.videomae import decoded_positions

    mask, decoder_mask, counts = masks
    model = model.eval().to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out, forward_s = [], 0.0
    size = model.size
    warm = slice(0, min(batch_size, video.shape[0]))  # the first call pays one-time set-up: not timed
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        model(video[warm].to(device), mask[warm].to(device),
              decoder_mask[warm].to(device) if decoder_mask is not None else None, counts)
    for start in range(0, video.shape[0], batch_size):
        part = slice(start, start + batch_size)
        v = video[part].to(device)
        m = mask[part].to(device)
        d = decoder_mask[part].to(device) if decoder_mask is not None else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, pred = model(v, m, d, counts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forward_s += time.perf_counter() - t0
        out.append(reconstruct_clip(v.float(), pred.float(), m, decoded_positions(m, d), size.patch_size,
                                    size.tubelet_size).cpu())
    return torch.cat(out), forward_s


def quality(model, video: torch.Tensor, masks, batch_size: int, device: torch.device, grid_path: Path) -> dict:
    """Metrics of one checkpoint on the fixed clips and masks, and its grid PNG."""
    from vmaescale.eval.reconstruction import masked_input, region_metrics, save_reconstruction_grid
    from vmaescale.models.videomae import decoded_positions, unnormalize

    mask, decoder_mask, _ = masks
    size = model.size
    recon, forward_s = reconstruct_all(model, video, masks, batch_size, device)
    original = unnormalize(video.float()).clamp(0, 1)
    masked = region_metrics(original, recon, mask & decoded_positions(mask, decoder_mask), size.patch_size,
                            size.tubelet_size)
    whole = region_metrics(original, recon, torch.ones_like(mask), size.patch_size, size.tubelet_size)
    peak, peak_kind = peak_memory_gb(device)
    save_reconstruction_grid(original[:GRID_CLIPS], masked_input(video[:GRID_CLIPS].float(), mask[:GRID_CLIPS],
                                                                 size.patch_size, size.tubelet_size),
                             recon[:GRID_CLIPS], grid_path)
    return {**{f"masked_{k}": v for k, v in masked.items()}, **{f"whole_{k}": v for k, v in whole.items()},
            "clips_per_s": video.shape[0] / forward_s if forward_s > 0 else None,
            "peak_memory_gb": peak, "peak_memory_kind": peak_kind, "grid": str(grid_path)}


def pretraining_model(src: str, select: str, allow_pickle: bool):
    from vmaescale.eval.source import open_source

    source = open_source(src, select, allow_pickle)
    if not hasattr(source.model, "decoder"):
        raise ValueError(f"SRC {src!r} is a {source.kind} model without a decoder; reconstruct needs a "
                         "pretraining checkpoint (VideoMAEForPreTraining, an official pretrain .pth, a "
                         "vmaescale pretraining run)")
    return source


COLUMNS = (("masked_psnr", "PSNR m", ".2f"), ("masked_ssim", "SSIM m", ".4f"), ("masked_mse", "MSE m", ".5f"),
           ("whole_psnr", "PSNR all", ".2f"), ("whole_ssim", "SSIM all", ".4f"), ("whole_mse", "MSE all", ".5f"),
           ("clips_per_s", "clips/s", ".1f"), ("peak_memory_gb", "peak GB", ".2f"))


def table_text(rows: list[dict]) -> str:
    name_w = max(len("model"), *(len(r["model"]) for r in rows))
    lines = [f"{'model':<{name_w}}" + "".join(f"{title:>11}" for _, title, _ in COLUMNS)]
    for r in rows:
        cells = "".join(f"{format(r[k], f) if r[k] is not None else '-':>11}" for k, _, f in COLUMNS)
        lines.append(f"{r['model']:<{name_w}}{cells}")
    return "\n".join(lines)


def run_reconstruct(args) -> int:
    """`vmaescale reconstruct`: see `vmaescale.cli` for the flags."""
    from vmaescale.eval.source import compute_device

    sources = [pretraining_model(args.src, args.select, args.allow_pickle)]
    if args.compare:
        sources.append(pretraining_model(args.compare, args.select, args.allow_pickle))
    first = sources[0].model
    for other in sources[1:]:
        if (other.model.num_frames, other.model.image_size, other.model.size.patch_size,
                other.model.size.tubelet_size) != (first.num_frames, first.image_size, first.size.patch_size,
                                                    first.size.tubelet_size):
            raise ValueError(f"--compare {args.compare!r}: clips of {other.model.num_frames} frames at "
                             f"{other.model.image_size} px do not match SRC's {first.num_frames} at "
                             f"{first.image_size} px; the same clips and masks need the same clip and patch shape")
    if sources[0].run_dir is None and not args.out:
        raise ValueError(f"--out is needed: {args.src} is not a vmaescale run dir, and nothing is written "
                         "next to a checkpoint, .pth or Hugging Face dir")
    out_dir = Path(args.out) if args.out else sources[0].run_dir / "reconstruct"
    encoder, encoder_ratio = parse_mask(args.mask, "--mask")
    decoder, decoder_ratio = parse_mask(args.decoder_mask, "--decoder-mask")
    spec = MaskSpec(encoder, encoder_ratio, decoder, decoder_ratio)
    device = compute_device(args.device)
    stride = args.sampling_rate or sources[0].run_field("data", "sampling_rate", 4)
    video = held_out_clips(args.shards, args.clips, first.num_frames, first.image_size, stride, args.backend)
    masks = fixed_masks(first, video.shape[0], spec, args.seed)
    rows = []
    for i, source in enumerate(sources):
        name = "src" if i == 0 else "compare"
        print(f"reconstructing {video.shape[0]} clips with {source.describe()}", file=sys.stderr, flush=True)
        metrics = quality(source.model, video, masks, args.batch_size, device, out_dir / f"grid_{name}.png")
        rows.append({"model": f"{name}: {Path(str(source.path)).name}", "source": source.describe(), **metrics})
    summary = {"shards": args.shards, "clips": int(video.shape[0]), "seed": args.seed,
               "mask": args.mask, "decoder_mask": args.decoder_mask, "device": str(device), "models": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nreconstruction of {video.shape[0]} clips from {args.shards} (masks: {args.mask}, decoder "
          f"{args.decoder_mask}, seed {args.seed}; 'm' = masked region, 'all' = whole clip)")
    print(table_text(rows))
    print(f"peak memory: {rows[0]['peak_memory_kind']}; grids and summary.json in {out_dir}")
    return 0
