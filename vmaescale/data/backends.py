"""Which input pipeline runs here (`data.backend`): see `vmaescale.data.loader`.

Imports neither backend: DALI is only probed (`import nvidia.dali`), so choosing costs no
PyAV import and no pipeline build.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "dali", "fallback", "synthetic")
DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")


def dali_unavailable_reason(codec: str, device: torch.device | None) -> str | None:
    """Why DALI cannot decode `codec` here, or None when it can."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"nvidia.dali does not import ({e}); install the 'dali' extra"
    on_gpu = device is not None and device.type == "cuda" and torch.cuda.is_available()
    if codec not in DALI_CPU_CODECS and not on_gpu:
        missing = ("the loader was given no CUDA device" if torch.cuda.is_available()
                   else "there is no CUDA device")
        return (f"codec {codec!r} needs DALI's GPU decoder (device='mixed') and {missing}; "
                f"DALI's CPU decoder handles only {list(DALI_CPU_CODECS)}")
    return None


def choose_backend(requested: str, codec: str, device: torch.device | None) -> tuple[str, str]:
    """(backend, why) for data.backend = `requested`."""
    if requested not in BACKENDS:
        raise ValueError(f"data.backend={requested!r}: build_loader accepts {list(BACKENDS)}")
    if requested in ("fallback", "synthetic"):
        return requested, f"data.backend={requested!r}"
    reason = dali_unavailable_reason(codec, device)
    if requested == "dali":
        if reason:
            raise ValueError(f"data.backend='dali' cannot run here: {reason}")
        return "dali", "data.backend='dali'"
    if reason:
        return "fallback", f"auto: {reason}"
    where = "GPU (mixed)" if device is not None and device.type == "cuda" else "CPU"
    return "dali", f"auto: DALI imports and decodes {codec} on the {where}"
