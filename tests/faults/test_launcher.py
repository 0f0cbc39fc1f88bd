"""Launcher faults on 2 gloo ranks: what torchrun (or a rank that never starts) does to
`directclr pretrain`, each case on the tiny runs of test_faults.py and, where it leaves a
checkpoint, resumed to the weights of the 2-rank run that was never interrupted:
SIGTERM to the torchrun process itself, kill -9 of one worker (either rank), and ranks that do
not all join (DIRECTCLR_JOIN_TIMEOUT)."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from directclr import preemption
from directclr.checkpoint import checkpoint_step, read_checkpoint
from directclr.config_file import WRITTEN_NAME
from directclr.distributed import (
    DEFAULT_JOIN_TIMEOUT,
    EXIT_JOIN_TIMEOUT,
    JOIN_TIMEOUT_VARIABLE,
    join_timeout,
)
from directclr.files import TEMPORARY_GLOB
from directclr.preemption import agreed_stop
from directclr.stop_signals import StopSignals
from tests.faults.helpers import (
    DDP_STEPS,
    Work,
    ddp_pretrain_args,
    descendants,
    finished,
    free_port,
    fresh,
    newest_checkpoint,
    rank_pid,
    rows,
    run,
    running,
    same_weights,
    set_arg,
    signalled,
    steps,
)
from tests.helpers import ENV_ONE_THREAD, ROOT, TWO_RANKS

# torchrun ends with its own exception once it is signalled (SignalException) or a worker fails
# (ChildFailedError), whatever its workers returned: 75 from ours after a stop signal.
TORCHRUN_FAILED = 1
JOIN_SECONDS = 5
# Seconds a process may take to import torch and reach the rendezvous on this loaded machine.
START_UP = 30


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny):
    return Work(tmp_path_factory.mktemp("launcher"), tiny)


@pytest.fixture(scope="module")
def reference(work):
    """The 2-rank run that went straight to its end, made once for the module."""
    return finished(work, "ddp-straight", lambda out: ddp_pretrain_args(work, out),
                    launcher=TWO_RANKS)


def rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    """The environment torchrun gives a worker, for a process started by hand."""
    env = {k: v for k, v in ENV_ONE_THREAD.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "GROUP_", "ROLE_", "LOCAL_WORLD"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            **extra}


def assert_job_ended(job: list[int]) -> None:
    """No process of the job, as listed below torchrun before the fault, still runs."""
    deadline = time.monotonic() + 10
    while running(job):
        assert time.monotonic() < deadline, f"still running after torchrun ended: {running(job)}"
        time.sleep(0.1)


def assert_whole_files(out) -> None:
    """Every checkpoint in --out reads back with its checksums; anything else left over is a
    temporary that the next run removes when it takes the folder."""
    for path in out.glob("ckpt_*.pt"):
        read_checkpoint(path)
    known = {"metrics.jsonl", ".lock", WRITTEN_NAME} | {p.name for p in out.glob("ckpt_*.pt")}
    left = [p for p in out.iterdir() if p.name not in known]
    assert all(p.match(TEMPORARY_GLOB) for p in left), left


def assert_resumes_to(reference, args: list[str], out, step: int) -> None:
    resumed = run(args, launcher=TWO_RANKS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stderr, resumed.stderr[-3000:]
    assert "skipping checkpoint" not in resumed.stderr, resumed.stderr[-3000:]
    assert steps(out) == list(range(1, DDP_STEPS + 1)), steps(out)
    assert same_weights(reference, out), "resumed weights differ from the straight 2-rank run's"


def test_sigterm_to_torchrun(work, reference):
    """SIGTERM to torchrun after step 1: it passes SIGTERM to both workers, which agree on a
    step, checkpoint it and exit 75 ("stopped by SIGTERM after step N" from each rank, rank 0's
    included); torchrun itself exits 1. Nothing of the job is left, and the same command
    resumes to the straight run's weights."""
    out = fresh(work / "torchrun-sigterm")
    args = ddp_pretrain_args(work, out)
    job: list[int] = []

    def sigterm_torchrun(proc):
        job.extend(descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
    code, text = signalled([*TWO_RANKS, *args], out, work / "torchrun-sigterm.log", 1,
                           sigterm_torchrun)
    assert_job_ended(job)
    assert code == TORCHRUN_FAILED and "SignalException" in text, f"exit {code}: {text[-3000:]}"
    stopped = checkpoint_step(newest_checkpoint(out))
    assert stopped == max(steps(out)) < DDP_STEPS, (stopped, rows(out))
    # cli prints this line just before the worker exits with EXIT_PREEMPTED
    said = f"directclr pretrain: stopped by SIGTERM after step {stopped};"
    assert text.count(said) == 2, text[-3000:]
    assert_whole_files(out)
    assert_resumes_to(reference, args, out, stopped)


@pytest.mark.parametrize("rank", [1, 0], ids=["rank-1", "rank-0"])
def test_kill_9_one_worker(work, reference, rank):
    """kill -9 of one worker once the checkpoint of step 1 exists: the other one and torchrun
    end within 30 s (torchrun exit 1, naming the rank killed), no process of the job is left,
    every checkpoint in --out is whole, and the same command resumes to the straight run's
    weights."""
    out = fresh(work / f"kill-9-rank-{rank}")
    args = set_arg(ddp_pretrain_args(work, out), "--ckpt-every", "1")
    with open(work / f"kill-9-rank-{rank}.log", "w") as log:
        torchrun = subprocess.Popen([*TWO_RANKS, *args], stdout=log, stderr=subprocess.STDOUT,
                                    env=ENV_ONE_THREAD)
        try:
            deadline = time.monotonic() + 600
            while not (out / "ckpt_000000001.pt").exists():
                assert torchrun.poll() is None and time.monotonic() < deadline, "no checkpoint 1"
                time.sleep(0.02)
            job, victim = descendants(torchrun.pid), rank_pid(torchrun.pid, rank)
            assert len(victim) == 1, f"rank {rank} not found below torchrun: {victim}"
            os.kill(victim[0], signal.SIGKILL)
            killed = time.monotonic()
            code = torchrun.wait(timeout=120)
            ended = time.monotonic() - killed
        finally:
            if torchrun.poll() is None:
                torchrun.kill()
    text = (work / f"kill-9-rank-{rank}.log").read_text()
    print(f"torchrun ended {ended:.2f} s after kill -9 of rank {rank}")
    assert_job_ended(job)
    assert ended < 30, f"torchrun ended {ended:.1f} s after the kill"
    assert code == TORCHRUN_FAILED, f"exit {code}: {text[-3000:]}"
    # torchrun's table of failures (the survivor, exiting first, may head it)
    assert re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\s*exitcode\s*: -9", text), \
        text[-3000:]
    survivor = 1 - rank  # one line, not the traceback of the collective it was in
    assert f"rank {survivor} lost another rank" in text and f"[rank{survivor}]: Traceback" \
        not in text, text[-3000:]
    assert not (out / "backbone.pt").exists(), "the run ended before the kill"
    assert_whole_files(out)
    assert_resumes_to(reference, args, out, checkpoint_step(newest_checkpoint(out)))


@pytest.mark.parametrize("rank, missing", [
    (0, "1 of 2 ranks did not join within 5 s at 127.0.0.1:{port}"),
    (1, "rank 1 of 2 found nothing listening at 127.0.0.1:{port} within 5 s"),
], ids=["rank-0-alone", "rank-1-alone"])
def test_rank_that_never_joins(work, rank, missing):
    """One worker of 2 started alone, with torchrun's environment: after DIRECTCLR_JOIN_TIMEOUT
    seconds (5 here) it exits 2 with one line saying how many ranks are missing (rank 0 hosts
    the rendezvous) or that nothing listens at MASTER_ADDR:MASTER_PORT, having said what it
    waits for; no traceback, nothing written. Without the timeout it waited silently for torch's
    30 minutes."""
    port = free_port()
    out = work / f"never-joined-{rank}"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *ddp_pretrain_args(work, out)], capture_output=True, text=True,
        timeout=JOIN_SECONDS + START_UP + 60,
        # the first process of its node: the one that logs the wait
        env=rank_env(rank, 2, port, LOCAL_RANK="0", **{JOIN_TIMEOUT_VARIABLE: str(JOIN_SECONDS)}))
    took = time.monotonic() - started
    print(f"rank {rank} alone: exit {proc.returncode} after {took:.1f} s")
    assert proc.returncode == EXIT_JOIN_TIMEOUT, proc.stderr[-3000:]
    assert missing.format(port=port) in proc.stderr, proc.stderr[-3000:]
    assert f"waiting up to 5 s for 2 ranks to join at 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert took < JOIN_SECONDS + START_UP, f"{took:.1f} s"
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "5 s"])
def test_bad_join_timeout(value):
    with pytest.raises(ValueError, match=JOIN_TIMEOUT_VARIABLE):
        join_timeout({JOIN_TIMEOUT_VARIABLE: value})


