"""The MLflow tracker against real MLflow: the embedded sqlite store and a real server."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from vmaescale.config import RunConfig, TrackingConfig
from vmaescale.tracking import (
    HTTP_ENV_DEFAULTS, Tracker, end_parent_run, flatten_config, git_commit, stage_tags,
    start_parent_run,
)

WARNING_TAIL = "training continues without tracking"
SERVER_START_TIMEOUT_S = 60


@pytest.fixture(autouse=True)
def clean_mlflow_env():
    """No tracking URI from the caller; undo the HTTP defaults a tracker sets in os.environ."""
    names = (*HTTP_ENV_DEFAULTS, "MLFLOW_TRACKING_URI", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    saved = {name: os.environ.pop(name, None) for name in names}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


@pytest.fixture(scope="module")
def sqlite_dir(tmp_path_factory):
    """One working directory (so one mlflow.db, created once) for the sqlite tests."""
    return tmp_path_factory.mktemp("sqlite_cwd")


@pytest.fixture
def in_sqlite_dir(sqlite_dir, monkeypatch):
    monkeypatch.chdir(sqlite_dir)
    return sqlite_dir


def run_config() -> dict:
    cfg = RunConfig(name="tiny", output_dir="runs/tiny")
    cfg.model.size = "B"
    return cfg.to_dict()


def tracking(experiment: str, **kwargs) -> TrackingConfig:
    return TrackingConfig(experiment=experiment, system_metrics=kwargs.pop("system_metrics", False),
                          **kwargs)


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if WARNING_TAIL in line]


def test_flatten_config_joins_keys_and_writes_lists_as_json():
    flat = flatten_config({"model": {"size": "B", "depth": 12}, "optim": {"betas": [0.9, 0.95]},
                           "deepspeed": {}, "train": {"compile": False}})
    assert flat == {"model.size": "B", "model.depth": "12", "optim.betas": "[0.9, 0.95]",
                    "deepspeed": "{}", "train.compile": "False"}
    assert flatten_config({"a": {"b": 1}}, prefix="run") == {"run.a.b": "1"}


def test_new_run_records_config_metrics_tags_and_artifacts(in_sqlite_dir, tmp_path):
    config = run_config()
    tracker = Tracker(tracking("new-run"), rank=0, output_dir=tmp_path / "runs" / "pretrain_b",
                      run_config=config, tags={"world_size": 2, "device": "cpu"})
    assert tracker.tracking_uri == f"sqlite:///{in_sqlite_dir.resolve()}/mlflow.db"
    assert (in_sqlite_dir / "mlflow.db").is_file()
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-3 * step}, step)
    config_path = tmp_path / "run_config.json"
    config_path.write_text(json.dumps(config))
    png = tmp_path / "step_000004.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    tracker.log_artifact(config_path)
    tracker.log_image(png)
    tracker.log_dict({"final_loss": 0.2, "steps": 5}, "summary.json")
    tracker.set_tags({"stop_reason": "max_steps"})
    tracker.finish()

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain_b"
    assert run.data.params == flatten_config(config)
    assert run.data.params["model.size"] == "B" and run.data.params["optim.betas"] == "[0.9, 0.95]"
    assert metric_steps(client, tracker.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["device"] == "cpu"
    assert tags["stop_reason"] == "max_steps"
    assert tags["git_commit"] == git_commit() and tags["vmaescale_version"]
    assert artifact_paths(client, tracker.run_id) == {
        "run_config.json", "reconstructions/step_000004.png", "summary.json"}
    stored = in_sqlite_dir / "mlruns" / "new-run" / tracker.run_id / "artifacts" / "summary.json"
    assert json.loads(stored.read_text()) == {"final_loss": 0.2, "steps": 5}


def test_sqlite_artifacts_live_beside_the_database_not_in_the_cwd(sqlite_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{sqlite_dir}/mlflow.db"
    tracker = Tracker(tracking("beside", tracking_uri=uri), rank=0, output_dir="r", run_config={})
    tracker.log_dict({"a": 1}, "summary.json")
    tracker.finish()
    assert (sqlite_dir / "mlruns" / "beside" / tracker.run_id / "artifacts" / "summary.json").is_file()
    assert list(tmp_path.iterdir()) == []


def test_resume_continues_the_same_run(in_sqlite_dir, tmp_path, capsys):
    config = run_config()
    first = Tracker(tracking("resume"), rank=0, output_dir=tmp_path / "r", run_config=config)
    for step in range(3):
        first.log_metrics({"loss": float(step)}, step)
    first.finish("KILLED")
    client = MlflowClient(first.tracking_uri)
    assert client.get_run(first.run_id).info.status == "KILLED"

    config["train"]["max_steps"] = 99  # params are immutable: a resumed run keeps the first value
    second = Tracker(tracking("resume"), rank=0, output_dir=tmp_path / "r", run_config=config,
                     run_id=first.run_id)
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    for step in range(3, 6):
        second.log_metrics({"loss": float(step)}, step)
    second.finish()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "0"
    assert metric_steps(client, first.run_id, "loss") == [(s, float(s)) for s in range(6)]
    experiment = client.get_experiment_by_name("resume")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert warnings_in(capsys.readouterr().err) == []


def test_other_ranks_and_disabled_tracking_log_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for tracker in (Tracker(tracking("quiet"), rank=1, output_dir="r", run_config=run_config()),
                    Tracker(tracking("quiet", enabled=False), rank=0, output_dir="r",
                            run_config=run_config())):
        assert tracker.run_id is None
        tracker.log_metrics({"loss": 1.0}, 0)
        tracker.log_dict({"a": 1}, "summary.json")
        tracker.log_artifact(tmp_path / "missing.json")
        tracker.set_tags({"a": "b"})
        tracker.finish("FAILED")
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no artifacts


def test_unknown_end_status_is_rejected(tmp_path):
    tracker = Tracker(tracking("quiet"), rank=1, output_dir="r", run_config={})
    with pytest.raises(ValueError, match="'DONE'.*FINISHED"):
        tracker.finish("DONE")


def test_parent_run_holds_one_child_per_stage(in_sqlite_dir, tmp_path):
    cfg = tracking("progressive")
    parent_id = start_parent_run(cfg, "progressive_b", {"stages": ["pretrain", "finetune"]})
    client = MlflowClient(f"sqlite:///{in_sqlite_dir.resolve()}/mlflow.db")
    for index, stage in enumerate(("pretrain", "finetune")):
        child = Tracker(cfg, rank=0, output_dir=tmp_path / stage, run_config=run_config(),
                        parent_run_id=parent_id,
                        tags=stage_tags(stage, index, ("pretrain", "finetune")))
        child.finish()
        tags = client.get_run(child.run_id).data.tags
        assert tags["mlflow.parentRunId"] == parent_id and tags["vmaescale.stage"] == stage
    end_parent_run(cfg, parent_id)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "progressive_b"
    assert parent.data.params == {"stages": '["pretrain", "finetune"]'}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.data.tags["vmaescale.stage"] for r in children) == ["finetune", "pretrain"]


def test_system_metrics_are_logged_when_enabled(in_sqlite_dir, tmp_path):
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.5"
    tracker = Tracker(tracking("system", system_metrics=True), rank=0, output_dir=tmp_path / "s",
                      run_config={})
    time.sleep(1.5)
    tracker.finish()
    metrics = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


def test_broken_store_warns_once_and_never_raises(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    uri = f"sqlite:///{tmp_path}/a_file/mlflow.db"
    tracker = Tracker(tracking("broken", tracking_uri=uri), rank=0, output_dir="r",
                      run_config={})
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.log_dict({"a": 1}, "summary.json")
    tracker.finish()
    assert tracker.run_id is None
    assert len(warnings_in(capsys.readouterr().err)) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free loopback port, sqlite backend and artifacts under `root`."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/server.db",
               "--artifacts-destination", f"file://{root}/artifacts"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: "
                               f"{(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.25)
    stop_server(proc)
    raise RuntimeError(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S} s: "
                       f"{(root / 'server.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """Kill the server's whole process group (it runs uvicorn in a child process)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    proc, url = start_server(tmp_path)
    try:
        yield proc, url
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_logs_to_a_tracking_server(mlflow_server, tmp_path):
    _, url = mlflow_server
    os.environ["MLFLOW_TRACKING_URI"] = url
    config = run_config()
    tracker = Tracker(tracking("server"), rank=0, output_dir=tmp_path / "srv", run_config=config,
                      tags={"world_size": 1})
    assert tracker.tracking_uri == url
    for step in range(4):
        tracker.log_metrics({"loss": 2.0 - step, "clips_per_s": 10.0}, step)
    config_path = tmp_path / "run_config.json"
    config_path.write_text(json.dumps(config))
    tracker.log_artifact(config_path, "config")
    tracker.finish()

    client = MlflowClient(url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten_config(config)
    assert run.data.tags["world_size"] == "1"
    assert metric_steps(client, tracker.run_id, "loss") == [(s, 2.0 - s) for s in range(4)]
    downloaded = client.download_artifacts(tracker.run_id, "config/run_config.json",
                                           str(tmp_path / "dl"))
    assert json.loads(Path(downloaded).read_text()) == config
    assert any((tmp_path / "artifacts").rglob("run_config.json"))  # stored by the server


@pytest.mark.slow
def test_dead_server_costs_seconds_one_warning_and_no_exception(mlflow_server, tmp_path, capsys):
    proc, url = mlflow_server
    tracker = Tracker(tracking("dying", tracking_uri=url, system_metrics=True), rank=0,
                      output_dir=tmp_path / "d", run_config=run_config())
    tracker.log_metrics({"loss": 1.0}, 0)
    run_id = tracker.run_id
    stop_server(proc)

    start = time.monotonic()
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0}, step)
    tracker.log_artifact(__file__)
    tracker.log_dict({"a": 1}, "summary.json")
    tracker.set_tags({"stop_reason": "done"})
    tracker.finish("FAILED")
    elapsed_s = time.monotonic() - start

    assert elapsed_s < 30
    warnings = warnings_in(capsys.readouterr().err)
    assert len(warnings) == 1 and "log_metrics" in warnings[0]
    assert tracker.run_id == run_id  # kept, so a later resume can find the run
