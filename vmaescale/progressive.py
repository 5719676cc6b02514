"""The progressive schedule: pretrain -> post-pretrain -> finetune (one or two phases) ->
evaluate, one command, each stage its own distributed job, one MLflow parent run.

    python launch/progressive.py --config configs/progressive_b.json --launcher "deepspeed --num_gpus 8"

A schedule config (`ScheduleConfig`, JSON) lists the stages. Each training stage names a
run config and overrides; the schedule adds what links the stages:

    <output_dir>/schedule.json          the schedule config as first launched, the MLflow
                                        parent run id and tracking URI, the logged model
    <output_dir>/<stage>/               the stage's run dir (checkpoints, final/, best/ ...)
    <output_dir>/<stage>/stage.json     lineage: schedule dir, parent run id, init source,
                                        status (running / completed), the stage's run id
    <output_dir>/<stage>/launch_config.json   the run config the stage was launched with
                                        (output_dir, init, tracking.parent_run_id set)

A training stage is finished when its stage.json says completed and `final/` holds the
weights; an evaluate stage when its `summary.json` exists. Re-running the command skips
finished stages, relaunches the unfinished one (the trainer resumes from its checkpoint and
reopens its MLflow run) and reopens the parent run. A schedule config that differs from
the stored one is refused with the difference, unless `--allow-config-change`.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vmaescale.config import ConfigError, TrackingConfig, from_dict, load_config, read_config_file
from vmaescale.train.rundir import RunDirError, RunLock, config_changes, describe

REPO = Path(__file__).resolve().parent.parent
TRAINING_KINDS = {"pretrain": "pretrain", "post-pretrain": "finetune", "finetune": "finetune"}
STAGE_KINDS = (*TRAINING_KINDS, "evaluate")
SCHEDULE_FILE = "schedule.json"
STAGE_FILE = "stage.json"
LAUNCH_CONFIG = "launch_config.json"
# Schedule fields a rerun may change without being refused: how to launch, not what to run.
HARMLESS_CHANGES = ("launcher",)
PAUSED = -1  # run_stage: the job stopped at train.run_steps, resumable; the schedule exits 0


@dataclass
class StageConfig:
    """One stage. Training stages: `config` + `set`, and `init` (an earlier stage whose
    final/ or best/ it starts from). Evaluate stages: `src` (an earlier stage), `shards`."""
    name: str = ""
    kind: str = field(default="finetune", metadata={"choices": STAGE_KINDS})
    config: str = ""
    set: list = field(default_factory=list)
    init: str = ""
    init_select: str = field(default="final", metadata={"choices": ("final", "best")})
    src: str = ""
    shards: str = ""
    views: str = "5x3"
    args: list = field(default_factory=list)


@dataclass
class ScheduleConfig:
    """The schedule: its name and output dir, MLflow settings shared by every stage, the
    default launcher (a command prefix), overrides for every training stage, the stages."""
    name: str = "schedule"
    output_dir: str = "runs/schedule"
    launcher: str = "torchrun --standalone --nproc_per_node 1"
    registry_name: str = ""
    set: list = field(default_factory=list)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    stages: list = field(default_factory=list)

    def stage_configs(self) -> list[StageConfig]:
        return [from_dict(StageConfig, stage, f"stages[{i}]") for i, stage in enumerate(self.stages)]

    def to_dict(self) -> dict:
        return asdict(self)


def load_schedule(path: str | Path, overrides: list[str] | None = None) -> ScheduleConfig:
    """Read and validate a schedule config; ConfigError names the bad field."""
    from vmaescale.config import apply_overrides

    data = read_config_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object (a schedule config), got {type(data).__name__}")
    cfg = from_dict(ScheduleConfig, apply_overrides(data, overrides or []))
    check_stages(cfg.stage_configs(), cfg.set)
    return cfg


def check_stages(stages: list[StageConfig], common_set: list[str]) -> None:
    """Names unique and usable as directory names; `init` / `src` name earlier stages of the
    right kind; training stages name a run config whose task fits their kind."""
    if not stages:
        raise ConfigError("stages: empty; accepted: a list of stages (pretrain, post-pretrain, finetune, evaluate)")
    seen: dict[str, StageConfig] = {}
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not stage.name or Path(stage.name).name != stage.name or stage.name.startswith("."):
            raise ConfigError(f"{where}.name: {stage.name!r}; accepted: a plain directory name")
        if stage.name in seen:
            raise ConfigError(f"{where}.name: {stage.name!r} is used twice")
        if stage.kind == "evaluate":
            check_evaluate_stage(stage, where, seen)
        else:
            check_training_stage(stage, where, seen, common_set)
        seen[stage.name] = stage


def check_training_stage(stage: StageConfig, where: str, earlier: dict[str, StageConfig],
                         common_set: list[str]) -> None:
    if not stage.config:
        raise ConfigError(f"{where}.config: empty; a {stage.kind} stage needs a run config (configs/*.json)")
    if stage.init and (stage.init not in earlier or earlier[stage.init].kind == "evaluate"):
        training = [name for name, s in earlier.items() if s.kind != "evaluate"]
        raise ConfigError(f"{where}.init: {stage.init!r}; accepted: an earlier training stage {training}")
    if stage.init and stage.kind == "pretrain":
        raise ConfigError(f"{where}.init: a pretrain stage starts from scratch; init is for "
                          "post-pretrain and finetune stages")
    task = load_config(stage.config, [*common_set, *stage.set]).task
    if task != TRAINING_KINDS[stage.kind]:
        raise ConfigError(f"{where}.config: {stage.config} is a {task!r} config; a {stage.kind} stage "
                          f"runs task {TRAINING_KINDS[stage.kind]!r}")


def check_evaluate_stage(stage: StageConfig, where: str, earlier: dict[str, StageConfig]) -> None:
    classifiers = [name for name, s in earlier.items() if s.kind in ("finetune", "post-pretrain")]
    if stage.src not in classifiers:
        raise ConfigError(f"{where}.src: {stage.src!r}; accepted: an earlier finetune or post-pretrain "
                          f"stage {classifiers}")
    if not stage.shards:
        raise ConfigError(f"{where}.shards: empty; an evaluate stage needs the test shards")


# ---------------------------------------------------------------- the schedule's own state


@dataclass
class ScheduleState:
    """schedule.json: what the first launch fixed (config, parent run, URI) and the result."""
    config: dict
    parent_run_id: str | None
    tracking_uri: str
    started: str
    model: dict | None = None


def diffable(config: dict) -> dict:
    """The schedule config with its stage list keyed by stage name, so a difference reads
    `stages.finetune.set: [...] -> [...]`."""
    stages = {str(s.get("name", i)): s for i, s in enumerate(config.get("stages", []))}
    return {**config, "stages": stages}


def schedule_changes(stored: dict, new: dict) -> dict[str, tuple]:
    """The differences that matter: everything but HARMLESS_CHANGES."""
    changes = config_changes(diffable(stored), diffable(new))
    return {k: v for k, v in changes.items() if k not in HARMLESS_CHANGES}


def read_state(out: Path) -> ScheduleState | None:
    path = out / SCHEDULE_FILE
    if not path.is_file():
        return None
    try:
        return ScheduleState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise RunDirError(f"{path} cannot be read ({error}); move {out} away to start the schedule over") from None


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a crash leaves the old file or the new one, never half)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- stage directories


def stage_dir(cfg: ScheduleConfig, stage: StageConfig) -> Path:
    return Path(cfg.output_dir) / stage.name


def training_done(out: Path) -> bool:
    """A training stage is finished: stage.json says completed and final/ holds the weights."""
    record = read_stage_record(out)
    return (record.get("status") == "completed" and (out / "final" / "model.safetensors").is_file()
            and (out / "final" / "vmaescale.json").is_file())


def evaluate_done(out: Path) -> bool:
    return (out / "summary.json").is_file()


def read_stage_record(out: Path) -> dict:
    try:
        return json.loads((out / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def newest_run_state(out: Path) -> dict | None:
    """The run state of the newest complete checkpoint of a run dir (step, MLflow run id), or None."""
    from vmaescale.train.checkpoint import checkpoint_meta, complete_tags

    tags = complete_tags(out / "checkpoints")
    return checkpoint_meta(out / "checkpoints", tags[-1])["run_state"] if tags else None


def checkpoint_step(out: Path) -> int | None:
    state = newest_run_state(out)
    return None if state is None else state["step"]


def stage_run_id(out: Path, kind: str) -> str | None:
    """The stage's MLflow run id: from its newest checkpoint, or the evaluate summary."""
    if kind != "evaluate":
        return (newest_run_state(out) or {}).get("mlflow_run_id")
    try:
        return json.loads((out / "summary.json").read_text()).get("mlflow_run_id")
    except (OSError, ValueError):
        return None


