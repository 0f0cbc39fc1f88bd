"""The CPU backend of the subvector-InfoNCE primitive, in the contract that
``directclr.fused.backend_primitive`` documents: a Layout's glue to the C++ kernels of infonce.cpp
(``torch.ops.directclr_cpu``, built on first use by ``directclr.native``), or where they cannot be
built to dense.py, the same ops in plain PyTorch.

The kernels take rows and columns normalized and contiguous in the working dtype
(``subvectors`` below; the layout's inverse norms, which the Triton kernels apply in
their tiles, are not used), each row's positive and excluded column as index vectors, and write the
gradients into the caller's buffers at any row stride: they can be the first columns of z's
gradients, so the backward holds no N x dim buffer beside them."""
from __future__ import annotations

import functools

import torch

from directclr import native

from . import dense

UNIT_ROWS = True
STRIDED_OUT = True
KEEPS_DOTS = True


def _ops():
    """The C++ ops, or their plain-PyTorch stand-ins (the same schemas) where they cannot be
    built."""
    return torch.ops.directclr_cpu if native.available() else dense


def _columns(layout):
    """Each row's positive and excluded column (-1: none), as the kernels take them (the Triton
    kernels find both from the pairing's offsets inside their tiles)."""
    return _index_columns(layout.rows.shape[0], layout.pairing, layout.rows.device)


@functools.lru_cache(maxsize=64)
def _index_columns(n_rows, pairing, device):
    """Cached: a training loop calls with the same few shapes every step, and building them
    (three small ops) was a tenth of a small batch's time outside the kernels. Never written
    to by any kernel; made outside inference mode so any later call may read them."""
    with torch.inference_mode(False):
        excluded = (torch.arange(n_rows, device=device) + pairing.excl_offset
                    if pairing.excl_offset >= 0
                    else torch.full((n_rows,), -1, dtype=torch.int64, device=device))
        return pairing.positives(n_rows, device), excluded


def subvectors(z1, z2, dim):
    """Both views' unit subvectors in the working dtype (``directclr.rows.subvectors``)."""
    return _ops().unit_subvectors(z1, z2, dim)


def finish_rows(grad_unit, sub, sub_inv_norm, inv_grad, divisor, z_grad):
    """``directclr.rows.finish_rows`` for unit rows (sub_inv_norm unused)."""
    return _ops().finish_rows(grad_unit, sub, inv_grad, divisor, z_grad)


def lse_forward(layout, scale, with_cols, keep):
    return _ops().lse_forward(layout.rows, layout.cols, *_columns(layout), scale, with_cols,
                              keep)


def lse_backward(layout, scale, row_lse, row_w, col_lse, col_w, kept, out_rows, out_cols):
    """Row blocks are independent (each row's LSE and weight are given), so a block at a time
    costs no extra products; but ntxent on one process (the columns are the rows, the column
    terms the row terms) goes in one call over all blocks, which skips the mirror tiles of its
    symmetric G."""
    rows, cols, pairing = layout.rows, layout.cols, layout.pairing
    pos, excl = _columns(layout)
    symmetric = (cols is rows and col_lse is row_lse and col_w is row_w
                 and pairing.offset == pairing.excl_offset == 0 and not out_cols.shape[0])
    if symmetric and native.available():  # ntxent on one process: G is symmetric
        torch.ops.directclr_cpu.lse_backward_symmetric(rows, pos, scale, row_lse, row_w, kept,
                                                       out_rows)
        return
    if len(out_rows) > 1 and out_cols.shape[0]:
        # each block's kernel call overwrites out_cols with its own rows' share
        raise ValueError("lse_backward: a column gradient needs the rows' gradient in one block")
    kernel = _ops().lse_backward
    first = 0
    for index, block in enumerate(out_rows):
        mine = slice(first, first + block.shape[0])
        first = mine.stop
        kernel(rows[mine], cols, pos[mine], excl[mine], scale, row_lse[mine], row_w[mine],
               col_lse, col_w, kept[mine] if kept.numel() else kept, block,
               out_cols if index == 0 else out_cols[:0])
