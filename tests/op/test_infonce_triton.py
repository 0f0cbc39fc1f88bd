"""The Triton backend: under TRITON_INTERPRET=1 on CPU tensors here, on CUDA where there is one."""
import math
import os

import pytest
import torch

from directclr import fused, infonce
from tests.helpers import (
    OUTPUTS,
    ROUNDING_FLOOR,
    assert_fp32_exact,
    assert_rel_close,
    assert_scale_invariant,
    assert_within_pytorch_error,
    loss_and_grads,
    make_views,
    reference_loss_and_grads,
)

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED,
    reason="CPU tensors reach the Triton kernels only through the interpreter")
# Tests that run on CUDA tensors where there is a GPU, else interpreted on CPU tensors.
DEVICE = "cuda" if CUDA else "cpu"
on_either = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")


def _cases():
    for variant in ("cross", "ntxent"):
        for n in (1, 3, 65, 130):
            for dim in (1, 7, 64, 360):
                yield variant, n, dim


@interpreted
@pytest.mark.parametrize("variant,n,dim", list(_cases()))
def test_triton_fp32_matches_float64(variant, n, dim):
    z1, z2 = make_views(n, 2048, layout="strided")  # D = 2048, row stride 4096, column stride 2
    loss, g1, g2 = loss_and_grads(z1, z2, dim=dim, variant=variant, backend="triton")
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(z1, z2, dim=dim, variant=variant)
    atol = 2e-6 / torch.cat([z1, z2])[:, 0].detach().abs().min().item() if dim == 1 else 0.0
    atol = max(atol, ROUNDING_FLOOR)
    assert_rel_close(loss, ref_loss, 1e-5, "loss", ROUNDING_FLOOR)
    assert_rel_close(g1, ref_g1, 1e-4, "grad z1", atol)
    assert_rel_close(g2, ref_g2, 1e-4, "grad z2", atol)
    assert torch.equal(g1[:, dim:], torch.zeros_like(g1[:, dim:]))


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant,n,dim", [("cross", 65, 360), ("ntxent", 3, 7),
                                           ("cross", 1, 64), ("ntxent", 130, 64)])
def test_triton_low_precision_within_pytorch_error(dtype, variant, n, dim):
    z1, z2 = make_views(n, 2048, dtype=dtype, layout="strided")
    ours = loss_and_grads(z1, z2, dim=dim, variant=variant, backend="triton")
    exact = reference_loss_and_grads(z1, z2, dim=dim, variant=variant)
    pytorch = reference_loss_and_grads(z1, z2, dim=dim, variant=variant, dtype=dtype)
    assert ours[1].dtype == dtype
    assert_within_pytorch_error(ours, exact, pytorch, ROUNDING_FLOOR)


@interpreted
@pytest.mark.parametrize("upstream", [1.0, 1e-3])
def test_triton_fp16_gradients_survive_large_n(upstream):
    """G ~ w/N falls below fp16's smallest subnormal at large N unless it is rescaled."""
    z1, z2 = make_views(1024, 64, dtype=torch.float16)
    weights = torch.full((1024,), upstream / 1024)
    ours = loss_and_grads(z1, z2, "none", weights, dim=64, backend="triton")
    exact = reference_loss_and_grads(z1, z2, "none", weights, dim=64)
    pytorch = reference_loss_and_grads(z1, z2, "none", weights, dim=64, dtype=torch.float16)
    for name, got, ref, pt in list(zip(OUTPUTS, ours, exact, pytorch))[1:]:
        err = (got.double() - ref).norm() / ref.norm()
        pt_err = (pt.double() - ref).norm() / ref.norm()
        assert err <= 2 * pt_err + 1e-3, (name, err.item(), pt_err.item())


@interpreted
@pytest.mark.parametrize("variant", ["cross", "ntxent"])
def test_triton_reduction_none_weights_and_zero_rows(variant):
    z1, z2 = make_views(9, 32)
    with torch.no_grad():
        z1[4].zero_()
    weights = torch.randn(9)
    ours = loss_and_grads(z1, z2, "none", weights, dim=20, variant=variant, backend="triton")
    cpu = loss_and_grads(z1, z2, "none", weights, dim=20, variant=variant, backend="cpu")
    for name, got, ref in zip(OUTPUTS, ours, cpu):
        assert_rel_close(got, ref, 1e-5, name)
    assert torch.equal(ours[1][4], torch.zeros_like(ours[1][4]))


