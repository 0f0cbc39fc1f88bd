"""Process groups for the launchers users already have: torchrun, SLURM's srun, or none.

- torchrun (or anything that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT):
  its environment as it is. It wins over SLURM's variables (torchrun inside an sbatch script),
  silently.
- srun without torchrun, one task per GPU: rank = SLURM_PROCID, world = the step's task count
  (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS), local rank = SLURM_LOCALID, rendezvous at
  MASTER_ADDR:MASTER_PORT where set, else at the first host of the step's node list (where task 0
  runs) and port DEFAULT_MASTER_PORT. These are exported as torchrun's variables, so code that
  looks for RANK or LOCAL_RANK sees the same environment under either launcher.
      #SBATCH --nodes=4 --ntasks-per-node=8 --gpus-per-node=8
      srun python -m directclr pretrain --data /imagenet/train --out /shared/runs/in1k ...
- Anything else is one plain process. Where SLURM's variables say a job is there but this process
  is not one of several srun tasks (python run straight from an sbatch script or an salloc shell:
  those environments have SLURM_PROCID=0 and the job's SLURM_NTASKS, but no SLURM_STEP_ID), one
  log line says so and how to launch with srun, instead of waiting forever for the other tasks.

NCCL on GPUs, gloo on CPU. The ranks wait for each other at most DIRECTCLR_JOIN_TIMEOUT seconds
(default DEFAULT_JOIN_TIMEOUT) when the process group is set up, not torch's 30 minutes: a rank
that never starts, or a MASTER_ADDR:MASTER_PORT that some node cannot reach, is a one-line error
naming how many ranks are missing and where, exit EXIT_JOIN_TIMEOUT (join_deadline).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("directclr.distributed")

# torch's own default (torchrun's --master-port). Two jobs whose first node is the same need
# different ports: export MASTER_PORT in the sbatch script (e.g. $((20000 + SLURM_JOB_ID % 20000))).
DEFAULT_MASTER_PORT = 29500
# Step ids from this value up are SLURM's own steps (interactive 0xfffffffa, batch 0xfffffffe,
# extern 0xffffffff), never an srun of the user's.
FIRST_SPECIAL_STEP = 0xFFFFFFF0
# How long the ranks of a launch wait for each other at start-up, in seconds: long enough for the
# slowest node of a big job to import torch from a shared filesystem, far below torch's 30 minutes.
DEFAULT_JOIN_TIMEOUT = 300.0
JOIN_TIMEOUT_VARIABLE = "DIRECTCLR_JOIN_TIMEOUT"
# A join done within this many seconds says nothing and opens no connection of its own.
JOIN_QUIET = 2.0
JOIN_POLL = 1.0  # seconds between looks at the rendezvous while waiting
JOIN_PROGRESS_EVERY = 30.0  # seconds between "still waiting" lines
EXIT_JOIN_TIMEOUT = 2  # the exit status of the command's other start-up errors
SRUN_HINT = ("to train on one process per GPU, start it with srun, one task per GPU: "
             "`srun --ntasks-per-node=<GPUs per node> python -m directclr pretrain ...` (or "
             "with torchrun)")


def launched_distributed() -> bool:
    """Whether this process is one rank of several: from the start under torchrun, and once
    setup_distributed has run under srun (it exports RANK)."""
    return "RANK" in os.environ


@dataclass(frozen=True)
class SlurmLaunch:
    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int

    def environ(self) -> dict[str, str]:
        """torchrun's names for this launch (as DINO's init_distributed_mode exports them)."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world),
                "LOCAL_RANK": str(self.local_rank), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def slurm_launch(env: Mapping[str, str] = os.environ) -> SlurmLaunch | None:
    """The launch of this process when it is one of several srun tasks without torchrun; None
    otherwise, after one log line where SLURM's variables are there but not used."""
    if "RANK" in env or not any(name in env for name in ("SLURM_JOB_ID", "SLURM_JOBID",
                                                          "SLURM_PROCID")):
        return None
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "?"
    job_tasks = _int(env, "SLURM_NTASKS", 1)
    tasks = _int(env, "SLURM_STEP_NUM_TASKS", job_tasks)
    if srun_task(env) and tasks > 1:
        rank = _int(env, "SLURM_PROCID")
        if not 0 <= rank < tasks:
            raise ValueError(f"SLURM_PROCID={rank} is not below the step's {tasks} tasks")
        if "SLURM_LOCALID" not in env:
            raise ValueError("srun task without SLURM_LOCALID: cannot tell this node's GPU")
        launch = SlurmLaunch(rank, tasks, _int(env, "SLURM_LOCALID"), master_addr(env),
                             _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT))
        if not 0 < launch.master_port < 65536:
            raise ValueError(f"MASTER_PORT={launch.master_port} is not a TCP port")
        if rank == 0:
            log.info("srun: %d tasks of SLURM job %s, rendezvous at %s:%d", tasks, job,
                     launch.master_addr, launch.master_port)
        return launch
    if srun_task(env):
        log.info("SLURM job %s, an srun step of one task: training as one process; %s", job,
                 SRUN_HINT)
    elif max(job_tasks, tasks) > 1:
        log.warning("SLURM job %s has %d tasks but this process was not started by srun: "
                    "training as ONE process; %s", job, max(job_tasks, tasks), SRUN_HINT)
    else:
        log.info("SLURM job %s of one task, not started by srun: training as one process; %s",
                 job, SRUN_HINT)
    return None


