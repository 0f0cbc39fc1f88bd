"""Property-based tests of ``directclr.infonce``: generated shapes, dtypes, row scales (zero,
below the norm floor, subnormal, up to the dtype's max), memory layouts, temperatures (from the
smallest allowed up), reductions, variants and backends, against the float64 formula; invalid
arguments; non-finite inputs. Example budgets come from the Hypothesis profile that
tests/conftest.py loads (``HYPOTHESIS_PROFILE``)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, note, settings
from hypothesis import strategies as st

from directclr import infonce, infonce_reference
from directclr.kernels.infonce import LOG2E, SHIFT_MAX
from directclr.rows import NORM_EPS, working_dtype
from directclr.scaling import scaled_rows

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
TRITON_RUNS = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
# Per-row 2^k scales that would put a subvector's norm, in [2^k, sqrt(24) 2^k) for max |entry| =
# 2^k, across the norm floor (1e-12 = 2^-39.9): below it the op promises a zero gradient, above
# it the formula's, and an fp32 norm may fall on the other side than the float64 one.
FLOOR_STRADDLING = range(-42, -39)
# The 'reference' backend is the plain formula in the input's dtype, with its overflows at small
# temperatures: the logits cos / tau for cos rounded above 1 (then inf - inf), lse - S_pos (up
# to 2 / tau), and the gradient w.r.t. z, up to N / (tau |u|) on the way through F.normalize's
# backward (inf, then inf - inf) though the tangential result fits. From 1e-4 up (|u| >= 1e-12,
# N <= 12: below 1e18) none can happen.
REFERENCE_TAU_MIN = 1e-4


# --------------------------------------------------------------------------- generated cases
def smallest_temperature(dtype: torch.dtype, backend: str) -> float:
    """The smallest temperature the op accepts: 1/tau must be finite in the working dtype
    (``_check_temperature``); Triton's base-2 logits, up to log2(e)/tau, need more."""
    largest = torch.finfo(working_dtype(dtype)).max
    bound = math.nextafter(1.0 / largest, math.inf)
    if backend == "triton":
        bound = max(bound, LOG2E / SHIFT_MAX * (1 + 1e-12))
    return bound


def dtypes_of(backend: str):
    """Triton takes no float64; the 'reference' backend in bf16/fp16 is PyTorch's own formula in
    that precision, the yardstick itself."""
    return {"triton": FLOATS[:1] + FLOATS[2:], "reference": FLOATS[:2]}.get(backend, FLOATS)


def row_exponents(dtype: torch.dtype):
    """k of a row's 2^k scale (its subvector's max |entry| is 2^k): mostly moderate, else from
    where every entry is subnormal (or zero) to the dtype's largest exponent."""
    info = torch.finfo(dtype)
    largest = math.frexp(info.max)[1] - 1
    smallest = math.frexp(info.smallest_normal)[1] - 1 - info.bits  # below every subnormal
    extreme = st.integers(smallest, largest).filter(lambda k: k not in FLOOR_STRADDLING)
    return st.one_of(st.integers(-6, 6), extreme)


LAYOUTS = ("contiguous", "column_major", "column_step", "row_step", "expanded")


def laid_out(values: torch.Tensor, layout: str, trailing_dim: bool) -> torch.Tensor:
    """values (N, D) as a leaf requiring grad, in the asked memory layout (same values, except
    'expanded', whose rows are all the first one: a stride-0 view), as (N, D, 1) with
    trailing_dim (the op flattens it)."""
    n, width = values.shape
    if layout == "contiguous":
        z = values.clone()
    elif layout == "column_major":  # transposed, then contiguous, then back: row stride 1
        z = values.T.contiguous().T
    elif layout == "column_step":  # every other column of a wider tensor
        z = values.new_zeros(n, 2 * width)[:, ::2]
        z.copy_(values)
    elif layout == "row_step":  # every other row of a taller tensor
        z = values.new_zeros(2 * n, width)[::2]
        z.copy_(values)
    else:
        z = values[:1].expand(n, width)
    return (z.unsqueeze(2) if trailing_dim else z).detach().requires_grad_()


