"""The fused InfoNCE op (C++ CPU backend) against the float64 reference formula."""
import math

import pytest
import torch

import directclr
from directclr import DirectCLRLoss, infonce, infonce_reference
from tests.helpers import (
    assert_fp32_exact,
    assert_rel_close,
    assert_scale_invariant,
    assert_within_pytorch_error,
    loss_and_grads,
    make_views,
    reference_loss_and_grads,
)


def _shapes():
    for variant in ("cross", "ntxent"):
        for n in (1, 2, 3, 65, 257, 1000):
            for width in (16, 2048):
                for dim in (1, 7, 128, 360, width):
                    if dim > width or (dim == width and dim in (128, 360)):
                        continue
                    if width == 2048 and n == 1000 and dim not in (360, 2048):
                        continue  # keep the suite quick: the big rows need only the main widths
                    yield variant, n, width, dim


@pytest.mark.parametrize("variant,n,width,dim", list(_shapes()))
def test_matches_float64_reference(variant, n, width, dim, dots_path):
    z1, z2 = make_views(n, width, layout="strided" if n % 2 else "transposed")
    before = (z1.detach().clone(), z2.detach().clone())
    loss, g1, g2 = loss_and_grads(z1, z2, dim=dim, variant=variant)
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(z1, z2, dim=dim, variant=variant)
    assert loss.dtype == torch.float32 and g1.dtype == z1.dtype and g1.shape == z1.shape
    # dim=1: the unit subvector is constant (+-1), so the true gradient is 0 and ours is fp32
    # round-off of the tangent projection, amplified by 1/|u| of the smallest row.
    # n=1: one pair alone, the loss and gradient exactly 0 (atol 0 holds them to that).
    atol = 0.0
    if dim == 1:
        atol = 2e-6 / torch.cat([z1, z2])[:, 0].detach().abs().min().item()
    assert_fp32_exact((loss, g1, g2), (ref_loss, ref_g1, ref_g2), atol)
    assert torch.equal(g1[:, dim:], torch.zeros_like(g1[:, dim:]))
    assert torch.equal(g2[:, dim:], torch.zeros_like(g2[:, dim:]))
    assert torch.equal(z1.detach(), before[0]) and torch.equal(z2.detach(), before[1])


@pytest.mark.parametrize("variant,n", [("cross", 1), ("cross", 3), ("cross", 257),
                                       ("ntxent", 2), ("ntxent", 3), ("ntxent", 257)])
