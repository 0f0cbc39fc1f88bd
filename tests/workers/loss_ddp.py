"""Run under torchrun by test_distributed.py: DDP over a linear model, the loss on local rows.

Every rank builds the same global batch and model from the seed, keeps its block of rows, and
rank 0 writes what the single-process run must reproduce.
"""
import argparse

import torch
import torch.distributed as dist

from directclr import infonce
from directclr.cli import exit_without_teardown

N, IN_FEATURES, WIDTH, DIM = 24, 8, 32, 20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x1, x2 = torch.randn(N, IN_FEATURES), torch.randn(N, IN_FEATURES)
    base = torch.nn.Linear(IN_FEATURES, WIDTH)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    results = {}
    for variant in ("cross", "ntxent"):
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Linear(IN_FEATURES, WIDTH).requires_grad_())
        model.module.load_state_dict(base.state_dict())
        loss = infonce(model(x1[rows]), model(x2[rows]), dim=DIM, variant=variant,
                       backend=args.backend)
        loss.backward()  # DDP averages the parameter gradients over ranks
        # The embedding gradients of this rank's rows, straight from the op.
        z1 = base(x1[rows]).detach().requires_grad_()
        z2 = base(x2[rows]).detach().requires_grad_()
        infonce(z1, z2, dim=DIM, variant=variant, backend=args.backend).backward()
        gathered = [torch.empty_like(z1.grad) for _ in range(world)]
        losses = [torch.empty_like(loss) for _ in range(world)]
        dist.all_gather(gathered, z1.grad)
        dist.all_gather(losses, loss.detach())
        results[variant] = {
            "loss_per_rank": torch.stack(losses),
            "weight_grad": model.module.weight.grad,
            "bias_grad": model.module.bias.grad,
            "z1_grad": torch.cat(gathered),
        }
    if rank == 0:
        torch.save({"world": world, "base": base.state_dict(), "x1": x1, "x2": x2,
                    "results": results}, args.out)
    # Every rank done before any tears gloo down (an early teardown can abort the other rank).
    dist.barrier()
    dist.destroy_process_group()
    exit_without_teardown()  # torch's DDP teardown can abort at interpreter exit


if __name__ == "__main__":
    main()
