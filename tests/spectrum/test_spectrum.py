"""Spectrum accumulation against numpy float64 (np.cov(bias=True) + eigvalsh)."""

import numpy as np
import pytest
import torch

from directclr import SpectrumAccumulator, embedding_spectrum
from directclr.spectrum import centered_gram
from tests.helpers import count_host_reads, run_worker


def numpy_eigenvalues(x, normalize=False):
    x = np.asarray(x, dtype=np.float64)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.sort(np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True)), 0, None))[::-1]


def low_rank(n, width, rank, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=gen) @ torch.randn(rank, width, generator=gen) + offset


@pytest.mark.parametrize("backend,dtype,width", [
    ("cpu", torch.float32, 150), ("cpu", torch.float64, 150), ("triton", torch.float32, 150),
    ("cpu", torch.float32, 601), ("cpu", torch.float64, 601)])  # 601: the C++ halving recurses
def test_centered_gram_matches_float64(backend, dtype, width):
    x = torch.randn(301, 2 * width, dtype=torch.float64)[:, ::2]  # strided, not a tile multiple
    center = x.mean(0) + 0.25  # not the batch mean: the returned sums must say by how much
    got, centered_sum = centered_gram(x.to(dtype), center, backend)
    exact = (x - center).T @ (x - center)
    rel = 1e-12 if dtype == torch.float64 else 2e-6
    assert (got.double() - exact).abs().max() <= rel * exact.abs().max()
    assert torch.equal(got, got.T)
    exact_sum = (x - center).sum(0)
    assert (centered_sum.double() - exact_sum).abs().max() <= rel * exact_sum.abs().max()


@pytest.mark.parametrize("width,rank", [(64, 64), (300, 40), (257, 1)])
def test_full_and_low_rank_against_numpy(width, rank):
    x = low_rank(2000, width, rank, offset=1e3)  # offset breaks E[zz^T] - mu mu^T in fp32
    spec = embedding_spectrum(x)
    ref = numpy_eigenvalues(x)
    top = ref[0]
    assert np.abs(spec.eigenvalues.numpy() - ref).max() <= 1e-5 * top
    assert spec.collapsed() == width - rank
    assert torch.allclose(spec.singular_values, (spec.eigenvalues * 2000).sqrt())
    assert torch.equal(spec.log_spectrum, spec.eigenvalues.log())


