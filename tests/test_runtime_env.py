"""detect_launch_env() against fake environments: torchrun, srun, a Slurm batch step, a plain process.

Every expected value below is one that the fake environment puts in; nothing is read from the real
environment of the test process (those variables are removed first).
"""

from __future__ import annotations

import subprocess

import pytest

from megatron_prune.runtime import distributed as mpd
from megatron_prune.runtime.distributed import LaunchEnv, detect_launch_env

_LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_STEP_ID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_JOB_NODELIST",
    "SLURM_LAUNCH_NODE_IPADDR",
)


@pytest.fixture(autouse=True)
def _clean_real_env(monkeypatch):
    """The process running pytest may itself be under torchrun or Slurm; hide that."""
    for k in _LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def fake_scontrol(monkeypatch):
    """Replace `scontrol show hostnames LIST` with a table; record the node lists asked for."""
    table = {"gpu[07-08]": ["gpu07", "gpu08"], "node[3-4]": ["node3", "node4"]}
    asked = []

    def run(cmd, **kwargs):
        assert cmd[:3] == ["scontrol", "show", "hostnames"], cmd
        asked.append(cmd[3])
        if cmd[3] not in table:
            raise subprocess.CalledProcessError(1, cmd, "", "bad node list")
        return subprocess.CompletedProcess(cmd, 0, stdout="\n".join(table[cmd[3]]) + "\n", stderr="")

    monkeypatch.setattr(mpd.subprocess, "run", run)
    return asked


# ---------------------------------------------------------------- torchrun


def test_torchrun_all_vars():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "10.1.2.3",
        "MASTER_PORT": "29555",
    }
    assert detect_launch_env(env) == LaunchEnv(
        rank=3, world_size=8, local_rank=3, master_addr="10.1.2.3", master_port=29555, launcher="torchrun"
    )


def test_torchrun_defaults_for_missing_optional_vars():
    le = detect_launch_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert le.launcher == "torchrun"
    assert (le.rank, le.world_size, le.local_rank) == (1, 2, 0)
    assert (le.master_addr, le.master_port) == ("127.0.0.1", 29500)


def test_torchrun_inside_srun_wins_over_slurm_vars():
    # One torchrun per node started by srun: torchrun's RANK/WORLD_SIZE describe the workers.
    env = {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node001",
        "MASTER_PORT": "29400",
        "SLURM_PROCID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "77",
    }
    le = detect_launch_env(env)
    assert le.launcher == "torchrun"
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port) == (
        9,
        16,
        1,
        "node001",
        29400,
    )


def test_rank_without_world_size_is_not_torchrun():
    assert detect_launch_env({"RANK": "2"}).launcher == "single"


# ---------------------------------------------------------------- srun


def test_srun_task_with_master_addr():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "5",
        "SLURM_JOB_ID": "123456",
        "MASTER_ADDR": "node001",
    }
    assert detect_launch_env(env) == LaunchEnv(
        rank=5,
        world_size=16,
        local_rank=5,
        master_addr="node001",
        master_port=20000 + 123456 % 20000,  # 23456: same on every task of the job
        launcher="slurm",
    )


def test_srun_master_port_from_env():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_STEP_ID": "3",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "999",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "31337",
    }
    le = detect_launch_env(env)
    assert (le.launcher, le.master_addr, le.master_port) == ("slurm", "n1", 31337)


def test_srun_port_without_job_id():
    env = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "n1"}
    assert detect_launch_env(env).master_port == 20000


def test_srun_world_size_from_step_num_tasks_when_ntasks_absent():
    env = {
        "SLURM_PROCID": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_JOB_ID": "1",
        "MASTER_ADDR": "n1",
    }
    le = detect_launch_env(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank) == ("slurm", 2, 4, 0)


def test_srun_world_size_defaults_to_one():
    env = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "MASTER_ADDR": "n1"}
    assert detect_launch_env(env).world_size == 1


def test_slurm_batch_step_without_srun_is_single_process():
    # The batch script itself has SLURM_PROCID=0 but no SLURM_STEP_ID: one process, not a step task.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "42", "MASTER_PORT": "25000"}
    le = detect_launch_env(env)
    assert le == LaunchEnv(0, 1, 0, "127.0.0.1", 25000, "single")


def test_slurm_master_addr_is_first_host_of_step_nodelist(fake_scontrol):
    env = {"SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "node[3-4]"}
    assert mpd._slurm_master_addr(env) == "gpu07"
    assert fake_scontrol == ["gpu[07-08]"]


def test_slurm_master_addr_falls_back_to_job_nodelist(fake_scontrol):
    assert mpd._slurm_master_addr({"SLURM_JOB_NODELIST": "node[3-4]"}) == "node3"


def test_slurm_master_addr_falls_back_to_launch_node_ip(fake_scontrol):
    env = {"SLURM_JOB_NODELIST": "unparsable[", "SLURM_LAUNCH_NODE_IPADDR": "10.9.8.7"}
    assert mpd._slurm_master_addr(env) == "10.9.8.7"


def test_slurm_master_addr_without_scontrol(monkeypatch):
    def missing(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(mpd.subprocess, "run", missing)
    assert mpd._slurm_master_addr({"SLURM_JOB_NODELIST": "node[3-4]"}) == "127.0.0.1"


def test_srun_master_addr_from_the_given_environ(fake_scontrol):
    env = {
        "SLURM_PROCID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "5",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    assert detect_launch_env(env).master_addr == "gpu07"


# ---------------------------------------------------------------- plain process


def test_plain_process():
    le = detect_launch_env({})
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.master_addr) == (
        "single",
        0,
        1,
        0,
        "127.0.0.1",
    )
    assert le.master_port == 0  # no rendezvous port: a single process uses an in-memory store


def test_plain_process_master_port_from_env():
    assert detect_launch_env({"MASTER_PORT": "12345"}).master_port == 12345


def test_default_reads_os_environ(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_PORT", "29777")
    le = detect_launch_env()
    assert (le.launcher, le.master_port) == ("torchrun", 29777)
