"""`vmaescale runs compare`: the parameters that differ between MLflow runs, their final
metrics, a schedule's stages as a tree, and the metrics' histories overlaid in one plot.

    vmaescale runs compare --experiment vit-g
    vmaescale runs compare 3f2a... 9b1c... --metric val_top1 --format csv
    vmaescale runs compare --experiment progressive-tiny --metric loss --plot curves.png

Runs come from an experiment (all of its runs) or from run ids; a run that is a parent
brings its child runs (the stages of a schedule, `mlflow.parentRunId`) along, listed under
it as a tree. A parameter is shown when at least two runs have it and they do not all
agree; a run without it shows nothing there. Metrics are the last logged value (MLflow's
"latest"). The tracking URI is read like everywhere else (`--tracking-uri`, else
$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db); a sqlite file that does not exist
is an error rather than a new empty store.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from vmaescale.config import TrackingConfig
from vmaescale.tracking import limit_http_retries, resolve_tracking_uri, sqlite_db_path

FORMATS = ("table", "csv", "json")
# Shown when no --metric is given, those that any of the runs has.
DEFAULT_METRICS = ("loss", "val_loss", "val_top1", "val_top5", "test_top1", "test_top5",
                   "test_mean_class_accuracy", "recon_psnr")
PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "vmaescale.stage"
MAX_RUNS = 1000


@dataclass
class RunRow:
    """One run as compared: where it sits in the tree, its params, its final metrics."""
    run_id: str
    name: str
    status: str
    parent_run_id: str | None
    depth: int
    stage: str
    params: dict[str, str]
    metrics: dict[str, float]
    start_time: int = 0
    children: list["RunRow"] = field(default_factory=list)


@dataclass
class Comparison:
    rows: list[RunRow]            # tree order: each parent followed by its children
    param_keys: list[str]         # the parameters that differ
    metric_keys: list[str]
    tracking_uri: str


def open_client(tracking_uri: str | None):
    """An MlflowClient for the URI (resolved as the trackers do); a missing sqlite file is
    an error naming it, not a new empty database."""
    from mlflow import MlflowClient

    uri = tracking_uri or resolve_tracking_uri(TrackingConfig())
    db_path = sqlite_db_path(uri)
    if db_path is not None and not db_path.is_file():
        raise FileNotFoundError(f"no MLflow store at {db_path} (tracking URI {uri}); pass "
                                "--tracking-uri or set MLFLOW_TRACKING_URI")
    limit_http_retries()
    return MlflowClient(uri), uri


def experiment_runs(client, experiment: str) -> list:
    """Every active run of the experiment named `experiment`."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"experiment {experiment!r} not found at {client.tracking_uri}; "
                         f"experiments there: {names}")
    return client.search_runs([found.experiment_id], max_results=MAX_RUNS)


def named_runs(client, run_ids: list[str]) -> list:
    """The runs `run_ids` plus, for each, its child runs (a schedule's stages)."""
    from mlflow.exceptions import MlflowException

    runs = []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            raise ValueError(f"run {run_id!r} not found at {client.tracking_uri} "
                             f"({error.error_code})") from None
        runs.append(run)
        runs.extend(child_runs(client, run))
    return runs


def child_runs(client, run) -> list:
    """The runs whose parent is `run`, and theirs, depth first."""
    children = client.search_runs([run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run.info.run_id}'",
                                  max_results=MAX_RUNS)
    return [found for child in children for found in (child, *child_runs(client, child))]


def run_row(run) -> RunRow:
    tags = run.data.tags
    return RunRow(run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
                  parent_run_id=tags.get(PARENT_TAG), depth=0, stage=tags.get(STAGE_TAG, ""),
                  params=dict(run.data.params), metrics=dict(run.data.metrics),
                  start_time=run.info.start_time or 0)


def tree_order(rows: list[RunRow]) -> list[RunRow]:
    """Parents first, each followed by its children (by stage index, then start time);
    `depth` set. A run whose parent is not among `rows` is a root."""
    by_id = {row.run_id: row for row in rows}
    roots = []
    for row in sorted(rows, key=lambda r: (r.start_time, r.run_id)):
        parent = by_id.get(row.parent_run_id or "")
        (parent.children if parent is not None else roots).append(row)
    ordered: list[RunRow] = []

    def visit(row: RunRow, depth: int) -> None:
        row.depth = depth
        ordered.append(row)
        for child in row.children:
            visit(child, depth + 1)

    for root in roots:
        visit(root, 0)
    return ordered


def differing_params(rows: list[RunRow]) -> list[str]:
    """Keys at least two runs have whose values are not all the same among those runs."""
    keys = sorted({key for row in rows for key in row.params})
    differing = []
    for key in keys:
        values = [row.params[key] for row in rows if key in row.params]
        if len(values) >= 2 and len(set(values)) > 1:
            differing.append(key)
    return differing


def chosen_metrics(rows: list[RunRow], wanted: list[str]) -> list[str]:
    """`wanted` (each must be in some run), or the DEFAULT_METRICS any run has."""
    present = {key for row in rows for key in row.metrics}
    if not wanted:
        return [key for key in DEFAULT_METRICS if key in present]
    missing = [key for key in wanted if key not in present]
    if missing:
        raise ValueError(f"metric(s) {missing} are in none of the {len(rows)} runs; "
                         f"their metrics: {sorted(present)}")
    return list(dict.fromkeys(wanted))


