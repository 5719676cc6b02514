"""Run directories that survive misuse: one run at a time, config checks on resume,
checkpoint fallback, and nothing unpickled. Real launches (1 rank, nano, in-memory clips)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_distributed import REPO, command, losses
from vmaescale.train.rundir import RunLock, check_resume_config, RunDirError

pytestmark = pytest.mark.slow


def launch(out: Path, *overrides: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = command(out, 1, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3",
                  *overrides) + list(extra)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run of 4 steps with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("rundir") / "run"
    ok(launch(out))
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".lock"))
    return out


def resumed_step(text: str) -> int:
    line = next(line for line in text.splitlines() if line.startswith("resumed from"))
    return int(line.split(" at step ")[1].split()[0])


# ---- 1. one run per directory ------------------------------------------------------------
def test_a_second_launch_into_a_held_directory_exits_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out)
    try:
        result = launch(out)
    finally:
        lock.release()
    assert result.returncode != 0
    assert f"pid {os.getpid()}" in result.stderr and "in use by another run" in result.stderr
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_the_lock_goes_with_the_process_that_held_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from vmaescale.train.rundir import RunLock; RunLock(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
        RunLock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    RunLock(out).release()  # no stale lock after a kill -9


# ---- 2. the config on resume ---------------------------------------------------------------
def test_a_changed_optimisation_is_refused_with_the_difference_shown(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    stored = (out / "config.json").read_text()
    result = launch(out, "optim.base_lr=0.01", "model.decoder_depth=1", "train.max_steps=6")
    assert result.returncode != 0
    error = next(line for line in result.stderr.splitlines() if line.startswith("launch/pretrain.py: error: "))
    assert "optim.base_lr: 0.03 -> 0.01" in error and "model.decoder_depth: 2 -> 1" in error, error
    assert "--allow-config-change" in error
    assert f'File "{REPO / "vmaescale"}' not in result.stderr  # no traceback of ours (torchrun prints its own)
    assert (out / "config.json").read_text() == stored  # not overwritten


def test_harmless_changes_resume_and_are_logged(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    text = ok(launch(out, "train.max_steps=6", "train.log_every=2"))
    assert resumed_step(text) == 4
    changed = next(line for line in text.splitlines() if line.startswith("resuming with changed settings"))
    assert "train.log_every: 1 -> 2; train.max_steps: 4 -> 6" in changed  # and output_dir: a copy
    assert max(losses(out)) == 6


def test_an_allowed_change_resumes_and_is_recorded_in_mlflow(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    text = ok(launch(out, "optim.base_lr=0.01", "train.max_steps=6", extra=("--allow-config-change",)))
    assert resumed_step(text) == 4 and "optim.base_lr: 0.03 -> 0.01" in text
    assert json.loads((out / "config.json").read_text())["optim"]["base_lr"] == 0.01
    from mlflow.tracking import MlflowClient
    run_id = json.loads((out / "checkpoints" / "step_00000006" / "complete.json").read_text())["run_state"]["mlflow_run_id"]
    tags = MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}").get_run(run_id).data.tags
    assert "optim.base_lr: 0.03 -> 0.01" in tags["resume_config_allowed"]


def test_an_unreadable_stored_config_is_a_refusal_not_a_crash(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(RunDirError, match="cannot be read"):
        check_resume_config(tmp_path / "config.json", {"a": 1}, allow_change=False)


# ---- 3. checkpoint fallback ------------------------------------------------------------------
def damage(out: Path, how: str) -> Path:
    tag = out / "checkpoints" / "step_00000004"
    target = {"truncated": "mp_rank_00_model_states.pt", "zero-byte": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "missing rank state": "rank_state_0.safetensors"}[how]
    path = tag / target
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "zero-byte":
        path.write_bytes(b"")
    else:
        path.unlink()
    return path


@pytest.mark.parametrize("how", ["truncated", "zero-byte", "missing rank state"])
def test_a_damaged_newest_checkpoint_is_named_and_the_older_one_resumed(finished, tmp_path, how):
    out = copy_of(finished, tmp_path)
    broken = damage(out, how)
    text = ok(launch(out, "train.max_steps=6"))
    assert f"checkpoint step_00000004 cannot be resumed from: {broken}" in text
    assert resumed_step(text) == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-4:] == [3, 4, 5, 6]  # steps 3-4 trained again


@pytest.mark.parametrize("latest", [b"/elsewhere/checkpoints/step_00000002", b"../../other/step_00000002",
                                    b"\xff\xfe\x00garbage"])
def test_latest_is_only_a_tag_of_this_directory(finished, tmp_path, latest):
    out = copy_of(finished, tmp_path)
    (out / "checkpoints" / "latest").write_bytes(latest)
    assert resumed_step(ok(launch(out, "train.max_steps=6"))) == 4  # the newest complete tag here


# ---- 4. nothing unpickled -----------------------------------------------------------------------
class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['VMAESCALE_PLANTED_MARKER']}",))


def test_a_planted_pickle_in_the_newest_checkpoint_does_not_run(finished, tmp_path, monkeypatch):
    out = copy_of(finished, tmp_path)
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("VMAESCALE_PLANTED_MARKER", str(marker))
    tag = out / "checkpoints" / "step_00000004"
    path = tag / "mp_rank_00_model_states.pt"
    import torch
    torch.save({"module": Planted()}, path)  # a real torch zip file holding a code-running pickle
    complete = json.loads((tag / "complete.json").read_text())
    complete["files"][path.name] = path.stat().st_size  # pass the size check: only the load can stop it
    (tag / "complete.json").write_text(json.dumps(complete))
    text = ok(launch(out, "train.max_steps=6"))
    assert not marker.exists()
    assert "checkpoint step_00000004 failed to load (UnpicklingError" in text
    assert resumed_step(text) == 2


def test_rank_state_files_are_safetensors_not_pickles(finished):
    tag = finished / "checkpoints" / "step_00000004"
    assert not list(tag.glob("rank_state_*.pt"))
    from vmaescale.train.checkpoint import load_rank_state
    state = load_rank_state(finished / "checkpoints", "step_00000004", 0)
    assert set(state) == {"rng", "masks"} and state["rng"]["numpy"][0] == "MT19937"


# ---- shards refused before any process group ---------------------------------------------------
def test_a_truncated_shard_ends_the_launch_before_any_process_group(tmp_path):
    from vmaescale.data.shards import BuildOptions, build_shards
    from vmaescale.data.synthetic import write_synthetic_videos
    write_synthetic_videos(tmp_path / "videos", n=8, codec="vp9", size=32, frames=16, classes=2)
    shards = tmp_path / "shards"
    build_shards(tmp_path / "videos", shards, BuildOptions(codec="vp9", short_side=32, shard_size=4),
                 workers=1, progress=False)
    tar = sorted(shards.glob("*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:1000])
    out = tmp_path / "run"
    result = launch(out, f"data.shards={shards}", "data.backend=fallback")
    assert result.returncode != 0
    line = next(line for line in result.stderr.splitlines() if tar.name in line)
    assert "data.bad_shards" in line or "refuse" in line, line
    assert "init_distributed" not in result.stdout + result.stderr and not (out / "checkpoints").exists()
