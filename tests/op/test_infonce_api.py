"""The op's API beyond the loss itself (issue #25): a learnable temperature, torch.compile with
dynamic arguments, torch.func, the errors for vmap and double backward, and edge semantics (one
pair, reduction="sum", (N, ...) inputs, no negative loss, DirectCLRLoss's checks)."""
import contextlib
import math

import pytest
import torch

from directclr import DirectCLRLoss, infonce, infonce_reference
from tests.helpers import (
    assert_fp32_exact,
    assert_rel_close,
    assert_within_pytorch_error,
    loss_and_grads,
    make_views,
    max_err,
    reference_loss_and_grads,
)

VARIANTS = ("cross", "ntxent")


def _with_temperature(z1, z2, tau, reduction="mean", weights=None, dtype=None, reference=False,
                      **kwargs):
    """(loss, grad z1, grad z2, grad tau) of `infonce` (or, with reference, of the formula run
    in `dtype`), tau a 0-d tensor requiring grad; with reduction='none' the upstream gradient
    is `weights`."""
    dtype = dtype or z1.dtype
    z1, z2 = (z.detach().to(dtype).requires_grad_() for z in (z1, z2))
    tau = tau.detach().to(torch.float64 if reference else tau.dtype).requires_grad_()
    if reference:
        loss = infonce_reference(z1, z2, temperature=tau, **kwargs)
        loss = loss.mean() if reduction == "mean" else loss
    else:
        loss = infonce(z1, z2, temperature=tau, reduction=reduction, **kwargs)
    loss.backward(torch.ones_like(loss) if weights is None else weights.to(loss.dtype))
    return loss.detach(), z1.grad, z2.grad, tau.grad


def _assert_tau_within_pytorch_error(ours, exact, pytorch):
    """assert_within_pytorch_error's rule, and for the temperature's gradient (one fp32 number,
    accumulated in fp32 whatever the input dtype) the same with a floor of 1e-5 of it instead
    of 1e-3: PyTorch's error is often just its rounding to fp32, and ours a few ulp (4e-7)."""
    assert_within_pytorch_error(ours[:3], exact[:3], pytorch[:3])
    ours_err, theirs_err = max_err(ours[3], exact[3]), max_err(pytorch[3], exact[3])
    assert ours_err <= 2 * theirs_err + 1e-5 * exact[3].abs().item(), (ours_err, theirs_err)


# --------------------------------------------------------------------------- learnable temperature
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n", [1, 3, 64])
def test_temperature_gradient_float64(variant, reduction, n):
    """The temperature's gradient (from the backward's row dot products) against autograd on
    the formula, to 1e-10, with arbitrary (negative too) per-pair weights."""
    z1, z2 = make_views(n, 24, dtype=torch.float64, layout="strided", seed=n)
    weights = torch.randn(n, dtype=torch.float64) if reduction == "none" else None
    tau = torch.tensor(0.3, dtype=torch.float64)
    kwargs = dict(reduction=reduction, weights=weights, dim=17, variant=variant)
    ours = _with_temperature(z1, z2, tau, backend="cpu", **kwargs)
    exact = _with_temperature(z1, z2, tau, reference=True, **kwargs)
    assert ours[3].dtype == torch.float64 and ours[3].shape == ()
    for name, got, ref in zip(("loss", "grad z1", "grad z2", "grad tau"), ours, exact):
        assert_rel_close(got, ref, 1e-10, name, atol=1e-12)
    if n > 1:
        assert exact[3].abs() > 1e-3  # a gradient to get wrong


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,tau", [(3, 0.1), (257, 0.07), (1000, 0.5)])
def test_temperature_gradient_fp32_within_pytorch_error(variant, n, tau):
    z1, z2 = make_views(n, 128, layout="strided")
    tau = torch.tensor(tau)
    kwargs = dict(dim=100, variant=variant)
    ours = _with_temperature(z1, z2, tau, backend="cpu", **kwargs)
    exact = _with_temperature(z1, z2, tau, reference=True, dtype=torch.float64, **kwargs)
    pytorch = _with_temperature(z1, z2, tau, reference=True, **kwargs)
    assert ours[3].dtype == torch.float32
    _assert_tau_within_pytorch_error(ours, exact, pytorch)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [3, 40])
