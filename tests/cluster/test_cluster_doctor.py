"""`vmaescale doctor` on this CPU-only machine: every check reported, what is missing named with
its fix, MLflow probed for real (an embedded store, a port nobody listens on)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster_runs import REPO, free_port

pytestmark = pytest.mark.slow

CHECKS = ("torch", "gpus", "deepspeed", "deepspeed ops", "dali", "libnvcuvid", "attention", "launch", "mlflow")


def doctor(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "vmaescale.cli", "doctor", *args], cwd=REPO,
                          env={**clean, **env}, capture_output=True, text=True, timeout=300)


def report(done: subprocess.CompletedProcess) -> dict[str, tuple[str, str]]:
    """{check name: (level, rest of the line)} from the printed report."""
    rows = {}
    for line in done.stdout.splitlines():
        level, _, rest = line[1:].partition("]")
        if line.startswith("[") and level.strip() in ("ok", "warn", "fail"):
            name = next(n for n in sorted(CHECKS, key=len, reverse=True) if rest.strip().startswith(n))
            rows[name] = (level.strip(), rest.strip()[len(name):].strip())
    return rows


def test_doctor_on_a_cpu_node_says_what_a_run_would_use_and_what_is_missing(tmp_path):
    done = doctor("--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    rows = report(done)
    assert set(rows) == set(CHECKS), done.stdout
    assert rows["torch"][0] == "ok" and "CPU build" in rows["torch"][1]
    assert rows["gpus"][0] == "warn" and "gloo" in rows["gpus"][1]
    assert "fix: for GPU runs install a CUDA torch" in done.stdout
    assert rows["deepspeed"][0] == "ok" and "accelerator cpu, backend gloo" in rows["deepspeed"][1]
    assert "prebuilt:" in rows["deepspeed ops"][1] and "JIT-buildable:" in rows["deepspeed ops"][1]
    assert rows["libnvcuvid"][0] == "warn" and "VP8 / VP9" in rows["libnvcuvid"][1]
    assert rows["attention"][0] == "ok" and rows["attention"][1].startswith("CPU: SDPA runs")
    assert rows["launch"][1].startswith("single: rank 0 of 1")
    assert rows["mlflow"][0] == "ok" and "embedded" in rows["mlflow"][1]
    assert done.returncode == 0, done.stdout  # warnings only


def test_doctor_fails_on_an_mlflow_server_that_does_not_answer():
    uri = f"http://127.0.0.1:{free_port()}"
    done = doctor(MLFLOW_TRACKING_URI=uri)
    level, detail = report(done)["mlflow"]
    assert (level, done.returncode) == ("fail", 1)
    assert f"{uri} does not answer" in detail and "fix: start the server" in done.stdout


def test_doctor_reports_the_launch_an_srun_task_would_derive():
    done = doctor(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_LOCALID="1",
                  SLURM_STEP_NUM_TASKS="2", SLURM_JOB_NODELIST="node[01-02]")
    assert report(done)["launch"][1] == "slurm: rank 1 of 2, rendezvous node01:14242"