def test_join_timeout_setting():
    assert join_timeout({}) == join_timeout({JOIN_TIMEOUT_VARIABLE: " "}) == DEFAULT_JOIN_TIMEOUT
    assert join_timeout({JOIN_TIMEOUT_VARIABLE: "2.5"}) == 2.5


def test_master_port_in_use(work):
    """Rank 0 whose MASTER_PORT another program holds: exit 2 at once with one line naming the
    address and EADDRINUSE (torch's own traceback before)."""
    out = work / "port-in-use"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = subprocess.run([sys.executable, *ddp_pretrain_args(work, out)],
                              capture_output=True, text=True, timeout=START_UP + 60,
                              env=rank_env(0, 2, port))
    assert proc.returncode == 2, proc.stderr[-3000:]  # the command's exit for a start-up error
    said = f"rank 0 of 2: the ranks could not join at 127.0.0.1:{port}: "
    assert said in proc.stderr and "EADDRINUSE" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


# Rank 1 joins late (past JOIN_QUIET: its rank-0 census is open), then keeps rank 0 waiting in
# an all-reduce for longer than the join timeout: that timeout bounds the join alone.
LATE_AND_SLOW = """
import sys, time
import torch, torch.distributed as dist
from directclr.distributed import JOIN_QUIET, setup_distributed
if sys.argv[1] == "1":
    time.sleep(JOIN_QUIET + 1)
rank, world, _ = setup_distributed()
if rank == 1:
    time.sleep(float(sys.argv[2]) + 3)
total = torch.ones(1)
dist.all_reduce(total)
print("sum", int(total.item()))
# As pretrain ends: a group left to the interpreter's exit can abort in gloo's teardown
# ("terminate called without an active exception", once in CI).
dist.destroy_process_group()
"""