def compare(tracking_uri: str | None = None, experiment: str | None = None,
            run_ids: list[str] | None = None, metrics: list[str] | None = None) -> Comparison:
    """Collect the runs of `experiment` or `run_ids` (with their children) and what differs."""
    if bool(experiment) == bool(run_ids):
        raise ValueError("give either --experiment NAME or one or more RUN_IDs, not both or neither")
    client, uri = open_client(tracking_uri)
    runs = experiment_runs(client, experiment) if experiment else named_runs(client, run_ids)
    unique = {run.info.run_id: run for run in runs}
    if not unique:
        raise ValueError(f"experiment {experiment!r} at {uri} has no runs")
    rows = tree_order([run_row(run) for run in unique.values()])
    return Comparison(rows, differing_params(rows), chosen_metrics(rows, metrics or []), uri)


# ---------------------------------------------------------------- output


def label(row: RunRow) -> str:
    """The run's name indented under its parent: '  └ finetune'."""
    return ("  " * (row.depth - 1) + "└ " if row.depth else "") + (row.name or row.run_id[:8])


def metric_text(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def format_table(comp: Comparison) -> str:
    """Runs as a numbered tree, then one line per differing param and per metric, a column
    per run (wide configs read down, not across)."""
    lines = [f"{len(comp.rows)} runs at {comp.tracking_uri}"]
    width = max(len(label(row)) for row in comp.rows)
    for i, row in enumerate(comp.rows, 1):
        stage = f"  stage {row.stage}" if row.stage else ""
        lines.append(f"  [{i}] {label(row):<{width}}  {row.run_id}  {row.status}{stage}")
    lines += section("params that differ", comp.param_keys, comp.rows,
                     lambda row, key: row.params.get(key, ""))
    lines += section("metrics (last value)", comp.metric_keys, comp.rows,
                     lambda row, key: metric_text(row.metrics.get(key)))
    return "\n".join(lines)


def section(title: str, keys: list[str], rows: list[RunRow], cell) -> list[str]:
    if not keys:
        return ["", f"{title}: none"]
    cells = [[str(cell(row, key)) for row in rows] for key in keys]
    key_width = max(len(key) for key in keys)
    widths = [max(len(f"[{i}]"), *(len(c[i - 1]) for c in cells)) for i in range(1, len(rows) + 1)]
    header = "  ".join(f"[{i}]".ljust(w) for i, w in enumerate(widths, 1)).rstrip()
    lines = ["", title, f"  {'':<{key_width}}  {header}"]
    for key, row_cells in zip(keys, cells):
        lines.append(f"  {key:<{key_width}}  " + "  ".join(c.ljust(w) for c, w in zip(row_cells, widths)).rstrip())
    return lines


def records(comp: Comparison) -> list[dict]:
    return [{"run_id": row.run_id, "name": row.name, "status": row.status,
             "parent_run_id": row.parent_run_id, "depth": row.depth, "stage": row.stage,
             "params": {key: row.params.get(key) for key in comp.param_keys},
             "metrics": {key: row.metrics.get(key) for key in comp.metric_keys}}
            for row in comp.rows]


def format_json(comp: Comparison) -> str:
    return json.dumps({"tracking_uri": comp.tracking_uri, "runs": records(comp)}, indent=2)


def format_csv(comp: Comparison) -> str:
    """One row per run: run_id, name, status, parent_run_id, depth, stage, then a
    `param:<key>` column per differing param and a `metric:<key>` column per metric."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run_id", "name", "status", "parent_run_id", "depth", "stage",
                     *(f"param:{k}" for k in comp.param_keys), *(f"metric:{k}" for k in comp.metric_keys)])
    for row in comp.rows:
        writer.writerow([row.run_id, row.name, row.status, row.parent_run_id or "", row.depth, row.stage,
                         *(row.params.get(k, "") for k in comp.param_keys),
                         *("" if row.metrics.get(k) is None else repr(row.metrics[k]) for k in comp.metric_keys)])
    return out.getvalue()


FORMATTERS = {"table": format_table, "csv": format_csv, "json": format_json}


def render(comp: Comparison, fmt: str) -> str:
    if fmt not in FORMATTERS:
        raise ValueError(f"format {fmt!r}; accepted: {list(FORMATS)}")
    return FORMATTERS[fmt](comp)


def metric_histories(comp: Comparison, tracking_uri: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{metric: {run_id: [(step, value), ...]}} for every run that logged the metric."""
    client, _ = open_client(tracking_uri)
    histories: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for key in comp.metric_keys:
        for row in comp.rows:
            if key in row.metrics:
                points = sorted((m.step, m.value) for m in client.get_metric_history(row.run_id, key))
                histories.setdefault(key, {})[row.run_id] = points
    return histories


def plot_curves(comp: Comparison, out_path: str | Path) -> Path:
    """One panel per metric, each run's full history against step (matplotlib, Agg); a line is
    labelled by the run's stage, else its name, and the start of its id."""
    if not comp.metric_keys:
        raise ValueError("nothing to plot: the runs share none of the default metrics; name one "
                         "with --metric")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = metric_histories(comp, comp.tracking_uri)
    names = {row.run_id: f"{row.stage or row.name or row.run_id[:8]} ({row.run_id[:8]})" for row in comp.rows}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {row.run_id: palette[i % len(palette)] for i, row in enumerate(comp.rows)}  # one per run, every panel
    fig, axes = plt.subplots(len(comp.metric_keys), 1, figsize=(8, 3.2 * len(comp.metric_keys)),
                             squeeze=False)
    for ax, key in zip(axes[:, 0], comp.metric_keys):
        for run_id, points in histories.get(key, {}).items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=names[run_id],
                    color=colors[run_id])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