@st.composite
def valid_cases(draw, backends):
    """Keyword arguments of one valid call: z1, z2 are built by ``make_inputs`` from the drawn
    description (a seed for the entries, each row's scale, zero rows)."""
    backend = draw(st.sampled_from(backends))
    dtype = draw(st.sampled_from(dtypes_of(backend)))
    n = draw(st.integers(1, 12))
    width = draw(st.integers(1, 24))
    dim = draw(st.one_of(st.none(), st.integers(1, width)))
    tau_min = smallest_temperature(dtype, backend)
    if backend == "reference":
        tau_min = REFERENCE_TAU_MIN
    # log-uniform from the bound (itself included) up to 1e4
    octaves = draw(st.one_of(st.just(0.0), st.floats(0.0, math.log2(1e4) - math.log2(tau_min))))
    temperature = math.exp(math.log(tau_min) + octaves * math.log(2)) if octaves else tau_min
    kind = draw(st.sampled_from(("float", "tensor", "learned")))
    return dict(
        backend=backend, dtype=dtype, n=n, width=width, dim=dim,
        variant=draw(st.sampled_from(("cross", "ntxent"))),
        reduction=draw(st.sampled_from(("mean", "sum", "none"))),
        layouts=(draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS))),
        trailing_dim=draw(st.booleans()),
        exponents=draw(st.lists(row_exponents(dtype), min_size=2 * n, max_size=2 * n)),
        zero_rows=draw(st.sets(st.integers(0, 2 * n - 1), max_size=2)),
        same_views=draw(st.booleans()),
        temperature=temperature, temperature_kind=kind,
        seed=draw(st.integers(0, 2**31 - 1)))


def make_inputs(case):
    """(z1, z2, upstream weights, subvector width) of a drawn case: entries from the seed with
    each row's subvector and rest scaled to max |entry| 2^k (so its norm is on the asked side
    of the floor), cast to the dtype, laid out as asked."""
    gen = torch.Generator().manual_seed(case["seed"])
    n, width = case["n"], case["width"]
    dim = width if case["dim"] is None else case["dim"]
    base = torch.randn(2 * n, width, generator=gen, dtype=torch.float64)
    if case["same_views"]:
        base[n:] = base[:n]
    for part in (base[:, :dim], base[:, dim:]):
        if part.shape[1]:
            part /= part.abs().amax(1, keepdim=True)
    exponent = torch.tensor(case["exponents"], dtype=torch.float64)
    base *= torch.exp2(exponent).unsqueeze(1)
    for row in case["zero_rows"]:
        base[row, :dim] = 0.0
    values = base.to(case["dtype"])
    device = TRITON_DEVICE if case["backend"] == "triton" else "cpu"
    z1, z2 = (laid_out(half.to(device), layout, case["trailing_dim"])
              for half, layout in zip(values.split(n), case["layouts"]))
    weights = (torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 2
               if case["reduction"] == "none" else None)
    return z1, z2, weights, dim


def temperature_argument(case):
    """The temperature as the call takes it: a float, a 0-d float32 tensor, or a float64
    parameter (learned, CLIP-style), with the value the op reads."""
    value = case["temperature"]
    if case["temperature_kind"] == "float":
        return value, value
    if case["temperature_kind"] == "tensor":
        tensor = torch.tensor(value, dtype=torch.float32)
        return tensor, tensor.item()
    return torch.tensor(value, dtype=torch.float64, requires_grad=True), value


# --------------------------------------------------------------------------- comparison
def assert_close_in_range(got, ref, out_dtype, rel, atol, what, row_norm=None,
                          may_overflow=False):
    """got (in out_dtype) against the float64 ref, |got - ref| <= rel max |ref| + atol (both
    sides times each row's subvector norm where row_norm is given, so that rows of any scale
    weigh alike, their gradients being ~ 1/norm): where ref is more than that past twice
    out_dtype's max, inf of its sign; where it is within half of it, finite (unless
    may_overflow); NaN nowhere."""
    got, ref = got.detach().cpu().double(), ref.detach().double()
    norm = torch.ones(()) if row_norm is None else row_norm.double().unsqueeze(1)
    largest = torch.finfo(out_dtype).max
    # a normalized bound, and what it allows each raw entry (subnormal outputs: their spacing)
    bound = (rel * (ref * norm).abs().max() + atol
             + torch.finfo(out_dtype).smallest_normal * norm).expand(ref.shape)
    slack = bound / norm
    assert not got.isnan().any(), f"{what}: NaN at {got.isnan().nonzero().tolist()}"
    past = ref.abs() - slack > 2 * largest
    assert torch.equal(got[past], ref[past].sign() * math.inf), f"{what}: finite past the max"
    inside = ref.abs() + slack <= 0.5 * largest
    if not may_overflow:
        assert got[inside].isfinite().all(), f"{what}: inf where the exact value fits"
    inside &= got.isfinite()
    if not inside.any():
        return
    err = ((got - ref) * norm).abs()[inside]
    worst = (err - bound[inside]).argmax()
    assert (err <= bound[inside]).all(), (
        f"{what}: error {err[worst].item():.3e} > {bound[inside][worst].item():.3e} (max "
        f"|ref| {(ref * norm).abs()[inside].max().item():.3e})")


