"""MLflow tracking from rank 0: resumable runs, parent/child runs per schedule stage.

    tracker = Tracker(cfg.tracking, rank, cfg.output_dir, cfg.to_dict(),
                      run_id=state.mlflow_run_id, tags={"world_size": 8, "device": "H100"})
    tracker.log_metrics({"loss": 0.61, "lr": 1e-3}, step)
    tracker.finish("KILLED")          # preempted; a later Tracker(run_id=...) resumes the run

Tracking is a side channel: it must never stop training. Any exception from MLflow (a
dead server, a locked sqlite file, a bad artifact path) prints one warning line to stderr,
naming the tracking URI and, for the failures we recognise, what to do, then disables the
tracker and returns; every later call is a no-op. On ranks other than 0, or with
`cfg.enabled` False, every method is a no-op and `run_id` is None.

Resuming (`run_id=...`) a run the store does not have (a fresh database, another server,
a deleted run) opens a new run instead, tagged `resumed_from_missing_run=<old id>`, and
prints one line saying so; the caller stores the new `run_id` for the next resume.

Tracking URI: `cfg.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else
`sqlite:///<absolute cwd>/mlflow.db`. The path is made absolute so a launcher and the
stages it starts agree on one database even if they later change directory. With a sqlite
store, experiments the tracker creates keep their artifacts beside the database, in
`<db dir>/mlruns/<experiment>/`.

Before MLflow sees a sqlite URI the tracker opens the file and writes to it in a
transaction it rolls back (`check_sqlite_store`): MLflow retries creating its engine 10
times with backoff (a constant, no variable sets it), so a file that cannot be opened
cost about 100 s before failing; the check fails in milliseconds. A file locked by
another writer passes: MLflow's own busy timeout deals with that.

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
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

from vmaescale import __version__
from vmaescale.config import TrackingConfig, flat_fields

HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",    # MLflow default 7
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # MLflow default 2 (seconds, doubled per retry)
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",       # MLflow default 120 (seconds per attempt)
}
RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARAMS_PER_BATCH = 100     # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000   # mlflow.utils.validation.MAX_METRICS_PER_BATCH
RESUMED_FROM_MISSING_TAG = "resumed_from_missing_run"
SQLITE_PREFIX = "sqlite:///"


class UnwritableStore(OSError):
    """The sqlite file of the tracking URI cannot be opened or written."""


# (text in the error, what to tell the user): the first match is appended to the warning.
ADVICE = (
    ("Invalid Host header", "the server rejects the host name in the URI: start it with "
                            "--allowed-hosts <host>:<port> (see docs/tracking.md)"),
    ("error code 401", "the server wants credentials: export MLFLOW_TRACKING_USERNAME "
                       "and MLFLOW_TRACKING_PASSWORD"),
    ("PERMISSION_DENIED", "the server denies this user: ask its admin for permission on "
                          "the experiment"),
    ("UnwritableStore", "make that path writable or point tracking.tracking_uri / "
                        "MLFLOW_TRACKING_URI elsewhere"),
    ("Connection refused", "start the server or fix the URI (tracking.tracking_uri / "
                           "MLFLOW_TRACKING_URI)"),
)


def flatten_config(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.size": "B", "optim.betas": "[0.9, 0.95]", ...}: MLflow params.

    Fields as `config.flat_fields` walks them; lists, tuples and empty dicts become JSON
    strings, every other value str(value).
    """
    return {name: json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
            for name, value in flat_fields(d, prefix).items()}


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """cfg.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<absolute cwd>/mlflow.db."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def sqlite_db_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (query string dropped), else None."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    path = tracking_uri[len(SQLITE_PREFIX):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def sqlite_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """file://<db dir>/mlruns/<experiment> for a sqlite store, else None (the server decides).

    MLflow would put a new experiment's artifacts under ./mlruns of whatever directory the
    creating process runs in; next to the database they stay with the run's records.
    """
    db_path = sqlite_db_path(tracking_uri)
    if db_path is None:
        return None
    return (db_path.resolve().parent / "mlruns" / experiment).as_uri()


def check_sqlite_store(tracking_uri: str) -> None:
    """Raise UnwritableStore unless the sqlite file of the URI can be created and written.

    A no-op for other URIs. Writes a table inside a transaction it rolls back (a read-only
    file passes BEGIN IMMEDIATE and fails only on the write); a lock held by another
    process counts as writable.
    """
    db_path = sqlite_db_path(tracking_uri)
    if db_path is None:
        return
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(db_path, timeout=0, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE vmaescale_write_check (x)")
            db.execute("ROLLBACK")
    except sqlite3.OperationalError as error:
        if "locked" not in str(error) and "busy" not in str(error):
            raise UnwritableStore(f"cannot write {db_path}: {error}") from error
    except OSError as error:
        raise UnwritableStore(f"cannot create {db_path}: {error}") from error


def advice_for(summary: str) -> str:
    """What to do about a failure whose summary matches ADVICE, else ""."""
    return next((hint for needle, hint in ADVICE if needle in summary), "")


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
                 tags: dict | None = None, new_run_if_missing: bool = True):
        """Open a new run, or resume `run_id`; one that is missing (or deleted) in the store
        gets a new run tagged with the old id unless `new_run_if_missing` is False, when
        it is a failure like any other (one warning, tracking off)."""
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self._client = None
        self._monitor = None
        self._active = rank == 0 and cfg.enabled
        self._new_run_if_missing = new_run_if_missing
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
        text = " ".join(f"{type(error).__name__}: {error}".split())
        summary, advice = text[:500], advice_for(text)
        print(f"vmaescale.tracking: WARNING: MLflow {action} failed at {self.tracking_uri} "
              f"({summary}); {advice + '; ' if advice else ''}"
              "training continues without tracking", file=sys.stderr, flush=True)
        self._active = False
        if self._monitor is not None:
            threading.Thread(target=self._monitor.finish, daemon=True).start()

    def _start(self, cfg: TrackingConfig, output_dir: Path, run_config: dict, run_id: str | None,
               parent_run_id: str | None, tags: dict) -> None:
        from mlflow import MlflowClient

        limit_http_retries()
        self.tracking_uri = resolve_tracking_uri(cfg)
        check_sqlite_store(self.tracking_uri)
        self._client = MlflowClient(self.tracking_uri)
        missing = self._resume_run(run_id) if run_id else None
        if self.run_id is None:
            self._create_run(cfg.experiment, cfg.run_name or output_dir.name, parent_run_id)
            self._log_params(flatten_config(run_config))
        if missing:
            tags = {**tags, RESUMED_FROM_MISSING_TAG: run_id}
            print(f"vmaescale.tracking: MLflow run {run_id} {missing} at {self.tracking_uri}; "
                  f"logging to new run {self.run_id} (tag {RESUMED_FROM_MISSING_TAG}={run_id})",
                  file=sys.stderr, flush=True)
        self._set_tags({**provenance_tags(), **tags})
        if cfg.system_metrics:
            self._start_system_metrics(resume=self.run_id == run_id)

    def _resume_run(self, run_id: str) -> str | None:
        """Reopen run_id (sets self.run_id); if the store lacks it, say why (self.run_id stays
        None) or raise when new_run_if_missing is False."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST" or not self._new_run_if_missing:
                raise
            return "was not found"
        if run.info.lifecycle_stage != "active":
            if not self._new_run_if_missing:
                raise ValueError(f"cannot resume run {run_id}: it is {run.info.lifecycle_stage}")
            return f"is {run.info.lifecycle_stage}"
        self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        return None

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
                      run_id=run_id, new_run_if_missing=False)
    tracker.finish(status)


