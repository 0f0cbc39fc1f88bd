"""Run under torchrun by test_spectrum.py: uneven per-rank batches, then all_reduce."""
import sys

import torch
import torch.distributed as dist

from directclr import SpectrumAccumulator

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
x = (torch.randn(333, 24) * torch.linspace(0.1, 3, 24) + 100.0).double()  # fp64: judge the merge
mine = x[:100] if rank == 0 else x[100:]  # uneven shards
acc = SpectrumAccumulator(24)
for chunk in torch.split(mine, 37):
    acc.update(chunk)
acc.all_reduce()
if rank == 0:
    torch.save({"x": x, "n": acc.n, "mean": acc.mean, "m2": acc.m2}, sys.argv[1])
dist.barrier()  # every rank done before any tears gloo down
dist.destroy_process_group()