def call(z1, z2, case, dim_argument, temperature, weights):
    """The op's loss and gradients (z1, z2, temperature; None where it has none)."""
    loss = infonce(z1, z2, dim=dim_argument, temperature=temperature, variant=case["variant"],
                   reduction=case["reduction"], backend=case["backend"])
    upstream = torch.ones_like(loss) if weights is None else weights.to(loss)
    loss.backward(upstream)
    grad_t = temperature.grad if isinstance(temperature, torch.Tensor) else None
    return loss.detach(), z1.grad, z2.grad, grad_t


def exact(z1, z2, case, dim, temperature, weights, floor_rows_get_zero):
    """The float64 formula on the same values: per-pair losses, the reduced loss, gradients
    (zero for rows below the norm floor where the op promises that) and the temperature's."""
    z = [x.detach().cpu().double().flatten(1).requires_grad_() for x in (z1, z2)]
    tau = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    per_pair = infonce_reference(z[0], z[1], dim, tau, case["variant"])
    reduced = {"mean": per_pair.mean(), "sum": per_pair.sum(), "none": per_pair}
    loss = reduced[case["reduction"]]
    upstream = torch.ones_like(loss) if weights is None else weights
    loss.backward(upstream)
    grads = []
    for x in z:
        grad = x.grad.clone()
        if floor_rows_get_zero:
            norms = torch.linalg.vector_norm(x.detach()[:, :dim], dim=1)
            grad[norms < NORM_EPS] = 0.0
        grads.append(grad)
    return per_pair.detach(), loss.detach(), grads[0], grads[1], tau.grad


def softmax_slack(z1, z2, dim, temperature, variant, work):
    """How much probability mass the op's softmaxes may misplace against the float64 ones (at
    most 1), the largest over the softmaxes. Its logits round by a few ulp of 1/tau: that moves
    mass in proportion, 2 rounding (1 - P_max), while small, and any of it once another logit is
    within the rounding of the top (a tie the working dtype cannot resolve). And each stored LSE
    (one number in the working dtype) keeps L = log sum exp(S - max) only to half an ulp of
    max + L, losing it entirely where it is smaller: min(L, ulp / 2) (exact ties at tau below
    ~1e-7 in fp32: each tied P comes out 1)."""
    a, b = (F.normalize(scaled_rows(z.detach().cpu().double().flatten(1)[:, :dim],
                                    torch.float64)[0], dim=1, eps=NORM_EPS) for z in (z1, z2))
    if variant == "cross":
        logits = a @ b.T / temperature
        logits = torch.cat([logits, logits.T])  # the row and the column softmaxes
    else:
        views = torch.cat([a, b])
        logits = (views @ views.T / temperature).fill_diagonal_(-math.inf)
    rounding = 4 * torch.finfo(work).eps / temperature
    top = logits.amax(1, keepdim=True)
    gaps = top - logits
    p_top = 1 / (-gaps).exp().sum(1)
    contested = (gaps <= 2 * rounding).sum(1) > 1
    moved = torch.where(contested & (rounding > 0.05), 1.0, min(1.0, 2 * rounding) * (1 - p_top))
    spread = (-gaps).exp().sum(1).log()
    exponent = torch.frexp(top.squeeze(1) + spread).exponent
    half_ulp = torch.ldexp(torch.full(exponent.shape, torch.finfo(work).eps / 4,
                                      dtype=torch.float64), exponent)
    return (moved + torch.minimum(spread, half_ulp)).max().item()


