"""The C++ InfoNCE ops of infonce.cpp in plain PyTorch, with their schemas: the CPU backend's
fallback where the kernels cannot be built (no compiler, see directclr.native). They form the
whole M x C logits, so memory is O(M C) instead of O((M + C) dim); equal to the C++ results to
1e-12 in float64 (tests/op/test_infonce.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from directclr import rows as rows_torch


def _logits(rows: Tensor, cols: Tensor, excl: Tensor, scale: float) -> Tensor:
    return _masked(_scaled(rows @ cols.T, scale), excl)


def _scaled(dots: Tensor, scale: float) -> Tensor:
    """scale_dots of infonce.cpp: near the dtype's max scale, a dot rounded above 1 would
    overflow to inf, so the dots are clamped to [-1, 1] there first."""
    if scale > 0.5 * torch.finfo(dots.dtype).max:
        dots = dots.clamp(-1.0, 1.0)
    return dots.mul_(scale)


def _masked(logits: Tensor, excl: Tensor) -> Tensor:
    excluding = excl >= 0
    logits[torch.arange(logits.shape[0])[excluding], excl[excluding]] = float("-inf")
    return logits


def unit_subvectors(z1, z2, dim):
    """torch.ops.directclr_cpu.unit_subvectors (kernels/cpu/rows.cpp)."""
    return rows_torch.subvectors(z1, z2, dim, unit=True)


def finish_rows(grad_unit, unit, inv_grad, divisor, z_grad):
    """torch.ops.directclr_cpu.finish_rows (kernels/cpu/rows.cpp): overwrites z_grad."""
    return rows_torch.finish_rows(grad_unit, unit, 1.0, inv_grad, divisor, z_grad)


def lse_forward(rows, cols, pos, excl, scale, with_cols, keep):
    """torch.ops.directclr_cpu.lse_forward."""
    logits = _logits(rows, cols, excl, scale)
    pos_logit = logits[torch.arange(rows.shape[0]), pos]
    kept = rows @ cols.T if keep else logits.new_empty((0, 0))
    if not with_cols:
        empty = logits.new_empty(0)
        return torch.logsumexp(logits, 1), pos_logit, empty, empty, kept
    col_max = logits.amax(0)
    return (torch.logsumexp(logits, 1), pos_logit, col_max, (logits - col_max).exp().sum(0),
            kept)


def lse_backward(rows, cols, pos, excl, scale, row_lse, row_w, col_lse, col_w, kept, grad_rows,
                 grad_cols):
    """torch.ops.directclr_cpu.lse_backward: overwrites grad_rows and, if it has rows,
    grad_cols."""
    logits = _logits(rows, cols, excl, scale) if not kept.numel() else _masked(
        _scaled(kept.clone(), scale), excl)
    row_w, col_w = row_w.to(rows.dtype), col_w.to(rows.dtype)
    # clamped at 0 as in infonce.cpp's grad_tile: P <= 1 whatever the logits' rounding
    grad_logits = ((logits - row_lse.to(rows.dtype).unsqueeze(1)).clamp_max(0.0).exp()
                   * row_w.unsqueeze(1))
    positive = row_w
    if col_lse.numel():
        grad_logits += ((logits - col_lse.to(rows.dtype).unsqueeze(0)).clamp_max(0.0).exp()
                        * col_w.unsqueeze(0))
        positive = row_w + col_w[pos]
    grad_logits[torch.arange(rows.shape[0]), pos] -= positive
    torch.mm(grad_logits, cols, out=grad_rows).mul_(scale)
    if grad_cols.shape[0]:
        torch.mm(grad_logits.T, rows, out=grad_cols).mul_(scale)
