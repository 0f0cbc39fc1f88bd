"""The algorithm behind directclr::infonce (directclr/infonce.py holds the op, its autograd and
the public API): the subvectors and their normalization, the row/column ``Layout`` of each
variant, the collectives (``directclr.collectives``; none without a group), and the primitive
contract every backend keeps: rows Q against columns K, one positive and an optional excluded
column per row -> row LSE (and column LSE); the backward recomputes tiles from the LSEs, or (CPU,
small batches: ``keeps_dots``) reads them from the dot products its forward kept (``Kept``).
``cpu``: ``kernels/cpu/primitive.py`` (C++ built on first use by ``native``, else plain
PyTorch); ``triton``: ``kernels/infonce.py``.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from .collectives import all_gather_rows, merge_col_lse, rank_and_world, reduce_scatter_rows
from .kernels.cpu import primitive as cpu_primitive
from .rows import working_dtype

# log2 of the largest 1/tau whose gradients w.r.t. the unit rows the backward computes as they are
# (see ``weight_exponent``).
UNIT_GRAD_MAX_LOG2 = 64
# The largest M x C matrix of unit dot products (MiB) that a backend with KEEPS_DOTS keeps from
# the forward for the backward, which then computes three matrix products instead of four; the
# environment variable sets it per call, 0 never keeps. 64 MiB: fp32 cross up to N = 4096, ntxent
# up to N = 1024 on one process (SYMMETRIC_KEEP_SHARE).
KEEP_DOTS_MB = 64
# ntxent on one process recomputes only the tiles of its symmetric S that start before each column
# block ends, about half the forward's product, which its keeping path computes whole: the two
# paths then cost about the same products, and keeping pays only while the tiles are too few to
# keep the cores busy. It keeps within this share of the budget (bench/results rows of 3e841d1,
# Intel Xeon 2 cores, fp32: keeping takes 0.76x the recomputing time at N = 1024, 1.10x at 2048).
SYMMETRIC_KEEP_SHARE = 0.25
KEEP_DOTS_ENV = "DIRECTCLR_KEEP_DOTS_MB"


# --------------------------------------------------------------------------- the primitive
class Pairing(NamedTuple):
    """Which column is each row's positive, and which (if any) it excludes: both are shifted
    diagonals, so kernels can tell from a tile's position whether it holds any."""
    offset: int  # row i's positive is i + offset + (half if i < half else -half)
    half: int  # 0 for cross; ntxent: N, the positive is the row of the other view
    excl_offset: int  # row i excludes column i + excl_offset (ntxent's self-similarity); -1: none

    def positives(self, n_rows: int, device) -> Tensor:
        rows = torch.arange(n_rows, device=device)
        return rows + self.offset + torch.where(rows < self.half, self.half, -self.half)


class Kept(NamedTuple):
    """What the forward keeps for the backward where ``keeps_dots``, all (0, 0) elsewhere: the
    (M, C) unit dot products and the rows of ``subvectors`` (2N, dim) with their (inv_norm,
    inv_grad, scale) stacked (3, 2N), so the backward neither recomputes a tile nor reads z's
    rows again."""
    dots: Tensor
    rows: Tensor
    row_stats: Tensor

    @staticmethod
    def shapes(n: int, dim: int, variant: str, world: int) -> tuple[tuple[int, int], ...]:
        """The shapes of what a forward that keeps its dots returns (the op's fake repeats
        them)."""
        return dots_shape(n, variant, world), (2 * n, dim), (3, 2 * n)


class Layout(NamedTuple):
    """One rank's operands of the primitive (``rank_layout``): rows Q against columns K.

    rows: (M, dim) Q, ``subvectors``' v: cross, z1's rows; ntxent, z1's then z2's.
    row_inv: (M,) 1 / max(|v|, eps) of each row, in the working dtype.
    cols: (C, dim) K, gathered over the ranks in rank order: each rank's z2 (cross), its rows
        (ntxent; on one process ``rows`` itself, the CPU backend's cue that G is symmetric).
    col_inv: (C,) the columns' inverse norms.
    pairing: each row's positive and excluded column (``Pairing``).
    """
    rows: Tensor
    row_inv: Tensor
    cols: Tensor
    col_inv: Tensor
    pairing: Pairing


