"""DataLoader worker processes that die with the process that iterates the loader, kill -9
included.

Workers start with "forkserver", never "fork": a process that already runs DALI (or any other
threaded library) can deadlock in a forked child. That made them outlive a killed trainer: a
worker's parent is the forkserver, and torch's workers watch only their parent (getppid() in
ManagerWatchdog); the forkserver exits once every write end of its "alive" pipe is closed, and
multiprocessing hands one to every process the forkserver forks, workers included. After kill -9
of the trainer the workers kept the forkserver alive and it kept their parent unchanged: both
lived on (300 s and more; with them the resource tracker, which waits for the workers).

So the kernel ends them (prctl PR_SET_PDEATHSIG; Linux only: elsewhere torch's check of the
parent ends the workers within its 5 s poll):
- the forkserver gets SIGKILL when the trainer's main thread ends (the thread that started it:
  PR_SET_PDEATHSIG watches a thread), set by its preload (forkserver_preload,
  prepare_forkserver), as soon as it has imported this package;
- each worker gets SIGKILL when the forkserver dies, set in the worker as the forkserver forks
  it, before it unpickles the dataset (seconds for a long file list, all that time holding a
  write end of the alive pipe). The forkserver is single-threaded, so the parent thread that
  PR_SET_PDEATHSIG watches is the whole process;
- then the resource tracker sees its pipe's last write end close, and exits.
And each worker closes its write end of the alive pipe in worker_init_fn, leaving the trainer's
as the last: a forkserver that did not get the signal (started by another thread, or by a
process that had set its preload first) still exits when the trainer dies, as designed.

What is left: a trainer killed while its forkserver still imports the package (torch; seconds on
a loaded machine) is outlived by it until that import ends, and then by the worker that the
trainer had already asked for until that worker reaches worker_init_fn.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import multiprocessing.forkserver
import os
import signal
import sys

from ..stop_signals import STOP_SIGNALS

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# A terminal's Ctrl-C and a scheduler's preemption (srun signals every process of a job) reach
# the workers and the forkserver too, while the trainer finishes its step and writes a checkpoint
# (directclr.stop_signals.StopSignals): they ignore them and end with the trainer instead. At the
# trainer's exit, multiprocessing would stop its daemon children with SIGTERM and wait for them,
# forever; so this process kills them first (_kill_workers_at_exit). STOP_SIGNALS: those.
PRELOAD = "directclr.data.forkserver_preload"
# In the forkserver, its pid; in a process it forks, None once that process has set its parent
# death signal (a process a worker forks is not the forkserver's).
_forkserver_pid: int | None = None


def worker_args(num_workers: int) -> dict:
    """DataLoader arguments for `num_workers` worker processes (0: load in the caller)."""
    if num_workers == 0:
        return {"num_workers": 0}
    _kill_workers_at_exit()
    context = multiprocessing.get_context("forkserver")
    preload = multiprocessing.forkserver._forkserver._preload_modules
    if PRELOAD not in preload:  # effective when this process starts its forkserver
        context.set_forkserver_preload([*preload, PRELOAD])
    return {"num_workers": num_workers, "multiprocessing_context": context,
            "worker_init_fn": functools.partial(_die_with_trainer, os.getpid())}


@functools.cache
def _kill_workers_at_exit() -> None:
    """SIGKILL to this process's daemon children (DataLoader workers) at exit: registered after
    multiprocessing's own exit hook, it runs before it (atexit is last in, first out), which then
    finds no child left to terminate() and join()."""
    def kill():
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()
                child.join()
    atexit.register(kill)


def prepare_forkserver() -> None:
    """Run in the forkserver as it starts (forkserver_preload). The stop signals are ignored
    here and, inherited, in every worker from its first instruction (in what it forks, the
    forkserver restores the SIGINT handler it found after its preload: this one's)."""
    global _forkserver_pid
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform != "linux":
        return
    trainer = os.getppid()
    if _started_by_main_thread(trainer):
        _set_parent_death_signal()
        if os.getppid() != trainer:  # it died before the prctl: no signal comes
            os._exit(0)
    _forkserver_pid = os.getpid()
    os.register_at_fork(after_in_child=_die_with_forkserver)


def _started_by_main_thread(parent: int) -> bool:
    """Whether `parent`'s main thread started this process (from /proc; False where the kernel
    does not list a thread's children)."""
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            return str(os.getpid()) in f.read().split()
    except OSError:
        return False


def _die_with_forkserver() -> None:
    """Runs in each process the forkserver forks, right after the fork."""
    global _forkserver_pid
    forkserver, _forkserver_pid = _forkserver_pid, None
    if forkserver is None:
        return
    _set_parent_death_signal()
    if os.getppid() != forkserver:  # it died before the prctl: no signal comes
        os._exit(1)


def _die_with_trainer(trainer: int, worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    server = multiprocessing.forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        # A process started from this worker would start a forkserver of its own (none is
        # known to this process), which sets this anew.
        server._forkserver_alive_fd = None
    if sys.platform != "linux":
        return
    # Set already where the forkserver ran prepare_forkserver; not where another preload won.
    _set_parent_death_signal()
    # The trainer or the forkserver may have died before prctl took effect, and then no signal
    # comes: the parent is then no longer a child of the trainer.
    grandparent = _parent_of(os.getppid())
    if grandparent is not None and grandparent != trainer:
        os.kill(os.getpid(), signal.SIGKILL)


def _set_parent_death_signal() -> None:
    """SIGKILL to this process when the thread that started it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name in parentheses may hold spaces; state and ppid follow it.
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
