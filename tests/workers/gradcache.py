"""Run under torchrun by test_gradcache.py: cached_step on a DDP model, each rank its rows, with
the gradient all-reduced once; rank 0 writes the gradients and the count of all-reduces."""
import argparse

import torch
import torch.distributed as dist

from directclr import DirectCLRLoss, cached_step
from directclr.cli import exit_without_teardown
from tests.workers.gradcache_models import N, build_net, make_batch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    view1, view2 = make_batch()
    rows = slice(rank * N // world, (rank + 1) * N // world)
    results = {}
    for variant in ("cross", "ntxent"):
        net = build_net(batchnorm=False)
        model = torch.nn.parallel.DistributedDataParallel(net)
        hook_calls = []
        model.register_comm_hook(None, _counting_allreduce(hook_calls))
        loss = cached_step(model, view1[rows], view2[rows],
                           DirectCLRLoss(dim=12, variant=variant), micro_batch=3)
        results[variant] = {"grads": [p.grad.clone() for p in net.parameters()],
                            "loss": loss, "allreduce_calls": len(hook_calls)}
    if rank == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()
    exit_without_teardown()


def _counting_allreduce(calls):
    def hook(state, bucket):
        calls.append(bucket.index())
        tensor = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])
    return hook


if __name__ == "__main__":
    main()