def backend_primitive(backend: str):
    """The module of a backend's primitive (cpu: kernels/cpu/primitive.py, triton:
    kernels/infonce.py). All keep one contract; S = scale * Q_hat K_hat^T, excluded entries
    removed; vectors and (rows, dim) buffers in the working dtype:

    UNIT_ROWS: whether the layout's rows and columns come normalized, contiguous, in the working
        dtype (row_inv, col_inv unused), or as v in z's dtype, any strides.
    subvectors(z1, z2, dim) -> (sub, inv_norm, inv_grad, scale): ``directclr.rows.subvectors``
        with unit = UNIT_ROWS (the CPU backend's in C++, one pass).
    finish_rows(grad_unit, sub, sub_inv_norm, inv_grad, divisor, z_grad) -> per-row radial:
        ``directclr.rows.finish_rows`` (the CPU backend's in C++, one pass; its sub is unit).
    STRIDED_OUT: whether buffers of any row stride (z's gradients' own first columns) cost no
        copy; else contiguous ones, several row blocks consecutive in one buffer.
    KEEPS_DOTS: whether lse_forward can keep Q_hat K_hat^T for the backward (else keep is
        always False and kept always empty).
    lse_forward(layout, scale, with_cols, keep) -> (row_lse, pos_logit, col_max, col_sum, kept):
        each row's LSE and S_i,pos_i; with_cols, each column's (max, sum exp(S - max)) over these
        rows, which ``merge_col_lse`` merges across ranks (else both empty); keep: the (M, C) unit
        dot products, which the backward then reads instead of recomputing (else (0, 0)).
    lse_backward(layout, scale, row_lse, row_w, col_lse, col_w, kept, out_rows, out_cols) -> None:
        the gradient w.r.t. Q_hat, K_hat of sum_i row_w_i (row_lse_i - S_i,pos_i) + sum_j col_w_j
        (col_lse_j - S_pos^-1(j),j) (no column term if col_lse is empty) overwrites out_rows
        (consecutive row blocks covering the rows, one per view) and, if it has rows, out_cols;
        kept: the forward's, read instead of recomputing its tiles where not empty.
        Written, not returned: so no backend copies an N x dim gradient (the CPU kernels write
        into z's gradients, the Triton kernels where they would allocate)."""
    if backend == "cpu":
        return cpu_primitive
    if backend == "triton":  # imported here: triton is optional, the CPU path never needs it
        from .kernels import infonce as triton_infonce
        return triton_infonce
    raise ValueError(f"backend {backend!r} has no fused primitive")


# --------------------------------------------------------------------------- the algorithm
def rank_layout(sub, inv, variant: str, group) -> Layout:
    """One rank's rows and gathered columns, from ``subvectors``' tensors. ntxent: rank r's block
    of the gathered columns is [a_r; b_r]."""
    rank = rank_and_world(group)[0]
    n = sub.shape[0] // 2
    if variant == "cross":
        return Layout(sub[:n], inv[:n], all_gather_rows(sub[n:], group),
                      all_gather_rows(inv[n:], group), Pairing(rank * n, 0, -1))
    return Layout(sub, inv, all_gather_rows(sub, group), all_gather_rows(inv, group),
                  Pairing(rank * 2 * n, n, rank * 2 * n))


def keep_dots_bytes() -> int:
    """The budget of ``keeps_dots`` in bytes: $DIRECTCLR_KEEP_DOTS_MB, else KEEP_DOTS_MB."""
    value = os.environ.get(KEEP_DOTS_ENV, "").strip()
    if not value:
        return KEEP_DOTS_MB << 20
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = math.nan
    if not megabytes >= 0 or math.isinf(megabytes):
        raise ValueError(f"{KEEP_DOTS_ENV} must be a number of MiB >= 0, got {value!r}")
    return int(megabytes * (1 << 20))


def dots_shape(n: int, variant: str, world: int) -> tuple[int, int]:
    """(M, C) of one rank's primitive: its rows against the gathered columns."""
    return (n, n * world) if variant == "cross" else (2 * n, 2 * n * world)


