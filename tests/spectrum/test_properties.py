"""Property-based tests of the spectrum (directclr/spectrum.py): generated embeddings (rank,
offset, scale up to the dtype's max, per-row scales), dtypes, state dtypes, backends and splits
into chunks and accumulators, against float64 eigenvalues of the whole batch's covariance. The
example budget is the Hypothesis profile's (tests/conftest.py)."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from directclr import SpectrumAccumulator, embedding_spectrum
from directclr.scaling import scaled_rows
from directclr.spectrum import NORM_EPS

INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@st.composite
def embeddings(draw, min_rows=2):
    """(N, D) embeddings of a drawn rank around a drawn offset, times 2^k (up to near the
    dtype's max, and down to tiny), and the accumulator's settings."""
    dtype = draw(st.sampled_from(INPUT_DTYPES))
    n = draw(st.integers(min_rows, 40))
    width = draw(st.integers(1, 12))
    rank = draw(st.integers(1, width))
    info = torch.finfo(dtype)
    # the largest |entry| below 2^(top + 1): room for the offset (4) and the spread (~8)
    top = math.frexp(info.max)[1] - 6
    exponent = draw(st.one_of(st.integers(-8, 8), st.integers(-top, top)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    offset = draw(st.sampled_from((0.0, 1.0, 4.0)))
    basis = torch.randn(rank, width, generator=gen, dtype=torch.float64)
    x = torch.randn(n, rank, generator=gen, dtype=torch.float64) @ basis / rank**0.5
    x = (x + offset) * 2.0**exponent
    return dict(z=x.to(dtype), normalize=draw(st.booleans()),
                state=draw(st.sampled_from((torch.float64, torch.float32))),
                backend=draw(st.sampled_from(("auto", "auto", "triton"))))


def exact_eigenvalues(z: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, float]:
    """Descending, clamped at 0, in float64, in units of s^2 (returned with s, a power of two
    that keeps the covariance inside float64): of the covariance (divided by N) of z's values,
    or of their unit rows (F.normalize's floor) where normalize."""
    x = z.double()
    if normalize:
        x = scaled_rows(x, torch.float64)[0]  # norms of rows near float64's max overflow
        x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)
    scale = 2.0 ** math.frexp(max(x.abs().max().item(), 1e-300))[1]
    x = x / scale
    centered = x - x.mean(0)
    cov = centered.T @ centered / len(x)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0), scale


def assert_spectrum(spectrum, case, what):
    """Eigenvalues descending, >= 0, and within the rounding of the float64 ones: of the
    eigenvalues (fp64 input into an fp64 state on the CPU) or of an fp32 Gram of the values
    (fp32 or bf16 input, an fp32 state, fp32 unit rows, Triton), relative to the top
    eigenvalue or to the second moment (which bounds what rounding the values costs), and to
    float64's own spacing where the eigenvalues are subnormal (embeddings near 1e-154 and
    below)."""
    ref, scale = exact_eigenvalues(case["z"], case["normalize"])
    got = spectrum.eigenvalues
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert (got[:-1] >= got[1:]).all() and (got >= 0).all(), f"{what}: not descending, >= 0"
    fp64 = (case["z"].dtype == torch.float64 and case["state"] == torch.float64
            and case["backend"] != "triton")  # the Triton Gram accumulates in fp32
    eps = torch.finfo(torch.float64 if fp64 else torch.float32).eps
    x = case["z"].double() / scale
    if case["normalize"]:
        x = torch.ones(1, 1)  # unit rows: second moment 1
    second_moment = x.pow(2).sum(1).mean().item()
    bound = 1e3 * eps * (ref[0].item() + second_moment) * scale * scale
    err = (got - ref * scale * scale).abs().max().item()
    assert err <= bound + torch.finfo(torch.float64).smallest_normal * 2.0**-50, (
        f"{what}: error {err:.3e} > {bound:.3e} (top eigenvalue "
        f"{ref[0].item() * scale * scale:.3e})")


def accumulator(case) -> SpectrumAccumulator:
    return SpectrumAccumulator(case["z"].shape[1], normalize=case["normalize"],
                               dtype=case["state"], backend=case["backend"])


def cut(draw, n: int, max_parts: int) -> list[int]:
    """Sizes of 1..max_parts consecutive chunks covering n rows (empty ones included)."""
    points = sorted(draw(st.lists(st.integers(0, n), max_size=max_parts - 1)))
    return [b - a for a, b in zip([0, *points], [*points, n])]


def fits_float64(case) -> bool:
    """Whether the spectrum in the embeddings' scale is inside float64 (else result() says it
    exceeds float64)."""
    ref, scale = exact_eigenvalues(case["z"], case["normalize"])
    return math.isfinite(ref[0].item() * scale * scale)


