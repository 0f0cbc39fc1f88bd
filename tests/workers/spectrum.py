"""Run under torchrun by test_spectrum.py: uneven per-rank batches, then all_reduce."""
import sys

import torch
import torch.distributed as dist

from directclr import SpectrumAccumulator

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
x = (torch.randn(333, 24) * torch.linspace(0.1, 3, 24) + 100.0).double()  # fp64: judge the merge
x[100:] *= 1000.0  # rank 1's state at a larger power-of-two scale than rank 0's
mine = x[:100] if rank == 0 else x[100:]  # uneven shards
acc = SpectrumAccumulator(24)
for chunk in torch.split(mine, 37):
    acc.update(chunk)
acc.all_reduce()
# A NaN on rank 1 only: after all_reduce every rank's result() knows it.
flagged = SpectrumAccumulator(24).update(mine[:5] if rank == 0 else mine[:5] * float("nan"))
for chunk in torch.split(mine, 37):
    flagged.update(chunk)
try:
    flagged.all_reduce().result()
    error = None
except ValueError as e:
    error = str(e)
if rank == 0:
    torch.save({"x": x, "n": acc.n, "batches": acc.batches, "mean": acc.mean, "m2": acc.m2,
                "nonfinite_error": error}, sys.argv[1])
dist.barrier()  # every rank done before any tears gloo down
dist.destroy_process_group()
