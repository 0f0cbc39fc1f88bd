"""SLURM's srun as a launcher without torchrun: the host-list parser, the mapping of SLURM's
environment to torchrun's, and two faked srun tasks training like torchrun's two ranks."""
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

from directclr import distributed
from directclr.distributed import (
    DEFAULT_MASTER_PORT,
    SlurmLaunch,
    cuda_index,
    expand_hostlist,
    first_host,
    setup_distributed,
    slurm_launch,
)

# The 2-rank torchrun tests' argv, environment and check (the tiny and one_process fixtures
# come from conftest.py).
from tests.helpers import ENV_ONE_THREAD, assert_same_training, ddp_args

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT")


def without_launchers(env):
    """`env` less any SLURM or torchrun variable (the tests may themselves run in a job)."""
    return {k: v for k, v in env.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))
            and k not in TORCHRUN_VARS}


@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("gpu-a,gpu-b.cluster.org", ["gpu-a", "gpu-b.cluster.org"]),
    ("node[001-004,007],gpu-a", ["node001", "node002", "node003", "node004", "node007", "gpu-a"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),  # the first number's width, kept past 9
    ("n[8-10]", ["n8", "n9", "n10"]),  # no padding
    ("n[098-100]", ["n098", "n099", "n100"]),
    ("n[1,3,5]", ["n1", "n3", "n5"]),
    ("a[1-2],b[09-10],c", ["a1", "a2", "b09", "b10", "c"]),
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),  # a suffix after the brackets
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),  # every combination, left to right
    (" x[7] , y ", ["x7", "y"]),
])
def test_host_lists_expand_like_scontrol(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "node[1-", "node1-]", "node[3-1]", "node[a-b]",
                                      "node[]", "node[1-[2]]", "n]1[", ","])
def test_malformed_host_lists_are_errors(nodelist):
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(nodelist)