def test_triton_temperature_gradient_within_pytorch_error(variant, dtype, n):
    """Interpreted here (TRITON_INTERPRET=1): the same formula as the cpu backend's, on the
    Triton kernels' row gradients."""
    z1, z2 = make_views(n, 96, dtype=dtype, layout="strided")
    tau = torch.tensor(0.1)
    kwargs = dict(dim=64, variant=variant)
    ours = _with_temperature(z1, z2, tau, backend="triton", **kwargs)
    exact = _with_temperature(z1, z2, tau, reference=True, dtype=torch.float64, **kwargs)
    pytorch = _with_temperature(z1, z2, tau, reference=True, **kwargs)
    _assert_tau_within_pytorch_error(ours, exact, pytorch)


def test_temperature_tensor_equals_float():
    """A 0-d tensor (any float dtype) gives the float's loss and gradients, bit for bit; without
    requires_grad it gets no gradient."""
    z1, z2 = make_views(20, 16)
    by_float = loss_and_grads(z1, z2, dim=12, temperature=0.25)
    tau = torch.tensor(0.25, dtype=torch.float16)
    by_tensor = loss_and_grads(z1, z2, dim=12, temperature=tau)
    for a, b in zip(by_float, by_tensor):
        assert torch.equal(a, b)
    assert tau.grad is None


def test_module_learns_temperature():
    torch.manual_seed(0)
    module = DirectCLRLoss(dim=12, temperature=0.2, learn_temperature=True)
    (param,) = module.parameters()
    assert param is module.log_temperature and param.shape == ()
    assert math.isclose(module.temperature.item(), 0.2, rel_tol=1e-6)
    assert "learned" in repr(module)
    z1, z2 = make_views(33, 16)
    module(z1, z2).backward()
    # d/d log(tau) = tau dL/dtau, against the formula in float64 at the same tau
    tau = param.detach().double().exp()
    exact = _with_temperature(z1, z2, tau, reference=True, dtype=torch.float64, dim=12)
    assert_rel_close(param.grad, exact[3] * tau, 1e-4, "grad log tau")
    before = param.item()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert param.item() != before
    module.temperature = 0.5  # a new value, still learnable
    assert math.isclose(module.temperature.item(), 0.5, rel_tol=1e-6)
    assert list(DirectCLRLoss(dim=12).parameters()) == []


# --------------------------------------------------------------------------- torch.compile
def _compiled_matches_eager(compiled, step, *calls, params=()):
    """step compiled with fullgraph=True, called on each (z1, z2, temperature) of calls, gives
    eager's loss and gradients (z1's, a tensor temperature's, and those of params)."""
    for z1, z2, tau in calls:
        results = []
        for fn in (compiled, step):
            a, b = (z.detach().requires_grad_() for z in (z1, z2))
            t = tau.detach().requires_grad_() if isinstance(tau, torch.Tensor) else tau
            for param in params:
                param.grad = None
            loss = fn(a, b, t)
            loss.backward()
            tensors = [t] + list(params) if isinstance(t, torch.Tensor) else list(params)
            results.append([loss.detach(), a.grad] + [x.grad for x in tensors])
        assert len(results[0]) == len(results[1])
        for got, ref in zip(*results):
            assert got is not None
            assert_rel_close(got, ref, 1e-6, "compiled")


