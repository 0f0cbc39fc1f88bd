"""infonce's `gather`: the local loss (gather=False, no collectives: one rank may call it alone),
the global loss (gather=True/None) and torch.compile(fullgraph=True) of both, on 2 gloo ranks
(tests/workers/gather.py), against the float64 reference formula."""

import pytest
import torch

from directclr import DirectCLRLoss, fused, infonce, infonce_reference
from tests.helpers import assert_rel_close, make_views, reference_loss_and_grads, run_worker
from tests.workers.gather import DIM, ROWS, global_views, own_rows

WORLD = 2
REL = 1e-12  # float64 throughout: the fused op and the formula differ by rounding only
WEIGHTS = torch.linspace(0.5, 2.0, ROWS, dtype=torch.float64)  # the worker's upstream gradient


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results of one 2-rank run of every case (one launch for the module)."""
    out = tmp_path_factory.mktemp("gather")
    run_worker("gather", "cases", out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_matches(got, ref, what):
    for name, index in (("loss", 0), ("grad z1", 1), ("grad z2", 2)):
        key = ("loss", "g1", "g2")[index]
        assert_rel_close(got[key], ref[index], REL, f"{what}: {name}")


def local_reference(rank, reduction="mean", scale=1.0, **kwargs):
    z1, z2 = own_rows(WORLD, rank)
    weights = WEIGHTS if reduction == "none" else None
    loss, g1, g2 = reference_loss_and_grads(z1 * scale, z2, reduction=reduction,
                                            weights=weights, dim=DIM, **kwargs)
    return loss, scale * g1, g2  # the gradient w.r.t. z1 of the loss at (scale * z1, z2)


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
def test_local_loss_on_each_rank_is_that_ranks_rows_alone(ranks, variant):
    for rank, results in enumerate(ranks):
        for reduction in ("mean", "none"):
            assert_matches(results[f"{variant}/gather=False/group=False/{reduction}"],
                           local_reference(rank, reduction, variant=variant),
                           f"rank {rank} {variant} gather=False {reduction}")
        assert_matches(results[f"{variant}/module/gather=False"],
                       local_reference(rank, variant=variant),
                       f"rank {rank} {variant} DirectCLRLoss(gather=False)")


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("case", ["gather=None/group=False", "gather=True/group=False",
                                  "gather=True/group=True"])
def test_gathered_loss_is_the_global_batch(ranks, variant, case):
    z1, z2 = global_views(WORLD)
    rows = [slice(r * ROWS, (r + 1) * ROWS) for r in range(WORLD)]
    # mean: each rank returns the mean over its own pairs (their losses in the global batch);
    # the mean over ranks is the global loss, and each rank's gradient is that of the sum of the
    # ranks' values (WORLD x the global loss), so that DDP's average is the global gradient.
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(z1, z2, dim=DIM, variant=variant)
    got = [results[f"{variant}/{case}/mean"] for results in ranks]
    assert_rel_close(torch.stack([g["loss"] for g in got]).mean(), ref_loss, REL,
                     f"{variant} {case} mean loss over ranks")
    for rank, (g, r) in enumerate(zip(got, rows)):
        assert_rel_close(g["g1"], WORLD * ref_g1[r], REL, f"rank {rank} {variant} {case} grad z1")
        assert_rel_close(g["g2"], WORLD * ref_g2[r], REL, f"rank {rank} {variant} {case} grad z2")
    # none: this rank's pairs' losses in the global batch; gradients of all ranks' weighted sum.
    ref = reference_loss_and_grads(z1, z2, reduction="none", weights=WEIGHTS.repeat(WORLD),
                                   dim=DIM, variant=variant)
    for rank, (results, r) in enumerate(zip(ranks, rows)):
        assert_matches(results[f"{variant}/{case}/none"], [x[r] for x in ref],
                       f"rank {rank} {variant} {case} reduction='none'")


@pytest.mark.parametrize("gather,variant", [(None, "cross"), (False, "ntxent")])
def test_compile_fullgraph_under_two_ranks_matches_eager(ranks, gather, variant):
    """step(a, b) = infonce(2a, b, gather=...), compiled with fullgraph=True (inductor)."""
    for rank, results in enumerate(ranks):
        eager = results[f"compile/{gather}/{variant}/eager"]
        compiled = results[f"compile/{gather}/{variant}/compiled"]
        assert "error" not in compiled, compiled["error"]
        for key in ("loss", "g1", "g2"):
            assert_rel_close(compiled[key], eager[key], REL, f"rank {rank} gather={gather} {key}")
        if gather is False:  # and it is the local loss, also compiled
            assert_matches(compiled, local_reference(rank, scale=2.0, variant=variant),
                           f"rank {rank} compiled gather=False")
    if gather is None:  # the global loss, also compiled
        z1, z2 = global_views(WORLD)
        ref_loss = reference_loss_and_grads(2.0 * z1, z2, dim=DIM, variant=variant)[0]
        losses = torch.stack([results[f"compile/None/{variant}/compiled"]["loss"]
                              for results in ranks])
        assert_rel_close(losses.mean(), ref_loss, REL, "compiled gather=None mean over ranks")


def test_distributed_ops_pass_opcheck(ranks):
    """torch.library.opcheck of both ops with a process group name: the fake outputs' shapes
    (the cross variant's column LSEs cover the whole group), schema and autograd registration."""
    for rank, results in enumerate(ranks):
        assert len(results["opcheck"]) == 8
        for case, outcome in results["opcheck"].items():
            assert outcome is None, f"rank {rank} {case}: {outcome['error']}"


def test_argument_errors_under_two_ranks(ranks):
    for results in ranks:
        errors = results["errors"]
        for key in ("group+gather=False", "module group+gather=False"):
            assert errors[key] and "group" in errors[key] and "gather=False" in errors[key], errors
        assert errors["reference+gather"] and "gather=False" in errors["reference+gather"], errors


def test_local_loss_on_rank_0_alone_does_not_hang(tmp_path):
    """Rank 1 never calls infonce; a collective on rank 0 would leave the ranks' collectives
    mismatched: the worker's barrier would then fail or time out (its process-group timeout)."""
    run_worker("gather", "one-rank", tmp_path)
    assert_matches(torch.load(tmp_path / "rank0.pt", weights_only=True), local_reference(0),
                   "rank 0 alone, gather=False")
    for rank in range(WORLD):  # both passed the barrier and the all-reduce after it (0 + 1)
        assert (tmp_path / f"rank{rank}.done").read_text().split()[0] == "1"


def test_argument_errors_without_torch_distributed(monkeypatch):
    """Raised before any kernel runs (the primitive is made to fail)."""
    def no_kernel(backend):
        raise AssertionError("a kernel ran before the arguments were checked")

    monkeypatch.setattr(fused, "backend_primitive", no_kernel)
    z1, z2 = make_views(4, 8)
    with pytest.raises(ValueError, match="gather=True needs a process group"):
        infonce(z1, z2, dim=8, gather=True)
    with pytest.raises(ValueError, match="gather=True needs a process group"):
        DirectCLRLoss(dim=8, gather=True)(z1, z2)
    sentinel_group = object()  # rejected before it is looked at
    with pytest.raises(ValueError, match="group and gather=False"):
        infonce(z1, z2, dim=8, group=sentinel_group, gather=False)
    with pytest.raises(TypeError, match="gather must be None, True or False"):
        infonce(z1, z2, dim=8, gather="yes")


def test_without_torch_distributed_gather_false_is_the_default():
    z1, z2 = make_views(6, 8, dtype=torch.float64)
    assert torch.equal(infonce(z1, z2, dim=8, gather=False), infonce(z1, z2, dim=8))


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
def test_a_learned_temperature_gets_the_global_gradient_under_ddp_averaging(ranks, variant):
    """Each rank's temperature gradient is its own rows' share of that of the ranks' summed
    losses; DDP averages a parameter's gradient over the ranks, which gives the global loss's
    (the mean of the ranks' values) gradient, as for every other parameter."""
    z1, z2 = global_views(WORLD)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    infonce_reference(z1, z2, DIM, tau, variant).mean().backward()
    averaged = sum(results[f"{variant}/temperature_grad"] for results in ranks) / WORLD
    assert_rel_close(averaged, tau.grad, REL, f"{variant} temperature gradient")
    assert not torch.equal(ranks[0][f"{variant}/temperature_grad"],
                           ranks[1][f"{variant}/temperature_grad"])  # shares, not copies