@interpreted
@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("temperature", [0.01, 0.5])
@pytest.mark.parametrize("dim", [80, 300])
def test_triton_running_max_and_fixed_shift_match_float64(variant, temperature, dim):
    """tau = 0.01 is past the fixed shift's range (2 / tau logits of spread underflow exp2):
    the kernels keep running maxima there; tau = 0.5 takes the fixed shift. fp32 at dim 80
    takes the fused backward, at dim 300 the G panels."""
    from directclr.kernels import infonce as kernels
    assert kernels._fixed_shift(1 / temperature)[1] == (temperature > 0.05)
    assert kernels.fused_backward(dim, torch.float32) == (dim == 80)
    z1, z2 = make_views(70, 320)
    with torch.no_grad():  # correlated views: peaked softmaxes, as in training
        z2.mul_(0.3).add_(z1)
    ours = loss_and_grads(z1, z2, dim=dim, variant=variant, temperature=temperature,
                          backend="triton")
    exact = reference_loss_and_grads(z1, z2, dim=dim, variant=variant, temperature=temperature)
    assert_fp32_exact(ours, exact, ROUNDING_FLOOR)


@interpreted
@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_wide_subvector_panels(variant, dtype):
    """Subvectors too wide for a fused backward: G panels, products outside the kernel."""
    from directclr.kernels import infonce as kernels
    z1, z2 = make_views(70, 640, dtype=dtype)
    old = kernels.PANEL_BYTES
    kernels.PANEL_BYTES = 32 * 140 * 4  # one 32-row block per panel under the interpreter
    try:
        ours = loss_and_grads(z1, z2, dim=600, variant=variant, backend="triton")
    finally:
        kernels.PANEL_BYTES = old
    assert not kernels.fused_backward(600, dtype)
    exact = reference_loss_and_grads(z1, z2, dim=600, variant=variant)
    if dtype == torch.float32:
        assert_fp32_exact(ours, exact, ROUNDING_FLOOR)
    else:
        pytorch = reference_loss_and_grads(z1, z2, dim=600, variant=variant, dtype=dtype)
        assert_within_pytorch_error(ours, exact, pytorch, ROUNDING_FLOOR)


@interpreted
@pytest.mark.parametrize("variant", ["cross", "ntxent"])
def test_triton_row_groups_and_column_splits(variant, monkeypatch):
    """Several row blocks per program (column partials read-modified-written across them) and
    several column splits (row partials merged, backward partial rows summed)."""
    from directclr.kernels import infonce as kernels
    monkeypatch.setattr(kernels, "MAX_ROW_GROUPS", 2)
    monkeypatch.setattr(kernels, "PROGRAMS_PER_SM", 8)
    z1, z2 = make_views(150, 64)
    ours = loss_and_grads(z1, z2, dim=40, variant=variant, backend="triton")
    exact = reference_loss_and_grads(z1, z2, dim=40, variant=variant)
    assert_fp32_exact(ours, exact, ROUNDING_FLOOR)


