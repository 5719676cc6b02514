"""Air-gapped install: a wheelhouse built for this machine installs into a fresh virtual
environment with no index and no other wheel folder (CPU target: no DALI, the CPU torch)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster_runs import REPO

pytestmark = pytest.mark.slow


def offline_env() -> dict[str, str]:
    """No pip configuration: no index, no extra index, no find-links but the one we pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "VIRTUAL_ENV"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def test_wheelhouse_installs_vmaescale_with_no_index(tmp_path):
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    built = subprocess.run([sys.executable, "-m", "vmaescale.wheelhouse", str(wheels), "--cuda", "cpu"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    names = {p.name.split("-")[0].lower() for p in wheels.glob("*.whl")}
    assert {"vmaescale", "deepspeed", "torch", "mlflow", "webdataset"} <= names
    assert f"pip install --no-index --find-links {wheels} vmaescale" in built.stdout

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-compile", "--no-index",
                                "--find-links", str(wheels), "vmaescale"],
                               env=offline_env(), capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    done = subprocess.run([str(venv / "bin" / "vmaescale"), "flops", "--model", "B"], env=offline_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "35.44" in done.stdout, done.stdout + done.stderr
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import deepspeed, mlflow, torch, vmaescale.train.trainer; print(deepspeed.__version__)"],
                           env=offline_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