def test_naive_formula_fails_where_ours_holds():
    """The test data really defeats E[zz^T] - mu mu^T in fp32 (so the test above means it)."""
    x = low_rank(2000, 64, 8, offset=1e3)
    naive = (x.T @ x) / len(x) - torch.outer(x.mean(0), x.mean(0))
    eig = torch.linalg.eigvalsh(naive.double()).flip(0)
    ours = embedding_spectrum(x).eigenvalues
    assert (eig - ours).abs().max() > 1e-3 * ours[0]
    assert embedding_spectrum(x).collapsed() == 56


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_streaming_and_merging_in_any_split_equal_one_pass(dtype, rel):
    """float64 input: the CPU kernel works in float64, so only the merge algebra is judged."""
    x = low_rank(1000, 48, 20, offset=50.0, seed=1).to(dtype)
    one = SpectrumAccumulator(48).update(x)
    streamed = SpectrumAccumulator(48)
    for chunk in torch.split(x, [1, 2, 300, 0, 97, 600]):
        streamed.update(chunk)
    left = SpectrumAccumulator(48).update(x[:123])
    right = SpectrumAccumulator(48).update(x[123:500]).update(x[500:])
    merged = left.merge(right)
    scale = one.m2.abs().max()
    for acc in (streamed, merged):
        assert acc.n == 1000
        assert (acc.mean - one.mean).abs().max() <= rel * one.mean.abs().max()
        assert (acc.m2 - one.m2).abs().max() <= rel * scale
        eig, ref = acc.result().eigenvalues, one.result().eigenvalues
        assert (eig - ref).abs().max() <= rel * ref[0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_normalized_rows_trace_is_one_minus_mean_norm(dtype, tol):
    x = (torch.randn(500, 32) + 2.0).to(dtype)
    acc = SpectrumAccumulator(32, normalize=True).update(x)
    unit = x.double() / x.double().norm(dim=1, keepdim=True)
    trace = acc.result().eigenvalues.sum().item()
    assert abs(trace - (1 - unit.mean(0).norm().item() ** 2)) < tol
    assert np.allclose(acc.result().eigenvalues.numpy(), numpy_eigenvalues(x, True),
                       atol=tol / 10)


def test_effective_rank_and_summary():
    iso = embedding_spectrum(torch.randn(20000, 16))
    assert 15.0 < iso.effective_rank <= 16.0
    line = embedding_spectrum(low_rank(1000, 16, 1).double())  # fp64: exact zeros stay ~0
    assert line.effective_rank == pytest.approx(1.0, abs=1e-3)
    constant = embedding_spectrum(torch.ones(10, 4))
    assert constant.collapsed() == 4 and constant.effective_rank == 0.0
    summary = line.summary()
    assert summary["collapsed"] == 15 and summary["dim"] == 16 and summary["n"] == 1000


def test_triton_backend_accumulates_like_cpu():
    x = low_rank(700, 70, 30, offset=10.0)
    cpu = SpectrumAccumulator(70, backend="cpu").update(x).result()
    tri = SpectrumAccumulator(70, backend="triton").update(x).result()
    assert torch.allclose(cpu.eigenvalues, tri.eigenvalues, atol=1e-5 * cpu.eigenvalues[0])


@pytest.mark.parametrize("call,error,match", [
    (lambda a: a.update(torch.randn(4, 7)), ValueError, "shape"),
    (lambda a: a.update(torch.randn(8)), ValueError, "shape"),
    (lambda a: a.update(torch.ones(4, 8, dtype=torch.int64)), TypeError, "floating"),
    (lambda a: a.update(torch.tensor([[float("nan")] * 8, [float("inf")] * 8])).result(),
     ValueError, "1 of the 1 batches held NaN or inf"),
    (lambda a: a.update(torch.randn(1, 8)).result(), ValueError, "at least 2 rows"),
    (lambda a: a.result(), ValueError, "at least 2 rows"),
    (lambda a: a.merge(SpectrumAccumulator(9)), ValueError, "same dim"),
    (lambda a: SpectrumAccumulator(0), ValueError, "dim"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(SpectrumAccumulator(8))


def test_all_reduce_two_process_gloo(tmp_path):
    """Ranks at different power-of-two scales (rank 1's rows are 1000x larger)."""
    out = tmp_path / "spec.pt"
    run_worker("spectrum", out)
    saved = torch.load(out, weights_only=True)
    one = SpectrumAccumulator(24).update(saved["x"])  # float64 data: exact up to round-off
    assert saved["n"] == len(saved["x"]) and saved["batches"] == 10
    assert torch.allclose(saved["mean"], one.mean, rtol=1e-12)
    assert (saved["m2"] - one.m2).abs().max() <= 1e-12 * one.m2.abs().max()
    assert saved["nonfinite_error"].startswith("1 of the 12 batches held NaN or inf values")


@pytest.mark.parametrize("normalize", [False, True])
def test_update_and_merge_read_nothing_on_the_host(normalize):
    """On a GPU each host read would stall the launch queue; a NaN batch is still an error, at
    result()."""
    x = low_rank(300, 16, 16, offset=2.0)
    bad = x[:50].clone()
    bad[7, 3] = float("nan")
    acc = SpectrumAccumulator(16, normalize=normalize, backend="cpu")
    other = SpectrumAccumulator(16, normalize=normalize, backend="cpu")
    with count_host_reads() as reads:
        acc.update(x[:100]).update(x[100:] * 1e30)  # a new scale: the state is rescaled
        other.update(x[:20] * 1e-30).update(bad)
        acc.merge(other)
    assert not reads, dict(reads)
    assert acc.n == 370 and acc.batches == 4
    with pytest.raises(ValueError, match="1 of the 4 batches held NaN or inf values"):
        acc.result()


def _spectrum_in_chunks(z, dtype, normalize=False):
    """Three updates and a merge, at different scales where z's rows differ in scale."""
    acc = SpectrumAccumulator(z.shape[1], normalize=normalize, dtype=dtype)
    other = SpectrumAccumulator(z.shape[1], normalize=normalize, dtype=dtype)
    acc.update(z[:150]).update(z[150:350])
    return acc.merge(other.update(z[350:])).result()


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e30), (torch.float32, 1e-30),
                                         (torch.bfloat16, 1e30), (torch.float64, 1e150),
                                         (torch.float64, 1e-150)])
@pytest.mark.parametrize("state", [torch.float64, torch.float32])
def test_huge_and_tiny_inputs_give_the_exact_spectrum(dtype, scale, state):
    """fp32 squares overflow past 1.8e19 and underflow below 1e-19 (fp64: 1e154, 1e-154); the
    second half of the rows is 4x the first (a larger power-of-two scale mid-stream)."""
    x = low_rank(500, 24, 10, offset=3.0).double()
    x[250:] *= 4
    z = (x * scale).to(dtype)
    spec = _spectrum_in_chunks(z, state)
    ref = numpy_eigenvalues(z.double() / scale) * scale**2
    rel = 1e-12 if dtype == torch.float64 and state == torch.float64 else 1e-5
    assert np.abs(spec.eigenvalues.numpy() - ref).max() <= rel * ref[0]
    if dtype != torch.bfloat16:  # rank 10, and the halves' means differ: 24 - 11 collapsed
        assert spec.collapsed() == 13


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_saved_and_loaded_state_goes_on_as_if_never_stopped(tmp_path, dtype):
    """What a checkpoint keeps of an epoch's spectrum: loaded into a new accumulator, the rest
    of the batches give the bits of one accumulator that saw them all (the scale changes
    mid-stream, so the saved power-of-two scale matters)."""
    z = low_rank(300, 16, 6, offset=2.0).to(dtype)
    z[200:] *= 1e6
    whole = SpectrumAccumulator(16, dtype=dtype).update(z[:100]).update(z[100:]).update(z[:7])
    path = tmp_path / "state.pt"
    torch.save(SpectrumAccumulator(16, dtype=dtype).update(z[:100]).state_dict(), path)
    resumed = SpectrumAccumulator(16, dtype=dtype).load_state_dict(
        torch.load(path, weights_only=True))
    resumed.update(z[100:]).update(z[:7])
    assert (resumed.n, resumed.batches) == (whole.n, whole.batches)
    assert torch.equal(resumed.result().eigenvalues, whole.result().eigenvalues)


def test_a_state_of_another_shape_is_refused():
    state = SpectrumAccumulator(8).update(torch.randn(5, 8)).state_dict()
    with pytest.raises(ValueError, match="state is of dim 8, normalize False; this "
                                         "accumulator's are 9, False"):
        SpectrumAccumulator(9).load_state_dict(state)
    with pytest.raises(ValueError, match="state must be a dict with keys"):
        SpectrumAccumulator(8).load_state_dict({**state, "extra": 1})


def test_eigenvalues_beyond_float64_are_a_clear_error_and_unit_rows_still_work():
    x = low_rank(300, 8, 8, offset=3.0).double()
    with pytest.raises(ValueError, match=r"largest eigenvalue, about 2\^1\d\d\d, exceeds float64"):
        _spectrum_in_chunks(x * 1e200, torch.float64)
    unit = _spectrum_in_chunks(x * 1e200, torch.float64, normalize=True)
    assert np.allclose(unit.eigenvalues.numpy(), numpy_eigenvalues(x, normalize=True), atol=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_spectrum_against_float64():
    x = low_rank(50000, 2048, 300, offset=5.0).cuda()
    spec = SpectrumAccumulator(2048).update(x.bfloat16()).result()
    ref = torch.linalg.eigvalsh(torch.cov(x.bfloat16().double().T).cpu()).flip(0).clamp_min(0)
    assert (spec.eigenvalues - ref).abs().max() <= 1e-5 * ref[0]
    assert spec.collapsed() == 2048 - 300


def rankme_published(z):
    """Garrido et al. (2023), directly: singular values of the raw (uncentered) float64 matrix,
    p = s / sum(s) + 1e-7, exp of the entropy."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum() + 1e-7
    return torch.exp(-(p * p.log()).sum()).item()


@pytest.mark.parametrize("n,width,rank,offset,dtype,rel", [
    (2000, 48, 48, 0.0, torch.float64, 1e-9), (1000, 64, 64, 0.5, torch.float32, 1e-6),
    # Null directions: the second moment's round-off (1e-16 of the top) becomes singular values
    # of 1e-8 of the largest, each adding ~1e-9 to the entropy (fp32 input: 3e-4, too coarse).
    (2000, 48, 12, 3.0, torch.float64, 1e-7),
    (10, 30, 30, 1.0, torch.float64, 1e-7)])  # n < D: the 10 singular values only
def test_rankme_raw_matches_the_published_formula_in_float64(n, width, rank, offset, dtype, rel):
    """Tolerances well below what the epsilon alone contributes (~1e-5 of the value)."""
    x = low_rank(n, width, rank, offset=offset, seed=2).to(dtype)
    x[: n // 2] *= 3  # rows of different scales
    expected = rankme_published(x)
    streamed = _spectrum_in_chunks(x, torch.float64) if n >= 350 else embedding_spectrum(x)
    assert streamed.rankme_raw == pytest.approx(expected, rel=rel)
    unit = x.double() / x.double().norm(dim=1, keepdim=True)  # normalize=True: of unit rows
    assert embedding_spectrum(x, normalize=True).rankme_raw == pytest.approx(
        rankme_published(unit), rel=max(rel, 1e-6 if dtype == torch.float32 else 1e-9))
    assert embedding_spectrum(x).summary()["rankme_raw"] == pytest.approx(streamed.rankme_raw,
                                                                          rel=rel)


def test_rankme_raw_is_not_the_centered_effective_rank():
    """An offset adds one strong uncentered direction: the raw RankMe falls, the centered
    effective rank does not move; both are invariant to scale."""
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain, shifted = embedding_spectrum(x), embedding_spectrum(x + 10.0)
    assert plain.rankme_raw == pytest.approx(plain.effective_rank, rel=0.01)  # mean ~ 0
    assert shifted.effective_rank == pytest.approx(plain.effective_rank, rel=1e-9)
    assert shifted.rankme_raw < 0.5 * plain.rankme_raw
    assert shifted.rankme_raw == pytest.approx(rankme_published(x + 10.0), rel=1e-9)
    assert embedding_spectrum(1e-3 * x).rankme_raw == pytest.approx(plain.rankme_raw, rel=1e-9)
    assert embedding_spectrum(torch.zeros(5, 3)).rankme_raw == 0.0
    assert SpectrumAccumulator(16).update(x).result(raw=False).rankme_raw is None

