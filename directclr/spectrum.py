"""Embedding spectrum: the covariance eigenvalues that show dimensional collapse.

``SpectrumAccumulator`` streams batches (and ranks) into (n, mean, M2) and merges partial states
with Chan's rule, M2 = M2a + M2b + delta delta^T na nb / n, never the unstable E[zz^T] - mu mu^T.
The per-batch centered Gram matrix is a fused kernel (Triton on CUDA, C++ on CPU) that computes
only the upper triangle of tiles; eigenvalues come from ``eigvalsh`` in float64 on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

NORM_EPS = 1e-12


def centered_gram(x: Tensor, mean: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(sum_i (x_i - mean)(x_i - mean)^T, sum_i (x_i - mean)) with fp32 accumulation (fp64 for
    fp64 input on CPU). backend: "auto" (Triton on CUDA, C++ on CPU), "cpu", or "triton" (CPU
    tensors need TRITON_INTERPRET=1)."""
    if backend not in ("auto", "triton", "cpu"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'cpu', got {backend!r}")
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        from kernels.covariance import centered_gram as triton_gram
        return triton_gram(x, mean)
    from . import _C  # noqa: F401  (registers torch.ops.directclr_cpu)
    return torch.ops.directclr_cpu.centered_gram(x, mean)


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of the covariance (descending, clamped at 0, float64) of `n` embeddings."""

    eigenvalues: Tensor
    n: int

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
        """RankMe: exp of the entropy of p_k = s_k / sum(s), s the singular values."""
        s = self.singular_values
        total = s.sum()
        if total <= 0:
            return 0.0
        p = s / total
        p = p[p > 0]
        return math.exp(-(p * p.log()).sum().item())

    def collapsed(self, rel: float = 1e-6) -> int:
        """How many dimensions have an eigenvalue below rel x the largest."""
        top = self.eigenvalues[0]
        if top <= 0:  # constant embeddings: every dimension has collapsed
            return self.eigenvalues.numel()
        return int((self.eigenvalues < rel * top).sum().item())

    def summary(self, rel: float = 1e-6) -> dict:
        return {"n": self.n, "dim": self.eigenvalues.numel(),
                "effective_rank": self.effective_rank, "collapsed": self.collapsed(rel),
                "collapsed_rel": rel, "top_eigenvalue": self.eigenvalues[0].item()}


class SpectrumAccumulator:
    """Streams (N, dim) batches of embeddings into the covariance and its spectrum.

    >>> acc = SpectrumAccumulator(2048)
    >>> for z in batches: acc.update(z)
    >>> acc.all_reduce()          # under torch.distributed: every rank gets the global state
    >>> spec = acc.result(); spec.effective_rank, spec.collapsed()
    """

    def __init__(self, dim: int, normalize: bool = False, dtype: torch.dtype = torch.float64,
                 backend: str = "auto"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dim, self.normalize, self.dtype, self.backend = dim, normalize, dtype, backend
        self.n = 0
        self.mean = torch.zeros(dim, dtype=dtype)
        self.m2 = torch.zeros(dim, dim, dtype=dtype)

    def _merge_state(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        if n_b == 0:
            return
        mean_b, m2_b = mean_b.to(self.mean), m2_b.to(self.m2)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b + torch.outer(delta, delta) * (self.n * n_b / n)
        self.mean += delta * (n_b / n)
        self.n = n

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
            norms = torch.linalg.vector_norm(z, dim=1, dtype=working, keepdim=True)
            z = z / norms.clamp_min(NORM_EPS)
        n_b = z.shape[0]
        # A working-precision mean is cheap; the centered sums from the kernel make it exact:
        # with s = sum(z - m), the batch mean is m + s/n and M2 = sum (z-m)(z-m)^T - s s^T / n.
        center = z.mean(0, dtype=working)
        # Any NaN/inf makes its column mean non-finite: the full count runs only then.
        if not torch.isfinite(center).all():
            bad = int((~torch.isfinite(z)).sum().item())
            raise ValueError(f"z holds {bad} non-finite values (NaN or inf)")
        m2_b, centered_sum = centered_gram(z, center, self.backend)
        centered_sum = centered_sum.double().cpu()
        mean_b = center.double().cpu() + centered_sum / n_b
        m2_b = m2_b.double().cpu() - torch.outer(centered_sum, centered_sum) / n_b
        self._merge_state(n_b, mean_b, m2_b)
        return self

    def merge(self, other: "SpectrumAccumulator") -> "SpectrumAccumulator":
        if not isinstance(other, SpectrumAccumulator) or other.dim != self.dim:
            raise ValueError("other must be a SpectrumAccumulator of the same dim")
        if other.normalize != self.normalize:
            raise ValueError("cannot merge accumulators with different `normalize`")
        self._merge_state(other.n, other.mean, other.m2)
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
        head = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.mean.double()])
        heads = [torch.empty_like(head, device=device) for _ in range(world)]
        dist.all_gather(heads, head.to(device), group=group)
        m2 = self.m2.double().to(device)
        dist.all_reduce(m2, group=group)
        counts = torch.stack([h[0] for h in heads]).cpu()
        means = torch.stack([h[1:] for h in heads]).cpu()
        total = counts.sum()
        if total == 0:
            return self
        mean = (counts[:, None] * means).sum(0) / total
        spread = (means - mean) * counts[:, None].sqrt()
        self.m2 = (m2.cpu() + spread.T @ spread).to(self.dtype)
        self.mean, self.n = mean.to(self.dtype), int(total.item())
        return self

    def covariance(self) -> Tensor:
        if self.n < 2:
            raise ValueError(f"the spectrum needs at least 2 rows in total, got {self.n}")
        return self.m2 / self.n

    def result(self) -> Spectrum:
        cov = self.covariance().double()
        eig = torch.linalg.eigvalsh((cov + cov.T) / 2).flip(0).clamp_min(0)
        return Spectrum(eig, self.n)


def embedding_spectrum(z: Tensor, normalize: bool = False) -> Spectrum:
    """The spectrum of one batch of embeddings, (N, D)."""
    if not isinstance(z, Tensor) or z.dim() != 2:
        raise ValueError("z must be a 2-D tensor (N, D)")
    return SpectrumAccumulator(z.shape[1], normalize=normalize).update(z).result()
