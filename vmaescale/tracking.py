"""MLflow tracking from rank 0: resumable runs, parent/child runs per schedule stage.

    tracker = Tracker(cfg.tracking, rank, cfg.output_dir, cfg.to_dict(),
                      run_id=state.mlflow_run_id, tags={"world_size": 8, "device": "H100"})
    tracker.log_metrics({"loss": 0.61, "lr": 1e-3}, step)
    tracker.finish("KILLED")          # preempted; a later Tracker(run_id=...) resumes the run

Tracking is a side channel: it must never stop training. Any exception from MLflow (a
dead server, a locked sqlite file, a bad artifact path) prints one warning line to stderr,
disables the tracker and returns; every later call is a no-op. On ranks other than 0, or
with `cfg.enabled` False, every method is a no-op and `run_id` is None.

Tracking URI: `cfg.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else
`sqlite:///<absolute cwd>/mlflow.db`. The path is made absolute so a launcher and the
stages it starts agree on one database even if they later change directory. With a sqlite
store, experiments the tracker creates keep their artifacts beside the database, in
`<db dir>/mlruns/<experiment>/`.

MLflow's HTTP client retries a failing request 7 times with exponential backoff and a
120 s timeout, so one call to a dead server can block for minutes. The tracker sets
smaller defaults in its process (`HTTP_ENV_DEFAULTS`); a value already in the environment
wins, so export e.g. `MLFLOW_HTTP_REQUEST_MAX_RETRIES=7` to get MLflow's patient behaviour.
With the defaults a refused connection fails in about 3 s and a server that accepts but
never answers in about 35 s (3 attempts x 10 s + backoff), once: the tracker then disables
itself.

The tracker talks to MLflow through an `MlflowClient` bound to its own URI, not through
the process-global fluent API (`mlflow.start_run`): no global active run can clash with
another run in the process, and no `atexit` hook marks a crashed run FINISHED.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

from vmaescale import __version__
from vmaescale.config import TrackingConfig

HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",    # MLflow default 7
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # MLflow default 2 (seconds, doubled per retry)
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",       # MLflow default 120 (seconds per attempt)
}
RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARAMS_PER_BATCH = 100     # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000   # mlflow.utils.validation.MAX_METRICS_PER_BATCH


def flatten_config(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.size": "B", "optim.betas": "[0.9, 0.95]", ...}.

    Non-empty dicts are walked; lists, tuples and empty dicts become JSON strings; every
    other value becomes str(value).
    """
    flat = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name))
        elif isinstance(value, (dict, list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = str(value)
    return flat


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """cfg.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<absolute cwd>/mlflow.db."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def sqlite_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """file://<db dir>/mlruns/<experiment> for a sqlite store, else None (the server decides).

    MLflow would put a new experiment's artifacts under ./mlruns of whatever directory the
    creating process runs in; next to the database they stay with the run's records.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or tracking_uri == prefix + ":memory:":
        return None
    db_path = Path(tracking_uri[len(prefix):]).resolve()
    return (db_path.parent / "mlruns" / experiment).as_uri()


def limit_http_retries() -> None:
    """Apply HTTP_ENV_DEFAULTS to this process where the variable is not already set."""
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def git_commit() -> str:
    """HEAD of the repository holding this package, or "unknown" (installed wheel, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def provenance_tags() -> dict[str, str]:
    return {"git_commit": git_commit(), "vmaescale_version": __version__}


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """One MLflow run, written from rank 0 only; see the module docstring."""

    def __init__(self, cfg: TrackingConfig, rank: int, output_dir: str | Path, run_config: dict,
                 run_id: str | None = None, parent_run_id: str | None = None,
                 tags: dict | None = None):
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self._client = None
        self._monitor = None
        self._active = rank == 0 and cfg.enabled
        self._call("start", self._start, cfg, Path(output_dir), run_config, run_id,
                   parent_run_id, tags or {})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("log_metrics", self._log_metrics, metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self._log_artifact, Path(path), artifact_path)

    def log_image(self, png_path: str | Path, artifact_path: str = "reconstructions") -> None:
        self._call("log_image", self._log_artifact, Path(png_path), artifact_path)

    def log_dict(self, data: dict, name: str) -> None:
        """Write `data` as the JSON artifact `name` (e.g. "summary.json")."""
        self._call("log_dict", self._log_dict, data, name)

    def set_tags(self, tags: dict) -> None:
        self._call("set_tags", self._set_tags, tags)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED; a KILLED run can be resumed by run_id."""
        if status not in RUN_END_STATUSES:
            raise ValueError(f"run status {status!r}; accepted: {list(RUN_END_STATUSES)}")
        self._call("finish", self._finish, status)
        self._active = False

    def _call(self, action: str, fn, *args) -> None:
        """Run fn(*args) if tracking is active; any exception disables tracking instead."""
        if not self._active:
            return
        try:
            fn(*args)
        except Exception as error:  # tracking must never stop training
            self._disable(action, error)

    def _disable(self, action: str, error: Exception) -> None:
        summary = " ".join(f"{type(error).__name__}: {error}".split())[:500]
        print(f"vmaescale.tracking: WARNING: MLflow {action} failed ({summary}); "
              "training continues without tracking", file=sys.stderr, flush=True)
        self._active = False
        if self._monitor is not None:
            threading.Thread(target=self._monitor.finish, daemon=True).start()

    def _start(self, cfg: TrackingConfig, output_dir: Path, run_config: dict, run_id: str | None,
               parent_run_id: str | None, tags: dict) -> None:
        from mlflow import MlflowClient

        limit_http_retries()
        self.tracking_uri = resolve_tracking_uri(cfg)
        self._client = MlflowClient(self.tracking_uri)
        if run_id:
            self._resume_run(run_id)
        else:
            self._create_run(cfg.experiment, cfg.run_name or output_dir.name, parent_run_id)
            self._log_params(flatten_config(run_config))
        self._set_tags({**provenance_tags(), **tags})
        if cfg.system_metrics:
            self._start_system_metrics(resume=bool(run_id))

    def _resume_run(self, run_id: str) -> None:
        run = self._client.get_run(run_id)
        if run.info.lifecycle_stage != "active":
            raise ValueError(f"cannot resume run {run_id}: it is {run.info.lifecycle_stage}")
        self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _create_run(self, experiment: str, run_name: str, parent_run_id: str | None) -> None:
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(
            experiment, artifact_location=sqlite_artifact_location(self.tracking_uri, experiment))
        tags = {MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {}
        run = self._client.create_run(experiment_id, tags=resolve_tags(tags), run_name=run_name)
        self.run_id = run.info.run_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        for chunk in batched(sorted(params.items()), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])

    def _set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        for chunk in batched(sorted(tags.items()), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in chunk])

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = now_ms()
        entries = [Metric(k, float(v), timestamp, step) for k, v in metrics.items()]
        for chunk in batched(entries, METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)

    def _log_artifact(self, path: Path, artifact_path: str | None) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"artifact {path} is not a file")
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def _log_dict(self, data: dict, name: str) -> None:
        self._client.log_dict(self.run_id, data, name)

    def _start_system_metrics(self, resume: bool) -> None:
        """CPU, memory, disk, network (and GPU with nvidia-ml-py) as system/* metrics."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume,
                                             tracking_uri=self.tracking_uri)
        self._monitor.start()

    def _finish(self, status: str) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._client.set_terminated(self.run_id, status, end_time=now_ms())


def start_parent_run(cfg: TrackingConfig, name: str, run_config: dict) -> str | None:
    """Open the parent run of a multi-stage schedule; pass its id to each stage's Tracker.

    Returns the run id, or None when tracking is disabled or the run could not be created
    (warned once).
    The run stays RUNNING until `end_parent_run`.
    """
    parent_cfg = replace(cfg, run_name=name, system_metrics=False)
    tracker = Tracker(parent_cfg, rank=0, output_dir=name, run_config=run_config,
                      tags={"vmaescale.role": "schedule"})
    return tracker.run_id


def end_parent_run(cfg: TrackingConfig, run_id: str | None, status: str = "FINISHED") -> None:
    """End a parent run opened by `start_parent_run`; a no-op for run_id None."""
    if run_id is None:
        return
    tracker = Tracker(replace(cfg, system_metrics=False), rank=0, output_dir=".", run_config={},
                      run_id=run_id)
    tracker.finish(status)


def stage_tags(stage: str, index: int, stages: Iterable[str]) -> dict[str, str]:
    """Tags that place a child run in its schedule: stage name, position and the full order."""
    return {"vmaescale.stage": stage, "vmaescale.stage_index": str(index),
            "vmaescale.stages": json.dumps(list(stages))}
