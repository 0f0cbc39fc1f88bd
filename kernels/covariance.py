"""Triton kernel of the per-batch covariance update: M2 = sum_i (x_i - mean)(x_i - mean)^T.

It also returns the centered column sums, so that a cheap fp32 mean suffices (the caller
corrects M2 exactly). One program per tile (I, J) of the upper triangle (lower ones return at
once); it streams all rows, centers them as it loads them (in fp32), accumulates in fp32 with
IEEE products (TF32 would swamp the small eigenvalues that show collapse), and writes the tile
and its mirror. Deterministic: each tile is reduced by one program in row order.

The width is a constexpr and the row stride is passed divided by the 16-byte vector width, so
the row loads are 16-byte vectors the pipeliner turns into cp.async (see kernels/infonce.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .infonce import Config, _operand, _vector_width

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Chosen from the static report (python -m directclr.gpu_report): no spills, 16-byte loads.
GRAM = Config(8, 3, BLOCK=128, BLOCK_R=16)
INTERPRETED = Config(4, 1, BLOCK=32, BLOCK_R=64)  # few big tiles: numpy pays per op


def config(interpret: bool = INTERPRET) -> Config:
    return INTERPRETED if interpret else GRAM


@triton.jit
def _centered_gram_kernel(x_ptr, row_stride_vec, mean_ptr, out_ptr, sum_ptr, n_rows,
                          WIDTH: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_R: tl.constexpr):
    tile_i = tl.program_id(0)
    tile_j = tl.program_id(1)
    if tile_j < tile_i:  # lower triangle: written as the mirror of (j, i)
        return
    offs_i = tile_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = tile_j * BLOCK + tl.arange(0, BLOCK)
    mask_i = offs_i < WIDTH
    mask_j = offs_j < WIDTH
    mean_i = tl.load(mean_ptr + offs_i, mask=mask_i, other=0.0)
    mean_j = tl.load(mean_ptr + offs_j, mask=mask_j, other=0.0)
    row_stride = row_stride_vec * VEC
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < n_rows
        base = x_ptr + offs_r.to(tl.int64)[:, None] * row_stride
        xi = tl.load(base + offs_i[None, :], mask=mask_r[:, None] & mask_i[None, :],
                     other=0.0).to(tl.float32)
        xj = tl.load(base + offs_j[None, :], mask=mask_r[:, None] & mask_j[None, :],
                     other=0.0).to(tl.float32)
        xi = tl.where(mask_r[:, None], xi - mean_i[None, :], 0.0)
        xj = tl.where(mask_r[:, None], xj - mean_j[None, :], 0.0)
        acc = tl.dot(tl.trans(xi), xj, acc, input_precision="ieee")
        col_sum += tl.sum(xi, axis=0)
    # Only the upper triangle of acc and its mirror: inside a diagonal tile acc[a, b] and
    # acc[b, a] need not be bitwise equal, and the result must be exactly symmetric.
    upper = mask_i[:, None] & mask_j[None, :] & (offs_i[:, None] <= offs_j[None, :])
    tl.store(out_ptr + offs_i[:, None] * WIDTH + offs_j[None, :], acc, mask=upper)
    tl.store(out_ptr + offs_j[None, :] * WIDTH + offs_i[:, None], acc, mask=upper)
    if tile_i == tile_j:  # one program per column tile reports the centered column sums
        tl.store(sum_ptr + offs_i, col_sum, mask=mask_i)


def centered_gram(x: torch.Tensor, mean: torch.Tensor):
    """(sum_i (x_i - mean)(x_i - mean)^T, sum_i (x_i - mean)) in fp32; x (N, D) of any float
    dtype and strides."""
    n_rows, width = x.shape
    out = torch.empty((width, width), dtype=torch.float32, device=x.device)
    centered_sum = torch.empty(width, dtype=torch.float32, device=x.device)
    x, row_stride_vec = _operand(x)
    mean = mean.to(torch.float32).contiguous()
    tiles = triton.cdiv(width, config().blocks["BLOCK"])
    _centered_gram_kernel[(tiles, tiles)](
        x, row_stride_vec, mean, out, centered_sum, n_rows, WIDTH=width,
        VEC=_vector_width(x.dtype), **config().launch())
    return out, centered_sum