def model_dir(run_dir: Path) -> Path:
    """What a classifier stage hands on: best/ when present, else final/ (as `evaluate` does)."""
    return run_dir / "best" if (run_dir / "best" / "model.safetensors").is_file() else run_dir / "final"


# ---------------------------------------------------------------- the runner


class Schedule:
    """Runs a schedule: see the module docstring."""

    def __init__(self, cfg: ScheduleConfig, launcher: str = "", allow_config_change: bool = False):
        self.cfg = cfg
        self.stages = cfg.stage_configs()
        self.launcher = shlex.split(launcher or cfg.launcher)
        if not self.launcher:
            raise ConfigError("launcher: empty; accepted: a command prefix, e.g. 'deepspeed --num_gpus 8', "
                              "'torchrun --nproc_per_node 8' or 'srun python'")
        self.allow_config_change = allow_config_change
        self.out = Path(cfg.output_dir)
        self.lock = RunLock(self.out)
        self.state = self._open_state()

    # ---- the parent run and schedule.json -----------------------------------------------
    def _open_state(self) -> ScheduleState:
        """The stored state (config checked) or a new one with a new parent run."""
        from vmaescale.tracking import resolve_tracking_uri, start_parent_run

        stored = read_state(self.out)
        config = self.cfg.to_dict()
        if stored is None:
            uri = resolve_tracking_uri(self.cfg.tracking)
            tracking = replace(self.cfg.tracking, tracking_uri=uri)
            parent = start_parent_run(tracking, self.cfg.tracking.run_name or self.cfg.name, config)
            state = ScheduleState(config, parent, uri, time.strftime("%Y-%m-%d %H:%M:%S %Z"))
            write_json(self.out / SCHEDULE_FILE, asdict(state))
            return state
        self._check_config(stored.config, config)
        stored.config = config
        write_json(self.out / SCHEDULE_FILE, asdict(stored))
        self._reopen_parent(stored)
        return stored

    def _check_config(self, stored: dict, new: dict) -> None:
        changes = schedule_changes(stored, new)
        if changes and not self.allow_config_change:
            raise RunDirError(f"the schedule config changed since {self.out / SCHEDULE_FILE} was written: "
                              f"{describe(changes)}. Run with --allow-config-change to go on with it, or "
                              "use a new output_dir")
        if changes:
            self.say(f"going on with schedule config changes allowed by --allow-config-change: {describe(changes)}")

    def _reopen_parent(self, state: ScheduleState) -> None:
        """Set the parent run RUNNING again (a warning, not a stop, when the store lacks it)."""
        from vmaescale.tracking import Tracker

        if state.parent_run_id is None:
            return
        Tracker(self.tracking(state), rank=0, output_dir=self.out, run_config={},
                run_id=state.parent_run_id, new_run_if_missing=False)

    def tracking(self, state: ScheduleState | None = None) -> TrackingConfig:
        uri = (state or self.state).tracking_uri
        return replace(self.cfg.tracking, tracking_uri=uri, system_metrics=False)

    # ---- running --------------------------------------------------------------------------
    def run(self) -> int:
        """Every unfinished stage in order; then the model and the summary. Returns the exit
        status: 0 done (or paused by a stage's train.run_steps), else the failing stage's."""
        for index, stage in enumerate(self.stages):
            code = self.run_stage(index, stage)
            if code != 0:
                return self.stop(stage, code)
        self.log_final_model()
        self.finish()
        return 0

    def run_stage(self, index: int, stage: StageConfig) -> int:
        out = stage_dir(self.cfg, stage)
        head = f"[{index + 1}/{len(self.stages)}] {stage.name} ({stage.kind})"
        done = evaluate_done(out) if stage.kind == "evaluate" else training_done(out)
        if done:
            self.say(f"{head}: finished, skipped ({out})")
            return 0
        step = None if stage.kind == "evaluate" else checkpoint_step(out)
        self.say(f"{head}: " + (f"resuming from its checkpoint at step {step}" if step is not None
                                else "starting") + f" -> {out}")
        command = self.stage_command(index, stage, out)
        self.write_stage_record(index, stage, out, "running")
        self.say(f"{head}: {shlex.join(command)}")
        code = run_stage_job(command, out / STATUS_FILE)
        if code == 0 and stage.kind != "evaluate" and not (out / "final" / "model.safetensors").is_file():
            self.say(f"{head}: the job paused before its end (train.run_steps); run the schedule again to go on")
            return PAUSED
        if code == 0:
            self.write_stage_record(index, stage, out, "completed")
        if code == 0 and stage.kind == "evaluate":
            self.tag_evaluate_run(index, stage, out)
        return code

    def tag_evaluate_run(self, index: int, stage: StageConfig, out: Path) -> None:
        """The stage tags on the evaluate command's child run (training runs get them from
        their config's tracking.tags)."""
        from vmaescale.tracking import Tracker

        run_id = stage_run_id(out, stage.kind)
        if run_id and self.state.parent_run_id:
            tracker = Tracker(self.tracking(), 0, out, {}, run_id=run_id, new_run_if_missing=False)
            tracker.set_tags(self.stage_tags(index, stage))
            tracker.finish()

    def stage_command(self, index: int, stage: StageConfig, out: Path) -> list[str]:
        if stage.kind == "evaluate":
            return self.evaluate_command(index, stage, out)
        launch_config = self.write_launch_config(index, stage, out)
        script = REPO / "launch" / f"{stage.kind.replace('-', '_')}.py"
        extra = ["--allow-config-change"] if self.allow_config_change else []
        return [*self.launcher, str(script), "--config", str(launch_config), *extra]

    def write_launch_config(self, index: int, stage: StageConfig, out: Path) -> Path:
        """The stage's run config: its file + the schedule's and its own overrides + the links
        (output_dir, init, MLflow parent, experiment, stage tags), validated, in its dir."""
        links = [f"output_dir={out}", f"tracking.run_name={stage.name}",
                 f"tracking.experiment={self.cfg.tracking.experiment}",
                 f"tracking.tracking_uri={self.state.tracking_uri}",
                 f"tracking.enabled={json.dumps(self.cfg.tracking.enabled)}",
                 f"tracking.system_metrics={json.dumps(self.cfg.tracking.system_metrics)}",
                 f"tracking.parent_run_id={self.state.parent_run_id or ''}",
                 f"tracking.tags={json.dumps(self.stage_tags(index, stage))}"]
        if stage.init:
            links += [f"finetune.init={stage_dir(self.cfg, self.stage_named(stage.init))}",
                      f"finetune.init_select={stage.init_select}"]
        cfg = load_config(stage.config, [*self.cfg.set, *stage.set, *links])
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / LAUNCH_CONFIG)
        return out / LAUNCH_CONFIG

    def evaluate_command(self, index: int, stage: StageConfig, out: Path) -> list[str]:
        """`vmaescale evaluate` of the src stage's run dir (best/ if present, else final/)
        under the launcher, as a module (`--module` for deepspeed, `-m` for the others)."""
        src = stage_dir(self.cfg, self.stage_named(stage.src))
        module_flag = "--module" if Path(self.launcher[0]).name == "deepspeed" else "-m"
        tracking = (["--tracking-uri", self.state.tracking_uri, "--experiment", self.cfg.tracking.experiment]
                    + (["--parent-run-id", self.state.parent_run_id] if self.state.parent_run_id else [])
                    if self.cfg.tracking.enabled else ["--no-track"])
        return [*self.launcher, module_flag, "vmaescale.cli", "evaluate", str(src), "--shards", stage.shards,
                "--out", str(out), "--views", stage.views, *tracking, *stage.args]

    def stage_tags(self, index: int, stage: StageConfig) -> dict[str, str]:
        from vmaescale.tracking import stage_tags
        return {**stage_tags(stage.name, index, [s.name for s in self.stages]),
                "vmaescale.schedule": self.cfg.name, "vmaescale.stage_kind": stage.kind}

    def stage_named(self, name: str) -> StageConfig:
        return next(s for s in self.stages if s.name == name)

    def write_stage_record(self, index: int, stage: StageConfig, out: Path, status: str) -> None:
        """stage.json: where the stage sits in its schedule and where it started from."""
        out.mkdir(parents=True, exist_ok=True)
        init = stage.init or stage.src
        record = {"schedule": self.cfg.name, "schedule_dir": str(self.out.resolve()),
                  "parent_run_id": self.state.parent_run_id, "tracking_uri": self.state.tracking_uri,
                  "stage": stage.name, "index": index, "kind": stage.kind, "status": status,
                  "init_from": str(stage_dir(self.cfg, self.stage_named(init)).resolve()) if init else None,
                  "init_select": stage.init_select if stage.init else None,
                  "mlflow_run_id": stage_run_id(out, stage.kind)}
        write_json(out / STAGE_FILE, record)

    # ---- the end ----------------------------------------------------------------------------
    def final_classifier(self) -> Path | None:
        """best/ (else final/) of the last finetune or post-pretrain stage, if any."""
        classifiers = [s for s in self.stages if s.kind in ("finetune", "post-pretrain")]
        return model_dir(stage_dir(self.cfg, classifiers[-1])) if classifiers else None

    def log_final_model(self) -> None:
        """Log the final classifier to the parent run as an MLflow model (registered when the
        schedule names registry_name), once: a rerun of a finished schedule finds it stored."""
        from vmaescale.tracking import log_classifier_model

        source = self.final_classifier()
        if source is None or self.state.parent_run_id is None or self.state.model is not None:
            return
        try:
            logged = log_classifier_model(self.state.tracking_uri, self.state.parent_run_id, source,
                                          self.cfg.registry_name)
        except Exception as error:  # the schedule is done; a tracking failure must not undo it
            print(f"vmaescale.progressive: WARNING: logging {source} as an MLflow model failed at "
                  f"{self.state.tracking_uri} ({type(error).__name__}: {error}); the weights are in {source}",
                  file=sys.stderr, flush=True)
            return
        self.state.model = {"source": str(source), **logged}
        write_json(self.out / SCHEDULE_FILE, asdict(self.state))

    def finish(self) -> None:
        from vmaescale.tracking import Tracker, end_parent_run

        summary = self.summary()
        write_json(self.out / "summary.json", summary)
        if self.state.parent_run_id:
            tracker = Tracker(self.tracking(), 0, self.out, {}, run_id=self.state.parent_run_id,
                              new_run_if_missing=False)
            tracker.log_dict(summary, "schedule_summary.json")
        end_parent_run(self.tracking(), self.state.parent_run_id)
        print_schedule_summary(summary)
        self.lock.release()

    def stop(self, stage: StageConfig, code: int) -> int:
        """A stage failed or paused: the parent run is marked (FAILED, or KILLED for a
        resumable stop: paused, or 75 = checkpointed on a signal) and the schedule exits with
        the stage's status (0 when paused)."""
        from vmaescale.tracking import end_parent_run

        if code != PAUSED:
            self.say(f"stage {stage.name} ended with exit status {code}; fix what it printed and run the "
                     "same command again: finished stages are skipped, this one resumes from its checkpoint")
        end_parent_run(self.tracking(), self.state.parent_run_id, "KILLED" if code in (PAUSED, 75) else "FAILED")
        self.lock.release()
        return 0 if code == PAUSED else code

    def summary(self) -> dict:
        stages = []
        for stage in self.stages:
            out = stage_dir(self.cfg, stage)
            entry = {"stage": stage.name, "kind": stage.kind, "dir": str(out),
                     "mlflow_run_id": stage_run_id(out, stage.kind)}
            if stage.kind == "evaluate":
                result = json.loads((out / "summary.json").read_text())
                entry.update({k: result.get(k) for k in ("top1", "top5", "mean_class_accuracy", "videos", "failed")})
            else:
                entry["step"] = checkpoint_step(out)
            stages.append(entry)
        return {"schedule": self.cfg.name, "dir": str(self.out), "parent_run_id": self.state.parent_run_id,
                "tracking_uri": self.state.tracking_uri, "experiment": self.cfg.tracking.experiment,
                "stages": stages, "model": self.state.model}

    def say(self, text: str) -> None:
        print(f"progressive: {text}", flush=True)