def check_against_float64(case):
    z1, z2, weights, dim = make_inputs(case)
    temperature, tau = temperature_argument(case)
    assume(tau >= smallest_temperature(case["dtype"], case["backend"]))  # fp32 rounding
    note(f"tau read by the op: {tau!r}")
    fused = case["backend"] != "reference"
    loss, g1, g2, grad_t = call(z1, z2, case, case["dim"], temperature, weights)
    per_pair, ref_loss, ref_g1, ref_g2, ref_t = exact(z1, z2, case, dim, tau, weights, fused)
    n, work, dtype = case["n"], working_dtype(case["dtype"]), case["dtype"]
    eps = torch.finfo(work).eps
    c = 1.0 / tau
    w_max = 1.0 / n if case["reduction"] == "mean" else (
        1.0 if weights is None else weights.abs().max().item())
    rel_loss, rel_grad = (1e-10, 1e-8) if work == torch.float64 else (1e-5, 1e-4)
    if dtype in (torch.bfloat16, torch.float16):  # the gradient comes back in the input's dtype
        rel_grad = max(rel_grad, torch.finfo(dtype).eps)
    assert loss.dtype == work
    assert (loss >= 0).all(), "a negative loss"
    # Each logit rounds to a few ulp of 1/tau (the fixed shift subtracts 1/tau from all), and a
    # per-pair loss past the working dtype's max is inf, so then is their mean.
    loss_floor = 16 * eps * c * (n if case["reduction"] == "sum" else 1)
    overflow = per_pair.max().item() > 0.5 * torch.finfo(work).max
    assert_close_in_range(loss, ref_loss, loss.dtype, rel_loss, loss_floor, "loss",
                          may_overflow=overflow)
    # The gradient w.r.t. a unit row, c (G K_hat), is exact up to G's error: the mass its row's
    # softmax and the (up to 2N) column softmaxes through it misplace. The fused backwards form
    # P = exp(S - LSE) from logits a few ulp of c off those the LSE came from (Triton: recomputed,
    # LSE through natural log; CPU: ntxent's S_ij for row j's LSE from S_ji, rounded apart by the
    # matrix product): exp turns that into as much error on every P (all of it past ~1/eps).
    slack = softmax_slack(z1, z2, dim, tau, case["variant"], work)
    if fused:
        slack += min(1.0, 32 * eps * c)
    grad_floor = c * w_max * (32 * eps + slack * (2 * n + 1))
    for name, got, ref, z in (("grad z1", g1, ref_g1, z1), ("grad z2", g2, ref_g2, z2)):
        assert got.shape == z.shape and got.dtype == z.dtype
        got = got.flatten(1)
        assert torch.equal(got[:, dim:], torch.zeros_like(got[:, dim:])), f"{name} beyond dim"
        norm = torch.linalg.vector_norm(z.detach().cpu().double().flatten(1)[:, :dim], dim=1)
        assert_close_in_range(got, ref, dtype, rel_grad, grad_floor, name,
                              row_norm=norm.clamp_min(NORM_EPS))
    if grad_t is not None:  # dL/dtau = -c^2 sum G_ij cos_ij
        assert_close_in_range(grad_t, ref_t, work, rel_grad, c * grad_floor * 2 * n,
                              "grad temperature")


# Found by a CI run (2026-12-06): ntxent at fp32's smallest temperature, where row 2's mirror
# logit rounded one ulp (2.5e30) above row 4's LSE: P = inf, a NaN gradient, before the CPU
# backward clamped S - LSE at 0.
SMALLEST_TAU_NTXENT = dict(
    backend="cpu", dtype=torch.float32, n=3, width=4, dim=None, variant="ntxent",
    reduction="mean", layouts=("contiguous", "contiguous"), trailing_dim=False, exponents=[0] * 6,
    zero_rows=set(), same_views=False, temperature=2.938736052218038e-39,
    temperature_kind="float", seed=0)


@given(valid_cases(backends=("cpu", "reference")))
@example(case=SMALLEST_TAU_NTXENT)
def test_cpu_and_reference_match_float64(case):
    check_against_float64(case)


