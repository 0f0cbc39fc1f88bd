"""Triton kernels of the subvector-InfoNCE primitive: the CUDA backend of ``directclr.infonce``.

Rows R (M x dim) against columns C (Nc x dim), the caller's ``z[:, :dim]`` in their own dtype
(bf16/fp16 go to the tensor cores as they are), each row divided by a power of two that keeps its
values below 2^16 (``directclr.rows.subvectors``), so that no product tile overflows fp32. The
L2 normalization is fused as a rescaling of each product tile, in base 2 so that the exponentials
are bare ``exp2``:

    l_ij = log2(e) * scale * (r_i . c_j) * inv_norm_r_i * inv_norm_c_j      (S_ij * log2(e))

Every logit lies in [-shift, shift] with shift = log2(e) / tau (unit rows). While 2 * shift stays
inside fp32's normal range (tau >= ~0.029, FIXED_SHIFT_MAX) that bound replaces the running max:
e_ij = exp2(l_ij - shift) serves the row sums, the column sums and both softmaxes of the
backward, one ``exp2`` per logit and pass. Below it, running maxima (two ``exp2``), with shift
split between the rows' and the columns' factors (``_logit_factors``) and, from CLAMPED_SHIFT_MIN
on, the backward's exponents clamped at 0; tau >= 8.5e-39 (SHIFT_MAX).

* ``_forward_kernel``: grid (row groups, column splits). Each program sweeps its column range
  for each of its row blocks, tiles computed transposed (columns x rows) so that the per-tile
  column sums reduce within 4 lanes while the row sums add up elementwise and are reduced once
  per row block. Row partials (max, sum) per split; column partials per row group, read-
  modified-written only by the program that owns them. The host merges them in a fixed order.
  One product per logit for the row and the column LSE.
* ``_backward_kernel`` (rows of at most FUSED_BACKWARD_MAX_ROW_BYTES, e.g. dim <= 256 in bf16):
  per row block, the whole subvector width in one fp32 accumulator; each column tile is loaded
  once and serves the recomputed logits and dR += G C (no recompute per dim chunk). The column
  gradient of ``cross`` is the same kernel on (C, R). Few row blocks split the columns, partial
  rows summed on the host in a fixed order.
* ``_g_panel_kernel`` (wider rows, e.g. dim 360 or 2048 in bf16): the G tiles of a panel of rows,
  written once in the input dtype; dR = G C and dC = G^T R go to cuBLAS, panels added in a
  fixed order. A fused backward at dim 360 would hold 128 x 384 fp32 accumulators per program:
  too many registers, or (at 64 rows) both warpgroups recomputing the same logits; the static
  report (python -m directclr.gpu_report) measured 1.33x the tensor work that way.

The positive logit is an O(N dim) row dot on the host; G's -[j = pos_i] term is subtracted in
fp32 inside the kernels, on the tiles that hold a positive (shifted diagonals, see Pairing), as
the excluded column (ntxent's self-similarity) is masked only on tiles that hold it. Loads:
``dim`` is a constexpr and row strides are passed divided by the 16-byte vector width (``VEC``)
and multiplied back inside, so that operand rows move as 16-byte cp.async even at ntxent's
360-element stride. Deterministic: no atomics, every output element reduced by one program in a
fixed order (cuBLAS products included).
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from directclr import rows

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Largest 2 * shift (base-2 logit spread) for the fixed shift: exp2(l - shift) >= 2^(-2 shift)
# stays a normal fp32 (2^-126), and the backward's w * grad_scale * exp2(shift - lse) <= 2^14 *
# 2^(2 shift) stays below fp32's 2^128.
FIXED_SHIFT_MAX = 100.0
# From this shift on, the logits' rounding (a few ulp of the shift: 2^-7 here, 2^104 at fp32's
# smallest temperature) can put a logit the backward recomputes above the LSE the forward took
# (other tiles, other roundings, and through natural log): the backward clamps exp2's argument
# at 0 there, P being <= 1 (unclamped: P > 1, and inf from 2^7 on, then inf - inf = NaN).
CLAMPED_SHIFT_MIN = 2.0**16
# The largest shift (tau >= 8.5e-39, though 1/tau fits fp32 from 2.9e-39): the logits reach
# shift times a unit dot product rounded above 1, and must not overflow fp32.
SHIFT_MAX = 0.5 * torch.finfo(torch.float32).max
# Programs worth launching per SM, and the bounds on partial buffers (row groups, column splits).
PROGRAMS_PER_SM = 4
MAX_ROW_GROUPS = 32
MAX_SPLIT_BYTES = 256 * 2**20
# |G| <= |row_w| + |col_w|; scaled, it peaks near 2^14, well inside fp16 (max 65504).
G_TARGET_LOG2 = 14
# 1 / directclr.rows.NORM_EPS: the inverse norm of rows below the norm floor.
INV_NORM_CAP = 1e12
# Bytes of G panels (two, input dtype) the wide-dim backward may hold at once.
PANEL_BYTES = 512 * 2**20
# The primitive's contract (directclr.fused.backend_primitive): rows come as v in z's dtype, any
# strides, normalized inside the tiles by the layout's inverse norms; gradients go to contiguous
# buffers (the kernels write rows of exactly dim elements), consecutive in one tensor where there
# are several blocks, which then take no copy.
UNIT_ROWS = False
STRIDED_OUT = False
KEEPS_DOTS = False  # its fused kernels recompute tiles on chip: kept M x C dots would cost HBM


def subvectors(z1, z2, dim):
    """v in z's dtype (``directclr.rows.subvectors``): the tiles normalize."""
    return rows.subvectors(z1, z2, dim, unit=False)


