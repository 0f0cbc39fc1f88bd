"""Run under torchrun (2 gloo ranks) by tests/op/test_dropin.py: the packages' gathered losses
against ours with gather=True, on the same rows.

    lightly_gather.py OUT   every rank writes OUT/rank<r>.pt: {case: {"ours": ..., "theirs": ...}},
                            each a dict of the loss and the gradients w.r.t. this rank's z1, z2

Cases: lightly's NTXentLoss(gather_distributed=True) and DirectCLRLoss(loss_dim, gather_distributed=
True) against ours variant="ntxent"; open_clip's ClipLoss(local_loss=True, gather_with_grad=True)
and its default ClipLoss(world_size=2) (local_loss=False, gather_with_grad=False) against ours
variant="cross". Every rank builds the same global batch from the seed and keeps its block of
ROWS rows. Skipped packages (not installed) leave their cases out.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from directclr import infonce
from directclr.cli import exit_without_teardown
from tests.workers.gather import loss_and_grads, recorded

ROWS, WIDTH, LOSS_DIM = 6, 16, 10  # per rank
TEMPERATURES = (0.07, 0.1, 0.5)
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def global_views(world, dtype=torch.float64):
    """Two correlated views of world * ROWS samples (z2 = z1 + noise), built in float64."""
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(world * ROWS, WIDTH, generator=gen, dtype=torch.float64)
    z2 = z1 + 1.5 * torch.randn(world * ROWS, WIDTH, generator=gen, dtype=torch.float64)
    return [z.to(dtype) for z in (z1, z2)]


def own_rows(world, rank, dtype=torch.float64):
    return [z[rank * ROWS:(rank + 1) * ROWS] for z in global_views(world, dtype)]


def lightly_cases(z1, z2, dtype_name):
    from lightly.loss import DirectCLRLoss as LightlyDirectCLRLoss
    from lightly.loss import NTXentLoss
    results = {}
    for tau in TEMPERATURES:
        results[f"lightly-ntxent/{dtype_name}/{tau}"] = {
            "theirs": recorded(lambda: loss_and_grads(
                NTXentLoss(temperature=tau, gather_distributed=True), z1, z2)),
            "ours": loss_and_grads(
                lambda a, b: infonce(a, b, dim=None, temperature=tau, variant="ntxent",
                                     gather=True), z1, z2)}
    results[f"lightly-directclr/{dtype_name}/0.5"] = {  # lightly's default temperature
        "theirs": recorded(lambda: loss_and_grads(
            LightlyDirectCLRLoss(loss_dim=LOSS_DIM, gather_distributed=True), z1, z2)),
        "ours": loss_and_grads(
            lambda a, b: infonce(a, b, dim=LOSS_DIM, temperature=0.5, variant="ntxent",
                                 gather=True), z1, z2)}
    return results


def open_clip_cases(z1, z2, dtype_name, rank, world):
    """open_clip's models hand ClipLoss unit features and logit_scale = exp(the learned log);
    here the features are normalized by F.normalize as open_clip's encode_image/encode_text do,
    and the gradients are w.r.t. the raw features before it (ours normalizes again: a no-op on
    unit rows, whose gradient then passes the caller's normalization unchanged)."""
    from open_clip.loss import ClipLoss
    results = {}
    for tau in TEMPERATURES:
        scale = torch.tensor(1.0 / tau, dtype=z1.dtype)

        def ours(a, b):
            return infonce(F.normalize(a, dim=-1), F.normalize(b, dim=-1), dim=None,
                           temperature=1.0 / scale.item(), variant="cross", gather=True)

        for name, kwargs in (("local", {"local_loss": True, "gather_with_grad": True}),
                             ("default", {})):
            loss_fn = ClipLoss(rank=rank, world_size=world, **kwargs)
            results[f"clip-{name}/{dtype_name}/{tau}"] = {
                "theirs": recorded(lambda: loss_and_grads(
                    lambda a, b: loss_fn(F.normalize(a, dim=-1), F.normalize(b, dim=-1), scale),
                    z1, z2)),
                "ours": loss_and_grads(ours, z1, z2)}
    return results


def main():
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for dtype_name, dtype in DTYPES.items():
        z1, z2 = own_rows(world, rank, dtype)
        # Every rank takes the same branches, so the collectives stay matched.
        for module, cases in (("lightly", lambda: lightly_cases(z1, z2, dtype_name)),
                              ("open_clip", lambda: open_clip_cases(z1, z2, dtype_name, rank,
                                                                    world))):
            try:
                __import__(module)
            except ImportError:
                continue
            results.update(cases())
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()  # every rank done before any tears gloo down
    dist.destroy_process_group()
    exit_without_teardown()  # torch can abort a gloo process in the interpreter's teardown


if __name__ == "__main__":
    main()