@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
@settings(max_examples=max(1, settings().max_examples // 4))  # the interpreter is slow
@given(valid_cases(backends=("triton",)))
def test_triton_matches_float64(case):
    check_against_float64(case)


# --------------------------------------------------------------------------- invalid arguments
def _bad_temperatures(dtype, backend):
    below = smallest_temperature(dtype, backend) / 2
    values = [0.0, -0.1, math.nan, math.inf, below]
    bad = [("temperature", ValueError, value) for value in values] + [
        ("temperature", ValueError, torch.ones(1)), ("temperature", TypeError, "0.1"),
        ("temperature", TypeError, True), ("temperature", TypeError, torch.tensor(1))]
    bad += [("temperature", ValueError, torch.tensor(value, dtype=torch.float64))
            for value in values]
    return st.sampled_from(bad)


@st.composite
def invalid_calls(draw):
    """A valid call with one thing wrong: (the name the error must carry, its type, kwargs)."""
    backend = draw(st.sampled_from(("cpu", "reference", "auto")))
    dtype = draw(st.sampled_from(FLOATS))
    n, width = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    z = torch.randn(n, width).to(dtype)
    kwargs = dict(z1=z, z2=z.clone(), dim=draw(st.integers(1, width)), temperature=0.1,
                  variant="cross", reduction="mean", backend=backend)
    wrong = draw(st.sampled_from(("dim", "temperature", "z dtype", "shapes", "dtypes",
                                  "rank", "empty", "choice", "triton float64")))
    if wrong == "dim":
        name, error, kwargs["dim"] = draw(st.sampled_from([
            ("dim", ValueError, width + draw(st.integers(1, 4))), ("dim", ValueError, 0),
            ("dim", ValueError, -draw(st.integers(1, 4))), ("dim", TypeError, 1.0),
            ("dim", TypeError, True)]))
    elif wrong == "temperature":
        name, error, kwargs["temperature"] = draw(_bad_temperatures(dtype, backend))
    elif wrong == "z dtype":
        bad = draw(st.sampled_from((torch.int64, torch.int32, torch.bool, torch.complex64)))
        name, error = draw(st.sampled_from(("z1", "z2"))), TypeError
        kwargs[name] = kwargs[name].to(bad)
    elif wrong == "shapes":
        other = draw(st.sampled_from(((n + 1, width), (n, width + 1), (n, width, 1),
                                      (n, 1, width))))
        name, error, kwargs["z2"] = "same shape", ValueError, torch.randn(other).to(dtype)
    elif wrong == "dtypes":
        other = draw(st.sampled_from([d for d in FLOATS if d != dtype]))
        name, error, kwargs["z2"] = "same dtype", TypeError, kwargs["z2"].to(other)
    elif wrong == "rank":
        which = draw(st.sampled_from(("z1", "z2")))
        name, error, kwargs[which] = which, ValueError, kwargs[which][0]
    elif wrong == "empty":
        name, error = "at least one row", ValueError
        kwargs["z1"], kwargs["z2"] = z[:0], z[:0]
    elif wrong == "choice":
        name, value = draw(st.sampled_from((("variant", "simclr"), ("reduction", "max"),
                                            ("backend", "cuda"))))
        error, kwargs[name] = ValueError, value
    else:
        name, error, kwargs["backend"] = "float64", TypeError, "triton"
        kwargs["z1"], kwargs["z2"] = z.double().to(TRITON_DEVICE), z.double().to(TRITON_DEVICE)
        assume(TRITON_RUNS)
    return name, error, kwargs


@given(invalid_calls())
def test_invalid_arguments_raise_an_error_naming_them(invalid):
    name, error, kwargs = invalid
    with pytest.raises(error, match=name):
        infonce(**kwargs)


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, 1e-320])
def test_reference_backend_checks_a_tensor_temperatures_value(value):
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature"):
        infonce(z, z, dim=4, temperature=torch.tensor(value, dtype=torch.float64),
                backend="reference")


