"""The progressive schedule for real: configs/progressive_tiny.json on generated VP9 shards,
each stage a 2-rank torchrun job on CPU, one MLflow parent run on a real sqlite store; a
SIGKILL in the middle of the second stage, then the same command again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from launching import REPO, metric_rows
from vmaescale.data.shards import BuildOptions, build_shards
from vmaescale.data.synthetic import write_synthetic_videos
from vmaescale.progressive import SCHEDULE_FILE, Schedule, load_schedule

LAUNCHER = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
STAGE_START_TIMEOUT_S = 600


def shards(root: Path, name: str, n: int, seed: int, labels: dict | None = None) -> Path:
    videos = root / f"{name}_videos"
    write_synthetic_videos(videos, n=n, codec="vp9", size=64, frames=24, fps=25, classes=4, seed=seed, speed=8)
    build_shards(videos, root / name, BuildOptions(codec="vp9", short_side=64, shard_size=16, seed=seed),
                 workers=1, progress=False, label_map=labels)
    return root / name


def tiny_schedule(root: Path, train: Path, val: Path, **changes) -> Path:
    """configs/progressive_tiny.json pointed at this test's shards, output dir and store."""
    cfg = json.loads((REPO / "configs" / "progressive_tiny.json").read_text())
    cfg["output_dir"] = str(root / "schedule")
    cfg["tracking"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    cfg["set"] += [f"data.shards={train}", f"data.val_shards={val}"]
    cfg["stages"][-1]["shards"] = str(val)
    cfg.update(changes)
    path = root / "schedule.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def progressive(config: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, str(REPO / "launch" / "progressive.py"), "--config", str(config),
                             "--launcher", LAUNCHER, *args], cwd=REPO, env=env, text=True, **popen)


def run_to_end(config: Path, *args: str) -> subprocess.CompletedProcess:
    proc = progressive(config, *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=1200)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def checkpoint_state(run_dir: Path) -> dict | None:
    tags = sorted((run_dir / "checkpoints").glob("step_*/complete.json"))
    return json.loads(tags[-1].read_text())["run_state"] if tags else None


def kill_when_checkpointed(proc: subprocess.Popen, run_dir: Path) -> dict:
    """SIGKILL the whole schedule once `run_dir` has its first checkpoint: the driver, torchrun
    and the ranks (which torchrun starts in sessions of their own), as a crashed node would."""
    deadline = time.monotonic() + STAGE_START_TIMEOUT_S
    while (state := checkpoint_state(run_dir)) is None:
        assert proc.poll() is None and time.monotonic() < deadline, "stage 2 never checkpointed"
        time.sleep(0.2)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for process in tree:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=60)
    proc.wait(timeout=60)
    return state


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("progressive")
    train = shards(root, "train", 64, seed=0)
    val = shards(root, "val", 32, seed=1, labels=json.loads((train / "labels.json").read_text()))
    return {"root": root, "train": train, "val": val}


