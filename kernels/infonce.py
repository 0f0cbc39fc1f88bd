"""Triton kernels of the subvector-InfoNCE primitive: the CUDA backend of ``directclr.infonce``.

Rows R (M x dim) against columns C (Nc x dim), read straight from the caller's strided
``z[:, :dim]`` views in their own dtype (bf16/fp16 go to the tensor cores as they are). The L2
normalization is fused as a rescaling of each dot-product tile:

    S_ij = scale * (r_i . c_j) * inv_norm_r_i * inv_norm_c_j

with one positive column ``pos[i]`` per row and an optional excluded column ``excl[i]`` (-1:
none) that is masked inside the tile, never subtracted afterwards.

* ``_lse_kernel``: per row block, all columns streamed; online log-sum-exp in fp32 and the
  positive logit. The column LSE of the cross variant is the same kernel on (C, R): two passes,
  deterministic, no atomics.
* ``_grad_kernel``: dL/dR_hat = scale * G C_hat, G recomputed tile by tile from the saved LSEs:
  G_ij = rw_i P^row_ij + cw_j P^col_ij - [j = pos_i] (rw_i + cw_j). The column gradient is the
  same kernel on (C, R) with the roles swapped. Grid: (row blocks, dim chunks).

Row offsets are int64 (row * stride overflows int32 past ~1M rows of 2048). Results are
deterministic run to run: every output element is reduced by one program in a fixed order.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Above this size class (N > 131072) one launch takes seconds: autotuning every configuration
# would cost minutes, so the first (the Hopper default) is taken.
AUTOTUNE_MAX_SIZE_CLASS = 17


def _prune_large(configs, named_args, **kwargs):
    return configs[:1] if named_args["size_class"] > AUTOTUNE_MAX_SIZE_CLASS else configs


def _lse_configs(interpret: bool = INTERPRET):
    if interpret:  # it cannot benchmark, and numpy pays per op: one configuration, big tiles
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                                 (128, 128, 32, 8, 4), (64, 64, 64, 4, 4)]
    ]


def _grad_configs(interpret: bool = INTERPRET):
    if interpret:  # as above
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 128})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd},
                      num_warps=w, num_stages=s)
        for bm, bn, bk, bd, w, s in [(64, 64, 64, 128, 4, 3), (128, 64, 64, 128, 8, 3),
                                     (64, 64, 64, 256, 8, 2), (128, 64, 32, 256, 8, 2),
                                     (64, 128, 64, 128, 8, 3)]
    ]


@triton.jit
def _logits_tile(rows_ptr, row_stride, row_k_stride, cols_ptr, col_stride, col_k_stride,
                 offs_m, offs_n, mask_m, mask_n, dim, row_inv, col_inv, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """scale * normalized(R[offs_m]) . normalized(C[offs_n]) in fp32, (BLOCK_M, BLOCK_N)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_base = rows_ptr + offs_m.to(tl.int64)[:, None] * row_stride
    col_base = cols_ptr + offs_n.to(tl.int64)[None, :] * col_stride
    for k0 in range(0, dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < dim
        offs_k64 = offs_k.to(tl.int64)  # column-major z: offs_k * stride passes 2^31
        r = tl.load(row_base + offs_k64[None, :] * row_k_stride,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        c = tl.load(col_base + offs_k64[:, None] * col_k_stride,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # the interpreter has no bf16 arithmetic
            r = r.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(r, c, acc, input_precision=PRECISION)
    return acc * (row_inv[:, None] * col_inv[None, :] * scale)


@triton.jit
def _row_block(row_inv_ptr, pos_ptr, excl_ptr, n_rows, BLOCK_M: tl.constexpr):
    """This program's rows: offsets, mask, inverse norms, positive and excluded columns."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    row_inv = tl.load(row_inv_ptr + offs_m, mask=mask_m, other=0.0)
    pos = tl.load(pos_ptr + offs_m, mask=mask_m, other=-1)
    excl = tl.load(excl_ptr + offs_m, mask=mask_m, other=-1)
    return offs_m, mask_m, row_inv, pos, excl


@triton.jit
def _column_tile(n0, rows_ptr, row_stride, row_k_stride, cols_ptr, col_stride, col_k_stride,
                 col_inv_ptr, offs_m, mask_m, n_cols, dim, row_inv, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Columns n0 .. n0 + BLOCK_N: offsets, mask, inverse norms and the logits tile."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_cols
    col_inv = tl.load(col_inv_ptr + offs_n, mask=mask_n, other=0.0)
    logits = _logits_tile(rows_ptr, row_stride, row_k_stride, cols_ptr, col_stride,
                          col_k_stride, offs_m, offs_n, mask_m, mask_n, dim, row_inv,
                          col_inv, scale, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
    return offs_n, mask_n, col_inv, logits


@triton.autotune(configs=_lse_configs(), key=["size_class", "dim"],
                 prune_configs_by={"early_config_prune": _prune_large})
@triton.jit
def _lse_kernel(rows_ptr, row_stride, row_k_stride, row_inv_ptr,
                cols_ptr, col_stride, col_k_stride, col_inv_ptr,
                pos_ptr, excl_ptr, lse_ptr, pos_logit_ptr,
                n_rows, n_cols, dim, scale, size_class,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_m, mask_m, row_inv, pos, excl = _row_block(row_inv_ptr, pos_ptr, excl_ptr, n_rows,
                                                    BLOCK_M)
    # Rows are unit (or zero) vectors, so every logit is >= -scale: a finite starting max.
    run_max = tl.zeros((BLOCK_M,), dtype=tl.float32) - scale
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, n_cols, BLOCK_N):
        offs_n, mask_n, col_inv, logits = _column_tile(
            n0, rows_ptr, row_stride, row_k_stride, cols_ptr, col_stride, col_k_stride,
            col_inv_ptr, offs_m, mask_m, n_cols, dim, row_inv, scale,
            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        pos_logit += tl.sum(tl.where(offs_n[None, :] == pos[:, None], logits, 0.0), axis=1)
        keep = mask_n[None, :] & (offs_n[None, :] != excl[:, None])
        logits = tl.where(keep, logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(lse_ptr + offs_m, run_max + tl.log(run_sum), mask=mask_m)
    tl.store(pos_logit_ptr + offs_m, pos_logit, mask=mask_m)


@triton.autotune(configs=_grad_configs(), key=["size_class", "dim"],
                 prune_configs_by={"early_config_prune": _prune_large})
@triton.jit
def _grad_kernel(rows_ptr, row_stride, row_k_stride, row_inv_ptr,
                 cols_ptr, col_stride, col_k_stride, col_inv_ptr,
                 pos_ptr, excl_ptr, row_lse_ptr, row_w_ptr, col_lse_ptr, col_w_ptr, grad_ptr,
                 grad_scale_ptr, n_rows, n_cols, dim, scale, size_class,
                 ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_m, mask_m, row_inv, pos, excl = _row_block(row_inv_ptr, pos_ptr, excl_ptr, n_rows,
                                                    BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    row_lse = tl.load(row_lse_ptr + offs_m, mask=mask_m, other=0.0)
    row_w = tl.load(row_w_ptr + offs_m, mask=mask_m, other=0.0)
    # G is about w / N: below fp16's smallest subnormal at large N. An exact power of two,
    # chosen on the host from max |w|, lifts it into range before the cast and is divided out.
    grad_scale = tl.load(grad_scale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, n_cols, BLOCK_N):
        offs_n, mask_n, col_inv, logits = _column_tile(
            n0, rows_ptr, row_stride, row_k_stride, cols_ptr, col_stride, col_k_stride,
            col_inv_ptr, offs_m, mask_m, n_cols, dim, row_inv, scale,
            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        grad = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        pos_weight = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ROW_TERM:
            grad += row_w[:, None] * tl.exp(logits - row_lse[:, None])
            pos_weight += row_w[:, None]
        if COL_TERM:
            col_lse = tl.load(col_lse_ptr + offs_n, mask=mask_n, other=0.0)
            col_w = tl.load(col_w_ptr + offs_n, mask=mask_n, other=0.0)
            grad += col_w[None, :] * tl.exp(logits - col_lse[None, :])
            pos_weight += col_w[None, :]
        grad -= tl.where(offs_n[None, :] == pos[:, None], pos_weight, 0.0)
        keep = mask_n[None, :] & (offs_n[None, :] != excl[:, None])
        # d/dC_hat_j of S_ij is scale * C_j * inv_norm_j: fold inv_norm_j into G's columns.
        grad = tl.where(keep, grad * (col_inv * grad_scale)[None, :], 0.0)
        c = tl.load(cols_ptr + offs_n.to(tl.int64)[:, None] * col_stride
                    + offs_d.to(tl.int64)[None, :] * col_k_stride,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
        else:  # same operand dtype as the forward's products (bf16/fp16 on tensor cores)
            grad = grad.to(c.dtype)
        acc = tl.dot(grad, c, acc, input_precision=PRECISION)
    out = grad_ptr + offs_m.to(tl.int64)[:, None] * dim + offs_d[None, :]
    tl.store(out, acc * (scale / grad_scale), mask=mask_m[:, None] & mask_d[None, :])


# --------------------------------------------------------------------------- launch wrappers
def _precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 inputs only where PyTorch's own setting allows it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """The interpreter has no bf16 arithmetic; fp16 it runs natively, so the interpreter tests
    exercise the GPU's fp16 path (fp16 operands, fp32 accumulation) as it is."""
    return INTERPRET and dtype == torch.bfloat16


def _size_class(n: int) -> int:
    return max(n - 1, 1).bit_length()  # autotune once per power-of-two size bucket


def _inverse(index: torch.Tensor, n: int) -> torch.Tensor:
    """inv[index[i]] = i where index[i] >= 0, else -1: who points at each column."""
    inv = torch.full((n,), -1, dtype=torch.int64, device=index.device)
    valid = index >= 0
    inv[index[valid]] = torch.arange(index.numel(), device=index.device)[valid]
    return inv


def _check(rows, cols):
    if rows.dtype != cols.dtype or rows.dtype not in (torch.float32, torch.float16,
                                                      torch.bfloat16):
        raise TypeError(f"triton backend: rows/cols must share a float32/float16/bfloat16 dtype, "
                        f"got {rows.dtype} and {cols.dtype}")


def _lse(rows, row_inv, cols, col_inv, pos, excl, scale):
    n_rows, dim = rows.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=rows.device)
    pos_logit = torch.empty_like(lse)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),)  # noqa: E731
    _lse_kernel[grid](rows, rows.stride(0), rows.stride(1), row_inv,
                      cols, cols.stride(0), cols.stride(1), col_inv,
                      pos, excl, lse, pos_logit, n_rows, cols.shape[0], dim, scale,
                      _size_class(n_rows), PRECISION=_precision(rows.dtype),
                      UPCAST=_upcast(rows.dtype))
    return lse, pos_logit


