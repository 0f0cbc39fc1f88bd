"""Run under torchrun (2 gloo ranks) by test_gather.py: infonce's `gather` argument.

    -m tests.workers.gather cases OUT     every rank writes OUT/rank<r>.pt: gather=False,
                                         gather=True/None and torch.compile(fullgraph=True)
                                         results, float64
    -m tests.workers.gather one-rank OUT  rank 0 alone calls infonce(gather=False) while rank 1
                                         does other work; then both meet at a barrier
                                         (process-group timeout ONE_RANK_TIMEOUT_S, so a stray
                                         collective fails, never hangs)

Every rank builds the same global batch from the seed and keeps its block of rows (ROWS each).
"""
import itertools
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from directclr import DirectCLRLoss, infonce
from directclr.cli import exit_without_teardown

ROWS, WIDTH, DIM = 8, 16, 12  # per rank
ONE_RANK_TIMEOUT_S = 30
VARIANTS = ("cross", "ntxent")


def global_views(world):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(world * ROWS, WIDTH, generator=gen, dtype=torch.float64)
            for _ in range(2)]


def own_rows(world, rank):
    return [z[rank * ROWS:(rank + 1) * ROWS] for z in global_views(world)]


def loss_and_grads(fn, z1, z2, weights=None):
    """fn(z1, z2)'s value and the gradients of (value * weights).sum() (weights: per-pair)."""
    z1, z2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    loss = fn(z1, z2)
    loss.backward(torch.ones_like(loss) if weights is None else weights)
    return {"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad}


def recorded(call):
    """call()'s value, or {"error": its traceback} if it raised."""
    try:
        return call()
    except Exception:  # noqa: BLE001 (recorded for the test to show)
        return {"error": traceback.format_exc()}


def error_of(call):
    try:
        call()
    except ValueError as e:
        return str(e)
    return None


def cases(out: Path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    z1, z2 = own_rows(world, rank)
    weights = torch.linspace(0.5, 2.0, ROWS, dtype=torch.float64)  # a per-pair upstream grad
    pair_group = dist.new_group([0, 1])
    results = {}
    for variant in VARIANTS:
        for gather, group in ((False, None), (None, None), (True, None), (True, pair_group)):
            key = f"{variant}/gather={gather}/group={group is not None}"
            for reduction in ("mean", "none"):
                results[f"{key}/{reduction}"] = loss_and_grads(
                    lambda a, b: infonce(a, b, dim=DIM, variant=variant, reduction=reduction,
                                         gather=gather, group=group),
                    z1, z2, weights if reduction == "none" else None)
        results[f"{variant}/module/gather=False"] = loss_and_grads(
            DirectCLRLoss(dim=DIM, variant=variant, gather=False), z1, z2)
        # A learned temperature over the global batch: each rank's gradient is its rows' share.
        tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        infonce(z1, z2, dim=DIM, temperature=tau, variant=variant, gather=True).backward()
        results[f"{variant}/temperature_grad"] = tau.grad
    # torch.compile(fullgraph=True): one compile per case (inductor), forward and backward. A
    # failure to compile (on every rank alike, before any collective) is recorded, not raised.
    for gather, variant in ((None, "cross"), (False, "ntxent")):
        def step(a, b):
            return infonce(a * 2.0, b, dim=DIM, variant=variant, gather=gather)
        torch._dynamo.reset()
        results[f"compile/{gather}/{variant}/eager"] = loss_and_grads(step, z1, z2)
        results[f"compile/{gather}/{variant}/compiled"] = recorded(
            lambda: loss_and_grads(torch.compile(step, fullgraph=True), z1, z2))
    # The ops with a process group: schema, fake (shapes across the group) and autograd.
    results["opcheck"] = {}
    for variant, keep_bytes in itertools.product(VARIANTS, (0, 1 << 20)):  # recompute, keep
        args = (z1, z2, DIM, torch.tensor(0.1, dtype=torch.float64), 0.1, variant, "cpu",
                pair_group.group_name, keep_bytes)
        _, row_lse, col_lse, *kept = torch.ops.directclr.infonce(*args)
        backward_args = (torch.randn(ROWS, dtype=torch.float64), z1, z2, row_lse, col_lse, *kept,
                         *args[2:-1])
        for name, op, op_args in (("infonce", torch.ops.directclr.infonce.default, args),
                                  ("infonce_backward", torch.ops.directclr.infonce_backward.default,
                                   backward_args)):
            results["opcheck"][f"{name}/{variant}/keep {keep_bytes}"] = recorded(
                lambda: torch.library.opcheck(op, op_args) and None)
    results["errors"] = {
        "group+gather=False": error_of(lambda: infonce(z1, z2, dim=DIM, group=pair_group,
                                                       gather=False)),
        "module group+gather=False": error_of(
            lambda: DirectCLRLoss(dim=DIM, group=pair_group, gather=False)(z1, z2)),
        "reference+gather": error_of(lambda: infonce(z1, z2, dim=DIM, backend="reference")),
    }
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()  # every rank done before any tears gloo down


def one_rank(out: Path):
    dist.init_process_group("gloo", timeout=timedelta(seconds=ONE_RANK_TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    z1, z2 = own_rows(world, rank)
    start = time.monotonic()
    if rank == 0:  # e.g. a validation loss computed by rank 0 alone
        result = loss_and_grads(lambda a, b: infonce(a, b, dim=DIM, gather=False), z1, z2)
        torch.save(result, out / "rank0.pt")
    else:  # something else, for long enough that rank 0 is inside infonce meanwhile
        time.sleep(2.0)
        torch.randn(64, 64) @ torch.randn(64, 64)
    dist.barrier()
    # Both ranks in step after it: each one's count of collectives matched the other's.
    ranks = torch.tensor([rank])
    dist.all_reduce(ranks)
    (out / f"rank{rank}.done").write_text(f"{ranks.item()} {time.monotonic() - start:.1f}")


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    {"cases": cases, "one-rank": one_rank}[mode](out)
    dist.destroy_process_group()
    exit_without_teardown()  # torch can abort a gloo process in the interpreter's teardown


if __name__ == "__main__":
    main()
