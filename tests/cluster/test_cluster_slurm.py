"""Slurm for real: a one-node cluster on localhost runs launch/slurm/pretrain.sbatch with 2
tasks; a pre-emption signal mid-run makes every rank checkpoint and exit 75, the batch shell
requeues the job, and the second start resumes from that checkpoint into the same MLflow run."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from cluster_runs import REPO, latest_step, overrides
from local_slurm import LocalSlurm, missing_reason

pytestmark = pytest.mark.slow
MAX_STEPS = 120


@pytest.fixture
def slurm(tmp_path):
    reason = missing_reason()
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    cluster = LocalSlurm(tmp_path / "slurm")
    try:
        yield cluster.start()
    finally:
        cluster.stop()
    assert all(p.poll() is not None for p in cluster.procs.values())  # every daemon stopped


def wait_for(predicate, what: str, slurm: LocalSlurm, log: Path, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            job_log = log.read_text()[-3000:] if log.exists() else "(no job log)"
            pytest.fail(f"{what}: not after {timeout_s} s\n{job_log}\n{slurm.logs()}")
        time.sleep(0.5)


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def submit(slurm: LocalSlurm, tmp_path: Path, form: str, out: Path, log: Path) -> str:
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "VMAESCALE_HOME": str(REPO), "LAUNCH_FORM": form,
           "GPUS_PER_NODE": "2", "VMAESCALE_STATUS_FILE": str(tmp_path / "status")}
    tasks = ["--ntasks=2"] if form == "srun" else ["--ntasks=1", "--cpus-per-task=2"]
    submitted = slurm.run(
        "sbatch", "--parsable", "--nodes=1", *tasks, f"--output={log}",
        f"--export=ALL,{','.join(f'{k}={v}' for k, v in env.items())}",
        str(REPO / "launch" / "slurm" / "pretrain.sbatch"), str(REPO / "configs" / "tiny.json"),
        *overrides(out, f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=1000"))
    return submitted.stdout.strip().split(";")[0]


# srun: one task per rank, srun returns the tasks' 75; torchrun: one task running 2 workers,
# torchrun turns their 75 into 1 and the script reads the status rank 0 wrote.
@pytest.mark.parametrize("form, step_status", [("srun", 75), ("torchrun", 1)])
def test_preempted_job_checkpoints_requeues_and_resumes_in_the_same_mlflow_run(slurm, tmp_path,
                                                                               form, step_status):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, tmp_path, form, out, log)
    wait_for(lambda: len(logged_steps(out)) >= 3, "training at step 3", slurm, log)
    slurm.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@N sends
    wait_for(lambda: slurm.job_field(job, "Restarts") == "1", "job requeued", slurm, log)
    # Slurm holds a requeued job until the first start's revoked credential expires
    # (AuthInfo cred_expire: 10 s in the test cluster, 120 s by default), then starts it again.
    wait_for(lambda: slurm.job_field(job, "JobState") == "COMPLETED", "requeued job completed",
             slurm, log)

    first, second = log.read_text().split(f"vmaescale: job {job} (start 2)")
    assert "got SIGUSR1" in first, first[-3000:]
    if form == "srun":  # every rank checkpointed and exited 75
        assert "task 0: Exited with exit code 75" in first and "task 1: Exited with exit code 75" in first
    assert f"exit status {step_status}, run status preempted: requeueing job {job}" in first
    stop_step = int(re.search(r"status\s+preempted.*?checkpoints/step_(\d+)", first, re.S).group(1))
    stop_tag = out / "checkpoints" / f"step_{stop_step:08d}"
    assert {"complete.json", "rank_state_0.safetensors", "rank_state_1.safetensors"} <= \
        {p.name for p in stop_tag.iterdir()}
    assert 3 <= stop_step < MAX_STEPS
    assert f"resumed from {stop_tag} at step {stop_step}" in second, second[-3000:]
    assert "exit status 0, run status completed" in second
    assert latest_step(out) == MAX_STEPS

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))  # both starts, one run, no step twice