# |G| <= |row_w| + |col_w|; scaled, it peaks near 2^14, well inside fp16 (max 65504).
G_TARGET_LOG2 = 14


def _grad_scale(row_w, col_w) -> torch.Tensor:
    """A power of two, on the device (no host sync), that brings max |G| to ~2^14."""
    bound = row_w.abs().amax() + col_w.abs().amax()
    exponent = G_TARGET_LOG2 - torch.ceil(torch.log2(bound.clamp_min(2.0**-100)))
    return torch.exp2(exponent.clamp(-100, 100)).reshape(1)


def _grad(rows, row_inv, cols, col_inv, pos, excl, scale, row_lse, row_w, col_lse, col_w,
          row_term, col_term):
    n_rows, dim = rows.shape
    grad = torch.empty((n_rows, dim), dtype=torch.float32, device=rows.device)
    grad_scale = _grad_scale(row_w if row_term else row_w[:0].new_zeros(1),
                             col_w if col_term else col_w[:0].new_zeros(1))
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(dim, meta["BLOCK_D"]))
    _grad_kernel[grid](rows, rows.stride(0), rows.stride(1), row_inv,
                       cols, cols.stride(0), cols.stride(1), col_inv,
                       pos, excl, row_lse, row_w, col_lse, col_w, grad, grad_scale,
                       n_rows, cols.shape[0], dim, scale, _size_class(n_rows),
                       ROW_TERM=row_term, COL_TERM=col_term,
                       PRECISION=_precision(rows.dtype), UPCAST=_upcast(rows.dtype))
    return grad


