"""The collectives: SyncBatchNorm's all-reduce on CPU (sum_over_ranks) and those of the InfoNCE
loss (its group, the gathered columns, the scattered column gradients, the merged column LSEs, the
equal-batch check). None runs without a process group (group None: one process's rows).
directclr.distributed sets the process group up.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# --- SyncBatchNorm on CPU

@torch.library.custom_op("directclr::sum_over_ranks", mutates_args=())
def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) over the default process group whose backward is again a sum over ranks
    (every rank's loss depends on every rank's contribution). An op that torch.compile keeps
    opaque: as an autograd.Function with an in-place all_reduce, torch 2.11's compile lost the
    backward's sum, and compiled DDP training on gloo drifted from eager from its second step
    (torch 2.14 traced it right). Registered once, when this module is first imported."""
    total = tensor.clone()
    dist.all_reduce(total)
    return total


@sum_over_ranks.register_fake
def _(tensor):
    return torch.empty_like(tensor)


sum_over_ranks.register_autograd(lambda ctx, grad: sum_over_ranks(grad))


# --- the InfoNCE loss
# directclr.infonce picks its group with loss_group; its custom ops run the rest in their bodies
# (eagerly, also under torch.compile). Group None (one process's rows) runs no collective.


def loss_group(gather, group):
    """The process group the loss covers (None: this process's rows alone, no collectives), from
    ``gather`` and ``group`` as ``directclr.infonce`` documents them; raises on a contradiction."""
    if gather is not None and not isinstance(gather, bool):
        raise TypeError(f"gather must be None, True or False, got {gather!r}")
    if gather is False:
        if group is not None:
            raise ValueError("group and gather=False contradict each other: gather=False is the "
                             "loss over this rank's rows alone, with no process group; pass "
                             "gather=True (or None) with group, or drop group")
        return None
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if group is None:
        if gather:
            raise ValueError("gather=True needs a process group: initialize torch.distributed "
                             "or pass group= (gather=False is the loss over this process's rows)")
        return None
    return None if dist.get_world_size(group) == 1 else group


def resolve_group(group_name: str):
    """The process group the loss's ops take by name (a str, which custom ops and dynamo pass
    through as a constant); "" is None: this process's rows alone, no collectives."""
    if not group_name:
        return None
    return dist.distributed_c10d._resolve_process_group(group_name)


def rank_and_world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _nccl(x: torch.Tensor, group) -> bool:
    """NCCL's tensor collectives apply (the backend may read "cpu:gloo,cuda:nccl")."""
    return x.is_cuda and "nccl" in str(dist.get_backend(group))


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's x stacked in rank order; x itself without a group (no copy)."""
    world = rank_and_world(group)[1]
    if world == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    if _nccl(x, group):
        dist.all_gather_into_tensor(out, x, group=group)
    else:  # gloo has no all_gather_into_tensor; chunks of a contiguous tensor are contiguous
        dist.all_gather(list(out.chunk(world)), x, group=group)
    return out


def reduce_scatter_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks, then keep this rank's block of rows."""
    rank, world = rank_and_world(group)
    if world == 1:
        return x
    x = x.contiguous()
    block = x.shape[0] // world
    if _nccl(x, group):
        out = x.new_empty((block, *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x, group=group)
        return out
    dist.all_reduce(x, group=group)  # gloo has no reduce_scatter
    return x[rank * block:(rank + 1) * block]


def merge_col_lse(col_max: torch.Tensor, col_sum: torch.Tensor, group) -> torch.Tensor:
    """Combines per-rank partial column log-sum-exps: exact, O(columns) traffic."""
    if rank_and_world(group)[1] > 1:
        global_max = col_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        col_sum = col_sum * (col_max - global_max).exp()
        dist.all_reduce(col_sum, group=group)
        col_max = global_max
    return col_max + col_sum.log()


# (local N, process group name) pairs this process has seen to be every rank's N.
_EQUAL_BATCHES_SEEN: set = set()


def check_equal_batches(n: int, device: torch.device, group_name: str) -> None:
    """Every rank must pass the same N. The check is an all-gather read on the host (a sync), so
    it runs once per (N, group) in each process, not on every step. It runs in the op's body
    (eagerly, also under torch.compile, which sees only the op).

    Caught: unequal N on a call where every rank's (N, group) is new to it, as on the first step,
    or on a short last batch that every rank reaches at once. Not caught here: ranks that
    disagree on whether their N is known (one at a new N runs this all-gather while the others
    start the loss's own collectives), nor ranks at different N all known from earlier steps.
    Either way the ranks' collectives no longer match: gloo aborts on the mismatched sizes
    ("Received data size doesn't match expected size"), NCCL may hang until its timeout or compute
    garbage; TORCH_DISTRIBUTED_DEBUG=DETAIL makes torch compare every collective's shapes across
    ranks and raise instead. A DistributedSampler pads every rank to the same number of samples,
    so ranks reach a short last batch together and it is checked like the first.
    """
    key = (n, group_name)
    if key in _EQUAL_BATCHES_SEEN:
        return
    group = resolve_group(group_name)
    world = rank_and_world(group)[1]
    sizes = torch.tensor([n], device=device)
    gathered = all_gather_rows(sizes, group).tolist()
    if len(set(gathered)) != 1:
        raise ValueError(f"z1 must have the same number of rows on every rank, got {gathered} "
                         f"across {world} ranks")
    _EQUAL_BATCHES_SEEN.add(key)
