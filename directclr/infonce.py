"""Subvector InfoNCE, the DirectCLR loss: InfoNCE on the first ``dim`` coordinates of z, fused.

Layers, top to bottom:

* ``infonce`` / ``DirectCLRLoss``: the public functional API and its thin module; argument checks.
* ``directclr::infonce`` / ``directclr::infonce_backward`` (torch.library custom ops, with fake
  and autograd registered): one op for one process (``group_name=""``) and for a process group
  (its name), so ``torch.compile(fullgraph=True)`` sees one opaque op either way; the collectives
  and the equal-N check run inside it, never traced.
* ``_forward`` / ``_backward``: normalization, the row/column ``Layout`` of each variant, the
  collectives (``directclr.distributed``; none without a group).
* the primitive, one contract (``Layout``) per backend: rows Q against columns K, one positive and
  an optional excluded column per row -> row LSE (and column LSE); backward recomputes tiles from
  the LSEs. ``cpu``: ``kernels/cpu/primitive.py`` (C++ built on first use by ``native``, else
  plain PyTorch); ``triton``: ``kernels/infonce.py``.
* ``infonce_reference``: the plain PyTorch formula, which builds the N x N matrix; tests and
  benchmarks compare against it.

Numerics: fp32 accumulation for fp16/bf16/fp32 inputs (float64 stays float64); the loss comes
back in that working dtype, gradients in the input dtype, exactly zero beyond ``dim``. Any finite
input gives the exact loss and gradient: rows with max |u| >= 2^16 are divided by a power of two
before their norms are taken (``scaling.scaled_rows``), so norms and products never overflow. A row
of zeros is normalized to zero (finite loss) and gets a zero gradient, since the norm has no
derivative there; so does any row with |u| < eps (F.normalize's floor). Non-finite inputs give a
NaN loss (never an error, so no device sync).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import VARIANTS
from .distributed import (
    all_gather_rows,
    check_equal_batches,
    loss_group,
    merge_col_lse,
    rank_and_world,
    reduce_scatter_rows,
    resolve_group,
)
from .kernels.cpu import primitive as cpu_primitive
from .scaling import scaled_rows

REDUCTIONS = ("mean", "none")
BACKENDS = ("auto", "cpu", "triton", "reference")
NORM_EPS = 1e-12  # same floor as F.normalize
RADIAL_CHUNK = 1024  # rows per temporary in the backward's row dot products


# --------------------------------------------------------------------------- reference formula
def infonce_reference(z1: Tensor, z2: Tensor, dim: int | None = 360, temperature: float = 0.1,
                      variant: str = "cross") -> Tensor:
    """Per-pair losses by the plain formula, in z's dtype. Materializes the N x N logits."""
    a, b = (F.normalize(scaled_rows(z[:, :dim], _working_dtype(z.dtype))[0], dim=1, eps=NORM_EPS)
            for z in (z1, z2))
    n = a.shape[0]
    target = torch.arange(n, device=a.device)
    if variant == "cross":
        logits = a @ b.T / temperature
        return 0.5 * (F.cross_entropy(logits, target, reduction="none")
                      + F.cross_entropy(logits.T, target, reduction="none"))
    views = torch.cat([a, b])
    logits = (views @ views.T / temperature).fill_diagonal_(float("-inf"))
    per_view = F.cross_entropy(logits, torch.cat([target + n, target]), reduction="none")
    return 0.5 * (per_view[:n] + per_view[n:])