@pytest.mark.parametrize("dynamic", [True, None])
def test_compile_with_a_float_temperature_that_changes(dynamic):
    """dynamic=True makes the float a SymFloat: no Python check may read it (the op checks it)."""
    def step(z1, z2, tau):
        return infonce(z1, z2, dim=10, temperature=tau, backend="cpu") + infonce(
            z1, z2, dim=10, temperature=tau, variant="ntxent", backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    _compiled_matches_eager(compiled, step, (*make_views(12, 24), 0.1),
                            (*make_views(12, 24, seed=1), 0.2), (*make_views(20, 24), 0.3))
    if dynamic:  # checked inside the op, where the value is concrete
        with pytest.raises(ValueError, match="temperature"):
            compiled(*make_views(12, 24), -0.5)


def test_a_changing_float_temperature_compiles_once():
    """A scheduled temperature under torch.compile(dynamic=True): one graph for every value (a
    float argument of the op would be specialized, one compile per value)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(lambda z1, z2, tau: infonce(z1, z2, dim=10, temperature=tau,
                                                         backend="cpu"),
                             backend=counter, fullgraph=True, dynamic=True)
    z1, z2 = make_views(12, 24)
    for tau in (0.1, 0.2, 0.3, 0.4):
        expected = infonce(z1, z2, dim=10, temperature=tau, backend="cpu")
        torch.testing.assert_close(compiled(z1, z2, tau), expected)
    assert counter.frame_count == 1


def test_compile_with_a_tensor_temperature():
    """A learned one (the module's parameter) and one passed in, both requiring grad."""
    module = DirectCLRLoss(dim=10, temperature=0.1, variant="ntxent", backend="cpu",
                           learn_temperature=True)

    def step(z1, z2, tau):
        return module(z1, z2) + infonce(z1 * 2.0, z2, dim=10, temperature=tau, backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    _compiled_matches_eager(compiled, step, (*make_views(12, 24), torch.tensor(0.2)),
                            (*make_views(12, 24, seed=1), torch.tensor(0.3)),
                            params=[module.log_temperature])


# --------------------------------------------------------------------------- torch.func
@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_func_grad_vjp_jacrev(variant):
    z1, z2 = make_views(5, 9, dtype=torch.float64)
    z1, z2 = z1.detach(), z2.detach()
    tau = torch.tensor(0.3, dtype=torch.float64)
    weights = torch.randn(5, dtype=torch.float64)

    def loss(backend, reduction="mean"):
        def fn(a, b, t):
            if backend == "reference":
                per_pair = infonce_reference(a, b, 6, t, variant)
                return per_pair.mean() if reduction == "mean" else per_pair
            return infonce(a, b, dim=6, temperature=t, variant=variant, reduction=reduction,
                           backend=backend)
        return fn

    ours = torch.func.grad(loss("cpu"), argnums=(0, 1, 2))(z1, z2, tau)
    exact = torch.func.grad(loss("reference"), argnums=(0, 1, 2))(z1, z2, tau)
    for got, ref in zip(ours, exact):
        assert_rel_close(got, ref, 1e-10, "grad")
    out, pull = torch.func.vjp(loss("cpu", "none"), z1, z2, tau)
    ref_out, ref_pull = torch.func.vjp(loss("reference", "none"), z1, z2, tau)
    assert_rel_close(out, ref_out, 1e-12, "vjp output")
    for got, ref in zip(pull(weights), ref_pull(weights)):
        assert_rel_close(got, ref, 1e-10, "vjp")
    jac = torch.func.jacrev(loss("cpu", "none"), argnums=(0, 2))(z1, z2, tau)
    ref_jac = torch.func.jacrev(loss("reference", "none"), argnums=(0, 2))(z1, z2, tau)
    assert jac[0].shape == (5, 5, 9) and jac[1].shape == (5,)
    for got, ref in zip(jac, ref_jac):
        assert_rel_close(got, ref, 1e-10, "jacrev")


def test_vmap_names_the_missing_batching_rule():
    z1, z2 = (torch.randn(3, 5, 8) for _ in range(2))
    with pytest.raises(RuntimeError, match="no vmap batching rule.*backend='reference'"):
        torch.func.vmap(lambda a, b: infonce(a, b, dim=6))(z1, z2)
    by_vmap = torch.func.vmap(lambda a, b: infonce(a, b, dim=6, backend="reference"))(z1, z2)
    assert_rel_close(by_vmap, torch.stack([infonce(a, b, dim=6) for a, b in zip(z1, z2)]), 1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_double_backward_names_the_reference(variant):
    z1, z2 = make_views(6, 8)
    tau = torch.tensor(0.2, requires_grad=True)
    loss = infonce(z1, z2, dim=8, temperature=tau, variant=variant)
    grads = torch.autograd.grad(loss, (z1, tau), create_graph=True)
    with pytest.raises(RuntimeError, match="directclr::infonce has no double backward.*"
                                           "backend='reference'"):
        (grads[0].square().sum() + grads[1]).backward()
    # the first-order gradient itself is the usual one
    assert_rel_close(grads[0], loss_and_grads(z1, z2, dim=8, temperature=0.2,
                                              variant=variant)[1], 1e-6, "grad z1")


# --------------------------------------------------------------------------- edge semantics
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pair_is_exactly_zero(variant, backend, dtype):
    """N = 1: the positive is each LSE's only term, so the loss is 0 whatever the inputs."""
    z1, z2 = make_views(1, 16, dtype=dtype)
    tau = torch.tensor(0.1, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        loss = infonce(z1, z2, dim=12, temperature=tau, variant=variant, reduction=reduction,
                       backend=backend)
        loss.sum().backward()
        assert loss.shape == (() if reduction != "none" else (1,)) and loss.item() == 0.0
        for grad in (z1.grad, z2.grad, tau.grad):
            assert torch.equal(grad, torch.zeros_like(grad))
    if backend != "reference":  # non-finite inputs still give NaN
        with torch.no_grad():
            z2[0, 3] = float("inf")
        assert torch.isnan(infonce(z1, z2, dim=12, variant=variant, backend=backend))


@pytest.mark.parametrize("variant", VARIANTS)
def test_reduction_sum_is_n_times_the_mean(variant):
    z1, z2 = make_views(17, 20)
    mean = loss_and_grads(z1, z2, "mean", dim=15, variant=variant)
    total = loss_and_grads(z1, z2, "sum", dim=15, variant=variant)
    assert total[0].shape == ()
    for got, ref in zip(total, mean):
        assert_rel_close(got, 17 * ref, 1e-6)
    ref = reference_loss_and_grads(z1, z2, "none", torch.ones(17), dim=15, variant=variant)
    assert_rel_close(total[1], ref[1], 1e-4, "grad z1 of the sum")


@pytest.mark.parametrize("shape", [(6, 4, 5), (6, 2, 3, 4)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_trailing_dims_are_flattened(shape, variant):
    """(N, ...) inputs are z.flatten(1) (as lightly does); the gradients keep the input shape."""
    z1, z2 = (torch.randn(shape).requires_grad_() for _ in range(2))
    weights = torch.randn(6)
    loss, g1, g2 = loss_and_grads(z1, z2, "none", weights, dim=11, variant=variant)
    flat = loss_and_grads(z1.flatten(1), z2.flatten(1), "none", weights, dim=11,
                          variant=variant)
    assert g1.shape == shape and g2.shape == shape
    assert torch.equal(loss, flat[0])
    assert torch.equal(g1.flatten(1), flat[1]) and torch.equal(g2.flatten(1), flat[2])
    assert torch.equal(infonce(z1, z2, dim=None), infonce(z1.flatten(1), z2.flatten(1), dim=None))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fp32_loss_is_never_negative(variant, backend):
    """Identical pairs at tau 0.05: each exact loss is ~1e-10, which fp32 rounding (the fixed
    shift by 1/tau) puts a few ulp of 20 below zero (-1.9e-6, -3.8e-6) unless clamped; the
    gradient stays the formula's."""
    z = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    loss, g1, g2 = loss_and_grads(z, z, "none", dim=64, temperature=0.05, variant=variant,
                                  backend=backend)
    assert (loss >= 0).all()
    exact = reference_loss_and_grads(z, z, "none", dim=64, temperature=0.05, variant=variant)
    assert_fp32_exact((loss, g1, g2), exact, atol=8 * torch.finfo(torch.float32).eps / 0.05)


def _bad_modules():
    return [
        ("dim", TypeError, dict(dim=2.5)),
        ("dim", ValueError, dict(dim=0)),
        ("temperature", ValueError, dict(temperature=0.0)),
        ("temperature", ValueError, dict(temperature=float("nan"))),
        ("temperature", TypeError, dict(temperature="0.1")),
        ("temperature", TypeError, dict(temperature=torch.tensor(0.1))),
        ("variant", ValueError, dict(variant="simclr")),
        ("reduction", ValueError, dict(reduction="max")),
        ("backend", ValueError, dict(backend="cuda")),
        ("gather", TypeError, dict(gather="yes")),
        ("gather=False", ValueError, dict(gather=False, group=object())),
        ("learn_temperature", TypeError, dict(learn_temperature=1)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_modules())))
def test_module_checks_arguments_at_construction(case):
    match, error, kwargs = _bad_modules()[case]
    with pytest.raises(error, match=match):
        DirectCLRLoss(**kwargs)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Names every op that reaches the dispatcher's Python modes."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("keep_mb", ["0", "64"])  # recompute, keep
def test_eager_calls_equal_the_dispatched_ops_bitwise(variant, keep_mb, monkeypatch):
    """Plain eager mode runs the ops' bodies directly; under a dispatch mode the ops themselves
    run (the mode sees both), with the same losses and gradients to the bit, the learned
    temperature's included."""
    monkeypatch.setenv("DIRECTCLR_KEEP_DOTS_MB", keep_mb)
    z1, z2 = make_views(33, 24)
    results = []
    for mode in (None, _RecordOps()):
        tau = torch.tensor(0.2, requires_grad=True)
        with mode if mode is not None else contextlib.nullcontext():
            loss, grad_z1, grad_z2 = loss_and_grads(z1, z2, reduction="none", dim=10,
                                                    temperature=tau, variant=variant,
                                                    weights=torch.linspace(0.5, 2.0, 33))
        results.append((loss, grad_z1, grad_z2, tau.grad))
    assert {"directclr.infonce.default", "directclr.infonce_backward.default"} <= set(mode.names)
    for direct, dispatched in zip(*results):
        assert torch.equal(direct, dispatched)