def test_join_timeout_bounds_the_join_alone():
    """Rank 1 joins 3 s after rank 0 (join timeout 8 s); both join, then rank 1 keeps rank 0 in
    an all-reduce for 11 s, which torch's own timeout (30 minutes) allows: both print the sum."""
    port, join_seconds = free_port(), 8
    procs = []
    try:
        for rank in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", LATE_AND_SLOW, str(rank), str(join_seconds)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=rank_env(rank, 2, port, **{JOIN_TIMEOUT_VARIABLE: str(join_seconds)})))
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0 and "sum 2" in stdout, stderr[-3000:]


def test_a_signal_during_the_stop_vote_waits_for_the_next_vote(monkeypatch):
    """A stop signal handled while this rank waits in the vote's all-reduce (the other rank
    voted to go on) must not stop this rank alone: it would wait in the stop's barrier while the
    other trains on (the chaos soak's hang: SIGUSR1 to rank 1 while rank 0 wrote a checkpoint).
    The next vote carries it, and every rank stops there."""
    signals = StopSignals()

    def all_reduce(votes, group=None):  # the handler runs while the vote waits
        signals.received = "SIGUSR1"
    monkeypatch.setattr(preemption.dist, "all_reduce", all_reduce)
    assert agreed_stop(signals, 2, None) is None
    assert agreed_stop(signals, 2, None) == "SIGUSR1"