finish_rows = rows.finish_rows


class Config:
    """A kernel configuration: tile sizes and launch options."""

    def __init__(self, num_warps: int, num_stages: int, **blocks):
        self.blocks, self.num_warps, self.num_stages = blocks, num_warps, num_stages

    def __repr__(self):
        return f"Config({self.blocks}, warps={self.num_warps}, stages={self.num_stages})"

    def launch(self) -> dict:
        return dict(**self.blocks, num_warps=self.num_warps, num_stages=self.num_stages)


# One configuration per kernel and operand type, chosen from the static report
# (python -m directclr.gpu_report: no spills, 16-byte operand loads, warpgroups on distinct rows,
# issue below the tensor work), so that no call spends seconds autotuning and every launch is one
# the report judged. fp32 doubles the operand bytes (fewer stages fit A100's 163 KiB), and IEEE fp32
# runs on FMA units, whose operands live in registers (smaller tiles).
_FMA = {"forward": Config(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
        "backward": Config(8, 2, BLOCK_M=64, BLOCK_N=32),
        "panel": Config(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)}
CONFIGS = {
    "hopper": {  # wgmma: accumulators of a warpgroup's 64 rows, operands from shared memory
        "tensor": {"forward": Config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
                   "backward": Config(8, 2, BLOCK_M=128, BLOCK_N=64),
                   "panel": Config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)},
        "tf32": {"forward": Config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
                 "backward": Config(8, 2, BLOCK_M=128, BLOCK_N=64),
                 "panel": Config(8, 2, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)},
        "fma": _FMA,
    },
    "ampere": {  # mma.sync: operand fragments in registers too, so smaller tiles
        "tensor": {"forward": Config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
                   "backward": Config(8, 2, BLOCK_M=64, BLOCK_N=64),
                   "panel": Config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32)},
        "tf32": {"forward": Config(8, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
                 "backward": Config(8, 2, BLOCK_M=64, BLOCK_N=64),
                 "panel": Config(8, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32)},
        "fma": _FMA,
    },
}
# Under the interpreter tiles are numpy arrays: big ones amortize its per-op cost.
INTERPRETED = {"forward": Config(4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64),
               "backward": Config(4, 1, BLOCK_M=32, BLOCK_N=32),
               "panel": Config(4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)}
# The widest subvector whose gradient rows (BLOCK_M x dim fp32) fit a backward program's
# registers beside its logits tile, and whose row block and column tiles fit shared memory:
# 512 bytes of a row. Wider ones take the G-panel path.
FUSED_BACKWARD_MAX_ROW_BYTES = 512


