"""Loader processes die with the process that iterates the loader, kill -9 included."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from directclr.data import build_pretrain_loader, prepare_synthetic


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) from /proc, None for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(pid: int) -> dict[int, int]:
    """pid -> start time of every descendant of `pid` (the start time tells a reused pid)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    found, todo = {}, [pid]
    while todo:
        for child, start in children.get(todo.pop(), []):
            found[child] = start
            todo.append(child)
    return found


def _alive(processes: dict[int, int]) -> list[int]:
    alive = []
    for pid, start in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start and stat[0] != "Z":
            alive.append(pid)
    return alive


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_torchvision_workers_die_with_a_killed_trainer(tmp_path):
    root = prepare_synthetic(tmp_path / "data", n=16, classes=2, min_side=40, max_side=60,
                             progress=False)
    script = textwrap.dedent(f"""
        from directclr.data import build_pretrain_loader
        if __name__ == "__main__":
            data = build_pretrain_loader("{root}", 4, backend="torchvision", device="cpu",
                                         image_size=32, num_threads=2, recipe="small")
            batches = iter(data)
            next(batches)
            print("running", flush=True)
            while True:
                for _ in data:
                    pass
    """)
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                   stderr=err, text=True)
    processes: dict[int, int] = {}
    try:
        assert trainer.stdout.readline() == "running\n", stderr.read_text()[-3000:]
        processes = _descendants(trainer.pid)
        # The forkserver and its 2 workers, and multiprocessing's resource tracker.
        assert len(processes) >= 3, processes
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 10
        while _alive(processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(processes)
    finally:
        trainer.kill()
        for pid in _alive(processes):
            os.kill(pid, signal.SIGKILL)


SLOW_TO_START = """
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

from directclr.data.workers import worker_args


class SlowToStart(Dataset):
    \"\"\"Unpickled by each worker before its worker_init_fn runs, slowly: a long file list.\"\"\"

    def __init__(self):
        self.items = 8

    def __len__(self):
        return self.items

    def __getitem__(self, i):
        return torch.zeros(1)

    def __setstate__(self, state):
        print("starting", flush=True)
        time.sleep(float(sys.argv[1]))
        self.__dict__.update(state)


if __name__ == "__main__":
    next(iter(DataLoader(SlowToStart(), batch_size=2, **worker_args(2))))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_workers_still_starting_die_with_a_killed_trainer(tmp_path):
    """kill -9 of the trainer while its 2 workers start (unpickling a dataset that takes 60 s):
    nothing of it is left 10 s later, neither the workers nor the forkserver nor the resource
    tracker. Each worker holds a write end of the forkserver's alive pipe until its
    worker_init_fn, and the tracker's until it exits."""
    script = tmp_path / "slow_to_start.py"
    script.write_text(SLOW_TO_START)
    trainer = subprocess.Popen([sys.executable, str(script), "60"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    processes: dict[int, int] = {}
    try:
        assert trainer.stdout.readline() == "starting\n"
        processes = _descendants(trainer.pid)
        assert len(processes) >= 3, processes  # the tracker, the forkserver, a worker or two
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 10
        while _alive(processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(processes), [_stat(pid) for pid in _alive(processes)]
    finally:
        trainer.kill()
        for pid in _alive(processes):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_a_worker_whose_trainer_died_before_it_was_ready_kills_itself():
    """No parent-death signal comes for a death before prctl: the worker checks that its parent
    (the forkserver; here this test) is still the trainer's child."""
    script = ("import sys\n"
              "from directclr.data.workers import _die_with_trainer\n"
              "_die_with_trainer(int(sys.argv[1]), 0)\n"
              "print('alive')\n")
    ready = subprocess.run([sys.executable, "-c", script, str(os.getppid())],
                           capture_output=True, text=True, timeout=120)
    assert ready.returncode == 0 and ready.stdout == "alive\n", ready.stderr[-3000:]
    orphaned = subprocess.run([sys.executable, "-c", script, str(os.getpid())],
                              capture_output=True, text=True, timeout=120)
    assert orphaned.returncode == -signal.SIGKILL and orphaned.stdout == "", orphaned.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="/proc is Linux's")
def test_the_dali_loader_starts_no_processes(tmp_path):
    """DALI runs on threads here (no parallel external source): nothing can outlive the trainer."""
    pytest.importorskip("nvidia.dali")
    root = prepare_synthetic(tmp_path / "data", n=16, classes=2, min_side=40, max_side=60,
                             progress=False)
    before = _descendants(os.getpid())
    data = build_pretrain_loader(root, 4, backend="dali", device="cpu", image_size=32,
                                 num_threads=2, recipe="small")
    next(iter(data))
    assert _descendants(os.getpid()) == before