def fake_path(monkeypatch, tmp_path, scontrol=None):
    """PATH = one folder, holding a `scontrol` script with body `scontrol` where given."""
    if scontrol is not None:
        script = tmp_path / "scontrol"
        script.write_text("#!/bin/sh\n" + scontrol + "\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_first_host_asks_scontrol_where_it_is_on_path(monkeypatch, tmp_path):
    fake_path(monkeypatch, tmp_path, 'test "$1 $2 $3" = "show hostnames n[1-2]" && '
                                     'printf "from-scontrol\\nn2\\n"')
    assert first_host("n[1-2]") == "from-scontrol"


@pytest.mark.parametrize("scontrol", [None, "exit 1", "true"])  # absent, failing, silent
def test_first_host_falls_back_to_the_parser(monkeypatch, tmp_path, scontrol):
    fake_path(monkeypatch, tmp_path, scontrol)
    assert first_host("n[07-08]") == "n07"


@pytest.fixture
def logged(caplog):
    """The records of directclr.distributed."""
    caplog.set_level(logging.INFO, logger="directclr.distributed")
    return lambda: [r for r in caplog.records if r.name == "directclr.distributed"]


def srun_env(**extra):
    """Task 3 of an srun step of 8 tasks on two nodes."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3",
            "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "gpu[07-08]",
            **extra}


def test_srun_tasks_map_to_torchrun_variables(monkeypatch, tmp_path, logged):
    fake_path(monkeypatch, tmp_path)
    launch = slurm_launch(srun_env())
    assert launch == SlurmLaunch(rank=3, world=8, local_rank=3, master_addr="gpu07",
                                 master_port=DEFAULT_MASTER_PORT)
    assert launch.environ() == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                                "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    assert logged() == []  # only task 0 says where the rendezvous is
    # The step's own nodes and task count before the job's; MASTER_* where the user set them.
    step = slurm_launch(srun_env(SLURM_STEP_NODELIST="gpu[08-09]", SLURM_STEP_NUM_TASKS="4",
                                 MASTER_PORT="12345"))
    assert (step.world, step.master_addr, step.master_port) == (4, "gpu08", 12345)
    assert slurm_launch(srun_env(MASTER_ADDR="head-ib")).master_addr == "head-ib"
    slurm_launch(srun_env(SLURM_PROCID="0", SLURM_LOCALID="0"))
    assert [r.getMessage() for r in logged()] == [
        "srun: 8 tasks of SLURM job 4242, rendezvous at gpu07:29500"]


def test_torchrun_wins_over_slurm_silently(logged):
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29400"}
    assert slurm_launch({**srun_env(), **torchrun}) is None
    assert slurm_launch({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", **torchrun}) is None
    assert slurm_launch({}) is None
    assert logged() == []


@pytest.mark.parametrize("env, level", [
    # python straight from an sbatch script asking for 32 tasks: SLURM_PROCID=0 but no step
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "32",
      "SLURM_JOB_NODELIST": "n[1-4]"}, logging.WARNING),
    # the same where SLURM names the batch step (0xfffffffe)
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "4294967294", "SLURM_PROCID": "0",
      "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"}, logging.WARNING),
    # an salloc shell of one task, and one of several
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}, logging.INFO),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n1"}, logging.WARNING),
    ({"SLURM_JOB_ID": "7"}, logging.INFO),
    # srun -n 1
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
      "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"}, logging.INFO),
], ids=["sbatch-script", "batch-step", "salloc-1", "salloc-8", "job-id-only", "srun-n1"])
def test_slurm_without_srun_tasks_is_one_process_and_says_so_once(env, level, logged):
    assert slurm_launch(env) is None
    records = logged()
    assert len(records) == 1 and records[0].levelno == level
    assert "one process" in records[0].getMessage().lower()
    assert "srun --ntasks-per-node" in records[0].getMessage()


@pytest.mark.parametrize("change, match", [
    ({"SLURM_PROCID": "8"}, "SLURM_PROCID=8 is not below"),
    ({"SLURM_NTASKS": "eight"}, "SLURM_NTASKS='eight' is not an integer"),
    ({"SLURM_JOB_NODELIST": ""}, "set MASTER_ADDR"),
    ({"SLURM_JOB_NODELIST": "gpu[07-"}, "unbalanced"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
])
def test_inconsistent_srun_environments_are_clear_errors(monkeypatch, tmp_path, change, match):
    fake_path(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match=match):
        slurm_launch(srun_env(**change))


def test_setup_exports_torchrun_variables_for_the_rest_of_the_code(monkeypatch, tmp_path):
    for name in [*os.environ, *TORCHRUN_VARS]:
        if name.startswith("SLURM_") or name in TORCHRUN_VARS:
            # setenv first: monkeypatch then restores the variable's absence too, removing what
            # setup_distributed exports (a RANK left behind would make every later in-process
            # run wait for a process group that never forms)
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
    fake_path(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    monkeypatch.setattr(distributed.dist, "init_process_group", calls.append)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: int(os.environ["RANK"]))
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: int(os.environ["WORLD_SIZE"]))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert setup_distributed() == (0, 1, torch.device("cpu"))  # an salloc shell
    assert not distributed.launched_distributed() and calls == []
    for name, value in srun_env().items():
        monkeypatch.setenv(name, value)
    assert setup_distributed() == (3, 8, torch.device("cpu"))
    assert calls == ["gloo"] and distributed.launched_distributed()
    assert {k: os.environ[k] for k in TORCHRUN_VARS if k in os.environ} == {
        "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": "29500"}


def test_each_srun_task_finds_its_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert cuda_index(5) == 5
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # --gpus-per-task=1
    assert cuda_index(5) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match="at most 4 tasks per node"):
        cuda_index(5)


def test_two_srun_tasks_without_torchrun_train_like_torchrun(tiny, tmp_path, one_process):
    """Two processes with the environment srun gives its tasks (no RANK): a 2-rank run on
    gloo that ends where one process with the whole batch does, as torchrun's 2 ranks do."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = tmp_path / "srun"
    env = without_launchers(ENV_ONE_THREAD)
    logs = [tmp_path / f"task{task}.log" for task in range(2)]
    procs = []
    try:
        for task, log in enumerate(logs):
            task_env = {**env, "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0",
                        "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
                        "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost",
                        "MASTER_PORT": str(port)}
            with log.open("w") as stderr:  # a file, not a pipe: a chatty task cannot block
                procs.append(subprocess.Popen(
                    [sys.executable] + ddp_args(tiny, "directclr") + ["--out", str(out)],
                    stdout=subprocess.DEVNULL, stderr=stderr, env=task_env))
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    errs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(err[-3000:] for err in errs)
    assert f"srun: 2 tasks of SLURM job 4242, rendezvous at localhost:{port}" in errs[0]
    assert " 2 process(es) on cpu" in errs[0]  # train's own account of the world size
    assert_same_training(one_process("directclr"), out, "directclr")