def print_schedule_summary(summary: dict) -> None:
    print(f"\n== schedule {summary['schedule']} summary " + "=" * 40)
    for entry in summary["stages"]:
        result = (f"top1 {entry['top1']}  top5 {entry['top5']}  videos {entry['videos']}"
                  if entry["kind"] == "evaluate" else f"step {entry['step']}")
        print(f"{entry['stage']:<16} {entry['kind']:<14} {result:<36} run {entry['mlflow_run_id']}  {entry['dir']}")
    if summary["model"]:
        registered = summary["model"].get("registered")
        print(f"model            {summary['model']['model_uri']}" + (f"  registered {registered}" if registered else ""))
    if summary["parent_run_id"]:
        print(f"parent run       {summary['parent_run_id']} in experiment '{summary['experiment']}'")
        print(f"compare          vmaescale runs compare {summary['parent_run_id']} --tracking-uri {summary['tracking_uri']}")


def run_schedule(config: str, overrides: list[str], launcher: str = "", allow_config_change: bool = False) -> int:
    """Load, check and run a schedule; returns the exit status."""
    cfg = load_schedule(config, overrides)
    return Schedule(cfg, launcher, allow_config_change).run()


STATUS_FILE = "exit_status"  # "STATUS CODE" from rank 0 (vmaescale.cluster.write_status_file)


def run_stage_job(command: list[str], status_file: Path) -> int:
    """Run one stage's job and return its exit status. SIGTERM or SIGUSR1 to the schedule is
    passed on as SIGTERM (torchrun handles only SIGTERM, SIGINT, SIGHUP and SIGQUIT); the
    stage checkpoints, and its rank 0's status file turns the launcher's generic failure
    status into 75 (checkpointed, resume me) when that is what happened."""
    from vmaescale.cluster import EXIT_REQUEUE

    status_file.unlink(missing_ok=True)
    child = subprocess.Popen(command, cwd=Path.cwd(), env={**os.environ, "VMAESCALE_STATUS_FILE": str(status_file)})

    def forward(signum, frame) -> None:
        child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code not in (0, EXIT_REQUEUE) and status_file.is_file():
        if status_file.read_text().split()[:1] == ["preempted"]:
            return EXIT_REQUEUE
    return code
