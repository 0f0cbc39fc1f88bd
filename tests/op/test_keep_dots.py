"""The CPU op's two paths (directclr.fused.keeps_dots): below the budget the forward keeps its
M x C unit dot products and the backward reads them (three matrix products), above it the
backward recomputes every tile (four). Both against the float64 reference at the budget's edge."""
import math

import pytest
import torch

from directclr import fused, infonce
from directclr.fused import KEEP_DOTS_ENV
from directclr.kernels.cpu import primitive as cpu_primitive
from tests.helpers import (
    assert_fp32_exact,
    assert_rel_close,
    loss_and_grads,
    make_views,
    reference_loss_and_grads,
)

N, WIDTH, DIM = 48, 64, 40


def kept_shape(z1, z2, variant, keep_bytes):
    tau = torch.tensor(0.1, dtype=torch.float64)
    return tuple(torch.ops.directclr.infonce(z1, z2, DIM, tau, 0.1, variant, "cpu", "",
                                             keep_bytes)[3].shape)


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_sides_of_the_budget_edge_are_exact(variant, dtype, monkeypatch):
    """A budget of exactly M x C elements keeps the dots, one byte less does not; the
    environment variable in MiB gives those budgets; each side equals the float64 formula."""
    z1, z2 = make_views(N, WIDTH, dtype=dtype, layout="strided")
    rows, cols = fused.dots_shape(N, variant, 1)
    edge = rows * cols * torch.finfo(dtype).bits // 8
    if variant == "ntxent":  # one process: symmetric S, a share of the budget
        edge = int(edge / fused.SYMMETRIC_KEEP_SHARE)
    results = {}
    for budget, keeps in ((edge, True), (edge - 1, False)):
        assert kept_shape(z1, z2, variant, budget) == ((rows, cols) if keeps else (0, 0))
        monkeypatch.setenv(KEEP_DOTS_ENV, repr(budget / 2**20))
        assert fused.keep_dots_bytes() == budget
        results[keeps] = loss_and_grads(z1, z2, dim=DIM, variant=variant)
    exact = reference_loss_and_grads(z1, z2, dim=DIM, variant=variant)
    for got in results.values():
        if dtype == torch.float32:
            assert_fp32_exact(got, exact)
        else:
            for name, ours, ref in zip(("loss", "grad z1", "grad z2"), got, exact):
                assert_rel_close(ours, ref, 1e-12, name)


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
def test_only_a_forward_with_a_backward_to_come_keeps_dots(variant, monkeypatch):
    asked = []
    forward = cpu_primitive.lse_forward
    monkeypatch.setattr(cpu_primitive, "lse_forward",
                        lambda *args: asked.append(args[-1]) or forward(*args))
    z1, z2 = make_views(N, WIDTH)
    with torch.no_grad():
        infonce(z1, z2, dim=DIM, variant=variant)
    infonce(z1.detach(), z2.detach(), dim=DIM, variant=variant)
    infonce(z1, z2, dim=DIM, variant=variant).backward()
    assert asked == [False, False, True]


def test_the_default_budget_keeps_small_batches_only(monkeypatch):
    monkeypatch.delenv(KEEP_DOTS_ENV, raising=False)
    budget = fused.keep_dots_bytes()
    assert budget == fused.KEEP_DOTS_MB << 20
    fp32 = torch.float32
    assert fused.keeps_dots("cpu", 4096, "cross", 1, fp32, budget)
    assert not fused.keeps_dots("cpu", 4097, "cross", 1, fp32, budget)
    assert fused.keeps_dots("cpu", 1024, "ntxent", 1, fp32, budget)  # a quarter: symmetric S
    assert not fused.keeps_dots("cpu", 1025, "ntxent", 1, fp32, budget)
    assert fused.keeps_dots("cpu", 1024, "ntxent", 2, fp32, budget)  # 2048 x 4096 x 4 B
    assert fused.keeps_dots("cpu", 2048, "cross", 2, torch.float64, budget)  # 2048 x 4096 x 8 B
    assert not fused.keeps_dots("cpu", 2049, "cross", 2, torch.float64, budget)
    assert not fused.keeps_dots("triton", 16, "cross", 1, fp32, budget)


@pytest.mark.parametrize("value", ["abc", "-1", "inf", "nan", "1e400"])
def test_a_bad_budget_names_the_variable(value, monkeypatch):
    monkeypatch.setenv(KEEP_DOTS_ENV, value)
    z1, z2 = make_views(4, 8)
    with pytest.raises(ValueError, match=KEEP_DOTS_ENV):
        infonce(z1, z2, dim=8)


def test_kept_dots_survive_a_second_backward(dots_path):
    """retain_graph: the backward reads the kept dots and must leave them as they were."""
    z1, z2 = make_views(N, WIDTH)
    loss = infonce(z1, z2, dim=DIM, variant="ntxent")
    loss.backward(retain_graph=True)
    first = z1.grad.clone()
    loss.backward()
    assert_rel_close(z1.grad, 2 * first, 1e-6, "grad z1 after two backwards")
    assert math.isfinite(loss.item())