# --------------------------------------------------------------------------- argument checks
def _check_args(z1, z2, dim, temperature, variant, reduction, backend) -> int:
    """Validates everything before any kernel runs; returns the resolved subvector width."""
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(z.shape)}")
        if not z.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if z1.dtype != z2.dtype:
        raise TypeError(f"z1 and z2 must have the same dtype, got {z1.dtype} and {z2.dtype}")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 must be on the same device, got {z1.device} and {z2.device}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    n, width = z1.shape
    if n < 1:
        raise ValueError("z1 must hold at least one row")
    if variant == "ntxent" and n < 2:
        raise ValueError(f"variant='ntxent' needs at least 2 rows in z1, got {n}")
    if dim is None:
        dim = width
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
    if not 1 <= dim <= width:
        raise ValueError(f"dim must be in [1, {width}] (the width of z1), got {dim}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    work = _working_dtype(z1.dtype)
    if temperature * torch.finfo(work).max < 1.0:  # the kernels scale every logit by 1/temperature
        raise ValueError(f"temperature must be >= {1.0 / torch.finfo(work).max:.4g} for {z1.dtype} "
                         f"input (its inverse must be finite in {work}), got {temperature}")
    return dim


def _resolve_backend(backend: str, z: Tensor) -> str:
    device = z.device
    if backend == "auto":
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='auto' has no kernel for device {device}; "
                             "use backend='reference'")
        backend = "cpu" if device.type == "cpu" else "triton"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, z1 is on {device}")
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
            raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with "
                             f"TRITON_INTERPRET=1), z1 is on {device}")
        if z.dtype == torch.float64:
            raise TypeError("backend='triton' takes float32/bfloat16/float16 z1, got float64; "
                            "use backend='cpu' or 'reference' for float64")
    return backend


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


