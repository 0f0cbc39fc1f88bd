"""The per-row work around the InfoNCE primitive, in plain PyTorch: both views' subvectors
(scaled into range and, for backends that take unit rows, normalized) and the backward's last
step from the gradient w.r.t. those rows to the one w.r.t. z. The Triton backend and the CPU
fallback (kernels/cpu/dense.py) use these; kernels/cpu/rows.cpp computes the same in one pass
over the rows for each."""
from __future__ import annotations

import torch
from torch import Tensor

from .scaling import scaled_rows

NORM_EPS = 1e-12  # same floor as F.normalize
RADIAL_CHUNK = 1024  # rows per temporary in the backward's row dot products


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def subvectors(z1: Tensor, z2: Tensor, dim: int, unit: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both views' v = u / s for u = z[:, :dim], in one new (2N, dim) tensor (z1's rows, then
    z2's: ntxent's rows as they are, cross's rows and columns its halves), with s a power of two
    per row that keeps |v| in range; 1/max(|v|, eps) for the forward, the 1/|v| the backward uses,
    and s. unit: v / max(|v|, eps) instead of v, in the working dtype, normalized in place (the
    CPU kernels take unit rows: no second copy); else v in z's dtype (the Triton kernels
    normalize in their tiles). v / |v| is u's unit row; rows that meet the eps floor are never
    rescaled (s = 1), so the floor is F.normalize's. The backward's 1/|v| is 0 where |v| < eps,
    since the norm has no derivative at 0 (this keeps fp16 gradients of zero rows finite)."""
    work = working_dtype(z1.dtype)
    n = z1.shape[0]
    sub = torch.empty((2 * n, dim), dtype=work if unit else z1.dtype, device=z1.device)
    scale = torch.cat([scaled_rows(z1[:, :dim], work, out=sub[:n])[1],
                       scaled_rows(z2[:, :dim], work, out=sub[n:])[1]])
    norm = torch.linalg.vector_norm(sub, dim=1, dtype=work)
    inv_norm = 1.0 / norm.clamp_min(NORM_EPS)
    if unit:
        sub.mul_(inv_norm.unsqueeze(1))
    return sub, inv_norm, torch.where(norm >= NORM_EPS, inv_norm, torch.zeros_like(norm)), scale


def finish_rows(grad_unit: Tensor, sub: Tensor, sub_inv_norm: Tensor | float,
                inv_norm_grad: Tensor, divisor: Tensor, z_grad: Tensor) -> Tensor:
    """One view's gradient w.r.t. z from the one w.r.t. its unit rows v_hat (fp32/fp64, any row
    stride, overwritten; it may be z_grad's own first columns): z_grad[:, :dim] = (g - v_hat
    (v_hat . g)) / |v| / divisor, z_grad[:, dim:] = 0. sub is the view's rows of ``subvectors``:
    v with sub_inv_norm 1/|v|, or already v_hat with sub_inv_norm 1. divisor: each row's power of
    two (times the backward's weight scale), undone last: for a huge row the quotient is the tiny
    gradient itself, with no factor 1/(s |v|) rounded on the way. Returns v_hat_i . g_i per row,
    from which the backward gets the temperature's gradient."""
    # v_hat . g without materializing v_hat, RADIAL_CHUNK rows at a time: an N x dim product
    # here would be the backward's only temporary of that size.
    radial = torch.cat([(grad_chunk * sub_chunk).sum(1) for grad_chunk, sub_chunk
                        in zip(grad_unit.split(RADIAL_CHUNK), sub.split(RADIAL_CHUNK))])
    radial *= sub_inv_norm
    grad_unit.addcmul_(sub, (radial * sub_inv_norm).unsqueeze(1), value=-1.0)
    grad_unit.mul_(inv_norm_grad.unsqueeze(1))
    dim = grad_unit.shape[1]
    torch.div(grad_unit, divisor.unsqueeze(1), out=z_grad[:, :dim])
    z_grad[:, dim:].zero_()
    return radial