def stage_tags(stage: str, index: int, stages: Iterable[str]) -> dict[str, str]:
    """Tags that place a child run in its schedule: stage name, position and the full order."""
    return {"vmaescale.stage": stage, "vmaescale.stage_index": str(index),
            "vmaescale.stages": json.dumps(list(stages))}


MODEL_ARTIFACT = "model"
MODEL_URI_TAG = "vmaescale.model_uri"


def log_classifier_model(tracking_uri: str, run_id: str, checkpoint_dir: str | Path,
                         registry_name: str = "") -> dict[str, str | None]:
    """Log a classifier checkpoint dir to run `run_id` as the MLflow model `model`
    (pyfunc, with its Hugging Face export and class names: `vmaescale.mlflow_model`) and,
    when `registry_name` is given, register it as a new version of that registered model.

    Returns {"model_uri": "runs:/<id>/model", "registered": "<name>/<version>" or None}.
    Raises on any MLflow error (the caller decides whether that is fatal).
    """
    import tempfile

    from mlflow import MlflowClient

    from vmaescale.mlflow_model import save_classifier_model

    limit_http_retries()
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        save_classifier_model(checkpoint_dir, Path(tmp) / MODEL_ARTIFACT)
        client.log_artifacts(run_id, str(Path(tmp) / MODEL_ARTIFACT), MODEL_ARTIFACT)
    model_uri = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    client.set_tag(run_id, MODEL_URI_TAG, model_uri)
    registered = register_model(client, run_id, registry_name) if registry_name else None
    return {"model_uri": model_uri, "registered": registered}


def register_model(client, run_id: str, name: str) -> str:
    """A new version of registered model `name` (created if missing) from the run's model;
    returns "<name>/<version>"."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description="vmaescale classifier (pyfunc + Hugging Face export)")
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    version = client.create_model_version(name, source, run_id=run_id)
    return f"{name}/{version.version}"