@pytest.mark.slow
def test_killed_in_stage_two_the_rerun_skips_stage_one_resumes_stage_two_and_continues_its_mlflow_runs(data):
    root = data["root"] / "killed"
    root.mkdir()
    config = tiny_schedule(root, data["train"], data["val"])
    out = root / "schedule"
    proc = progressive(config, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = kill_when_checkpointed(proc, out / "finetune")
    assert not (out / "finetune" / "final").exists()
    parent = json.loads((out / SCHEDULE_FILE).read_text())["parent_run_id"]
    pretrain_weights = (out / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns

    rerun = run_to_end(config)
    assert rerun.returncode == 0, rerun.stdout[-6000:]
    assert "[1/3] pretrain (pretrain): finished, skipped" in rerun.stdout
    assert f"[2/3] finetune (finetune): resuming from its checkpoint at step {killed_at['step']}" in rerun.stdout
    assert f"at step {killed_at['step']}" in rerun.stdout and killed_at["step"] > 0
    assert (out / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns == pretrain_weights
    finished = checkpoint_state(out / "finetune")
    assert finished["step"] == 120 and finished["mlflow_run_id"] == killed_at["mlflow_run_id"]
    assert json.loads((out / SCHEDULE_FILE).read_text())["parent_run_id"] == parent

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    by_stage = {run.data.tags["vmaescale.stage"]: run for run in children}
    assert sorted(by_stage) == ["finetune", "pretrain", "test"] and len(children) == 3
    assert by_stage["finetune"].info.run_id == killed_at["mlflow_run_id"]
    assert all(run.info.status == "FINISHED" for run in children)
    assert client.get_run(parent).info.status == "FINISHED"
    loss_steps = {m.step for m in client.get_metric_history(killed_at["mlflow_run_id"], "loss")}
    assert loss_steps == set(range(10, 121, 10))  # one run, before and after the kill
    assert max(r["step"] for r in metric_rows(out / "finetune") if "loss" in r) == 120
    record = json.loads((out / "finetune" / "stage.json").read_text())
    assert record["parent_run_id"] == parent and record["status"] == "completed"
    assert record["init_from"] == str((out / "pretrain").resolve())
    assert json.loads((out / "finetune" / "config.json").read_text())["tracking"]["parent_run_id"] == parent
    assert set(json.loads((out / "test" / "summary.json").read_text())) >= {"top1", "top5", "videos"}


@pytest.mark.slow
def test_a_finished_schedule_logs_and_registers_its_classifier_once_and_a_rerun_skips_every_stage(data, capsys):
    root = data["root"] / "whole"
    root.mkdir()
    config = tiny_schedule(root, data["train"], data["val"])
    first = run_to_end(config)
    assert first.returncode == 0, first.stdout[-6000:]
    again = run_to_end(config)
    assert again.returncode == 0, again.stdout[-6000:]
    assert [line for line in again.stdout.splitlines() if "skipped" in line] == [
        f"progressive: [{i}/3] {name} ({kind}): finished, skipped ({root / 'schedule' / name})"
        for i, (name, kind) in enumerate((("pretrain", "pretrain"), ("finetune", "finetune"),
                                          ("test", "evaluate")), 1)]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    state = json.loads((root / "schedule" / SCHEDULE_FILE).read_text())
    assert state["model"]["registered"] == "vmaescale-tiny-motion/1"  # logged once, not per launch
    client = MlflowClient(uri, registry_uri=uri)
    [version] = client.search_model_versions("name = 'vmaescale-tiny-motion'")
    assert version.run_id == state["parent_run_id"]
    import mlflow.pyfunc
    import numpy as np
    os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = uri
    try:
        model = mlflow.pyfunc.load_model("models:/vmaescale-tiny-motion/1")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_REGISTRY_URI"]
    labels = json.loads((data["train"] / "labels.json").read_text())
    predicted = model.predict(np.zeros((2, 3, 8, 64, 64), dtype=np.float32))
    assert list(predicted.columns) == [*sorted(labels, key=labels.get), "label"]
    from vmaescale import cli
    capsys.readouterr()
    assert cli.main(["runs", "compare", state["parent_run_id"], "--tracking-uri", uri, "--format", "json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]  # the schedule as a tree: parent, then its stages
    assert [(r["depth"], r["stage"]) for r in runs] == [(0, ""), (1, "pretrain"), (1, "finetune"), (1, "test")]
    assert runs[3]["metrics"]["test_top1"] == json.loads((root / "schedule" / "test" / "summary.json").read_text())["top1"]


def test_a_changed_schedule_is_refused_with_the_difference_unless_allowed(tmp_path, data, monkeypatch):
    monkeypatch.chdir(REPO)  # the stage configs are named relative to the repository
    config = tiny_schedule(tmp_path, data["train"], data["val"])
    Schedule(load_schedule(config)).lock.release()  # a first launch: schedule.json, the parent run
    cfg = json.loads(config.read_text())
    cfg["stages"][1]["set"][0] = "train.max_steps=200"
    cfg["launcher"] = "deepspeed --num_gpus 2"  # how to launch is not a change of the schedule
    config.write_text(json.dumps(cfg))
    refused = run_to_end(config)
    assert refused.returncode == 2
    [line] = refused.stdout.strip().splitlines()
    assert line.startswith("launch/progressive.py: error: the schedule config changed since")
    assert "stages.finetune.set: [" in line and "'train.max_steps=120'" in line and "'train.max_steps=200'" in line
    assert "launcher" not in line and "--allow-config-change" in line
    allowed = Schedule(load_schedule(config), allow_config_change=True)
    allowed.lock.release()
    stored = json.loads((tmp_path / "schedule" / SCHEDULE_FILE).read_text())
    assert stored["config"]["stages"][1]["set"][0] == "train.max_steps=200"
    assert stored["parent_run_id"] == allowed.state.parent_run_id


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"name": "ft", "kind": "finetune", "config": "configs/tiny_finetune.json", "init": "pre"}]},
     "stages[0].init: 'pre'; accepted: an earlier training stage []"),
    ({"stages": [{"name": "pre", "kind": "finetune", "config": "configs/tiny.json"}]},
     "stages[0].config: configs/tiny.json is a 'pretrain' config; a finetune stage runs task 'finetune'"),
    ({"stages": [{"name": "t", "kind": "evaluate", "src": "x", "shards": "s"}]},
     "stages[0].src: 'x'; accepted: an earlier finetune or post-pretrain stage []"),
    ({"stages": [{"name": "a/b", "kind": "pretrain", "config": "configs/tiny.json"}]},
     "stages[0].name: 'a/b'; accepted: a plain directory name"),
    ({"stages": [{"name": "a", "kind": "train", "config": "configs/tiny.json"}]},
     "stages[0].kind: 'train' is not one of ['pretrain', 'post-pretrain', 'finetune', 'evaluate']"),
])
def test_a_bad_schedule_is_one_config_error_line(tmp_path, data, change, message):
    config = tiny_schedule(tmp_path, data["train"], data["val"], **change)
    refused = run_to_end(config)
    assert refused.returncode == 2
    assert refused.stdout.strip() == f"launch/progressive.py: config error: {message}"
    assert not (tmp_path / "schedule").exists()


