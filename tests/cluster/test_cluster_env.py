"""The process-group variables derived from what each launcher sets (vmaescale.cluster)."""

from __future__ import annotations

import time

import pytest

from vmaescale.cluster import (EXIT_REQUEUE, first_slurm_host, launch_env, parse_slurm_time,
                               single_process_accelerate_note, slurm_master_port, stop_deadline,
                               write_status_file)

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "node01",
            "MASTER_PORT": "41234", "LOCAL_WORLD_SIZE": "2"}
# What srun sets in each task of `srun --ntasks-per-node 4` on node[07-08] (one task per GPU).
SRUN_TASK = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_STEP_NODELIST": "node[07-08]"}


def test_launcher_variables_are_taken_as_they_are():
    env = launch_env({**TORCHRUN, **SRUN_TASK})  # torchrun under srun: torchrun's values win
    assert (env.rank, env.local_rank, env.world_size) == (3, 1, 8)
    assert (env.master_addr, env.master_port, env.launcher) == ("node01", 41234, "launcher")


def test_srun_task_derives_rank_world_and_rendezvous_from_slurm():
    env = launch_env(SRUN_TASK)
    assert (env.rank, env.local_rank, env.world_size) == (5, 1, 8)
    assert env.master_addr == "node07" and env.launcher == "slurm"
    assert env.master_port == slurm_master_port("123456") == 10000 + 123456 % 20000
    assert env.variables() == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                               "MASTER_ADDR": "node07", "MASTER_PORT": str(env.master_port)}


def test_srun_keeps_master_addr_and_port_the_script_exported():
    env = launch_env({**SRUN_TASK, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "23456"})
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 23456)


def test_batch_shell_is_not_mistaken_for_a_task():
    batch = {k: v for k, v in SRUN_TASK.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")}
    env = launch_env(batch, pick_port=lambda: 40001)
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_standalone_process_gets_a_free_port_never_29500():
    env = launch_env({}, pick_port=lambda: 40001)
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (0, 1, "127.0.0.1", 40001)
    real = launch_env({})
    assert real.master_port != 29500 and 0 < real.master_port < 65536


def test_job_port_is_stable_for_a_requeued_job_and_outside_the_ephemeral_range():
    ports = {slurm_master_port(j) for j in (1, 19999, 20000, 987654321)}
    assert all(10000 <= p < 30000 for p in ports)
    assert slurm_master_port("42") == slurm_master_port(42)
    with pytest.raises(ValueError, match="SLURM_JOB_ID: 'x1' is not a number"):
        slurm_master_port("x1")


def test_multi_process_launch_without_master_port_is_refused():
    with pytest.raises(ValueError, match="MASTER_PORT: not set, but WORLD_SIZE is 2"):
        launch_env({"RANK": "0", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("nodelist, first", [
    ("node01", "node01"), ("node[01-08]", "node01"), ("gpu[003-010,012],cpu1", "gpu003"),
    ("a1,a2", "a1"), ("rack[2,4]-n[1-3]", "rack2-n1"), ("localhost", "localhost"),
])
def test_first_host_of_a_slurm_host_list(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_empty_host_list_is_refused():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST: '' is not a Slurm host list"):
        first_slurm_host("")


def test_plain_accelerate_launch_on_a_cpu_machine_is_named():
    single = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False"}
    assert "started a single process" in single_process_accelerate_note(single, gpu_count=0)
    assert single_process_accelerate_note({**single, **TORCHRUN}, gpu_count=0) is None  # --multi_gpu
    assert single_process_accelerate_note(single, gpu_count=1) is None
    assert single_process_accelerate_note({}, gpu_count=0) is None


def test_time_budget_and_slurm_end_time_give_the_earlier_deadline():
    job = {"SLURM_JOB_ID": "7"}
    assert stop_deadline(0, 0, 1000.0, job) is None
    assert stop_deadline(60, 0, 1000.0, {}) == 1060.0
    assert stop_deadline(0, 300, 1000.0, job, job_end=lambda env: 2000.0) == 1700.0
    assert stop_deadline(60, 300, 1000.0, job, job_end=lambda env: 2000.0) == 1060.0
    assert stop_deadline(0, 300, 1000.0, job, job_end=lambda env: None) is None
    assert stop_deadline(0, 300, 1000.0, {}, job_end=lambda env: 2000.0) is None  # not in Slurm


def test_squeue_end_time_is_read_as_local_time():
    expected = time.mktime((2026, 12, 2, 5, 0, 0, 0, 0, -1))
    assert parse_slurm_time("2026-12-02T05:00:00\n") == expected
    for text in ("N/A", "Unknown", "NONE", ""):
        assert parse_slurm_time(text) is None


def test_status_file_tells_the_batch_script_what_happened(tmp_path):
    path = tmp_path / "status"
    write_status_file("preempted", EXIT_REQUEUE, {"VMAESCALE_STATUS_FILE": str(path)})
    assert path.read_text() == "preempted 75\n"
    write_status_file("completed", 0, {})  # unset: nothing written
    assert path.read_text() == "preempted 75\n"
