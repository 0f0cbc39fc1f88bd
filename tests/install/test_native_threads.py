"""The C++ kernels share their loops over ATen's threads (at::parallel_for, an OpenMP region
compiled into our library): built without OpenMP they would run every row on the calling thread."""
import os
import threading

import torch

from directclr import native


def _thread_cpu_ticks() -> dict[int, int]:
    """CPU time (user + system, clock ticks) of each thread of this process."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        ticks[int(tid)] = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


def test_row_kernels_run_on_every_thread():
    """unit_subvectors (rows split between the threads, no BLAS inside) over 2 threads: the
    thread that is not the caller does a good share of the CPU work."""
    native.load()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z1, z2 = torch.randn(16384, 1024), torch.randn(16384, 1024)
        torch.ops.directclr_cpu.unit_subvectors(z1, z2, 1024)  # threads started
        before = _thread_cpu_ticks()
        for _ in range(60):
            torch.ops.directclr_cpu.unit_subvectors(z1, z2, 1024)
        after = _thread_cpu_ticks()
    finally:
        torch.set_num_threads(threads)
    gained = {tid: after[tid] - before.get(tid, 0) for tid in after}
    caller = gained.pop(threading.get_native_id())
    assert caller > 0 and max(gained.values(), default=0) > 0.25 * caller, (caller, gained)

