"""Crash-safe DeepSpeed checkpoints with run state, pruning, resume and consolidation.

Layout under `<output_dir>/checkpoints/`:

    step_00000100/              DeepSpeed files of every rank
    step_00000100/rank_state_<r>.pt   this rank's RNG and loader state
    step_00000100/shared_state.safetensors  state equal on every rank (the weight EMA), if any
    step_00000100/complete.json       written last: step, world size, run state
    latest                            tag of the newest complete checkpoint (atomic rename)

A crash during a write leaves `latest` pointing at the previous complete checkpoint, and a
tag without complete.json is never resumed from. Only the last K complete tags are kept.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from vmaescale.fileio import write_atomic

COMPLETE = "complete.json"
SHARED_STATE = "shared_state.safetensors"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, run_state: dict, rank_state: dict,
                    rank: int, world_size: int, keep: int,
                    shared_state: dict[str, torch.Tensor] | None = None) -> str:
    """Every rank calls this. Returns the tag once it is complete on disk.

    `shared_state`: tensors equal on every rank (a weight EMA), written once by rank 0 as
    SHARED_STATE (safetensors) before the checkpoint is marked complete.
    """
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"run_state": run_state},
                           save_latest=False)
    torch.save(rank_state, ckpt_dir / tag / f"rank_state_{rank}.pt")
    dist.barrier()
    if rank == 0:
        if shared_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in shared_state.items()},
                      str(ckpt_dir / tag / SHARED_STATE))
        meta = {"step": step, "world_size": world_size, "run_state": run_state}
        write_atomic(ckpt_dir / tag / COMPLETE, json.dumps(meta, indent=2))
        write_atomic(ckpt_dir / "latest", tag)
        prune_checkpoints(ckpt_dir, keep)
    dist.barrier()
    return tag


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a complete.json, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.parent.name for p in ckpt_dir.glob(f"step_*/{COMPLETE}"))


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete tags, and any incomplete older tag."""
    complete = complete_tags(ckpt_dir)
    keep_set = set(complete[-keep:])
    newest = complete[-1] if complete else ""
    for path in ckpt_dir.glob("step_*"):
        if path.is_dir() and path.name not in keep_set and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)


def resume_tag(ckpt_dir: Path) -> str | None:
    """The newest complete tag: `latest` if it is complete, else the newest with complete.json."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
    complete = complete_tags(ckpt_dir)
    return complete[-1] if complete else None


def checkpoint_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / COMPLETE).read_text())


def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert a checkpoint to DeepSpeed Universal format (for a new world size); returns its tag."""
    out_tag = f"{tag}_universal"
    if (ckpt_dir / out_tag / COMPLETE).is_file():
        return out_tag
    shutil.rmtree(ckpt_dir / out_tag, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder", str(ckpt_dir / tag), "--output_folder", str(ckpt_dir / out_tag),
                    "--inject_missing_state", "--num_extract_workers", "1",
                    "--num_merge_workers", "1"], check=True)
    shutil.copy(ckpt_dir / tag / COMPLETE, ckpt_dir / out_tag / COMPLETE)
    return out_tag


def fp32_state_dict(ckpt_dir: Path, tag: str, engine) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights from a ZeRO checkpoint (stage 0: the module's own weights)."""
    if engine.zero_optimization_stage() == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