def srun_task(env: Mapping[str, str]) -> bool:
    """Whether srun started this process: srun sets SLURM_STEP_ID (and SLURM_PROCID) for its
    tasks; an sbatch script or an salloc shell has no step of the user's."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    return "SLURM_PROCID" in env and step.isdigit() and int(step) < FIRST_SPECIAL_STEP


def master_addr(env: Mapping[str, str]) -> str:
    """MASTER_ADDR where set, else the first host of the step's (else the job's) node list: the
    node of task 0, which hosts the rendezvous."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name):
            return first_host(env[name])
    raise ValueError("srun task without SLURM_JOB_NODELIST: set MASTER_ADDR to the host of "
                     "task 0")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames` where it is on PATH, else
    expand_hostlist."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    return expand_hostlist(nodelist)[0]


_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list in full, in order: "node[001-003,007],gpu-a" ->
    node001 node002 node003 node007 gpu-a. A range keeps its first number's zero padding; several
    bracket groups in one name give every combination ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2)."""
    hosts: list[str] = []
    for name in _split_top_level(nodelist):
        expanded = [""]
        rest = name
        while rest:
            open_at = rest.find("[")
            if open_at < 0:
                if "]" in rest:
                    raise ValueError(f"host list {nodelist!r}: ']' without '['")
                expanded = [e + rest for e in expanded]
                break
            close_at = rest.find("]", open_at)
            if close_at < 0 or "[" in rest[open_at + 1:close_at] or "]" in rest[:open_at]:
                raise ValueError(f"host list {nodelist!r}: unbalanced brackets")
            prefix, ranges, rest = rest[:open_at], rest[open_at + 1:close_at], rest[close_at + 1:]
            numbers = _expand_ranges(ranges, nodelist)
            expanded = [e + prefix + n for e in expanded for n in numbers]
        hosts.extend(expanded)
    if not hosts:
        raise ValueError(f"host list {nodelist!r} names no host")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """The comma-separated names, commas inside brackets left to their ranges."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            names.append(nodelist[start:i])
            start = i + 1
    names.append(nodelist[start:])
    return [name.strip() for name in names if name.strip()]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    numbers = []
    for part in ranges.split(","):
        match = _RANGE.fullmatch(part.strip())
        if not match:
            raise ValueError(f"host list {nodelist!r}: {part!r} is not a number or a range")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"host list {nodelist!r}: range {part!r} runs backwards")
        numbers.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return numbers


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name, "").strip()
    if not value:
        if default is None:
            raise ValueError(f"srun task without {name}")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def cuda_index(local_rank: int) -> int:
    """The GPU of this srun task: its local rank, or the one GPU it sees where srun gave each task
    its own (--gpus-per-task=1, --gpu-bind: CUDA_VISIBLE_DEVICES names one device)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise ValueError(f"task {local_rank} of its node sees {count} GPUs: start at most {count} "
                     "tasks per node (--ntasks-per-node) or give each task one GPU "
                     "(--gpus-per-task=1)")


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun's environment, srun's (exported as torchrun's), or one plain process."""
    launch = slurm_launch(os.environ)
    if launch is not None:
        os.environ.update(launch.environ())
    if not launched_distributed():
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        if launch is not None:
            local_rank = cuda_index(local_rank)
        torch.cuda.set_device(local_rank)
    unset = [name for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
             if not os.environ.get(name)]
    if unset:
        raise ValueError(f"RANK is set but not {', '.join(unset)}: a launcher other than torchrun "
                         "or srun must set all of RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
    with join_deadline(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                       join_timeout(os.environ)):
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def join_timeout(env: Mapping[str, str]) -> float:
    """DIRECTCLR_JOIN_TIMEOUT in seconds, else DEFAULT_JOIN_TIMEOUT."""
    text = env.get(JOIN_TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_JOIN_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{JOIN_TIMEOUT_VARIABLE}={text!r} must be a number of seconds > 0")
    return seconds


@contextlib.contextmanager
def join_deadline(rank: int, world: int, timeout: float):
    """Ends the process with a one-line error when the body (init_process_group) has not returned
    within `timeout` seconds, and turns torch's errors while the ranks join into one line.

    Why a watcher thread, not init_process_group's `timeout=`: torch passes that one value both
    to the env:// rendezvous (the TCPStore's wait for its clients) and to the process group as
    the timeout of every later collective, which must stay long (the ranks wait in a barrier
    while rank 0 writes a checkpoint). Handing init_process_group a store built here (store=...)
    would separate the two, but would copy torch's env:// rendezvous (which process hosts the
    store: rank 0, or torchrun's agent), and the tests that stand in for init_process_group
    would reach for the network. The body runs in C++ with the GIL released, so a thread can
    watch it; nothing can interrupt it, hence os._exit, before anything is written.

    A join that takes longer than JOIN_QUIET seconds is logged (by each node's first process),
    and each waiting rank checks in at the rendezvous store, so that the error can count the
    ranks that never arrived."""
    joined = threading.Event()
    # Held by the watcher from its last look to os._exit, and by this thread to mark the join
    # done: a join that ends while the watcher decides cannot be cut off after it returned.
    decision = threading.Lock()
    watcher = threading.Thread(target=_watch_join, args=(rank, world, timeout, joined, decision),
                               name="directclr-join", daemon=True)
    watcher.start()
    try:
        yield
    except dist.DistError as err:  # MASTER_PORT taken; rank 0, the store's host, gave up
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise ConnectionError(f"rank {rank} of {world}: the ranks could not join at {where}: "
                              f"{str(err).splitlines()[0]}") from None
    finally:
        with decision:
            joined.set()


class JoinCensus:
    """The ranks waiting at the rendezvous store at host:port, each counted once under `key`."""

    def __init__(self, host: str, port: int, key: str):
        self.host, self.port, self.key = host, port, key
        self.store: dist.TCPStore | None = None
        self.present: int | None = None  # None: the store was never reached

    def look(self, seconds_left: float) -> None:
        """Checks in on the first look that reaches the store, then reads the count."""
        try:
            if self.store is None:
                # a plain socket first: a TCPStore that cannot connect dumps a C++ stack trace
                socket.create_connection((self.host, self.port), timeout=JOIN_POLL).close()
                self.store = dist.TCPStore(self.host, self.port, is_master=False,
                                           timeout=timedelta(seconds=max(1.0, seconds_left)),
                                           wait_for_workers=False)
                self.present = self.store.add(self.key, 1)
            else:
                self.present = self.store.add(self.key, 0)
        except (OSError, dist.DistError):  # not up yet, or gone: the last count stands
            return


def _watch_join(rank: int, world: int, timeout: float, joined: threading.Event,
                decision: threading.Lock) -> None:
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    where = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    if joined.wait(min(JOIN_QUIET, timeout / 2)):
        return
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if first_on_node:
        log.info("rank %d: waiting up to %g s for %d ranks to join at %s (%s)", rank, timeout,
                 world, where, JOIN_TIMEOUT_VARIABLE)
    # one key per launch and restart: torchrun's store can outlive a round of workers
    census = JoinCensus(host, port, "directclr/join/{}/{}".format(
        os.environ.get("TORCHELASTIC_RUN_ID", ""),
        os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    progress_at = time.monotonic() + JOIN_PROGRESS_EVERY
    while not joined.wait(max(0.0, min(JOIN_POLL, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            break
        census.look(deadline - time.monotonic())
        if first_on_node and time.monotonic() >= progress_at:
            progress_at += JOIN_PROGRESS_EVERY
            log.info("rank %d: %s of %d ranks at %s, %.0f s left", rank,
                     "?" if census.present is None else census.present, world, where,
                     deadline - time.monotonic())
    census.look(JOIN_POLL)
    decision.acquire()  # kept until os._exit: the join cannot be marked done meanwhile
    if joined.is_set():
        decision.release()
        return
    if census.present is None:
        missing = (f"rank {rank} of {world} found nothing listening at {where} within "
                   f"{timeout:g} s: rank 0 hosts the rendezvous there (not started, or not "
                   "reachable from this node)")
    else:
        missing = (f"{world - census.present} of {world} ranks did not join within {timeout:g} s "
                   f"at {where}")
    log.error("%s; start all %d ranks (WORLD_SIZE) with the same MASTER_ADDR:MASTER_PORT, or "
              "raise %s", missing, world, JOIN_TIMEOUT_VARIABLE)
    os._exit(EXIT_JOIN_TIMEOUT)
