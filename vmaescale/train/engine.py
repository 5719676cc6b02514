"""DeepSpeed setup: the process group, the DeepSpeed config derived from the run config,
and the engine with a client AdamW (param groups) and the per-step lr schedule.

The engine never knows which model size it runs: it takes any nn.Module.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from vmaescale.cluster import Peers, apply_launch_env
from vmaescale.config import RunConfig
from vmaescale.train.optim import WarmupCosineSchedule, param_groups


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


def silence_library_deprecations() -> None:
    """Hide deprecation warnings raised inside DeepSpeed 0.19's own calls into torch (each rank
    prints `all_gather_into_tensor is deprecated` on the first step); users cannot act on them.
    Called by the launchers, not on import, so importing the package changes no filters."""
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def dist_env() -> DistEnv:
    """Rank / local rank / world size from torchrun, deepspeed or accelerate, else an srun task's
    SLURM_* variables, else 1 process; MASTER_ADDR / MASTER_PORT derived alike
    (`vmaescale.cluster.launch_env`) and written to os.environ for the process group."""
    env = apply_launch_env(os.environ)
    return DistEnv(env.rank, env.local_rank, env.world_size)


_PEERS: Peers | None = None


def peers() -> Peers | None:
    """Host and pid of every rank of this process group (None before `init_distributed`)."""
    return _PEERS


def use_group_timeout(timeout: timedelta) -> None:
    """Make `timeout` the default of every process group, not only the world's: DeepSpeed builds
    its ZeRO groups with `new_group(ranks)` and no timeout, which would fall back to torch's
    default (30 min for gloo) and leave a rank waiting that long on a hung peer."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def init_distributed(env: DistEnv, timeout_s: float = 600.0) -> torch.device:
    """Start the process group (nccl on GPU, gloo/ccl on CPU) and return this rank's device.

    A collective that waits `timeout_s` on a dead or hung rank fails (gloo raises; NCCL's
    watchdog aborts the process: TORCH_NCCL_ASYNC_ERROR_HANDLING=1 unless set)."""
    global _PEERS
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(os.environ.get("VMAESCALE_DS_LOG_LEVEL", "WARNING"))
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    accel = get_accelerator()
    use_group_timeout(timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    _PEERS = Peers(torch.distributed.distributed_c10d._get_default_store(), env.rank,
                   env.world_size, timeout_s)
    if accel.device_name() == "cuda":
        index = env.local_rank % torch.cuda.device_count()  # srun --gpus-per-task: one visible GPU
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def resolve_precision(cfg: RunConfig, device: torch.device) -> str:
    """'auto' means bf16 on GPU and fp32 on CPU."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if device.type == "cuda" else "fp32"


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str) -> dict:
    """The DeepSpeed config dict, derived from the run config; `cfg.deepspeed` is merged last.

    Config validation refuses pass-through keys set here from the run config (a new one
    belongs in `vmaescale.config.DERIVED_DEEPSPEED_KEYS`, tests/test_config.py checks)."""
    micro_clips = cfg.train.videos_per_gpu * cfg.data.num_sample
    ds = {
        "train_micro_batch_size_per_gpu": micro_clips,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": micro_clips * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.clip_grad,  # explicit: 0.19.3+ defaults to 1.0
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {
            "stage": cfg.train.zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds["bf16"]["check_grad_overflow"] = True
    return merge_dicts(ds, cfg.deepspeed)


def merge_dicts(base: dict, extra: dict) -> dict:
    """Recursive merge: `extra` wins; nested dicts merge key by key."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    return torch.optim.AdamW(groups, lr=cfg.optim.base_lr, betas=tuple(cfg.optim.betas),
                             eps=cfg.optim.eps)


def gather_leaf_modules_whole_under_zero3(model: nn.Module) -> None:
    """Make the model's ZeRO-3 leaf modules gather all their parameters in one pre-forward hook.

    Attention reads `self.qkv.weight` itself instead of calling `self.qkv`, so the qkv
    Linear's own hook never runs. Eager ZeRO-3 gathers such a parameter when it is read,
    but torch.compile traces that read and sees the empty partition (e.g. "size mismatch,
    got input (8x64), vec (0)"). Called before deepspeed.initialize, which installs the hooks.
    (PatchEmbed's read of proj.weight.dtype only costs one recompile at step 2, when
    prefetching starts; as a leaf its compiled backward saw the empty partition.)
    """
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, model.zero3_leaf_modules())


def build_engine(model: nn.Module, cfg: RunConfig, ds_config: dict, schedule_args: dict):
    """deepspeed.initialize with a client AdamW and the warmup-cosine schedule."""
    import deepspeed

    if cfg.model.compile and cfg.train.zero_stage == 3:
        gather_leaf_modules_whole_under_zero3(model)
    optimizer = build_optimizer(model, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: WarmupCosineSchedule(opt, **schedule_args))
    apply_compile(engine, cfg)
    return engine, optimizer, scheduler


def apply_compile(engine, cfg: RunConfig) -> None:
    """model.compile: the whole module through DeepSpeed's engine.compile(), or (compile_scope
    'blocks') each transformer block on its own, after DeepSpeed has installed its hooks."""
    if not cfg.model.compile:
        return
    if cfg.model.compile_scope == "model":
        engine.compile()
    else:
        from vmaescale.models.vit import compile_blocks
        compile_blocks(engine.module)
