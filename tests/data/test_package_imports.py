"""The data package has no import circle, nothing on the DALI path imports PyAV, and the
synthetic backend is chosen by build_loader like the others."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vmaescale.config import DataConfig


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_dali_path_imports_no_pyav_and_not_the_fallback():
    modules = imported_after("from vmaescale.data.loader import build_loader; import vmaescale.data.dali")
    assert "av" not in modules
    assert "vmaescale.data.fallback" not in modules and "vmaescale.data.shards" not in modules


@pytest.mark.parametrize("backend", ["vmaescale.data.dali", "vmaescale.data.fallback"])
def test_a_backend_imports_neither_the_loader_nor_the_other_backend(backend):
    modules = imported_after(f"import {backend}")
    other = {"vmaescale.data.dali", "vmaescale.data.fallback"} - {backend}
    assert "vmaescale.data.loader" not in modules and not other & modules


def test_build_loader_chooses_the_synthetic_backend():
    from vmaescale.data.loader import build_loader
    cfg = DataConfig(backend="synthetic", num_frames=4, image_size=32, num_sample=2)
    loader = build_loader(cfg, 3, 0, 1, mode="train", seed=1, start_step=2, steps_per_epoch=5)
    batches = list(loader)
    assert loader.backend == "synthetic" and len(batches) == 3
    assert batches[0]["video"].shape == (6, 3, 4, 32, 32) and batches[0]["video"].dtype == torch.float32
    val = build_loader(cfg, 3, 0, 1, mode="eval", steps_per_epoch=1)
    assert next(iter(val))["video"].shape == (3, 3, 4, 32, 32)