def keeps_dots(backend: str, n: int, variant: str, world: int, dtype: torch.dtype,
               keep_bytes: int) -> bool:
    """Whether the forward keeps its (M, C) unit dot products for the backward: on a backend that
    can, where they fit ``keep_bytes``. One choice per shape, which the op's fake (the shape of
    what it returns) repeats."""
    if n == 1 and world == 1:  # one_pair: no primitive at all
        return False
    if not backend_primitive(backend).KEEPS_DOTS:
        return False
    if variant == "ntxent" and world == 1:
        keep_bytes = int(keep_bytes * SYMMETRIC_KEEP_SHARE)
    rows, cols = dots_shape(n, variant, world)
    return rows * cols * torch.finfo(working_dtype(dtype)).bits // 8 <= keep_bytes


def one_pair(z1, z2, dim, variant):
    """N = 1 on one process: (loss, row LSE, column LSE, Kept) with the loss 0 exactly,
    since each LSE has the positive as its only term (NaN where the subvectors hold NaN or inf,
    as for any N; no host read); the LSEs are unused (``backward`` gives zeros)."""
    work = working_dtype(z1.dtype)
    finite = torch.isfinite(z1[:, :dim]).all() & torch.isfinite(z2[:, :dim]).all()
    loss = torch.zeros(1, dtype=work, device=z1.device).masked_fill_(~finite, math.nan)
    return (loss, loss.new_zeros(1 if variant == "cross" else 2),
            loss.new_zeros(1 if variant == "cross" else 0), nothing_kept(loss))


def nothing_kept(like: Tensor) -> Kept:
    return Kept(*(like.new_empty((0, 0)) for _ in Kept._fields))


def forward(z1, z2, dim, temperature, variant, backend, group, keep_bytes):
    """Per-pair losses of this rank's rows, and the LSEs (and what it keeps, ``Kept``) that
    backward needs."""
    world = rank_and_world(group)[1]
    if z1.shape[0] == 1 and world == 1:
        return one_pair(z1, z2, dim, variant)
    primitive = backend_primitive(backend)
    sub, inv, inv_grad, scale = primitive.subvectors(z1, z2, dim)
    keep = keeps_dots(backend, z1.shape[0], variant, world, z1.dtype, keep_bytes)
    row_lse, pos_logit, col_max, col_sum, dots = primitive.lse_forward(
        rank_layout(sub, inv, variant, group), 1.0 / temperature, variant == "cross", keep)
    n = z1.shape[0]
    # Each LSE and logit halved before any difference: at tiny temperatures (|S| up to 1/tau,
    # near fp32's max) a difference of two can overflow where its half, or the pair's loss, fits.
    # Halving is exact, so elsewhere this rounds as the difference halved.
    half_row_lse, half_pos_logit = 0.5 * row_lse, 0.5 * pos_logit
    if variant == "cross":
        col_lse = merge_col_lse(col_max, col_sum, group)
        own_col_lse = col_lse.split(n)[rank_and_world(group)[0]]  # this rank's z2 rows
        loss = (half_row_lse - half_pos_logit) + (0.5 * own_col_lse - half_pos_logit)
    else:
        col_lse = col_max  # empty: ntxent's column LSEs are the gathered row LSEs (backward)
        per_view = half_row_lse - half_pos_logit
        loss = per_view[:n] + per_view[n:]
    # Each exact loss is >= 0 (the positive is one of its LSE's terms); rounding (fp32's fixed
    # shift by 1/tau) can leave it a few ulp under. Clamped here only: the gradient stays the
    # formula's.
    kept = (Kept(dots, sub, torch.stack((inv, inv_grad, scale))) if keep
            else nothing_kept(row_lse))
    return loss.clamp_min_(0.0), row_lse, col_lse, kept