# --------------------------------------------------------------------------- non-finite input
@given(valid_cases(backends=("cpu", "reference")), st.data())
def test_non_finite_entries_give_nan_exactly_where_read(case, data):
    """A NaN or inf inside the subvector of any row: every pair's loss is NaN (each LSE sums
    over all rows and columns), never an error; the backward runs. Beyond dim: never read, so
    the results are those of the input with that entry zeroed, bit for bit."""
    case = dict(case, temperature_kind="float")
    z1, z2, weights, dim = make_inputs(case)
    view = data.draw(st.sampled_from((0, 1)))
    row = data.draw(st.integers(0, case["n"] - 1))
    col = data.draw(st.integers(0, case["width"] - 1))
    bad = data.draw(st.sampled_from((math.nan, math.inf, -math.inf)))
    clean = [z.detach().clone() for z in (z1, z2)]
    clean[view][row, col] = 0.0
    poisoned = [z.clone() for z in clean]
    poisoned[view][row, col] = bad
    inputs = [z.requires_grad_() for z in poisoned]
    loss, g1, g2, _ = call(*inputs, case, case["dim"], case["temperature"], weights)
    if col < dim:
        assert loss.isnan().all(), "a finite loss from a non-finite subvector"
        return
    clean_loss, clean_g1, clean_g2, _ = call(*[z.requires_grad_() for z in clean], case,
                                             case["dim"], case["temperature"], weights)
    for got, ref in ((loss, clean_loss), (g1, clean_g1), (g2, clean_g2)):
        assert torch.equal(got, ref)


# --------------------------------------------------------------------------- scale invariance
@given(valid_cases(backends=("cpu",)), st.data())
def test_rows_scaled_by_powers_of_two_give_the_same_loss(case, data):
    """The op normalizes each subvector, so multiplying rows by powers of two 2^k that keep
    their entries normal and their norms above the floor changes the loss by rounding alone,
    and each row's gradient by 1/2^k."""
    case = dict(case, temperature_kind="float", layouts=("contiguous", "contiguous"),
                trailing_dim=False)
    z1, z2, weights, dim = make_inputs(case)
    info = torch.finfo(case["dtype"])
    values = torch.cat([z1.detach(), z2.detach()]).double()
    norms = torch.linalg.vector_norm(values[:, :dim], dim=1)
    nonzero = values.abs().where(values != 0, math.inf).amin(1)
    # up to the dtype's max, down to where the smallest entry is still normal and the norm
    # above the floor; rows at or below the floor (those are normalized by it) stay as they are
    up = torch.floor(torch.log2(info.max / values.abs().amax(1))).clamp_max(100)
    down = torch.ceil(torch.log2(torch.maximum(info.smallest_normal / nonzero,
                                               2 * NORM_EPS / norms))).clamp_min(-100)
    exponents = torch.tensor([data.draw(st.integers(int(lo), int(hi)), label=f"k row {row}")
                              if norm >= 2 * NORM_EPS and lo <= hi else 0
                              for row, (lo, hi, norm)
                              in enumerate(zip(down.tolist(), up.tolist(), norms.tolist()))])
    factor = torch.exp2(exponents.double()).unsqueeze(1)
    scaled = (values * factor).to(case["dtype"])
    loss, g1, g2, _ = call(z1, z2, case, case["dim"], case["temperature"], weights)
    s1, s2 = (z.detach().requires_grad_() for z in scaled.split(case["n"]))
    scaled_loss, sg1, sg2, _ = call(s1, s2, case, case["dim"], case["temperature"], weights)
    eps = torch.finfo(working_dtype(case["dtype"])).eps
    floor = 16 * eps / case["temperature"] * (case["n"] if case["reduction"] == "sum" else 1)
    assert torch.equal(scaled_loss.isfinite(), loss.isfinite())
    finite = loss.isfinite()
    assert ((scaled_loss - loss).abs()[finite] <= 4 * eps * loss.abs()[finite] + floor).all()
    for got, ref, k in ((sg1, g1, factor[:case["n"]]), (sg2, g2, factor[case["n"]:])):
        unscaled, ref = got.double() * k, ref.double()
        both = unscaled.isfinite() & ref.isfinite()
        # both round to the dtype, and where subnormal (below its smallest normal, here in
        # the units of the unscaled rows) to its spacing
        slack = 4 * info.eps * ref.abs() + info.smallest_normal * (k + 1)
        assert ((unscaled - ref).abs()[both] <= slack[both]).all(), "scaled gradient"
