"""Crash-safe DeepSpeed checkpoints with run state, pruning, resume and consolidation.

Layout under `<output_dir>/checkpoints/`:

    step_00000100/              DeepSpeed files of every rank
    step_00000100/rank_state_<r>.safetensors  this rank's RNG and loader state (state_io)
    step_00000100/shared_state.safetensors  state equal on every rank (the weight EMA), if any
    step_00000100/complete.json       written last: step, world size, run state, and the
                                      size of every file of the tag
    latest                            tag of the newest complete checkpoint (atomic rename)

A crash during a write leaves `latest` pointing at the previous complete checkpoint, and a
tag without complete.json is never resumed from. A tag whose files disagree with its
complete.json (missing, zero-byte, truncated) is named and skipped for the next older one.
`latest` is only ever read as the name of a tag in this directory. Only the last K
complete tags are kept.

Nothing here is unpickled. vmaescale's own files are JSON and safetensors; DeepSpeed's
`.pt` files are read with `torch.load(weights_only=True)`, allowing only the DeepSpeed
classes in DEEPSPEED_SAFE_GLOBALS (`weights_only_loads`), for resume, consolidation
and the Universal conversion alike.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from vmaescale.fileio import write_atomic
from vmaescale.train.state_io import load_state, save_state

COMPLETE = "complete.json"
SHARED_STATE = "shared_state.safetensors"
TAG_PATTERN = re.compile(r"step_\d{8}")  # what tag_for writes; not the _universal copies
# Classes DeepSpeed pickles into its checkpoint files (ZeRO 1-3, fp16 / bf16 loss scaling);
# plain data holders, no code runs when they are rebuilt.
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment.fragment_address")


def rank_state_file(rank: int) -> str:
    return f"rank_state_{rank}.safetensors"


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
    save_state(ckpt_dir / tag / rank_state_file(rank), rank_state)
    dist.barrier()
    if rank == 0:
        if shared_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in shared_state.items()},
                      str(ckpt_dir / tag / SHARED_STATE))
        meta = {"step": step, "world_size": world_size, "run_state": run_state,
                "files": file_sizes(ckpt_dir / tag)}
        write_atomic(ckpt_dir / tag / COMPLETE, json.dumps(meta, indent=2))
        write_atomic(ckpt_dir / "latest", tag)
        prune_checkpoints(ckpt_dir, keep)
    dist.barrier()
    return tag


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a complete.json, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.parent.name for p in ckpt_dir.glob(f"step_*/{COMPLETE}")
                  if TAG_PATTERN.fullmatch(p.parent.name))


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete tags, and any incomplete older tag."""
    complete = complete_tags(ckpt_dir)
    keep_set = set(complete[-keep:])
    newest = complete[-1] if complete else ""
    for path in ckpt_dir.glob("step_*"):
        if path.is_dir() and path.name not in keep_set and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)


def file_sizes(tag_dir: Path) -> dict[str, int]:
    """{file name: size in bytes} of every file of a tag but complete.json."""
    return {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir())
            if p.is_file() and p.name != COMPLETE}


def resume_candidates(ckpt_dir: Path) -> list[str]:
    """Complete tags to try, best first: the one `latest` names, then the others newest first.

    `latest` counts only when it holds the plain name of a complete tag of this directory (no
    path, no other run's directory); otherwise it is ignored.
    """
    complete = complete_tags(ckpt_dir)
    order = complete[::-1]
    named = latest_tag(ckpt_dir)
    if named in complete:
        order.remove(named)
        order.insert(0, named)
    return order


def latest_tag(ckpt_dir: Path) -> str | None:
    try:
        text = (ckpt_dir / "latest").read_bytes()[:64].decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if TAG_PATTERN.fullmatch(text) else None


def checkpoint_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / COMPLETE).read_text())


def checkpoint_problem(ckpt_dir: Path, tag: str) -> str | None:
    """Why a complete tag cannot be resumed from (a file missing, empty or of the wrong size,
    an unreadable complete.json), or None when every file is as complete.json recorded."""
    tag_dir = ckpt_dir / tag
    try:
        meta = checkpoint_meta(ckpt_dir, tag)
        expected = dict(meta["files"])
        # Every rank's state file, even one rank 0's listing missed (a lagging network mount).
        expected |= {rank_state_file(r): expected.get(rank_state_file(r))
                     for r in range(int(meta["world_size"]))}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{tag_dir / COMPLETE} is unreadable or has no file list ({type(e).__name__}: {e})"
    for name, size in expected.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual == 0 or (size is not None and actual != size):
            return f"{path} has {actual} bytes, {size if size is not None else 'more than 0'} expected"
    return None


def load_rank_state(ckpt_dir: Path, tag: str, rank: int) -> dict:
    return load_state(ckpt_dir / tag / rank_state_file(rank))


def _safe_globals() -> list:
    import importlib

    allowed = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # not in this DeepSpeed version
    return allowed


@contextlib.contextmanager
def weights_only_loads():
    """Inside: every torch.load (DeepSpeed's engine, zero_to_fp32, its Universal loaders pass
    weights_only=False) is a weights_only=True load allowing DEEPSPEED_SAFE_GLOBALS only."""
    real_load, allowed = torch.load, _safe_globals()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return real_load(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load


# ds_to_universal, run with every torch.load weights_only (see weights_only_loads).
_UNIVERSAL_MAIN = ("import runpy, sys; from vmaescale.train.checkpoint import weights_only_loads; "
                   "sys.argv[0] = 'ds_to_universal'\n"
                   "with weights_only_loads(): "
                   "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__')")


def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert a checkpoint to DeepSpeed Universal format (for a new world size); returns its tag."""
    out_tag = f"{tag}_universal"
    if (ckpt_dir / out_tag / COMPLETE).is_file():
        return out_tag
    shutil.rmtree(ckpt_dir / out_tag, ignore_errors=True)
    subprocess.run([sys.executable, "-c", _UNIVERSAL_MAIN,
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

    with weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
