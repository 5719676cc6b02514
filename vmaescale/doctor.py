"""`vmaescale doctor`: what a run on this node would use, and why; each check ok / warn / fail
with the fix. Runs anywhere (a CPU-only box says what is missing for a GPU run).

    vmaescale doctor                          # this node, MLflow from $MLFLOW_TRACKING_URI
    vmaescale doctor --config configs/g.json  # and that run's tracking URI
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Attention shapes of a training step: (heads, head_dim, tokens) for B and g at 16x224^2,
# pretraining (10% of 1568 tokens visible) and finetuning (all 1568).
ATTENTION_SHAPES = {"B": (12, 64), "g": (16, 88)}
TOKENS = {"pretrain": 157, "finetune": 1568}


@dataclass(frozen=True)
class Check:
    name: str
    level: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""


def check_torch() -> list[Check]:
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    return [Check("torch", "ok", f"{torch.__version__} ({build})")]


def check_gpus() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        why = ("this torch is a CPU build" if not torch.version.cuda
               else "torch cannot initialise CUDA (driver missing, too old, or no GPU visible)")
        return [Check("gpus", "warn", f"none: {why}; training runs on the CPU with gloo (tests, demos)",
                      "for GPU runs install a CUDA torch and check `nvidia-smi`; in a container run it "
                      "with --gpus all (NVIDIA Container Toolkit)")]
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    checks = [Check("gpus", "ok", f"{len(names)} x {names[0]}" + (" (mixed models)" if len(set(names)) > 1 else ""))]
    checks.append(Check("driver", "ok", f"{driver_version()}, CUDA {torch.version.cuda} (torch)"))
    checks.append(check_nccl())
    return checks


def driver_version() -> str:
    if shutil.which("nvidia-smi") is None:
        return "driver version unknown (no nvidia-smi)"
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return f"driver {out[0]}" if out else "driver version unknown"


def check_nccl() -> Check:
    import torch

    try:
        version = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as err:  # a CUDA torch without NCCL
        return Check("nccl", "fail", f"not usable: {err}", "install a torch build with NCCL (the pip CUDA wheels have it)")
    knobs = {k: v for k, v in os.environ.items() if k.startswith("NCCL_") or k.startswith("TORCH_NCCL_")}
    return Check("nccl", "ok", f"{version}" + (f"; set: {knobs}" if knobs else ""))


def check_deepspeed() -> list[Check]:
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as err:
        return [Check("deepspeed", "fail", f"not importable: {err}", "pip install 'deepspeed>=0.19.3,<0.20'")]
    accel = get_accelerator()
    checks = [Check("deepspeed", "ok", f"{deepspeed.__version__}, accelerator {accel.device_name()}, "
                                       f"backend {accel.communication_backend_name()}")]
    checks.append(check_deepspeed_ops())
    return checks


def check_deepspeed_ops() -> Check:
    """ds_report's facts: ops prebuilt into the wheel, and those that can JIT-build here."""
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    prebuilt = sorted(name for name, built in installed_ops.items() if built)
    compatible = sorted(name for name, builder in ALL_OPS.items()
                        if name not in prebuilt and _compatible(builder))
    detail = f"prebuilt: {', '.join(prebuilt) or 'none'}; JIT-buildable: {', '.join(compatible) or 'none'}"
    if compatible and shutil.which("ninja") is None and not _importable("ninja"):
        return Check("deepspeed ops", "fail", detail + "; ninja is missing, so nothing can JIT-build",
                     "pip install ninja (and a C++ compiler); or use a wheel built with DS_BUILD_OPS=1")
    return Check("deepspeed ops", "ok", detail + " (vmaescale needs none prebuilt: a client torch AdamW)")


def _compatible(builder) -> bool:
    try:
        return bool(builder.is_compatible(verbose=False))
    except Exception:
        return False


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def check_dali() -> list[Check]:
    try:
        import nvidia.dali as dali
    except ImportError:
        return [Check("dali", "warn", "not installed: the fallback loader (PyAV) decodes on the CPU",
                      "pip install nvidia-dali-cuda130==2.4.0 (CUDA 12 drivers: nvidia-dali-cuda120)")]
    return [Check("dali", "ok", f"{dali.__version__}"), check_nvcuvid()]


def in_container() -> bool:
    return Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()


