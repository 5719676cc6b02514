"""`vmaescale runs compare` on real MLflow runs (written by the real Tracker): the embedded
sqlite store and a real `mlflow server` on a free loopback port."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
from PIL import Image

from test_tracking import start_server, stop_server
from vmaescale import cli
from vmaescale.config import RunConfig, TrackingConfig
from vmaescale.tracking import HTTP_ENV_DEFAULTS, Tracker, end_parent_run, stage_tags, start_parent_run

STAGES = ("pretrain", "finetune")


@pytest.fixture(autouse=True)
def clean_mlflow_env():
    names = (*HTTP_ENV_DEFAULTS, "MLFLOW_TRACKING_URI")
    saved = {name: os.environ.pop(name, None) for name in names}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def stage_config(task: str, lr: float) -> dict:
    cfg = RunConfig(name=task, task=task, output_dir=f"runs/{task}")
    cfg.model.size = "nano"
    cfg.optim.base_lr = lr
    return cfg.to_dict()


def write_schedule(uri: str, experiment: str, name: str, lr: float, losses: list[float]) -> dict:
    """A parent run with a pretrain and a finetune child, as launch/progressive.py writes them."""
    tracking = TrackingConfig(experiment=experiment, tracking_uri=uri, system_metrics=False)
    parent = start_parent_run(tracking, name, {"name": name, "stages": list(STAGES)})
    ids = {"parent": parent}
    for index, task in enumerate(STAGES):
        child = Tracker(tracking, 0, f"runs/{name}/{task}", stage_config(task, lr), parent_run_id=parent,
                        tags=stage_tags(task, index, STAGES))
        for step, loss in enumerate(losses, 1):
            child.log_metrics({"loss": loss + index, "lr": lr}, step * 10)
        if task == "finetune":
            child.log_metrics({"val_top1": 50.0 + 10 * lr * 1000}, len(losses) * 10)
        child.finish()
        ids[task] = child.run_id
    end_parent_run(tracking, parent)
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    a = write_schedule(uri, "compare", "sched_a", 1e-3, [0.9, 0.7, 0.5])
    b = write_schedule(uri, "compare", "sched_b", 2e-3, [0.8, 0.6, 0.3, 0.2])
    return {"uri": uri, "a": a, "b": b, "root": root}


def runs_compare(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what writing the runs printed (MLflow's "View run at" lines)
    status = cli.main(["runs", "compare", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_an_experiment_shows_each_schedule_as_a_tree_with_the_differing_params_and_final_metrics(store, capsys):
    status, out, _ = runs_compare(capsys, "--experiment", "compare", "--tracking-uri", store["uri"])
    assert status == 0
    lines = out.splitlines()
    tree = [line.split() for line in lines[1:7]]
    assert [row[1:3] for row in tree] == [["sched_a", store["a"]["parent"]], ["└", "pretrain"], ["└", "finetune"],
                                          ["sched_b", store["b"]["parent"]], ["└", "pretrain"], ["└", "finetune"]]
    assert tree[1][3] == store["a"]["pretrain"] and tree[5][3] == store["b"]["finetune"]
    params = {line.split()[0]: line.split()[1:] for line in lines[7:]
              if line.startswith("  ") and not line.split()[0].startswith("[")}
    assert params["optim.base_lr"] == ["0.001", "0.001", "0.002", "0.002"]  # only the stage runs have it
    assert params["task"] == ["pretrain", "finetune", "pretrain", "finetune"]
    assert "model.size" not in params  # the same in every run that has it
    assert params["loss"] == ["0.5", "1.5", "0.2", "1.2"]  # last values; the parents have none
    assert params["val_top1"] == ["60", "70"]


def test_run_ids_bring_their_stages_and_csv_and_json_carry_the_same_rows(store, capsys):
    parent = store["b"]["parent"]
    status, out, _ = runs_compare(capsys, parent, "--tracking-uri", store["uri"], "--format", "csv",
                                  "--metric", "loss")
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["run_id"] for r in rows] == [parent, store["b"]["pretrain"], store["b"]["finetune"]]
    assert [r["depth"] for r in rows] == ["0", "1", "1"]
    assert [r["parent_run_id"] for r in rows] == ["", parent, parent]
    assert [r["stage"] for r in rows] == ["", "pretrain", "finetune"]
    assert [r["metric:loss"] for r in rows] == ["", "0.2", "1.2"]
    assert rows[1]["param:task"] == "pretrain"
    status, out, _ = runs_compare(capsys, store["a"]["finetune"], store["b"]["finetune"], "--tracking-uri",
                                  store["uri"], "--format", "json")
    runs = json.loads(out)["runs"]
    assert [r["run_id"] for r in runs] == [store["a"]["finetune"], store["b"]["finetune"]]
    assert [r["params"]["optim.base_lr"] for r in runs] == ["0.001", "0.002"]
    assert "task" not in runs[0]["params"]  # both finetune: nothing differs there
    assert [r["metrics"]["val_top1"] for r in runs] == [60.0, 70.0]


def test_the_plot_overlays_every_runs_full_history(store, capsys, tmp_path):
    png = tmp_path / "curves.png"
    status, _, err = runs_compare(capsys, "--experiment", "compare", "--tracking-uri", store["uri"],
                                  "--metric", "loss", "--metric", "val_top1", "--plot", str(png))
    assert status == 0 and f"wrote {png}" in err
    with Image.open(png) as image:
        assert image.format == "PNG" and image.height > image.width / 2  # two panels, one above the other
    from vmaescale.runs import compare, metric_histories
    histories = metric_histories(compare(store["uri"], "compare", metrics=["loss"]), store["uri"])
    assert histories["loss"][store["b"]["pretrain"]] == [(10, 0.8), (20, 0.6), (30, 0.3), (40, 0.2)]
    assert len(histories["loss"]) == 4


def test_user_errors_name_the_bad_value_and_what_is_there(store, capsys, tmp_path):
    status, _, err = runs_compare(capsys, "--experiment", "nope", "--tracking-uri", store["uri"])
    assert status == 2 and "experiment 'nope' not found" in err and "'compare'" in err
    status, _, err = runs_compare(capsys, "--experiment", "compare", "--tracking-uri", store["uri"],
                                  "--metric", "acc")
    assert status == 2 and "metric(s) ['acc'] are in none of the 6 runs" in err and "'loss'" in err
    status, _, err = runs_compare(capsys, "0" * 32, "--tracking-uri", store["uri"])
    assert status == 2 and f"run '{'0' * 32}' not found" in err
    status, _, err = runs_compare(capsys, "--tracking-uri", store["uri"])
    assert status == 2 and "either --experiment NAME or one or more RUN_IDs" in err
    missing = tmp_path / "none.db"
    status, _, err = runs_compare(capsys, "--experiment", "x", "--tracking-uri", f"sqlite:///{missing}")
    assert status == 2 and f"no MLflow store at {missing}" in err and not missing.exists()
    assert len(err.strip().splitlines()) == 1


def test_the_default_tracking_uri_is_mlflow_tracking_uri(store, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    status, out, _ = runs_compare(capsys, store["a"]["parent"])
    assert status == 0 and out.splitlines()[0] == f"3 runs at {store['uri']}"


def test_compare_works_against_a_real_tracking_server(tmp_path, capsys):
    proc, url = start_server(tmp_path)
    try:
        ids = write_schedule(url, "served", "sched_s", 1e-3, [0.9, 0.4])
        status, out, _ = runs_compare(capsys, "--experiment", "served", "--tracking-uri", url,
                                      "--format", "json", "--plot", str(tmp_path / "served.png"))
    finally:
        stop_server(proc)
    assert status == 0
    runs = json.loads(out)["runs"]
    assert [r["run_id"] for r in runs] == [ids["parent"], ids["pretrain"], ids["finetune"]]
    assert [r["metrics"]["loss"] for r in runs] == [None, 0.4, 1.4]
    assert (tmp_path / "served.png").is_file()