@interpreted
def test_triton_is_deterministic():
    z1, z2 = make_views(40, 64)
    first = loss_and_grads(z1, z2, dim=48, backend="triton")
    second = loss_and_grads(z1, z2, dim=48, backend="triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@on_either
def test_triton_rejects_float64():
    z1, z2 = (z.to(DEVICE) for z in make_views(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        infonce(z1, z2, dim=4, backend="triton")


# --------------------------------------------------------------------------- GPU only
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _cuda_views(n, width, dtype):
    return [z.detach().cuda().requires_grad_() for z in make_views(n, width, dtype=dtype)]


@cuda_only
@pytest.mark.parametrize("variant,n", [("cross", 1000), ("cross", 8192), ("cross", 32768),
                                       ("ntxent", 1000), ("ntxent", 8192)])
def test_cuda_bf16_against_reference(variant, n):
    """Judged against PyTorch's own bf16 error; the exact side is float64 where the reference's
    N x N buffers fit in float64, float32 (far below bf16's error) beyond."""
    z1, z2 = _cuda_views(n, 2048, torch.bfloat16)
    ours = loss_and_grads(z1, z2, dim=360, variant=variant)
    pytorch = reference_loss_and_grads(z1, z2, dim=360, variant=variant, dtype=torch.bfloat16)
    exact_dtype = torch.float64 if n <= 8192 else torch.float32
    exact = reference_loss_and_grads(z1, z2, dim=360, variant=variant, dtype=exact_dtype)
    assert_within_pytorch_error(ours, exact, pytorch, ROUNDING_FLOOR)


def _chunked_cross_loss_fp64(z1, z2, dim, temperature=0.1, chunk=4096):
    """The cross loss in float64 without the N x N matrix: LSEs over row chunks."""
    a = torch.nn.functional.normalize(z1[:, :dim].double(), dim=1)
    b = torch.nn.functional.normalize(z2[:, :dim].double(), dim=1)
    positives = (a * b).sum(1) / temperature
    row_lse = torch.cat([torch.logsumexp(a[i:i + chunk] @ b.T / temperature, 1)
                         for i in range(0, len(a), chunk)])
    col_lse = torch.cat([torch.logsumexp(b[i:i + chunk] @ a.T / temperature, 1)
                         for i in range(0, len(b), chunk)])
    return (0.5 * (row_lse + col_lse) - positives).mean()


@cuda_only
def test_cuda_bf16_n65536_loss_against_chunked_float64():
    z1, z2 = _cuda_views(65536, 2048, torch.bfloat16)
    loss, g1, g2 = loss_and_grads(z1, z2, dim=360)
    exact = _chunked_cross_loss_fp64(z1.detach(), z2.detach(), 360)
    assert abs(loss.double() - exact).item() <= 1e-3 * exact.abs().item()
    assert torch.isfinite(g1).all() and torch.isfinite(g2).all()
    assert torch.equal(g1[:, 360:], torch.zeros_like(g1[:, 360:]))


@cuda_only
@pytest.mark.parametrize("variant", ["cross", "ntxent"])
def test_cuda_fp32_against_float64(variant):
    z1, z2 = make_views(3000, 512)
    z1 = z1.detach().cuda().requires_grad_()
    z2 = z2.detach().cuda().requires_grad_()
    loss, g1, _ = loss_and_grads(z1, z2, dim=360, variant=variant)
    ref_loss, ref_g1, _ = reference_loss_and_grads(z1, z2, dim=360, variant=variant)
    rel = 1e-2 if torch.backends.cuda.matmul.allow_tf32 else 1e-4
    assert_rel_close(loss, ref_loss, rel, "loss")
    assert_rel_close(g1, ref_g1, rel, "grad z1")


@cuda_only
def test_cuda_opcheck_and_compile():
    z1, z2 = (torch.randn(64, 128, device="cuda", requires_grad=True) for _ in range(2))
    for variant in ("cross", "ntxent"):
        torch.library.opcheck(torch.ops.directclr.infonce.default,
                              (z1, z2, 100, torch.tensor(0.1), math.nan, variant, "triton"))
    torch._dynamo.reset()
    step = torch.compile(lambda a, b: infonce(a, b, dim=100), fullgraph=True)
    loss = step(z1, z2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()


@on_either
@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("dtype,rel_grad", [pytest.param(torch.float32, 1e-4, id="fp32"),
                                            pytest.param(torch.bfloat16, 1e-2, id="bf16")])
def test_triton_any_finite_scale_gives_the_exact_loss_and_gradient(dtype, rel_grad, variant):
    """Rows up to fp32's max, whose products would overflow the kernels' fp32 tiles."""
    assert_scale_invariant(dtype, variant, "triton", 1e-5, rel_grad, device=DEVICE)


def test_triton_rejects_a_temperature_whose_inverse_overflows_fp32():
    """Before any kernel (or the check of the device) runs."""
    z1, z2 = make_views(3, 8)
    with pytest.raises(ValueError, match="temperature"):
        infonce(z1, z2, dim=8, temperature=1e-40, backend="triton")


@interpreted
@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("dim", [40, 600])  # fused backward; G panels
def test_backends_keep_one_contract(variant, dim):
    """One Layout through each backend's lse_forward and lse_backward (the contract of
    directclr.fused.backend_primitive): the same LSEs and gradients w.r.t. the normalized rows and
    columns. Triton's row blocks may lie one after another in one buffer (written in place) or
    anywhere, strided (copied to them): the same values either way."""
    n, scale, cross = 20, 10.0, variant == "cross"
    z1, z2 = make_views(n, dim + 8)
    weights = torch.rand(2 * n, generator=torch.Generator().manual_seed(1))
    seen = {}
    for backend in ("cpu", "triton"):
        primitive = fused.backend_primitive(backend)
        sub, inv, _, _ = primitive.subvectors(z1.detach(), z2.detach(), dim)
        layout = fused.rank_layout(sub, inv, variant, None)
        row_lse, pos_logit, col_max, col_sum, kept = primitive.lse_forward(layout, scale, cross,
                                                                            False)
        col_lse = col_max + col_sum.log() if cross else row_lse
        row_w = weights[:layout.rows.shape[0]]
        col_w = weights[n:] if cross else row_w
        apart = [torch.empty(n, dim + 3)[:, :dim] for _ in range(1 if cross else 2)]
        out_cols = torch.empty(n if cross else 0, dim)
        primitive.lse_backward(layout, scale, row_lse, row_w, col_lse, col_w, kept, apart,
                               out_cols)
        seen[backend] = (row_lse, pos_logit, col_lse, torch.cat(apart), out_cols)
        if backend == "triton":
            joined = torch.empty(len(apart) * n, dim)
            primitive.lse_backward(layout, scale, row_lse, row_w, col_lse, col_w, kept,
                                   list(joined.split(n)), out_cols.clone())
            assert torch.equal(joined, torch.cat(apart))
    names = ("row LSE", "positive logit", "column LSE", "row gradient", "column gradient")
    for name, cpu, triton in zip(names, seen["cpu"], seen["triton"]):
        assert triton.shape == cpu.shape, name
        if cpu.numel():  # ntxent: no column gradient
            assert_rel_close(triton, cpu, 1e-5, name, ROUNDING_FLOOR)