def operand_kind(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "tensor"
    return "tf32" if _precision(dtype) == "tf32" else "fma"


def family() -> str:
    """The GPU generation Triton compiles for (its driver's target, so the static report's
    compile-only driver gets the configurations of the arch it compiles for)."""
    from triton.runtime import driver
    return "hopper" if driver.active.get_current_target().arch >= 90 else "ampere"


def configs(dtype: torch.dtype, interpret: bool = INTERPRET) -> dict[str, Config]:
    return INTERPRETED if interpret else CONFIGS[family()][operand_kind(dtype)]


def fused_backward(dim: int, dtype: torch.dtype) -> bool:
    """Whether the backward runs fused (else through G panels)."""
    padded = max(16, triton.next_power_of_2(dim))
    return padded * torch.empty(0, dtype=dtype).element_size() <= FUSED_BACKWARD_MAX_ROW_BYTES


# --------------------------------------------------------------------------- device code
@triton.jit
def _rows_tile(ptr, offs, mask, stride_vec, k0, VEC: tl.constexpr, DIM: tl.constexpr,
               WIDTH: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``offs`` x columns k0 .. k0 + WIDTH of a row-major operand, zeros past DIM."""
    offs_k = k0 + tl.arange(0, WIDTH)
    stride = stride_vec * VEC  # a multiple of VEC the compiler can see: 16-byte vectors
    tile = tl.load(ptr + offs.to(tl.int64)[:, None] * stride + offs_k[None, :],
                   mask=mask[:, None] & (offs_k < DIM)[None, :], other=0.0)
    if UPCAST:  # the interpreter has no bf16 arithmetic
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _scaled_logits(rows_ptr, row_stride_vec, cols_ptr, col_stride_vec, offs_m, mask_m, offs_n,
                   mask_n, row_scale, col_inv, offset, VEC: tl.constexpr, DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """log2(e) * S - offset for one tile, fp32: a K loop over the subvector (a constexpr trip
    count)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        r = _rows_tile(rows_ptr, offs_m, mask_m, row_stride_vec, k0, VEC, DIM, BLOCK_K, UPCAST)
        c = _rows_tile(cols_ptr, offs_n, mask_n, col_stride_vec, k0, VEC, DIM, BLOCK_K, UPCAST)
        acc = tl.dot(r, tl.trans(c), acc, input_precision=PRECISION)
    return _scale(acc, row_scale, col_inv, offset)


@triton.jit
def _scale(acc, row_scale, col_inv, offset):
    """Products to base-2 logits minus offset: one multiply and one fused multiply-add each."""
    return tl.fma(acc * row_scale[:, None], col_inv[None, :], -offset)


@triton.jit
def _keep(offs_m, mask_m, offs_n, mask_n, excl_offset, HAS_EXCL: tl.constexpr):
    keep = mask_m[:, None] & mask_n[None, :]
    if HAS_EXCL:
        keep = keep & (offs_n[None, :] != (offs_m + excl_offset)[:, None])
    return keep


@triton.jit
def _edge(row0, n0, n_rows, n_cols, excl_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          HAS_EXCL: tl.constexpr):
    """Whether tile (row0, n0) holds a padded row or column or an excluded entry."""
    edge = (row0 + BLOCK_M > n_rows) | (n0 + BLOCK_N > n_cols)
    if HAS_EXCL:
        edge = edge | ((n0 < row0 + excl_offset + BLOCK_M) & (row0 + excl_offset < n0 + BLOCK_N))
    return edge


@triton.jit
def _positives(offs_m, mask_m, pos_offset, pos_half):
    """Each row's positive column (a shifted diagonal, or two for ntxent's halves), and the
    first and last of them: the tiles between hold G's -w terms."""
    pos = offs_m + pos_offset + tl.where(offs_m < pos_half, pos_half, -pos_half)
    first = tl.min(tl.where(mask_m, pos, 2**30), axis=0)
    last = tl.max(tl.where(mask_m, pos, -(2**30)), axis=0)
    return pos, first, last


@triton.jit
def _forward_kernel(rows_ptr, row_stride_vec, row_scale_ptr, cols_ptr, col_stride_vec,
                    col_inv_ptr, row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr,
                    n_rows, n_cols, excl_offset, blocks_per_group, tiles_per_split, shift,
                    DIM: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WITH_COLS: tl.constexpr,
                    HAS_EXCL: tl.constexpr, FIXED_SHIFT: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """A reduction along the MMA tile's second axis stays within 4 lanes; along its first it
    crosses lanes and warps. Row statistics alone: tiles (rows x columns), row sums per tile on
    the cheap axis. With column statistics: tiles computed transposed (columns x rows), so the
    column sums (new columns every tile) take the cheap axis, and the row sums (the same rows all
    along the sweep) are added elementwise and reduced once per row block."""
    group = tl.program_id(0)
    split = tl.program_id(1)
    col_begin = split * tiles_per_split * BLOCK_N
    col_end = tl.minimum(col_begin + tiles_per_split * BLOCK_N, n_cols)
    offset = shift if FIXED_SHIFT else 0.0  # under the fixed shift, logits relative to it
    for block in range(group * blocks_per_group, (group + 1) * blocks_per_group):
        row0 = block * BLOCK_M
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_rows
        row_scale = tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0)
        # Logits lie in [-shift, shift]: the fixed max, or a finite floor for the running one.
        row_max = tl.zeros((BLOCK_M,), dtype=tl.float32) + (shift if FIXED_SHIFT else -shift)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if WITH_COLS:
            row_sums = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # fixed shift: per lane
        for n0 in range(col_begin, col_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_cols
            col_inv = tl.load(col_inv_ptr + offs_n, mask=mask_n, other=0.0)
            edge = _edge(row0, n0, n_rows, n_cols, excl_offset, BLOCK_M, BLOCK_N, HAS_EXCL)
            if WITH_COLS:  # (columns x rows)
                logits = _scaled_logits(cols_ptr, col_stride_vec, rows_ptr, row_stride_vec,
                                        offs_n, mask_n, offs_m, mask_m, col_inv, row_scale,
                                        offset, VEC, DIM, BLOCK_N, BLOCK_M, BLOCK_K, PRECISION,
                                        UPCAST)
                if edge:
                    logits = tl.where(tl.trans(_keep(offs_m, mask_m, offs_n, mask_n,
                                                     excl_offset, HAS_EXCL)),
                                      logits, float("-inf"))
                if FIXED_SHIFT:
                    exps = tl.exp2(logits)
                    row_sums += exps
                    part = col_sum_ptr + group * n_cols + offs_n
                    tl.store(part, tl.load(part, mask=mask_n) + tl.sum(exps, axis=1),
                             mask=mask_n)
                else:
                    new_max = tl.maximum(row_max, tl.max(logits, axis=0))
                    row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(
                        tl.exp2(logits - new_max[None, :]), axis=0)
                    row_max = new_max
                    part_max = col_max_ptr + group * n_cols + offs_n
                    part_sum = col_sum_ptr + group * n_cols + offs_n
                    old_max = tl.load(part_max, mask=mask_n, other=0.0)
                    col_max = tl.maximum(old_max, tl.max(logits, axis=1))
                    col_sum = tl.load(part_sum, mask=mask_n) * tl.exp2(old_max - col_max) + \
                        tl.sum(tl.exp2(logits - col_max[:, None]), axis=1)
                    tl.store(part_max, col_max, mask=mask_n)
                    tl.store(part_sum, col_sum, mask=mask_n)
            else:  # (rows x columns)
                logits = _scaled_logits(rows_ptr, row_stride_vec, cols_ptr, col_stride_vec,
                                        offs_m, mask_m, offs_n, mask_n, row_scale, col_inv,
                                        offset, VEC, DIM, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
                                        UPCAST)
                if edge:
                    logits = tl.where(_keep(offs_m, mask_m, offs_n, mask_n, excl_offset,
                                            HAS_EXCL), logits, float("-inf"))
                if FIXED_SHIFT:
                    row_sum += tl.sum(tl.exp2(logits), axis=1)
                else:
                    new_max = tl.maximum(row_max, tl.max(logits, axis=1))
                    row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(
                        tl.exp2(logits - new_max[:, None]), axis=1)
                    row_max = new_max
        if WITH_COLS and FIXED_SHIFT:
            row_sum = tl.sum(row_sums, axis=0)
        tl.store(row_max_ptr + split * n_rows + offs_m, row_max, mask=mask_m)
        tl.store(row_sum_ptr + split * n_rows + offs_m, row_sum, mask=mask_m)


@triton.jit
def _softmax_exp2(arg, CLAMPED: tl.constexpr):
    """exp2 of a logit minus its softmax's LSE (base 2), <= 0 but for rounding; CLAMPED: at
    shifts where that rounding can reach 2^7 (CLAMPED_SHIFT_MIN), clamped at 0."""
    if CLAMPED:
        arg = tl.minimum(arg, 0.0)
    return tl.exp2(arg)


@triton.jit
def _g_tile(logits, offs_m, mask_m, offs_n, mask_n, row0, n0, n_rows, n_cols, excl_offset,
            pos, first_pos, last_pos, row_coef, col_coef, row_lse, col_lse_ptr, row_wg,
            col_wg_ptr, shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_EXCL: tl.constexpr, FIXED_SHIFT: tl.constexpr, CLAMPED: tl.constexpr):
    """G for one tile: row_w_i P^row_ij + col_w_j P^col_ij - [j = pos_i] (row_w_i + col_w_j),
    with the row and column coefficients prepared by the host (fixed shift: w * exp2(shift -
    lse) folded in, so one exp2 serves both softmaxes). The positive term is subtracted here,
    in fp32, before G is rounded for the tensor cores: P_ii - 1 is small once training works."""
    if FIXED_SHIFT:  # logits come relative to the shift
        grad = tl.exp2(logits) * (row_coef[:, None] + col_coef[None, :])
    else:
        col_lse = tl.load(col_lse_ptr + offs_n, mask=mask_n, other=0.0)
        grad = (row_coef[:, None] * _softmax_exp2(logits - row_lse[:, None], CLAMPED)
                + col_coef[None, :] * _softmax_exp2(logits - col_lse[None, :], CLAMPED))
    holds_pos = (n0 <= last_pos) & (first_pos < n0 + BLOCK_N)
    if holds_pos | _edge(row0, n0, n_rows, n_cols, excl_offset, BLOCK_M, BLOCK_N, HAS_EXCL):
        col_wg = tl.load(col_wg_ptr + offs_n, mask=mask_n, other=0.0)
        grad -= tl.where(offs_n[None, :] == pos[:, None], row_wg[:, None] + col_wg[None, :], 0.0)
        grad = tl.where(_keep(offs_m, mask_m, offs_n, mask_n, excl_offset, HAS_EXCL), grad, 0.0)
    return grad


@triton.jit
def _backward_kernel(rows_ptr, row_stride_vec, row_scale_ptr, cols_ptr, col_stride_vec,
                     col_inv_ptr, col_fold_ptr, row_coef_ptr, col_coef_ptr, row_lse_ptr,
                     col_lse_ptr, row_wg_ptr, col_wg_ptr, out_ptr, out_scale_ptr, n_rows, n_cols,
                     pos_offset, pos_half, excl_offset, tiles_per_split, shift, DIM: tl.constexpr,
                     VEC: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, HAS_EXCL: tl.constexpr, FIXED_SHIFT: tl.constexpr,
                     CLAMPED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """out[split, i, :] = sum_j G_ij C_j fold_j over this split's columns (times out_scale),
    fold_j = 1 / |C_j| but 0 for zero columns (their 1 / eps would overflow fp16's G)."""
    row0 = tl.program_id(0) * BLOCK_M
    split = tl.program_id(1)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    row_scale = tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0)
    row_coef = tl.load(row_coef_ptr + offs_m, mask=mask_m, other=0.0)
    row_lse = tl.load(row_lse_ptr + offs_m, mask=mask_m, other=0.0)
    row_wg = tl.load(row_wg_ptr + offs_m, mask=mask_m, other=0.0)
    pos, first_pos, last_pos = _positives(offs_m, mask_m, pos_offset, pos_half)
    # The row block stays on chip for the whole column sweep, at its full width: each column
    # tile is loaded once and serves the recomputed logits and dR += G C.
    rows = _rows_tile(rows_ptr, offs_m, mask_m, row_stride_vec, 0, VEC, DIM, D_PAD, UPCAST)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    col_begin = split * tiles_per_split * BLOCK_N
    col_end = tl.minimum(col_begin + tiles_per_split * BLOCK_N, n_cols)
    for n0 in range(col_begin, col_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_cols
        col_inv = tl.load(col_inv_ptr + offs_n, mask=mask_n, other=0.0)
        col_coef = tl.load(col_coef_ptr + offs_n, mask=mask_n, other=0.0)
        cols = _rows_tile(cols_ptr, offs_n, mask_n, col_stride_vec, 0, VEC, DIM, D_PAD, UPCAST)
        logits = _scale(tl.dot(rows, tl.trans(cols), input_precision=PRECISION), row_scale,
                        col_inv, shift if FIXED_SHIFT else 0.0)
        grad = _g_tile(logits, offs_m, mask_m, offs_n, mask_n, row0, n0, n_rows, n_cols,
                       excl_offset, pos, first_pos, last_pos, row_coef, col_coef, row_lse,
                       col_lse_ptr, row_wg, col_wg_ptr, shift, BLOCK_M, BLOCK_N, HAS_EXCL,
                       FIXED_SHIFT, CLAMPED)
        # d/dC_hat_j of S_ij is scale * C_j * inv_norm_j: fold inv_norm_j into G's columns, and
        # feed the tensor cores G in the operands' dtype, as the forward's products.
        col_fold = tl.load(col_fold_ptr + offs_n, mask=mask_n, other=0.0)
        grad = (grad * col_fold[None, :]).to(cols.dtype)
        acc = tl.dot(grad, cols, acc, input_precision=PRECISION)
    out_scale = tl.load(out_scale_ptr)
    offs_d = tl.arange(0, D_PAD)
    out = out_ptr + (split * n_rows + offs_m.to(tl.int64))[:, None] * DIM + offs_d[None, :]
    tl.store(out, acc * out_scale, mask=mask_m[:, None] & (offs_d < DIM)[None, :])


@triton.jit
def _g_panel_kernel(rows_ptr, row_stride_vec, row_scale_ptr, row_fold_ptr, cols_ptr,
                    col_stride_vec, col_inv_ptr, col_fold_ptr, row_coef_ptr, col_coef_ptr,
                    row_lse_ptr, col_lse_ptr, row_wg_ptr, col_wg_ptr, g_rows_ptr, g_cols_ptr,
                    n_rows, n_cols, row_begin, pos_offset, pos_half, excl_offset, shift,
                    DIM: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WITH_COLS: tl.constexpr,
                    HAS_EXCL: tl.constexpr, FIXED_SHIFT: tl.constexpr, CLAMPED: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One G tile of the panel of rows starting at row_begin, written twice: G fold_j (for
    dR = G C) and, with WITH_COLS, G fold_i (for dC = G^T R); fold = 1 / |row|, 0 for zero rows."""
    row0 = row_begin + tl.program_id(0) * BLOCK_M
    n0 = tl.program_id(1) * BLOCK_N
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_cols
    row_scale = tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0)
    col_inv = tl.load(col_inv_ptr + offs_n, mask=mask_n, other=0.0)
    logits = _scaled_logits(rows_ptr, row_stride_vec, cols_ptr, col_stride_vec, offs_m, mask_m,
                            offs_n, mask_n, row_scale, col_inv, shift if FIXED_SHIFT else 0.0,
                            VEC, DIM, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
    pos, first_pos, last_pos = _positives(offs_m, mask_m, pos_offset, pos_half)
    grad = _g_tile(logits, offs_m, mask_m, offs_n, mask_n, row0, n0, n_rows, n_cols,
                   excl_offset, pos, first_pos, last_pos,
                   tl.load(row_coef_ptr + offs_m, mask=mask_m, other=0.0),
                   tl.load(col_coef_ptr + offs_n, mask=mask_n, other=0.0),
                   tl.load(row_lse_ptr + offs_m, mask=mask_m, other=0.0), col_lse_ptr,
                   tl.load(row_wg_ptr + offs_m, mask=mask_m, other=0.0), col_wg_ptr, shift,
                   BLOCK_M, BLOCK_N, HAS_EXCL, FIXED_SHIFT, CLAMPED)
    panel_rows = tl.num_programs(0) * BLOCK_M
    local = (offs_m - row_begin).to(tl.int64)[:, None] * n_cols + offs_n[None, :]
    keep = (offs_m - row_begin < panel_rows)[:, None] & mask_n[None, :]
    col_fold = tl.load(col_fold_ptr + offs_n, mask=mask_n, other=0.0)
    tl.store(g_rows_ptr + local, (grad * col_fold[None, :]).to(g_rows_ptr.dtype.element_ty),
             mask=keep)
    if WITH_COLS:
        row_fold = tl.load(row_fold_ptr + offs_m, mask=mask_m, other=0.0)
        tl.store(g_cols_ptr + local, (grad * row_fold[:, None]).to(g_cols_ptr.dtype.element_ty),
                 mask=keep)


# --------------------------------------------------------------------------- host side
def _precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 inputs only where PyTorch's own setting allows it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """The interpreter has no bf16 arithmetic; fp16 it runs natively, so the interpreter tests
    exercise the GPU's fp16 path (fp16 operands, fp32 accumulation) as it is."""
    return INTERPRET and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 2
    return PROGRAMS_PER_SM * sms


def _vector_width(dtype: torch.dtype) -> int:
    return 16 // torch.empty(0, dtype=dtype).element_size()


def _operand(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x with unit column stride, its row stride a multiple of the 16-byte vector and its base
    16-byte aligned (a copy where the caller's layout is not), and that stride / VEC."""
    vec = _vector_width(x.dtype)
    if x.stride(1) != 1 or x.stride(0) % vec or x.data_ptr() % 16 or x.shape[0] < 1:
        padded = x.new_empty((x.shape[0], triton.cdiv(x.shape[1], vec) * vec))
        padded[:, :x.shape[1]] = x
        x = padded[:, :x.shape[1]]
    return x, max(x.stride(0), vec) // vec


def _split(n_items: int, parts: int) -> tuple[int, int]:
    """(items per part, parts) covering n_items with no empty part."""
    per = triton.cdiv(n_items, max(1, min(parts, n_items)))
    return per, triton.cdiv(n_items, per)


def _fixed_shift(scale: float) -> tuple[float, bool]:
    shift = LOG2E * scale
    if shift > SHIFT_MAX:
        raise ValueError(f"temperature must be >= {LOG2E / SHIFT_MAX:.4g} for backend='triton' "
                         f"(its base-2 logits, up to log2(e) / temperature, must stay finite in "
                         f"float32), got {1.0 / scale:.4g}")
    return shift, 2 * shift <= FIXED_SHIFT_MAX


def _logit_factors(row_inv, col_inv, shift: float, fixed: bool):
    """The per-row and per-column factors (fp32) by which ``_scale`` multiplies a tile's
    products, in that order, into base-2 logits: shift / |r| and 1 / |c|. Past the fixed shift
    (up to 1.4e38 at fp32's smallest temperature) the partial product (r . c) shift / |r| =
    |c| cos shift can overflow though the logit cos shift cannot, and so can shift / |r| itself
    for rows below the norm floor (1 / eps = 1e12): inf, then inf - inf = NaN. There shift is
    split instead, a power of two a ~ sqrt(shift) on the rows (exact) and shift / a on the
    columns."""
    if fixed:
        return (row_inv * shift).float(), col_inv.float()
    row_part = 2.0 ** math.floor(0.5 * math.log2(shift))
    return (row_inv * row_part).float(), (col_inv * (shift / row_part)).float()


def _merge(part_max: torch.Tensor, part_sum: torch.Tensor) -> torch.Tensor:
    """Natural-log LSE from base-2 (max, sum) partials along dim 0, in a fixed order."""
    top = part_max.amax(0)
    return (top + torch.log2((part_sum * torch.exp2(part_max - top)).sum(0))) * LN2


def _check(rows, cols):
    if rows.dtype != cols.dtype or rows.dtype not in (torch.float32, torch.float16,
                                                      torch.bfloat16):
        raise TypeError(f"triton backend: rows/cols must share a float32/float16/bfloat16 dtype, "
                        f"got {rows.dtype} and {cols.dtype}")


class _Launch(NamedTuple):
    """What a kernel's launch on (rows, cols) takes besides its own arguments: the tile sizes, the
    operands with 16-byte rows (and their row strides in vectors), and the constexprs of the
    dtype, the pairing and the shift."""
    block_m: int
    block_n: int
    rows: torch.Tensor
    row_stride_vec: int
    cols: torch.Tensor
    col_stride_vec: int
    constexprs: dict


def _launch(kernel: str, rows, cols, excl_offset: int, fixed: bool) -> _Launch:
    config = configs(rows.dtype)[kernel]
    dtype, dim = rows.dtype, rows.shape[1]
    rows, row_stride_vec = _operand(rows)
    cols, col_stride_vec = _operand(cols)
    constexprs = dict(DIM=dim, VEC=_vector_width(dtype), HAS_EXCL=excl_offset >= 0,
                      FIXED_SHIFT=fixed, PRECISION=_precision(dtype), UPCAST=_upcast(dtype),
                      **config.launch())
    return _Launch(config.blocks["BLOCK_M"], config.blocks["BLOCK_N"], rows, row_stride_vec, cols,
                   col_stride_vec, constexprs)


def _launch_forward(rows, row_inv, cols, col_inv, excl_offset, scale, with_cols):
    """Row LSE (and column LSE over these rows), natural log, fp32."""
    n_rows, n_cols = rows.shape[0], cols.shape[0]
    shift, fixed = _fixed_shift(scale)
    launch = _launch("forward", rows, cols, excl_offset, fixed)
    row_blocks = triton.cdiv(n_rows, launch.block_m)
    col_tiles = triton.cdiv(n_cols, launch.block_n)
    blocks_per_group, groups = _split(row_blocks, MAX_ROW_GROUPS)
    tiles_per_split, splits = _split(col_tiles, triton.cdiv(_programs_wanted(rows.device), groups))
    f32 = dict(dtype=torch.float32, device=rows.device)
    row_max = torch.empty((splits, n_rows), **f32)
    row_sum = torch.empty((splits, n_rows), **f32)
    col_shape = (groups, n_cols) if with_cols else (0,)
    col_max = torch.full(col_shape, shift if fixed else -shift, **f32)
    col_sum = torch.zeros(col_shape, **f32)
    row_factor, col_factor = _logit_factors(row_inv, col_inv, shift, fixed)
    _forward_kernel[(groups, splits)](
        launch.rows, launch.row_stride_vec, row_factor, launch.cols,
        launch.col_stride_vec, col_factor, row_max, row_sum, col_max, col_sum, n_rows,
        n_cols, excl_offset, blocks_per_group, tiles_per_split, shift, WITH_COLS=with_cols,
        **launch.constexprs)
    row_lse = _merge(row_max, row_sum)
    return row_lse, _merge(col_max, col_sum) if with_cols else None


def _coefficients(weights, lse, shift, fixed, grad_scale):
    """Per row (or column) vectors of G: its coefficient (w, and with the fixed shift
    exp2(shift - lse2) folded in), the base-2 LSE and the weight, all times grad_scale."""
    weights = weights * grad_scale
    lse2 = lse * LOG2E
    coef = weights * torch.exp2(shift - lse2) if fixed else weights
    return coef.float().contiguous(), lse2.float().contiguous(), weights.float().contiguous()


def _fold(inv_norm: torch.Tensor) -> torch.Tensor:
    """1 / |row| to fold into G, 0 for rows below the norm floor (zero rows, whose clamped
    1 / eps would overflow fp16's G and whose normalized value is zero anyway)."""
    return torch.where(inv_norm < 0.5 * INV_NORM_CAP, inv_norm, 0.0)


def _grad_scale(row_w, col_w, row_fold, col_fold) -> torch.Tensor:
    """A power of two, on the device (no host sync), that brings max |G fold| to ~2^14: G is
    about w / N, below fp16's smallest subnormal at large N."""
    bound = (row_w.abs().amax() + col_w.abs().amax()) * torch.maximum(row_fold.amax(),
                                                                      col_fold.amax())
    exponent = G_TARGET_LOG2 - torch.ceil(torch.log2(bound.clamp_min(2.0**-100)))
    return torch.exp2(exponent.clamp(-100, 100)).reshape(1)


def _launch_backward(rows, row_inv, cols, col_inv, col_fold, pairing, scale, row_terms,
                     col_terms, out_scale, grad):
    """grad (n_rows x dim, fp32) <- scale * sum_j G_ij C_j fold_j for every row. *_terms: the
    (coefficient, base-2 LSE, scaled weight) vectors of rows and columns."""
    (n_rows, dim), n_cols = rows.shape, cols.shape[0]
    shift, fixed = _fixed_shift(scale)
    launch = _launch("backward", rows, cols, pairing.excl_offset, fixed)
    row_blocks = triton.cdiv(n_rows, launch.block_m)
    col_tiles = triton.cdiv(n_cols, launch.block_n)
    # Few row blocks leave SMs idle: split the columns, partial rows summed below.
    most_splits = max(1, MAX_SPLIT_BYTES // (4 * n_rows * dim))
    tiles_per_split, splits = _split(col_tiles, min(most_splits, triton.cdiv(
        _programs_wanted(rows.device), row_blocks)))
    # One split writes grad itself where its rows are dim apart, as the kernel writes them.
    direct = splits == 1 and grad.is_contiguous()
    out = grad if direct else torch.empty((splits, n_rows, dim), dtype=torch.float32,
                                          device=rows.device)
    (row_coef, row_lse2, row_wg), (col_coef, col_lse2, col_wg) = row_terms, col_terms
    row_factor, col_factor = _logit_factors(row_inv, col_inv, shift, fixed)
    _backward_kernel[(row_blocks, splits)](
        launch.rows, launch.row_stride_vec, row_factor, launch.cols, launch.col_stride_vec,
        col_factor, col_fold, row_coef, col_coef, row_lse2, col_lse2, row_wg, col_wg, out,
        out_scale, n_rows, n_cols, pairing.offset, pairing.half, pairing.excl_offset,
        tiles_per_split, shift, D_PAD=max(16, triton.next_power_of_2(dim)),
        CLAMPED=shift >= CLAMPED_SHIFT_MIN, **launch.constexprs)
    if not direct:
        torch.sum(out, 0, out=grad)


def _mm(a, b):
    """a @ b in fp32 (cuBLAS accumulates in fp32 and, asked to, returns fp32)."""
    if a.is_cuda and a.dtype != torch.float32:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:  # a torch without out_dtype: one rounding to bf16/fp16 per panel
            return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())


def _panel_backward(rows, row_inv, row_fold, cols, col_inv, col_fold, pairing, scale,
                    row_terms, col_terms, out_scale, grad_rows, grad_cols):
    """Wide subvectors: G written once per panel of rows, products by cuBLAS in panel order, into
    grad_rows and (if it has rows) grad_cols, fp32, any row stride."""
    n_rows, n_cols = rows.shape[0], cols.shape[0]
    shift, fixed = _fixed_shift(scale)
    launch = _launch("panel", rows, cols, pairing.excl_offset, fixed)
    block_m, block_n = launch.block_m, launch.block_n
    rows, cols = launch.rows, launch.cols
    with_grad_cols = grad_cols.shape[0] > 0
    buffers = 2 if with_grad_cols else 1
    panel_rows = max(block_m, PANEL_BYTES // (buffers * n_cols * rows.element_size())
                     // block_m * block_m)
    panel_rows = min(panel_rows, triton.cdiv(n_rows, block_m) * block_m)
    g_rows = rows.new_empty((panel_rows, n_cols))
    g_cols = rows.new_empty((panel_rows, n_cols)) if with_grad_cols else g_rows
    grad_cols.zero_()  # the panels add to it
    (row_coef, row_lse2, row_wg), (col_coef, col_lse2, col_wg) = row_terms, col_terms
    row_factor, col_factor = _logit_factors(row_inv, col_inv, shift, fixed)
    for begin in range(0, n_rows, panel_rows):
        count = min(panel_rows, n_rows - begin)
        _g_panel_kernel[(triton.cdiv(count, block_m), triton.cdiv(n_cols, block_n))](
            rows, launch.row_stride_vec, row_factor, row_fold, cols, launch.col_stride_vec,
            col_factor, col_fold, row_coef, col_coef, row_lse2, col_lse2, row_wg, col_wg, g_rows,
            g_cols, n_rows, n_cols, begin, pairing.offset, pairing.half, pairing.excl_offset,
            shift, WITH_COLS=with_grad_cols, CLAMPED=shift >= CLAMPED_SHIFT_MIN,
            **launch.constexprs)
        grad_rows[begin:begin + count] = _mm(g_rows[:count], cols)
        if with_grad_cols:
            grad_cols += _mm(g_cols[:count].T, rows[begin:begin + count])
    grad_rows *= out_scale
    grad_cols *= out_scale


def _positive_logits(rows, row_inv, cols, col_inv, pos, scale):
    """S_i,pos_i as an O(N * dim) row dot in fp32 (every row has a positive)."""
    paired = cols.index_select(0, pos).float()
    return (rows.float() * paired).sum(1) * row_inv * col_inv.index_select(0, pos) * scale


def lse_forward(layout, scale: float, with_cols: bool, keep: bool):
    """The contract's forward (directclr.fused.backend_primitive). Column partials come as (max,
    sum) = (lse, 1), which ranks merge like the CPU kernel's. Keeps no dots (KEEPS_DOTS)."""
    if keep:
        raise ValueError("the Triton kernels keep no dot products (KEEPS_DOTS is False)")
    rows, row_inv, cols, col_inv, pairing = layout
    _check(rows, cols)
    row_lse, col_lse = _launch_forward(rows, row_inv, cols, col_inv, pairing.excl_offset, scale,
                                       with_cols)
    pos = pairing.positives(rows.shape[0], rows.device)
    pos_logit = _positive_logits(rows, row_inv.float(), cols, col_inv.float(), pos, scale)
    kept = row_lse.new_empty((0, 0))
    if not with_cols:
        empty = row_lse.new_empty(0)
        return row_lse, pos_logit, empty, empty, kept
    return row_lse, pos_logit, col_lse, torch.ones_like(col_lse), kept


def _joined(blocks: list[torch.Tensor]) -> torch.Tensor | None:
    """The blocks of rows as one (rows, dim) tensor: the block itself, or a view where several
    lie one after another in one contiguous buffer (as directclr.infonce allocates them for this
    backend); None where they do not."""
    first = blocks[0]
    if len(blocks) == 1:
        return first
    storage, end = first.untyped_storage().data_ptr(), first.storage_offset()
    for block in blocks:
        if (not block.is_contiguous() or block.storage_offset() != end
                or block.untyped_storage().data_ptr() != storage):
            return None
        end += block.numel()
    return first.as_strided((sum(block.shape[0] for block in blocks), first.shape[1]),
                            (first.shape[1], 1))


def lse_backward(layout, scale: float, row_lse, row_w, col_lse, col_w, kept, out_rows, out_cols):
    """The contract's backward (directclr.fused.backend_primitive), into fp32 buffers: no copy where
    they are contiguous (several row blocks: consecutive in one buffer). `kept` is always empty
    here (KEEPS_DOTS)."""
    rows, row_inv, cols, col_inv, pairing = layout
    _check(rows, cols)
    row_w, col_w = row_w.float(), col_w.float()
    row_inv, col_inv = row_inv.float().contiguous(), col_inv.float().contiguous()
    row_fold, col_fold = _fold(row_inv), _fold(col_inv)
    shift, fixed = _fixed_shift(scale)
    grad_scale = _grad_scale(row_w, col_w, row_fold, col_fold)
    out_scale = (scale / grad_scale).float()
    row_terms = _coefficients(row_w, row_lse, shift, fixed, grad_scale)
    col_terms = _coefficients(col_w, col_lse, shift, fixed, grad_scale)
    joined = _joined(out_rows)
    grad_rows = joined if joined is not None else torch.empty(
        rows.shape, dtype=torch.float32, device=rows.device)  # scattered: copied to them below
    if not fused_backward(rows.shape[1], rows.dtype):
        _panel_backward(rows, row_inv, row_fold, cols, col_inv, col_fold, pairing, scale,
                        row_terms, col_terms, out_scale, grad_rows, out_cols)
    else:
        _launch_backward(rows, row_inv, cols, col_inv, col_fold, pairing, scale, row_terms,
                         col_terms, out_scale, grad_rows)
        if out_cols.shape[0]:  # columns see the transposed problem (cross: one shifted diagonal)
            transposed = pairing._replace(offset=-pairing.offset, half=0, excl_offset=-1)
            _launch_backward(cols, col_inv, rows, row_inv, row_fold, transposed, scale,
                             col_terms, row_terms, out_scale, out_cols)
    if joined is None:
        for block, part in zip(out_rows, grad_rows.split([b.shape[0] for b in out_rows])):
            block.copy_(part)