@given(embeddings(), st.data())
def test_any_split_into_updates_gives_the_float64_spectrum(case, data):
    """Updates in chunks of any sizes (empty ones too) == one update == float64 eigenvalues of
    the whole batch's covariance, at any scale the dtype holds."""
    z = case["z"]
    sizes = cut(data.draw, len(z), 6)
    one = accumulator(case).update(z)
    chunked = accumulator(case)
    for chunk in z.split(sizes):
        chunked.update(chunk)
    assert chunked.n == one.n == len(z)
    if not fits_float64(case):
        for acc in (one, chunked):
            with pytest.raises(ValueError, match="exceeds float64"):
                acc.result()
        return
    assert_spectrum(one.result(), case, "one update")
    assert_spectrum(chunked.result(), case, f"updates of {sizes}")


@given(embeddings(), st.data())
def test_merging_in_any_order_gives_the_float64_spectrum(case, data):
    """Accumulators of consecutive chunks merged in any order (as ranks or workers would) give
    the spectrum of the whole, whichever order and whatever scales the parts have."""
    z = case["z"]
    parts = [accumulator(case).update(chunk) for chunk in z.split(cut(data.draw, len(z), 4))]
    order = data.draw(st.permutations(range(len(parts))))
    merged = parts[order[0]]
    for index in order[1:]:
        merged.merge(parts[index])
    assert merged.n == len(z)
    if fits_float64(case):
        assert_spectrum(merged.result(), case, f"merged in order {order}")


@given(embeddings(), st.data())
def test_normalized_spectrum_ignores_row_scales(case, data):
    """normalize=True: each row's scale (here 2^k per row, anywhere the dtype holds its values
    as normal numbers) changes nothing; the spectrum is that of the unit rows."""
    case = dict(case, normalize=True)
    z = case["z"].double()
    info = torch.finfo(case["z"].dtype)
    largest = z.abs().amax(1)
    smallest = z.abs().where(z != 0, math.inf).amin(1)
    norms = torch.linalg.vector_norm(z, dim=1)
    exponents = []
    for top, low, norm in zip(largest.tolist(), smallest.tolist(), norms.tolist()):
        if norm < 2 * NORM_EPS:  # normalized by the floor: not scale-free
            exponents.append(0)
            continue
        # 2^k top < max, 2^k low >= the smallest normal, 2^k norm >= 2 eps
        up = math.frexp(info.max)[1] - math.frexp(top)[1] - 1
        down = max(math.frexp(info.smallest_normal)[1] - math.frexp(low)[1] + 1,
                   math.frexp(2 * NORM_EPS)[1] - math.frexp(norm)[1] + 1)
        exponents.append(data.draw(st.integers(down, up)) if down <= up else 0)
    scaled = torch.ldexp(z, torch.tensor(exponents).unsqueeze(1)).to(case["z"].dtype)
    spectrum = accumulator(case).update(scaled).result()
    assert_spectrum(spectrum, case, "rows scaled by 2^k")


@given(embeddings())
def test_effective_rank_is_within_one_and_the_rank_bound(case):
    """exp of an entropy over the nonzero singular values, which centering leaves at most
    min(N - 1, D) of: within [1, min(N - 1, D)], or 0 for constant embeddings (no spread)."""
    if not fits_float64(case):
        return
    spectrum = accumulator(case).update(case["z"]).result()
    n, width = case["z"].shape
    assert spectrum.rank_bound == min(n - 1, width)
    rank = spectrum.effective_rank
    if spectrum.eigenvalues[0] == 0:
        assert rank == 0.0
    else:
        assert 1.0 - 1e-12 <= rank <= spectrum.rank_bound * (1 + 1e-12), rank
    assert spectrum.collapsed() >= width - spectrum.rank_bound


@given(embeddings(min_rows=1), st.data())
def test_non_finite_batches_make_the_result_an_error(case, data):
    """A NaN or inf anywhere in any batch: update never raises (no host read), result() does,
    counting the batches that held one."""
    z = case["z"].clone()
    row, col = data.draw(st.integers(0, len(z) - 1)), data.draw(st.integers(0, z.shape[1] - 1))
    z[row, col] = data.draw(st.sampled_from((math.nan, math.inf, -math.inf)))
    acc = accumulator(case).update(z).update(case["z"])
    with pytest.raises(ValueError, match="1 of the 2 batches held NaN or inf"):
        acc.result()


@given(embeddings())
def test_embedding_spectrum_is_one_update(case):
    if not fits_float64(case):
        return
    spectrum = embedding_spectrum(case["z"], normalize=case["normalize"])
    assert_spectrum(spectrum, dict(case, state=torch.float64), "embedding_spectrum")
