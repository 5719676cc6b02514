"""The MLflow tracker against real MLflow: the embedded sqlite store and a real server."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from vmaescale.config import RunConfig, TrackingConfig
from vmaescale.tracking import (
    HTTP_ENV_DEFAULTS, RESUMED_FROM_MISSING_TAG, Tracker, end_parent_run, flatten_config,
    git_commit, stage_tags, start_parent_run,
)

WARNING_TAIL = "training continues without tracking"
SERVER_START_TIMEOUT_S = 60
SERVER_NAME = "mlflow-host.test"  # a host name, not an IP; see the loopback_name fixture
MISSING_RUN_ID = "0123456789abcdef0123456789abcdef"


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


@pytest.mark.parametrize("uri", ["sqlite:////proc/mlflow.db",       # MLflow alone: ~100 s
                                 "sqlite:////proc/vmaescale-nope/mlflow.db"])
def test_unwritable_store_fails_in_seconds_with_one_warning(uri, capfd):
    """/proc refuses new files even to root; the run goes on untracked."""
    start = time.monotonic()
    tracker = Tracker(tracking("unwritable", tracking_uri=uri), rank=0, output_dir="r",
                      run_config=run_config())
    for step in range(3):
        tracker.log_metrics({"loss": 1.0}, step)
    tracker.log_dict({"a": 1}, "summary.json")
    tracker.finish("FAILED")
    elapsed_s = time.monotonic() - start

    assert elapsed_s < 15
    assert tracker.run_id is None
    err = capfd.readouterr().err
    warnings = warnings_in(err)
    assert len(warnings) == 1 and f"at {uri} " in warnings[0] and "writable" in warnings[0]
    assert "will be retried" not in err  # MLflow's engine retry loop never ran


def test_resume_of_a_run_the_store_lacks_opens_a_new_tagged_run(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # a fresh mlflow.db that has never seen MISSING_RUN_ID
    config = run_config()
    tracker = Tracker(tracking("lost"), rank=0, output_dir=tmp_path / "r", run_config=config,
                      run_id=MISSING_RUN_ID, tags={"world_size": 1})
    assert tracker.run_id and tracker.run_id != MISSING_RUN_ID
    tracker.log_metrics({"loss": 0.5}, 7)
    tracker.finish("KILLED")

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.tags[RESUMED_FROM_MISSING_TAG] == MISSING_RUN_ID
    assert run.data.tags["world_size"] == "1" and run.data.params == flatten_config(config)
    assert metric_steps(client, tracker.run_id, "loss") == [(7, 0.5)]
    err = capfd.readouterr().err
    said = [line for line in err.splitlines() if MISSING_RUN_ID in line]
    assert len(said) == 1 and "not found" in said[0] and tracker.run_id in said[0]
    assert warnings_in(err) == []

    again = Tracker(tracking("lost"), rank=0, output_dir=tmp_path / "r", run_config=config,
                    run_id=tracker.run_id)  # the new id, as the checkpoint now stores it
    assert again.run_id == tracker.run_id
    again.finish()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_of_a_deleted_run_opens_a_new_tagged_run(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    first = Tracker(tracking("deleted"), rank=0, output_dir="r", run_config={})
    first.finish("KILLED")
    client = MlflowClient(first.tracking_uri)
    client.delete_run(first.run_id)
    second = Tracker(tracking("deleted"), rank=0, output_dir="r", run_config={},
                     run_id=first.run_id)
    second.finish()
    assert second.run_id != first.run_id
    assert client.get_run(second.run_id).data.tags[RESUMED_FROM_MISSING_TAG] == first.run_id
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if "is deleted" in line] != []
    assert warnings_in(err) == []


def test_ending_a_missing_parent_run_creates_nothing(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    end_parent_run(tracking("parents"), MISSING_RUN_ID)
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    assert client.search_experiments() == [] or all(
        client.search_runs([e.experiment_id]) == [] for e in client.search_experiments())
    warnings = warnings_in(capfd.readouterr().err)
    assert len(warnings) == 1 and MISSING_RUN_ID in warnings[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int | None = None,
                 *extra_args: str) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a (free) loopback port, sqlite backend and artifacts under `root`."""
    port = port or free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/server.db",
               "--artifacts-destination", f"file://{root}/artifacts", *extra_args]
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


@pytest.fixture
def loopback_name(monkeypatch):
    """SERVER_NAME resolves to 127.0.0.1 in this process (no /etc/hosts edit, undone after)."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        return real_getaddrinfo("127.0.0.1" if host == SERVER_NAME else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("NO_PROXY", "*")  # a proxy from the caller's environment would not know it
    return SERVER_NAME


@pytest.fixture
def named_server(tmp_path, loopback_name):
    """A server started as docs/tracking.md says: --allowed-hosts <name>:<port>."""
    port = free_port()
    proc, _ = start_server(tmp_path, port, "--allowed-hosts", f"{loopback_name}:{port}")
    try:
        yield f"http://{loopback_name}:{port}"
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_a_host_name_uri_is_tracked_when_the_server_allows_it(named_server, tmp_path, capfd):
    url = named_server
    config = run_config()
    tracker = Tracker(tracking("named", tracking_uri=url), rank=0, output_dir=tmp_path / "n",
                      run_config=config)
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 + step}, step)
    tracker.log_dict({"final_loss": 3.0}, "summary.json")
    tracker.finish()

    assert warnings_in(capfd.readouterr().err) == []
    client = MlflowClient(url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == flatten_config(config)
    assert metric_steps(client, tracker.run_id, "loss") == [(s, 1.0 + s) for s in range(3)]
    assert artifact_paths(client, tracker.run_id) == {"summary.json"}


@pytest.mark.slow
def test_a_host_name_the_server_does_not_allow_gets_403_and_one_clear_warning(
        mlflow_server, loopback_name, tmp_path, capfd):
    _, ip_url = mlflow_server  # started without --allowed-hosts: localhost and private IPs only
    url = f"http://{loopback_name}:{ip_url.rsplit(':', 1)[1]}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                               timeout=10)
    assert refused.value.code == 403 and b"Invalid Host header" in refused.value.read()

    start = time.monotonic()
    tracker = Tracker(tracking("refused", tracking_uri=url), rank=0, output_dir=tmp_path / "r",
                      run_config=run_config())
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.finish()
    assert time.monotonic() - start < 15
    assert tracker.run_id is None
    warnings = warnings_in(capfd.readouterr().err)
    assert len(warnings) == 1
    assert f"at {url} " in warnings[0] and "403" in warnings[0] and "--allowed-hosts" in warnings[0]


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