def backward(grad, z1, z2, row_lse, col_lse, kept: Kept, dim, temperature, variant, backend,
             group):
    """Gradients w.r.t. z1, z2 of sum_i grad_i * loss_i, summed over all ranks' losses, and
    w.r.t. the temperature (0-d, working dtype; with a group, this rank's share, see below)."""
    n, work = z1.shape[0], working_dtype(z1.dtype)
    cross, world = variant == "cross", rank_and_world(group)[1]
    if n == 1 and world == 1:  # one_pair: the loss is 0 whatever the inputs
        return (torch.zeros(z1.shape, dtype=z1.dtype, device=z1.device),
                torch.zeros(z2.shape, dtype=z2.dtype, device=z2.device),
                torch.zeros((), dtype=work, device=z1.device))
    primitive = backend_primitive(backend)
    if kept.rows.numel():
        sub, (inv, inv_grad, scale) = kept.rows, kept.row_stats
    else:
        sub, inv, inv_grad, scale = primitive.subvectors(z1, z2, dim)
    layout = rank_layout(sub, inv, variant, group)
    exponent = weight_exponent(temperature)
    # each pair's loss averages two terms
    half = math.ldexp(0.5, -exponent) * grad.to(row_lse.dtype).contiguous()
    row_w = half if variant == "cross" else torch.cat([half, half])
    col_w = all_gather_rows(row_w if variant == "ntxent" else half, group)
    if variant == "ntxent":  # S is symmetric: column j's LSE is row j's
        col_lse = all_gather_rows(row_lse, group)
    # wholly written by finish_rows below
    grad_z = [torch.empty(z.shape, dtype=z.dtype, device=z.device) for z in (z1, z2)]
    # The views whose gradient the primitive writes (cross over several ranks: the rows' alone),
    # into z's gradients where the backend can (no N x dim buffers beside them), else one buffer.
    views = 1 if cross and world > 1 else 2
    if primitive.STRIDED_OUT and z1.dtype == work:
        grads = [z_grad[:, :dim] for z_grad in grad_z[:views]]
    else:
        grads = list(torch.empty((views * n, dim), dtype=work, device=z1.device).split(n))
    if cross:  # local rows only see their part of each column's gradient: summed over ranks
        out_rows = grads[:1]
        out_cols = grads[1] if world == 1 else sub.new_empty((world * n, dim), dtype=work)
    else:  # G + G^T on local rows is complete (S symmetric): no column gradient
        out_rows, out_cols = grads, sub.new_empty((0, dim), dtype=work)
    primitive.lse_backward(layout, 1.0 / temperature, row_lse, row_w, col_lse, col_w,
                           kept.dots, out_rows, out_cols)
    if views == 1:
        grads.append(reduce_scatter_rows(out_cols, group))
    radial = []
    divisor = scale * math.ldexp(1.0, -exponent) if exponent else scale  # powers of two: exact
    for grad_sub, z_grad, rows in zip(grads, grad_z, (slice(0, n), slice(n, 2 * n))):
        radial.append(primitive.finish_rows(grad_sub, sub[rows], inv[rows], inv_grad[rows],
                                            divisor[rows], z_grad).sum())
    # The temperature, at no N x N cost: L depends on the unit rows only through S = c Q_hat
    # K_hat^T (c = 1/tau), so for either variant sum_i v_hat_i . g_i over both views' rows (g
    # the gradient w.r.t. the unit rows, before its radial part is removed) is 2 c dL/dc: each
    # side of cross gives c sum G.(Q_hat K_hat^T), ntxent's 2N rows are both S's rows and its
    # columns. dL/dtau = -c^2 dL/dc = -c sum / 2. With a group each rank sums its own rows
    # (their gradients are already summed over the ranks' losses): the ranks' values add up to
    # the gradient of the sum of all ranks' losses, as z's do, so DDP's averaging of the
    # parameter's gradient gives the global loss's, like every other parameter's.
    grad_temperature = (radial[0] + radial[1]) * (-0.5 / temperature) * 2.0**exponent
    return grad_z[0], grad_z[1], grad_temperature


def weight_exponent(temperature: float) -> int:
    """k >= 0 such that the backward's weights times 2^-k keep the gradients w.r.t. the unit rows
    in range: those are c (G K_hat) (c = 1/tau), up to c (|row_w| + N |col_w|) in size, so near
    the working dtype's largest c (fp32: 3.4e38) they overflow (then inf - inf = NaN in the
    radial part) though the gradient w.r.t. z, their tangential part over |v|, is finite. G is
    linear in the weights: weighted by 2^-k, c (G K_hat) is at most 2^UNIT_GRAD_MAX_LOG2 (|w|
    + N |w|), and the last division of the backward gives 2^k back. 0 (no change at all) for
    every tau above 2^-UNIT_GRAD_MAX_LOG2 = 5.4e-20."""
    return max(0, math.frexp(1.0 / temperature)[1] - UNIT_GRAD_MAX_LOG2)