class Layout(NamedTuple):
    """One rank's operands of the primitive (``_layout``): rows Q against columns K.

    rows: (M, dim) Q, ``_subvectors``' v: cross, z1's rows; ntxent, z1's then z2's.
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


def _primitive(backend: str):
    """The module of a backend's primitive (cpu: kernels/cpu/primitive.py, triton:
    kernels/infonce.py). All keep one contract; S = scale * Q_hat K_hat^T, excluded entries
    removed; vectors and (rows, dim) buffers in the working dtype:

    UNIT_ROWS: whether the layout's rows and columns come normalized, contiguous, in the working
        dtype (row_inv, col_inv unused), or as v in z's dtype, any strides.
    STRIDED_OUT: whether buffers of any row stride (z's gradients' own first columns) cost no
        copy; else contiguous ones, several row blocks consecutive in one buffer.
    lse_forward(layout, scale, with_cols) -> (row_lse, pos_logit, col_max, col_sum): each row's
        LSE and S_i,pos_i; with_cols, each column's (max, sum exp(S - max)) over these rows, which
        ``merge_col_lse`` merges across ranks (else both empty).
    lse_backward(layout, scale, row_lse, row_w, col_lse, col_w, out_rows, out_cols) -> None: the
        gradient w.r.t. Q_hat, K_hat of sum_i row_w_i (row_lse_i - S_i,pos_i) + sum_j col_w_j
        (col_lse_j - S_pos^-1(j),j) (no column term if col_lse is empty) overwrites out_rows
        (consecutive row blocks covering the rows, one per view) and, if it has rows, out_cols.
        Written, not returned: so no backend copies an N x dim gradient (the CPU kernels write
        into z's gradients, the Triton kernels where they would allocate)."""
    if backend == "cpu":
        return cpu_primitive
    if backend == "triton":  # imported here: triton is optional, the CPU path never needs it
        from .kernels import infonce as triton_infonce
        return triton_infonce
    raise ValueError(f"backend {backend!r} has no fused primitive")


# --------------------------------------------------------------------------- the algorithm
def _subvectors(z1: Tensor, z2: Tensor, dim: int, unit: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both views' v = u / s for u = z[:, :dim], in one new (2N, dim) tensor (z1's rows, then
    z2's: ntxent's rows as they are, cross's rows and columns its halves), with s a power of two
    per row that keeps |v| in range; 1/max(|v|, eps) for the forward, the 1/|v| the backward uses,
    and s. unit: v / max(|v|, eps) instead of v, in the working dtype, normalized in place (the
    CPU kernels take unit rows: no second copy); else v in z's dtype (the Triton kernels
    normalize in their tiles). v / |v| is u's unit row; rows that meet the eps floor are never
    rescaled (s = 1), so the floor is F.normalize's. The backward's 1/|v| is 0 where |v| < eps,
    since the norm has no derivative at 0 (this keeps fp16 gradients of zero rows finite)."""
    work = _working_dtype(z1.dtype)
    n = z1.shape[0]
    sub = torch.empty((2 * n, dim), dtype=work if unit else z1.dtype, device=z1.device)
    scale = torch.cat([scaled_rows(z1[:, :dim], work, out=sub[:n])[1],
                       scaled_rows(z2[:, :dim], work, out=sub[n:])[1]])
    norm = torch.linalg.vector_norm(sub, dim=1, dtype=work)
    inv_norm = 1.0 / norm.clamp_min(NORM_EPS)
    if unit:
        sub.mul_(inv_norm.unsqueeze(1))
    return sub, inv_norm, torch.where(norm >= NORM_EPS, inv_norm, torch.zeros_like(norm)), scale


def _remove_radial(grad_unit: Tensor, sub: Tensor, sub_inv_norm: Tensor | float,
                   inv_norm_grad: Tensor) -> None:
    """grad_unit <- (g - v_hat (v_hat . g)) / |v| in place (fp32/fp64, any row stride): from the
    gradient w.r.t. v_hat to the one w.r.t. v, for one view's rows of ``_subvectors``: sub is v
    with sub_inv_norm 1/|v|, or already v_hat with sub_inv_norm 1."""
    # v_hat . g without materializing v_hat, RADIAL_CHUNK rows at a time: an N x dim product
    # here would be the backward's only temporary of that size.
    radial = torch.cat([(grad_chunk * sub_chunk).sum(1) for grad_chunk, sub_chunk
                        in zip(grad_unit.split(RADIAL_CHUNK), sub.split(RADIAL_CHUNK))])
    radial *= sub_inv_norm
    grad_unit.addcmul_(sub, (radial * sub_inv_norm).unsqueeze(1), value=-1.0)
    grad_unit.mul_(inv_norm_grad.unsqueeze(1))


def _layout(sub, inv, variant: str, group) -> Layout:
    """One rank's rows and gathered columns, from ``_subvectors``' tensors. ntxent: rank r's block
    of the gathered columns is [a_r; b_r]."""
    rank = rank_and_world(group)[0]
    n = sub.shape[0] // 2
    if variant == "cross":
        return Layout(sub[:n], inv[:n], all_gather_rows(sub[n:], group),
                      all_gather_rows(inv[n:], group), Pairing(rank * n, 0, -1))
    return Layout(sub, inv, all_gather_rows(sub, group), all_gather_rows(inv, group),
                  Pairing(rank * 2 * n, n, rank * 2 * n))


def _forward(z1, z2, dim, temperature, variant, backend, group):
    """Per-pair losses of this rank's rows, and the LSEs that backward needs."""
    primitive = _primitive(backend)
    sub, inv, _, _ = _subvectors(z1, z2, dim, primitive.UNIT_ROWS)
    row_lse, pos_logit, col_max, col_sum = primitive.lse_forward(
        _layout(sub, inv, variant, group), 1.0 / temperature, variant == "cross")
    n = z1.shape[0]
    if variant == "cross":
        col_lse = merge_col_lse(col_max, col_sum, group)
        own_col_lse = col_lse.split(n)[rank_and_world(group)[0]]  # this rank's z2 rows
        loss = 0.5 * ((row_lse - pos_logit) + (own_col_lse - pos_logit))
    else:
        col_lse = col_max  # empty: ntxent's column LSEs are the gathered row LSEs (backward)
        per_view = row_lse - pos_logit
        loss = 0.5 * (per_view[:n] + per_view[n:])
    return loss, row_lse, col_lse


def _backward(grad, z1, z2, row_lse, col_lse, dim, temperature, variant, backend, group):
    """Gradients w.r.t. z1, z2 of sum_i grad_i * loss_i, summed over all ranks' losses."""
    primitive = _primitive(backend)
    sub, inv, inv_grad, scale = _subvectors(z1, z2, dim, primitive.UNIT_ROWS)
    layout = _layout(sub, inv, variant, group)
    half = 0.5 * grad.to(row_lse.dtype).contiguous()  # each pair's loss averages two terms
    row_w = half if variant == "cross" else torch.cat([half, half])
    col_w = all_gather_rows(row_w if variant == "ntxent" else half, group)
    if variant == "ntxent":  # S is symmetric: column j's LSE is row j's
        col_lse = all_gather_rows(row_lse, group)
    n, work = z1.shape[0], _working_dtype(z1.dtype)
    cross, world = variant == "cross", rank_and_world(group)[1]
    grad_z = [torch.empty(z.shape, dtype=z.dtype, device=z.device) for z in (z1, z2)]
    for z_grad in grad_z:  # the first dim columns are all written below
        z_grad[:, dim:].zero_()
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
    primitive.lse_backward(layout, 1.0 / temperature, row_lse, row_w, col_lse, col_w, out_rows,
                           out_cols)
    if views == 1:
        grads.append(reduce_scatter_rows(out_cols, group))
    for grad_sub, z_grad, rows in zip(grads, grad_z, (slice(0, n), slice(n, 2 * n))):
        _remove_radial(grad_sub, sub[rows], 1.0 if primitive.UNIT_ROWS else inv[rows],
                       inv_grad[rows])
        # 1/s last: for a huge row the quotient is the (tiny) gradient itself, with no factor
        # 1/(s |v|) rounded on the way. (grad_sub may be z_grad's own first columns.)
        torch.div(grad_sub, scale[rows].unsqueeze(1), out=z_grad[:, :dim])
    return tuple(grad_z)


# --------------------------------------------------------------------------- torch.library ops
# One op pair for one process (group_name "") and for a process group (its name): the group
# travels as a str, which dynamo and the dispatcher pass through as a constant, so
# torch.compile(fullgraph=True) sees one opaque op whose body runs the collectives eagerly.
def _fake_outputs(z1: Tensor, variant: str, group_name: str) -> tuple[Tensor, Tensor, Tensor]:
    n = z1.shape[0]
    work = _working_dtype(z1.dtype)
    rows = n if variant == "cross" else 2 * n
    cols = n * rank_and_world(resolve_group(group_name))[1] if variant == "cross" else 0
    return (z1.new_empty(n, dtype=work), z1.new_empty(rows, dtype=work),
            z1.new_empty(cols, dtype=work))


@torch.library.custom_op("directclr::infonce", mutates_args=())
def _infonce_op(z1: Tensor, z2: Tensor, dim: int, temperature: float, variant: str,
                backend: str, group_name: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """Fused InfoNCE of this process's rows: (per-pair loss, row LSE, column LSE). With a
    ``group_name``, the rows are this rank's block of the group's global batch (every rank of the
    group calls it with the same N, checked once per (N, group)); with "", the batch is z1, z2."""
    group = resolve_group(group_name)
    if group is not None:
        check_equal_batches(z1.shape[0], z1.device, group_name)
    return _forward(z1, z2, dim, temperature, variant, backend, group)


@_infonce_op.register_fake
def _(z1, z2, dim, temperature, variant, backend, group_name=""):
    return _fake_outputs(z1, variant, group_name)


@torch.library.custom_op("directclr::infonce_backward", mutates_args=())
def _infonce_backward_op(grad: Tensor, z1: Tensor, z2: Tensor, row_lse: Tensor, col_lse: Tensor,
                         dim: int, temperature: float, variant: str, backend: str,
                         group_name: str = "") -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. z1, z2; with a group, of the sum over all its ranks' losses."""
    return _backward(grad, z1, z2, row_lse, col_lse, dim, temperature, variant, backend,
                     resolve_group(group_name))


@_infonce_backward_op.register_fake
def _(grad, z1, z2, row_lse, col_lse, dim, temperature, variant, backend, group_name=""):
    return (torch.empty(z1.shape, dtype=z1.dtype, device=z1.device),
            torch.empty(z2.shape, dtype=z2.dtype, device=z2.device))


def _setup_context(ctx, inputs, output):
    z1, z2, *args = inputs  # dim, temperature, variant, backend, group_name (defaults filled)
    _, row_lse, col_lse = output
    ctx.save_for_backward(z1, z2, row_lse, col_lse)
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(row_lse, col_lse)


def _op_backward(ctx, grad_loss, _grad_row_lse, _grad_col_lse):
    z1, z2, row_lse, col_lse = ctx.saved_tensors
    grad_z1, grad_z2 = torch.ops.directclr.infonce_backward(grad_loss, z1, z2, row_lse, col_lse,
                                                            *ctx.args)
    return (grad_z1, grad_z2) + (None,) * len(ctx.args)


_infonce_op.register_autograd(_op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def infonce(z1: Tensor, z2: Tensor, dim: int | None = 360, temperature: float = 0.1,
            variant: str = "cross", reduction: str = "mean", backend: str = "auto",
            group=None, gather: bool | None = None) -> Tensor:
    """InfoNCE on the first ``dim`` coordinates of two views' embeddings, never forming N x N.

    Args:
        z1, z2: (N, D) embeddings of the two views, any float dtype and strides; only
            ``z[:, :dim]`` is read, and the gradient beyond it is exactly zero.
        dim: subvector width d0 (DirectCLR: 360 of ResNet-50's 2048); None uses all of D.
        temperature: softmax temperature tau > 0.
        variant: ``"cross"`` (official DirectCLR: N x N cross-view logits, both directions
            averaged) or ``"ntxent"`` (SimCLR: 2N x 2N, self-similarity excluded).
        reduction: ``"mean"`` (scalar) or ``"none"`` (one loss per pair; their mean is the loss).
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpu"``, ``"triton"`` or
            ``"reference"`` (plain PyTorch, builds the N x N matrix; this process's rows only,
            so it needs ``gather=False`` once torch.distributed is initialized).
        group: the process group to gather over (default: the world, once torch.distributed is
            initialized).
        gather: whether the batch is the group's global batch (each rank passing its own rows)
            or this process's rows alone.

            * ``None`` (default): global when torch.distributed is initialized or ``group`` is
              given, else local.
            * ``True``: global; needs ``group`` or an initialized torch.distributed (else
              ValueError).
            * ``False``: local: the loss of this rank's N pairs among themselves, with no
              collectives at all, so one rank may call it alone. Use it for anything a rank
              computes by itself (a validation loss on rank 0, a per-rank diagnostic). Passing
              ``group`` with it is a ValueError.

            With gather, *every rank of the group must call infonce, with the same N*: it runs
            collectives (a rank that does not call it leaves the others waiting). Equal N is
            checked the first time a process sees an N (what that catches:
            ``directclr.distributed.check_equal_batches``).

    Returns:
        Without gather, the loss of the N pairs (``"mean"``) or their N losses (``"none"``).
        With gather over W ranks (global batch W * N), this rank's share: ``"none"`` gives the
        losses of this rank's N pairs *in the global batch* (their negatives are all W * N
        pairs), and ``"mean"`` their mean over this rank's pairs, not the global loss. The mean
        of the returned scalars over the ranks is the global loss; and the gradient each rank
        gets is that of the *sum* of all ranks' returned values, so DDP's averaging over ranks
        yields exactly the gradient of the global loss.
    """
    dim = _check_args(z1, z2, dim, temperature, variant, reduction, backend)
    group = loss_group(gather, group)
    backend = _resolve_backend(backend, z1)
    temperature = float(temperature)
    if backend == "reference":
        if group is not None:
            raise ValueError("backend='reference' is single-process: pass gather=False for this "
                             "rank's rows alone, or use backend='auto' to gather")
        loss = infonce_reference(z1, z2, dim, temperature, variant)
    else:
        group_name = "" if group is None else group.group_name
        loss = torch.ops.directclr.infonce(z1, z2, dim, temperature, variant, backend,
                                           group_name)[0]
    return loss.mean() if reduction == "mean" else loss


class DirectCLRLoss(torch.nn.Module):
    """``infonce`` as a module: ``DirectCLRLoss(dim=360)(z1, z2)``; ``gather=False`` for a loss a
    rank computes alone (e.g. validation) under torch.distributed."""

    def __init__(self, dim: int | None = 360, temperature: float = 0.1, variant: str = "cross",
                 reduction: str = "mean", backend: str = "auto", group=None,
                 gather: bool | None = None):
        super().__init__()
        self.dim, self.temperature, self.variant = dim, temperature, variant
        self.reduction, self.backend, self.group, self.gather = reduction, backend, group, gather

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return infonce(z1, z2, self.dim, self.temperature, self.variant, self.reduction,
                       self.backend, self.group, self.gather)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, temperature={self.temperature}, variant={self.variant!r}, "
                f"reduction={self.reduction!r}, gather={self.gather!r}")