def lse_forward(rows, row_inv, cols, col_inv, pos, excl, scale: float, with_cols: bool):
    """Row LSE and positive logit of every row; with_cols: each column's LSE over these rows,
    returned as (max, sum) = (lse, 1) partials so that ranks merge them like the CPU kernel's."""
    _check(rows, cols)
    row_lse, pos_logit = _lse(rows, row_inv, cols, col_inv, pos, excl, scale)
    if not with_cols:
        empty = row_lse.new_empty(0)
        return row_lse, pos_logit, empty, empty
    no_pos = torch.full((cols.shape[0],), -1, dtype=torch.int64, device=cols.device)
    col_lse, _ = _lse(cols, col_inv, rows, row_inv, no_pos, _inverse(excl, cols.shape[0]), scale)
    return row_lse, pos_logit, col_lse, torch.ones_like(col_lse)


def lse_backward(rows, row_inv, cols, col_inv, pos, excl, scale: float, row_lse, row_w,
                 col_lse, col_w, with_grad_cols: bool):
    """Gradients w.r.t. the normalized rows and (if with_grad_cols) columns, fp32, of
    sum_i row_w_i (row_lse_i - S_i,pos_i) + sum_j col_w_j (col_lse_j - S_pos^-1_j,j);
    the column term is present when col_lse is non-empty."""
    _check(rows, cols)
    col_term = col_lse.numel() > 0
    n_cols = cols.shape[0]
    row_w = row_w.float().contiguous()
    if col_term:
        col_w = col_w.float().contiguous()
    else:  # placeholders: the kernel reads them only under COL_TERM
        col_lse = col_w = torch.zeros(n_cols, dtype=torch.float32, device=rows.device)
    grad_rows = _grad(rows, row_inv, cols, col_inv, pos, excl, scale, row_lse, row_w,
                      col_lse, col_w, True, col_term)
    if not with_grad_cols:
        return grad_rows, grad_rows.new_empty((0, rows.shape[1]))
    # Columns see the transposed problem: their own LSE/weights are the "row" terms there.
    grad_cols = _grad(cols, col_inv, rows, row_inv, _inverse(pos, n_cols), _inverse(excl, n_cols),
                      scale, col_lse, col_w, row_lse, row_w, col_term, True)
    return grad_rows, grad_cols