@pytest.mark.parametrize("name", ["progressive_tiny.json", "progressive_motion.json", "progressive_b.json",
                                  "progressive_g.json"])
def test_the_shipped_schedules_load(name, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_schedule(REPO / "configs" / name)
    assert [s.kind for s in cfg.stage_configs()][0] == "pretrain"


STAGE_THAT_CHECKPOINTS_ON_SIGTERM = """
import os, signal, sys, time
def stop(signum, frame):
    with open(os.environ["VMAESCALE_STATUS_FILE"], "w") as f:
        f.write("preempted 75\\n")
    sys.exit(1)  # what torchrun makes of a worker's 75
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1], "w").close()
time.sleep(60)
"""


def test_a_signal_to_the_schedule_reaches_the_stage_and_its_checkpoint_exit_is_75(tmp_path):
    """SIGUSR1 (Slurm's pre-emption signal) to the driver goes on to the stage job as SIGTERM;
    the launcher's generic 1 becomes 75 because rank 0 wrote `preempted` to its status file."""
    import threading

    from vmaescale.progressive import run_stage_job
    ready = tmp_path / "ready"
    command = [sys.executable, "-c", STAGE_THAT_CHECKPOINTS_ON_SIGTERM, str(ready)]

    def signal_when_ready() -> None:
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    assert run_stage_job(command, tmp_path / "exit_status") == 75
    assert run_stage_job([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "exit_status") == 3