def test_reduction_none_with_arbitrary_upstream_weights(variant, n):
    z1, z2 = make_views(n, 64)
    weights = torch.randn(n)  # includes negative weights: every term of dL/dS is exercised
    loss, g1, g2 = loss_and_grads(z1, z2, "none", weights, dim=40, variant=variant)
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(z1, z2, "none", weights, dim=40,
                                                        variant=variant)
    assert loss.shape == (n,)
    atol = 0.0  # n=1: exactly 0, as in test_matches_float64_reference
    assert_rel_close(loss, ref_loss, 1e-5, "per-pair loss", atol)
    assert_rel_close(g1, ref_g1, 1e-4, "grad z1", atol)
    assert_rel_close(g2, ref_g2, 1e-4, "grad z2", atol)
    # The mean of the per-pair losses is the loss.
    mean_loss = infonce(z1, z2, dim=40, variant=variant)
    assert math.isclose(loss.mean().item(), mean_loss.item(), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("n,width,dim", [(3, 16, 7), (257, 2048, 360), (1000, 512, 128)])
def test_low_precision_within_pytorch_error(dtype, variant, n, width, dim):
    """|x - x64| <= 2 |x_pytorch - x64| + atol, x_pytorch being the formula run in `dtype`."""
    z1, z2 = make_views(n, width, dtype=dtype, layout="strided")
    ours = loss_and_grads(z1, z2, dim=dim, variant=variant)
    exact = reference_loss_and_grads(z1, z2, dim=dim, variant=variant)
    pytorch = reference_loss_and_grads(z1, z2, dim=dim, variant=variant, dtype=dtype)
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    assert_within_pytorch_error(ours, exact, pytorch)


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("rescaled", [False, True])
def test_gradcheck_float64(variant, reduction, rescaled, dots_path):
    """rescaled: z1's rows times 1 to 3e100 inside the function, so the op rescales rows (max
    |u| >= 2^16) and its backward must undo that exactly."""
    z1, z2 = make_views(5, 9, dtype=torch.float64, layout="strided")
    row_scale = torch.tensor([1.0, 2.0**40, 1e-3, 3e100, 7e4], dtype=torch.float64)[:, None]
    if not rescaled:
        row_scale = torch.ones_like(row_scale)
    torch.autograd.gradcheck(
        lambda a, b: infonce(a * row_scale, b, dim=6, temperature=0.3, variant=variant,
                             reduction=reduction),
        (z1, z2))


def test_loss_is_symmetric_in_views_and_invariant_to_scale():
    z1, z2 = make_views(33, 40)
    for variant in ("cross", "ntxent"):
        forward = infonce(z1, z2, dim=20, variant=variant)
        swapped = infonce(z2, z1, dim=20, variant=variant)
        scaled = infonce(3.0 * z1, 0.5 * z2, dim=20, variant=variant)
        assert math.isclose(forward.item(), swapped.item(), rel_tol=1e-6)
        assert math.isclose(forward.item(), scaled.item(), rel_tol=1e-6)


def test_positive_pairs_lower_the_loss():
    z = torch.randn(64, 32)
    aligned = infonce(z, z + 0.01 * torch.randn_like(z), dim=32)
    shuffled = infonce(z, torch.randn_like(z), dim=32)
    assert aligned < shuffled - 1.0


@pytest.mark.parametrize("temperature", [0.01, 0.5, 2.0])
def test_temperatures(temperature, dots_path):
    z1, z2 = make_views(65, 32)
    loss, g1, g2 = loss_and_grads(z1, z2, dim=20, temperature=temperature)
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(z1, z2, dim=20, temperature=temperature)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(g1, ref_g1, 1e-4, "grad z1")


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_mean_of_huge_per_pair_losses_stays_finite(variant, backend):
    """temperature 1e-38 (allowed in fp32: 1/t fits): per-pair losses near 1e38, each finite, and
    their mean fits too; summed in fp32 they overflowed to inf (issue 26), and so did the sum of a
    pair's two directions before it was halved. Triton: shift / |r| and |c| shift / |r| overflowed
    fp32 in the tiles (NaN rows) until shift was split between rows and columns."""
    z1, z2 = make_views(16, 8)
    z1, z2 = z1.detach(), z2.detach()
    ref = infonce_reference(z1.double(), z2.double(), 4, 1e-38, variant)
    per_pair = infonce(z1, z2, dim=4, temperature=1e-38, variant=variant, reduction="none",
                       backend=backend)
    assert per_pair.max() > 1e37 and per_pair.sum().isinf()  # the case in point
    assert_rel_close(per_pair, ref, 1e-5, "per-pair loss")
    loss = infonce(z1, z2, dim=4, temperature=1e-38, variant=variant, backend=backend)
    assert_rel_close(loss, ref.mean(), 1e-5, "loss")


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
def test_gradient_at_the_smallest_temperatures_is_exact(variant, dots_path):
    """temperature 1e-38: the gradient w.r.t. a unit row is 1/tau (G K_hat), up to 1/tau (|w| +
    N |w|) when a row is every other row's nearest (here z1's first, at the centre of a cone),
    past fp32's max with unit weights (the sum's gradient), so it was inf and its radial part
    NaN; the gradient w.r.t. z, the tangential part over |v| (here |v| ~ 1e4), is finite."""
    z1, z2 = make_views(64, 64)
    with torch.no_grad():
        centre = torch.ones(64)
        z1.copy_(1e3 * (centre + 0.5 * z1))
        z2.copy_(1e3 * (centre + 0.5 * z2))
        z1[0] = 1e3 * centre
    weights = torch.ones(64)
    ours = loss_and_grads(z1, z2, reduction="none", weights=weights, dim=64, temperature=1e-38,
                          variant=variant)
    exact = reference_loss_and_grads(z1, z2, reduction="none", weights=weights, dim=64,
                                     temperature=1e-38, variant=variant)
    assert_fp32_exact(ours, exact)


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
def test_logits_stay_finite_at_the_smallest_temperature(variant):
    """1/tau at fp32's max (tau 2.9e-39, the bound): a unit row's product with itself rounds
    above 1 about as often as not, and 1/tau times that overflowed to inf, then inf - inf = NaN
    in the LSEs; the products are clamped to [-1, 1] at such scales. Triton's bound is 8.5e-39
    (its base-2 logits reach log2(e) / tau), below which it says so."""
    tau = math.nextafter(1 / torch.finfo(torch.float32).max, 1.0)
    z1 = make_views(10, 8)[0].detach()
    z2 = z1.clone()
    ours = loss_and_grads(z1, z2, reduction="none", weights=torch.ones(10), dim=8,
                          temperature=tau, variant=variant)
    exact = reference_loss_and_grads(z1, z2, reduction="none", weights=torch.ones(10), dim=8,
                                     temperature=tau, variant=variant)
    assert_fp32_exact(ours, exact, atol=8 * torch.finfo(torch.float32).eps / tau)
    with pytest.raises(ValueError, match="temperature must be >= 8.479e-39 for backend='triton'"):
        infonce(z1, z2, dim=8, temperature=tau, variant=variant, backend="triton")


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
def test_zero_rows_give_finite_loss_and_zero_gradient(variant):
    z1, z2 = make_views(9, 16)
    with torch.no_grad():
        z1[2].zero_()
        z2[5, :8].zero_()  # zero inside the subvector only
    loss, g1, g2 = loss_and_grads(z1, z2, dim=8, variant=variant)
    ref_loss, ref_g1, _ = reference_loss_and_grads(z1, z2, dim=8, variant=variant)
    assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert torch.equal(g1[2], torch.zeros_like(g1[2]))
    assert torch.equal(g2[5], torch.zeros_like(g2[5]))
    others = [i for i in range(9) if i != 2]
    assert_rel_close(g1[others], ref_g1[others], 1e-4, "grad of nonzero rows")


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_gives_nan_loss(variant, bad):
    z1, z2 = make_views(6, 8)
    with torch.no_grad():
        z2[3, 1] = bad
    for reduction in ("mean", "none"):
        loss = infonce(z1, z2, dim=4, variant=variant, reduction=reduction)
        assert torch.isnan(loss).any()
    # Outside the subvector the value is never read.
    with torch.no_grad():
        z2[3, 1] = 0.0
        z2[3, 6] = bad
    assert torch.isfinite(infonce(z1, z2, dim=4, variant=variant))


def test_module_matches_functional():
    z1, z2 = make_views(17, 50)
    module = DirectCLRLoss(dim=30, temperature=0.2, variant="ntxent")
    assert "dim=30" in repr(module)
    assert torch.equal(module(z1, z2), infonce(z1, z2, dim=30, temperature=0.2, variant="ntxent"))


def test_cpu_kernels_build_here():
    """The cpu backend's tests below test the C++ kernels, not the plain-PyTorch fallback that a
    failed build would quietly switch to (make build provides cmake and a compiler)."""
    from directclr import native
    native.load()  # raises, with the build log's path, where the kernels cannot be built


def test_dim_none_uses_whole_vector():
    z1, z2 = make_views(10, 12)
    assert torch.equal(infonce(z1, z2, dim=None), infonce(z1, z2, dim=12))


def test_reference_backend_is_the_formula():
    z1, z2 = make_views(10, 12)
    per_pair = directclr.infonce_reference(z1, z2, 5, 0.1, "cross")
    assert torch.equal(infonce(z1, z2, dim=5, backend="reference", reduction="none"), per_pair)
    # the mean is taken in float64 on every backend (huge per-pair losses may not sum in fp32)
    expected = per_pair.mean(dtype=torch.float64).float()
    assert torch.equal(infonce(z1, z2, dim=5, backend="reference"), expected)


@pytest.mark.parametrize("keep_bytes", [0, 1 << 20])  # recompute, keep the dots
@pytest.mark.parametrize("known", [0.1, math.nan])  # the value given, or read from the tensor
def test_opcheck(known, keep_bytes):
    tau = torch.tensor(0.1, dtype=torch.float64)
    for variant in ("cross", "ntxent"):
        z1, z2 = make_views(7, 12)
        torch.library.opcheck(torch.ops.directclr.infonce.default,
                              (z1, z2, 5, tau, known, variant, "cpu", "", keep_bytes))
        grad = torch.randn(7)
        _, row_lse, col_lse, *kept = torch.ops.directclr.infonce(z1, z2, 5, tau, known, variant,
                                                                 "cpu", "", keep_bytes)
        dots = (7, 7) if variant == "cross" else (14, 14)
        assert [k.shape for k in kept] == ([(0, 0)] * 3 if not keep_bytes
                                           else [dots, (14, 5), (3, 14)])
        torch.library.opcheck(torch.ops.directclr.infonce_backward.default,
                              (grad, z1.detach(), z2.detach(), row_lse, col_lse, *kept, 5, tau,
                               known, variant, "cpu"))


def test_torch_compile_fullgraph(dots_path):
    torch._dynamo.reset()

    def step(z1, z2):
        return infonce(z1 * 2.0, z2, dim=10, variant="cross") + 0.1 * infonce(
            z1, z2, dim=10, variant="ntxent")

    compiled = torch.compile(step, fullgraph=True)  # inductor: the op stays opaque inside
    z1, z2 = make_views(12, 24)
    loss = compiled(z1, z2)
    loss.backward()
    g1 = z1.grad.clone()
    z1.grad = None
    eager = step(z1, z2)
    eager.backward()
    assert math.isclose(loss.item(), eager.item(), rel_tol=1e-6)
    assert_rel_close(g1, z1.grad, 1e-6, "compiled grad")


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("dtype,rel_loss,rel_grad", [
    pytest.param(torch.float32, 1e-5, 1e-4, id="fp32"),
    pytest.param(torch.float64, 1e-12, 1e-10, id="fp64"),
    pytest.param(torch.bfloat16, 1e-5, 1e-2, id="bf16")])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_any_finite_scale_gives_the_exact_loss_and_gradient(backend, dtype, rel_loss, rel_grad,
                                                            variant):
    """Rows up to the dtype's max (fp32: 3.4e38, where squares overflow from 1.8e19), scales
    43 (fp32) to 313 (fp64) decades apart in one batch."""
    if backend == "reference" and dtype == torch.bfloat16:
        rel_loss = 1e-2  # the formula itself runs in bf16
    assert_scale_invariant(dtype, variant, backend, rel_loss, rel_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_below_the_norm_floor_keep_it(dtype):
    """1e-30 and subnormal rows are normalized by the floor (F.normalize's u / eps: the loss of
    the formula) and get a zero gradient, like a row of zeros."""
    z1, z2 = make_views(6, 16, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    with torch.no_grad():
        z1[1] *= 1e-30
        z2[4] *= tiny / 4  # subnormal
    loss, g1, g2 = loss_and_grads(z1, z2, dim=16)
    ref_loss, ref_g1, _ = reference_loss_and_grads(z1, z2, dim=16)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert torch.equal(g1[1], torch.zeros_like(g1[1]))
    assert torch.equal(g2[4], torch.zeros_like(g2[4]))
    others = [i for i in range(6) if i != 1]
    assert_rel_close(g1[others], ref_g1[others], 1e-4, "grad of the other rows")


# --------------------------------------------------------------------------- bad input
def _bad_calls():
    z = torch.randn(4, 8)
    return [
        ("z1", TypeError, lambda: infonce(z.numpy(), z)),
        ("z1 must have at least 2 dims", ValueError, lambda: infonce(z[0], z[0])),
        ("z2 must have at least 2 dims", ValueError, lambda: infonce(z, z[0])),
        ("same shape", ValueError, lambda: infonce(z, z.unsqueeze(0))),
        ("same shape", ValueError, lambda: infonce(z.view(4, 2, 4), z.view(4, 4, 2))),
        ("same shape", ValueError, lambda: infonce(z, torch.randn(5, 8))),
        ("same shape", ValueError, lambda: infonce(z, torch.randn(4, 9))),
        ("dim", ValueError, lambda: infonce(z, z, dim=0)),
        ("dim", ValueError, lambda: infonce(z, z, dim=9)),
        ("dim", TypeError, lambda: infonce(z, z, dim=2.5)),
        ("dim", TypeError, lambda: infonce(z, z, dim=True)),
        ("temperature", ValueError, lambda: infonce(z, z, dim=4, temperature=0.0)),
        ("temperature", ValueError, lambda: infonce(z, z, dim=4, temperature=-0.1)),
        ("temperature", ValueError, lambda: infonce(z, z, dim=4, temperature=float("nan"))),
        ("temperature", ValueError, lambda: infonce(z, z, dim=4, temperature=float("inf"))),
        ("temperature", TypeError, lambda: infonce(z, z, dim=4, temperature="0.1")),
        ("temperature", TypeError, lambda: infonce(z, z, dim=4, temperature=torch.tensor(1))),
        ("temperature", ValueError, lambda: infonce(z, z, dim=4, temperature=torch.ones(1))),
        # a tensor's value is checked inside the op, before any kernel
        ("temperature", ValueError, lambda: infonce(z, z, dim=4, temperature=torch.tensor(0.0))),
        ("temperature", ValueError, lambda: infonce(z, z, dim=4,
                                                    temperature=torch.tensor(float("nan")))),
        ("temperature", ValueError, lambda: infonce(z, z, dim=4,
                                                    temperature=torch.tensor(1e-40).double())),
        # 1/temperature overflows the working dtype (fp32 for bf16 too, fp64 for fp64)
        ("temperature", ValueError, lambda: infonce(z, z, dim=4, temperature=1e-40)),
        ("temperature", ValueError, lambda: infonce(z.bfloat16(), z.bfloat16(), dim=4,
                                                    temperature=2.9e-39)),
        ("temperature", ValueError, lambda: infonce(z.double(), z.double(), dim=4,
                                                    temperature=5e-309)),
        ("z1", TypeError, lambda: infonce(z.long(), z.long(), dim=4)),
        ("z1", TypeError, lambda: infonce(z.to(torch.complex64), z.to(torch.complex64), dim=4)),
        ("same dtype", TypeError, lambda: infonce(z, z.double(), dim=4)),
        ("at least one row", ValueError, lambda: infonce(z[:0], z[:0], dim=4)),
        ("same device", ValueError, lambda: infonce(z, z.to("meta"), dim=4)),
        ("variant", ValueError, lambda: infonce(z, z, dim=4, variant="simclr")),
        ("reduction", ValueError, lambda: infonce(z, z, dim=4, reduction="max")),
        ("backend", ValueError, lambda: infonce(z, z, dim=4, backend="cuda")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_clear_error(case):
    match, error, call = _bad_calls()[case]
    with pytest.raises(error, match=match):
        call()


def test_many_threads_narrow_column_tiles(dots_path):
    """64 threads x width 2048 shrink the backward's column tiles (bounded per-thread partials)."""
    before = torch.get_num_threads()
    torch.set_num_threads(64)
    try:
        z1, z2 = make_views(700, 2048)
        loss, g1, g2 = loss_and_grads(z1, z2, dim=None)
    finally:
        torch.set_num_threads(before)
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(z1, z2, dim=None)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(g1, ref_g1, 1e-4, "grad z1")
    assert_rel_close(g2, ref_g2, 1e-4, "grad z2")


@pytest.mark.parametrize("threads", [1, 3, 16])
def test_ntxent_mirror_tiles_give_every_row_its_loss(threads, dots_path):
    """ntxent's fp32 forward computes only the tiles that start before each 1024-column block
    ends and takes the others' row sums and positives from their mirror tiles: 2 x 1100 rows
    span three column blocks; these thread counts give row tiles of 256, 256 and 128 rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        z1, z2 = make_views(1100, 48, seed=threads)
        loss = infonce(z1, z2, dim=40, variant="ntxent", reduction="none")
    finally:
        torch.set_num_threads(before)
    reference = directclr.infonce_reference(z1.double(), z2.double(), 40, 0.1, "ntxent")
    assert_rel_close(loss, reference, 1e-5, "per-row loss")


@pytest.mark.parametrize("threads", [1, 3, 16])
@pytest.mark.parametrize("dtype,temperature,rtol", [(torch.float32, 0.1, 1e-5),
                                                    (torch.float64, 0.02, 1e-12)])
def test_ntxent_symmetric_backward(threads, dtype, temperature, rtol, monkeypatch, dots_path):
    """ntxent's backward on one process computes only the tiles that start before each column
    block ends; a tile wholly before the block also gives the block's rows their G^T Y. 2 x 700
    rows span two blocks and the views' boundary falls inside a row tile; fp32 at tau 0.1 takes
    the fixed shift, fp64 at tau 0.02 the running max. Per-row weights: G's row and column terms
    differ."""
    from directclr import native
    calls = []
    native.load()
    op = torch.ops.directclr_cpu.lse_backward_symmetric
    monkeypatch.setattr(torch.ops.directclr_cpu, "lse_backward_symmetric",
                        lambda *args: calls.append(1) or op(*args))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        z1, z2 = make_views(700, 48, dtype=dtype, seed=threads)
        weights = torch.rand(700, generator=torch.Generator().manual_seed(threads))
        loss, g1, g2 = loss_and_grads(z1, z2, reduction="none", weights=weights, dim=40,
                                      temperature=temperature, variant="ntxent")
    finally:
        torch.set_num_threads(before)
    assert calls == [1]
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(
        z1, z2, reduction="none", weights=weights, dim=40, temperature=temperature,
        variant="ntxent")
    assert_rel_close(loss, ref_loss, rtol, "per-row loss")
    assert_rel_close(g1, ref_g1, rtol, "grad z1")
    assert_rel_close(g2, ref_g2, rtol, "grad z2")
