"""Embedding spectrum: the covariance eigenvalues that show dimensional collapse.

``SpectrumAccumulator`` streams batches (and ranks) into (n, mean, M2) and merges partial states
with Chan's rule, M2 = M2a + M2b + delta delta^T na nb / n, never the unstable E[zz^T] - mu mu^T.
The per-batch centered Gram matrix is a fused kernel (Triton on CUDA, C++ on CPU) that computes
only the upper triangle of tiles; the state stays on the batches' device until ``result``, whose
eigenvalues come from ``eigvalsh`` in float64 on the CPU.

Two effective ranks, not to be confused: ``Spectrum.effective_rank`` is exp of the entropy of
the singular values of the *centered* embeddings (the covariance's view, the paper's spectrum);
``Spectrum.rankme_raw`` is RankMe as Garrido et al. (2023) publish it, the singular values of the
*raw, uncentered* embedding matrix with their epsilon. The raw second moment needs no other state:
sum_i z_i z_i^T = M2 + n mu mu^T.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import native
from .scaling import max_abs, power_of_two_scale, scaled_rows

NORM_EPS = 1e-12
RANKME_EPS = 1e-7  # Garrido et al. (2023): p_k = s_k / sum(s) + eps


def centered_gram(x: Tensor, mean: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(sum_i (x_i - mean)(x_i - mean)^T, sum_i (x_i - mean)) with fp32 accumulation (fp64 for
    fp64 input on CPU). backend: "auto" (Triton on CUDA, C++ on CPU, plain PyTorch on a CPU where
    the C++ kernels cannot be built), "cpu", or "triton" (CPU tensors need TRITON_INTERPRET=1)."""
    if backend not in ("auto", "triton", "cpu"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'cpu', got {backend!r}")
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        from .kernels.covariance import centered_gram as triton_gram
        return triton_gram(x, mean)
    if backend == "auto" and not native.available():
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        centered = x.to(work) - mean.to(work)
        return centered.T @ centered, centered.sum(0)
    native.load()
    return torch.ops.directclr_cpu.centered_gram(x, mean)


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of the covariance (descending, clamped at 0, float64) of `n` embeddings, and
    (where computed) those of their raw, uncentered second moment Z^T Z / n."""

    eigenvalues: Tensor
    n: int
    raw_eigenvalues: Tensor | None = None

    @property
    def singular_values(self) -> Tensor:
        """Singular values of the centered (n, D) embedding matrix: sqrt(n * eigenvalue)."""
        return (self.eigenvalues * self.n).sqrt()

    @property
    def log_spectrum(self) -> Tensor:
        """Natural log of the eigenvalues; exact zeros become -inf."""
        return self.eigenvalues.log()

    @property
    def effective_rank(self) -> float:
        """Effective rank (centered): exp of the entropy of p_k = s_k / sum(s), s the singular
        values of the centered embeddings (RankMe's formula on the covariance, no epsilon)."""
        s = self.singular_values
        total = s.sum()
        if total <= 0:
            return 0.0
        p = s / total
        p = p[p > 0]
        return math.exp(-(p * p.log()).sum().item())

    @property
    def rankme_raw(self) -> float | None:
        """RankMe as published (Garrido et al. 2023): s the min(n, D) singular values of the raw,
        uncentered (n, D) embedding matrix, p_k = s_k / sum(s) + 1e-7, exp(-sum p_k log p_k).
        None where the raw eigenvalues were not computed; 0.0 for all-zero embeddings (where
        the published formula divides by zero)."""
        if self.raw_eigenvalues is None:
            return None
        s = (self.raw_eigenvalues * self.n).sqrt()[:min(self.n, self.raw_eigenvalues.numel())]
        total = s.sum()
        if total <= 0:
            return 0.0
        p = s / total + RANKME_EPS
        return math.exp(-(p * p.log()).sum().item())

    @property
    def rank_bound(self) -> int:
        """The largest rank the covariance of `n` rows can have: centering leaves n - 1
        independent rows, so min(n - 1, dim) whatever the embeddings."""
        return max(0, min(self.n - 1, self.eigenvalues.numel()))

    @property
    def sample_limited(self) -> bool:
        """True when n <= dim: at least dim - (n - 1) dimensions collapse for want of rows."""
        return self.rank_bound < self.eigenvalues.numel()

    @property
    def sample_size_note(self) -> str | None:
        """Why `collapsed` counts dimensions the sample cannot span (None when n > dim)."""
        if not self.sample_limited:
            return None
        dim = self.eigenvalues.numel()
        return (f"only {self.n} rows for {dim} dimensions: centered, they span at most "
                f"{self.rank_bound} (N - 1), so {dim - self.rank_bound} of the {dim} dimensions "
                f"count as collapsed whatever the model; embed more than {dim} images to "
                f"measure collapse")

    def collapsed(self, rel: float = 1e-6) -> int:
        """How many dimensions have an eigenvalue below rel x the largest (with n <= dim, at
        least dim - rank_bound of them for want of rows: see ``sample_size_note``)."""
        top = self.eigenvalues[0]
        if top <= 0:  # constant embeddings: every dimension has collapsed
            return self.eigenvalues.numel()
        # a ratio, not rel * top: that underflows to 0 for a subnormal top (embeddings near
        # 1e-160), and the zero eigenvalues would not count
        return int((self.eigenvalues / top < rel).sum().item())

    def summary(self, rel: float = 1e-6) -> dict:
        return {"n": self.n, "dim": self.eigenvalues.numel(),
                "effective_rank": self.effective_rank, "rankme_raw": self.rankme_raw,
                "collapsed": self.collapsed(rel),
                "collapsed_rel": rel, "top_eigenvalue": self.eigenvalues[0].item(),
                "rank_bound": self.rank_bound}


class SpectrumAccumulator:
    """Streams (N, dim) batches of embeddings into the covariance and its spectrum.

    >>> acc = SpectrumAccumulator(2048)
    >>> for z in batches: acc.update(z)
    >>> acc.all_reduce()          # under torch.distributed: every rank gets the global state
    >>> spec = acc.result(); spec.effective_rank, spec.collapsed()

    The state lives on the device of the first batch, in ``dtype``, and ``update`` never waits
    for that device (no host sync): batches holding NaN or inf are counted there and reported by
    ``result``. Each batch is divided by a power of two that keeps its squares inside fp32 (and
    the state by the largest of them), so any finite input gives the exact spectrum.
    """

    def __init__(self, dim: int, normalize: bool = False, dtype: torch.dtype = torch.float64,
                 backend: str = "auto"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dim, self.normalize, self.dtype, self.backend = dim, normalize, dtype, backend
        self.n = 0
        self.batches = 0
        self._start(torch.device("cpu"))

    def _start(self, device: torch.device) -> None:
        """The empty state, allocated on ``device`` (a copy there could wait for it)."""
        self._mean = torch.zeros(self.dim, dtype=self.dtype, device=device)  # units of _scale
        self._m2 = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=device)  # _scale ** 2
        # A power of two; 0 until the first batch, whose scale then wins any maximum.
        self._scale = torch.zeros((), dtype=torch.float64, device=device)
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # NaN/inf batches

    def _unscaled(self, x: Tensor, power: int) -> Tensor:
        """x * _scale ** power in ``dtype``: inf where that cannot hold it (one factor at a time,
        so that zeros stay zeros where _scale ** 2 alone would overflow)."""
        x = x.double()
        for _ in range(power):
            x = x * self._scale
        return x.to(self.dtype)

    @property
    def mean(self) -> Tensor:
        """The mean row so far."""
        return self._unscaled(self._mean, 1)

    @property
    def m2(self) -> Tensor:
        """sum_i (z_i - mean)(z_i - mean)^T so far."""
        return self._unscaled(self._m2, 2)

    def _merge_state(self, n_b: int, mean_b: Tensor, m2_b: Tensor, scale_b: Tensor) -> None:
        """Chan's rule; mean_b and m2_b are in units of scale_b (and scale_b ** 2)."""
        if n_b == 0:
            return
        if self.n == 0 and self._m2.device != m2_b.device:
            self._start(m2_b.device)
        device = self._m2.device
        scale_b = scale_b.to(device, torch.float64)
        scale = torch.maximum(self._scale, scale_b)
        # Both states in units of the larger scale: the ratios are powers of two <= 1, exact
        # (or, where they underflow, far below the other state's precision).
        ratio, ratio_b = (self._scale / scale).to(self.dtype), (scale_b / scale).to(self.dtype)
        mean_b = mean_b.to(device, self.dtype) * ratio_b
        n = self.n + n_b
        self._mean.mul_(ratio)
        delta = mean_b - self._mean
        self._m2.mul_(ratio * ratio).add_(m2_b.to(device, self.dtype) * (ratio_b * ratio_b))
        self._m2.addr_(delta, delta, alpha=self.n * n_b / n)
        self._mean.add_(delta, alpha=n_b / n)
        self._scale, self.n = scale, n

    @torch.no_grad()
    def update(self, z: Tensor) -> "SpectrumAccumulator":
        if not isinstance(z, Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (N, {self.dim}), got {tuple(z.shape)}")
        if not z.dtype.is_floating_point:
            raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
        if z.shape[0] == 0:
            return self
        working = torch.float64 if z.dtype == torch.float64 else torch.float32
        if self.normalize:
            z = scaled_rows(z, working)[0]
            z = z / torch.linalg.vector_norm(z, dim=1, dtype=working, keepdim=True).clamp_min(
                NORM_EPS)
        n_b = z.shape[0]
        maxabs = max_abs(z).to(working)
        scale_b = power_of_two_scale(maxabs, scale_up=True)
        z = z / scale_b.to(z.dtype)
        # A working-precision mean is cheap; the centered sums from the kernel make it exact:
        # with s = sum(z - m), the batch mean is m + s/n and M2 = sum (z-m)(z-m)^T - s s^T / n.
        center = z.mean(0, dtype=working)
        m2_b, centered_sum = centered_gram(z, center, self.backend)
        centered_sum = centered_sum.double()
        mean_b = center.double() + centered_sum / n_b
        m2_b = m2_b.double().addr_(centered_sum, centered_sum, alpha=-1.0 / n_b)
        self._merge_state(n_b, mean_b, m2_b, scale_b)
        # Any NaN/inf makes its column mean non-finite (a finite z / scale_b cannot overflow it).
        self._nonfinite += ~torch.isfinite(center).all().to(self._nonfinite.device)
        self.batches += 1
        return self

    def merge(self, other: "SpectrumAccumulator") -> "SpectrumAccumulator":
        if not isinstance(other, SpectrumAccumulator) or other.dim != self.dim:
            raise ValueError("other must be a SpectrumAccumulator of the same dim")
        if other.normalize != self.normalize:
            raise ValueError("cannot merge accumulators with different `normalize`")
        self._merge_state(other.n, other._mean, other._m2, other._scale)
        self._nonfinite += other._nonfinite.to(self._nonfinite.device)
        self.batches += other.batches
        return self

    def all_reduce(self, group=None) -> "SpectrumAccumulator":
        """Every rank ends with the state of all ranks' batches (Chan's rule over ranks)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        world = dist.get_world_size(group)
        if world == 1:
            return self
        nccl = "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        home = self._m2.device
        # Every rank's state in units of the largest scale, as in _merge_state.
        scale = self._scale.reshape(1).to(device, copy=True)  # reduced in place below
        dist.all_reduce(scale, op=dist.ReduceOp.MAX, group=group)
        ratio = self._scale.to(device) / scale
        sizes = torch.tensor([self.n, self.batches], dtype=torch.float64, device=device)
        head = torch.cat([sizes, self._nonfinite.to(device, torch.float64).reshape(1),
                          self._mean.to(device, torch.float64) * ratio])
        heads = [torch.empty_like(head) for _ in range(world)]
        dist.all_gather(heads, head, group=group)
        m2 = self._m2.to(device, torch.float64) * (ratio * ratio)
        dist.all_reduce(m2, group=group)
        heads = torch.stack(heads)
        n, batches, nonfinite = (int(x) for x in heads[:, :3].sum(0).tolist())
        if n == 0:
            return self
        counts, means = heads[:, :1], heads[:, 3:]
        mean = (counts * means).sum(0) / n
        spread = (means - mean) * counts.sqrt()
        self._m2 = (m2 + spread.T @ spread).to(home, self.dtype)
        self._mean = mean.to(home, self.dtype)
        self._scale = scale.reshape(()).to(home)
        self._nonfinite = torch.tensor(nonfinite, device=home)
        self.n, self.batches = n, batches
        return self

    STATE_KEYS = ("dim", "normalize", "n", "batches", "mean", "m2", "scale", "nonfinite")

    def state_dict(self) -> dict:
        """The state as plain values and CPU tensors (for torch.save with weights_only=True)."""
        return {"dim": self.dim, "normalize": self.normalize, "n": self.n,
                "batches": self.batches, "mean": self._mean.cpu(), "m2": self._m2.cpu(),
                "scale": self._scale.cpu(), "nonfinite": self._nonfinite.cpu()}

    def load_state_dict(self, state: dict,
                        device: torch.device | None = None) -> "SpectrumAccumulator":
        """Replaces the state by `state` (state_dict's), on `device` (default: where the state
        is now), where the batches that follow will be."""
        if not isinstance(state, dict) or set(state) != set(self.STATE_KEYS):
            raise ValueError(f"state must be a dict with keys {list(self.STATE_KEYS)}")
        if (state["dim"], state["normalize"]) != (self.dim, self.normalize):
            raise ValueError(f"state is of dim {state['dim']}, normalize {state['normalize']}; "
                             f"this accumulator's are {self.dim}, {self.normalize}")
        device = self._m2.device if device is None else device
        self.n, self.batches = int(state["n"]), int(state["batches"])
        self._mean = state["mean"].to(device, self.dtype)
        self._m2 = state["m2"].to(device, self.dtype)
        self._scale = state["scale"].to(device, torch.float64)
        self._nonfinite = state["nonfinite"].to(device, torch.int64)
        return self

    def _scaled_covariance(self) -> Tensor:
        """The covariance in units of _scale ** 2."""
        if self.n < 2:
            raise ValueError(f"the spectrum needs at least 2 rows in total, got {self.n}")
        return self._m2 / self.n

    def covariance(self) -> Tensor:
        return self._unscaled(self._scaled_covariance(), 2)

    def result(self, raw: bool = True) -> Spectrum:
        """The spectrum; with raw=True also the eigenvalues of the raw second moment
        (M2 + n mu mu^T) / n, for ``Spectrum.rankme_raw`` (None where they exceed float64)."""
        cov = self._scaled_covariance().double().cpu()
        nonfinite = int(self._nonfinite)  # the state's first read on the host: no extra sync
        if nonfinite:
            raise ValueError(f"{nonfinite} of the {self.batches} batches held NaN or inf values: "
                             f"the spectrum is undefined")
        eig = torch.linalg.eigvalsh((cov + cov.T) / 2).flip(0).clamp_min(0)
        # n centered rows span at most n - 1 dimensions: past that the eigenvalues are round-off
        # (fp32 input: ~1e-8 of the top), which would count in effective_rank's entropy and take
        # it past min(n - 1, dim).
        eig[self.n - 1:] = 0
        scale = self._scale.item()
        top = eig[0].item()
        if not math.isfinite(top * scale * scale):
            raise ValueError(f"the covariance's largest eigenvalue, about "
                             f"2^{math.log2(top) + 2 * math.log2(scale):.0f}, exceeds float64: "
                             f"the spectrum cannot be reported in the embeddings' scale "
                             f"(normalize=True gives that of their unit rows)")
        raw_eig = None
        if raw:  # the uncentered second moment, in the same units of _scale ** 2
            mean = self._mean.double().cpu()
            second = cov + torch.outer(mean, mean)
            raw_eig = torch.linalg.eigvalsh((second + second.T) / 2).flip(0).clamp_min(0)
            raw_eig = raw_eig * scale * scale
            if not math.isfinite(raw_eig[0].item()):
                raw_eig = None
        return Spectrum(eig * scale * scale, self.n, raw_eig)


def embedding_spectrum(z: Tensor, normalize: bool = False) -> Spectrum:
    """The spectrum of one batch of embeddings, (N, D)."""
    if not isinstance(z, Tensor) or z.dim() != 2:
        raise ValueError("z must be a 2-D tensor (N, D)")
    return SpectrumAccumulator(z.shape[1], normalize=normalize).update(z).result()