def check_nvcuvid() -> Check:
    """DALI's GPU decoder needs libnvcuvid from the driver; containers get it only with the
    `video` driver capability."""
    caps = os.environ.get("NVIDIA_DRIVER_CAPABILITIES", "")
    try:
        ctypes.CDLL("libnvcuvid.so.1")
        return Check("libnvcuvid", "ok", "reachable: DALI decodes H.264 / HEVC / AV1 on the GPU")
    except OSError:
        pass
    import torch

    if not torch.cuda.is_available():
        return Check("libnvcuvid", "warn", "not reachable (no GPU here): DALI decodes only VP8 / VP9 / "
                     "MJPEG, on the CPU", "on a GPU node the driver provides it (in a container: "
                     "NVIDIA_DRIVER_CAPABILITIES must include video)")
    if in_container() and "video" not in caps and caps != "all":
        return Check("libnvcuvid", "fail", f"not reachable; NVIDIA_DRIVER_CAPABILITIES={caps or '(unset)'} "
                     "lacks 'video', so the container runtime did not mount it",
                     "run the container with NVIDIA_DRIVER_CAPABILITIES=compute,utility,video "
                     "(docker/Dockerfile sets it)")
    return Check("libnvcuvid", "warn", "not reachable: DALI can decode only VP8 / VP9 / MJPEG, on the CPU",
                 "on a GPU node install the NVIDIA driver's video library (libnvcuvid, part of the driver)")


def check_attention() -> list[Check]:
    """Which SDPA kernel the B and g attention shapes select here."""
    import torch

    if not torch.cuda.is_available():
        return [Check("attention", "ok", f"CPU: SDPA runs {cpu_sdpa_kernel()} for B and g; "
                                          "the GPU kernel (flash / efficient / cudnn) is chosen on a GPU node")]
    return [Check(f"attention {size}", *sdpa_choice(size)) for size in ATTENTION_SHAPES]


def cpu_sdpa_kernel() -> str:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, *ATTENTION_SHAPES["B"][:1], 16, ATTENTION_SHAPES["B"][1])
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return "its flash-attention CPU kernel (fp32)"
    except RuntimeError:
        return "the math kernel"


def sdpa_choice(size: str) -> tuple[str, str, str]:
    """(level, detail, fix) for bf16 attention of `size` at pretraining and finetuning lengths."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = ATTENTION_SHAPES[size]
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    if hasattr(torch._C, "_get_sdp_priority_order"):
        order = [SDPBackend(i) for i in torch._C._get_sdp_priority_order()]
    chosen = {}
    for stage, tokens in TOKENS.items():
        q = torch.randn(2, heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
        for backend in order:
            try:
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
                chosen[stage] = backend.name.lower()
                break
            except RuntimeError:
                continue
    detail = f"{heads} heads x {dim}: " + ", ".join(f"{s} {k}" for s, k in chosen.items())
    if any(k == "math" for k in chosen.values()):
        return "warn", detail, "the math kernel is slow and memory-hungry: use a GPU / torch with flash attention"
    return "ok", detail, ""


def check_launch() -> list[Check]:
    """What the process-group set-up would derive from this environment."""
    import torch

    from vmaescale.cluster import launch_env, single_process_accelerate_note

    try:
        env = launch_env(os.environ)
    except ValueError as err:
        return [Check("launch", "fail", str(err), "start through torchrun, deepspeed, accelerate or srun")]
    checks = [Check("launch", "ok", f"{env.launcher}: rank {env.rank} of {env.world_size}, "
                                    f"rendezvous {env.master_addr}:{env.master_port}")]
    note = single_process_accelerate_note(os.environ, torch.cuda.device_count())
    if note:
        checks.append(Check("accelerate", "warn", note.removeprefix("note: "),
                            "accelerate launch --multi_gpu --num_processes N"))
    return checks


def check_mlflow(uri: str) -> list[Check]:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
        if os.access(folder if folder.exists() else folder.parent, os.W_OK):
            return [Check("mlflow", "ok", f"{uri} (embedded; writable {folder})")]
        return [Check("mlflow", "fail", f"{uri}: {folder} is not writable", "point tracking.tracking_uri elsewhere")]
    if uri.startswith(("http://", "https://")):
        return [check_mlflow_server(uri)]
    return [Check("mlflow", "warn", f"{uri}: not checked (only sqlite and http(s) are)")]


def check_mlflow_server(uri: str) -> Check:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as reply:
            return Check("mlflow", "ok", f"{uri} answers ({reply.status})")
    except urllib.error.HTTPError as err:
        if err.code == 403:
            return Check("mlflow", "fail", f"{uri} answers 403 (Invalid Host header)",
                         "start the server with --allowed-hosts <host>:<port> (docs/tracking.md)")
        return Check("mlflow", "fail", f"{uri} answers HTTP {err.code}", "check the server's log")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return Check("mlflow", "fail", f"{uri} does not answer ({reason})",
                     "start the server (docs/tracking.md) or unset MLFLOW_TRACKING_URI for sqlite:///mlflow.db")


def run_checks(tracking_uri: str = "") -> list[Check]:
    checks = []
    for group in (check_torch, check_gpus, check_deepspeed, check_dali, check_attention, check_launch):
        checks += group()
    return checks + check_mlflow(tracking_uri)


def print_report(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"[{c.level:^4}] {c.name:<{width}}  {c.detail}")
        if c.fix and c.level != "ok":
            print(f"       {'':<{width}}  fix: {c.fix}")
    counts = {level: sum(c.level == level for c in checks) for level in ("ok", "warn", "fail")}
    print(f"{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail")
