"""Subvector InfoNCE, the DirectCLR loss: InfoNCE on the first ``dim`` coordinates of z, fused.

Layers, top to bottom:

* ``infonce`` / ``DirectCLRLoss``: the public functional API and its thin module; the argument
  checks are in ``directclr/loss_args.py``.
* ``directclr::infonce`` / ``directclr::infonce_backward`` (torch.library custom ops, with fake
  and autograd registered): one op for one process (``group_name=""``) and for a process group
  (its name), so ``torch.compile(fullgraph=True)`` sees one opaque op either way; the collectives
  and the equal-N check run inside it, never traced. The temperature is a 0-d tensor input (its
  value read inside the op), so it can be learned and compiled dynamically. ``infonce`` calls the
  op through ``_InfoNCE``, the same autograd as a ``torch.autograd.Function`` in the form that
  torch.func's transforms accept; in plain eager mode (``_direct_call``) through
  ``_InfoNCEEager``, which runs the ops' bodies without the dispatcher.
* ``directclr/fused.py``: the algorithm inside the op (``forward`` / ``backward``: normalization,
  each variant's row/column ``Layout``, the collectives) and the primitive contract every backend
  keeps (``backend_primitive``).
* ``infonce_reference``: the plain PyTorch formula, which builds the N x N matrix; tests and
  benchmarks compare against it.

Numerics: fp32 accumulation for fp16/bf16/fp32 inputs (float64 stays float64); the loss comes back
in that working dtype, gradients in the input dtype, exactly zero beyond ``dim``. Inputs of any
finite scale give the exact loss and gradient (for tau >= 1e-5 in fp32: docs/loss.md): rows with max
|u| >= 2^16 are divided by a power of two before their norms are taken (``scaling.scaled_rows``), so
norms and products never overflow. A row of zeros is normalized to zero (finite loss) and gets a
zero gradient, since the norm has no derivative there; so does any row with |u| < eps (F.normalize's
floor). Non-finite inputs give a NaN loss (never an error, so no device sync). One pair alone (N = 1
without a group) has the loss 0 exactly (the positive is the only term of each LSE) and a zero
gradient; otherwise each pair's loss is clamped at 0 from below (its exact value is >= 0; fp32
rounding may dip under), the gradient being the formula's own.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused
from .collectives import (
    check_equal_batches,
    loss_group,
    rank_and_world,
    resolve_group,
)
from .loss_args import check_args, check_options, check_temperature, resolve_backend
from .rows import NORM_EPS
from .scaling import scaled_rows


# --------------------------------------------------------------------------- reference formula
def infonce_reference(z1: Tensor, z2: Tensor, dim: int | None = 360,
                      temperature: float | Tensor = 0.1, variant: str = "cross") -> Tensor:
    """Per-pair losses by the plain formula, in z's dtype, for (N, D) views. Materializes the
    N x N logits; a tensor temperature gets its gradient from autograd."""
    a, b = (F.normalize(scaled_rows(z[:, :dim], fused.working_dtype(z.dtype))[0], dim=1,
                        eps=NORM_EPS) for z in (z1, z2))
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


# --------------------------------------------------------------------------- torch.library ops
# One op pair for one process (group_name "") and for a process group (its name): the group
# travels as a str, which dynamo and the dispatcher pass through as a constant, so
# torch.compile(fullgraph=True) sees one opaque op whose body runs the collectives eagerly.
def _fake_outputs(z1: Tensor, dim: int, variant: str, backend: str, group_name: str,
                  keep_bytes: int) -> tuple[Tensor, ...]:
    n = z1.shape[0]
    work = fused.working_dtype(z1.dtype)
    world = rank_and_world(resolve_group(group_name))[1]
    rows = n if variant == "cross" else 2 * n
    cols = n * world if variant == "cross" else 0
    if fused.keeps_dots(backend, n, variant, world, z1.dtype, keep_bytes):
        kept = fused.Kept.shapes(n, dim, variant, world)
    else:
        kept = ((0, 0),) * len(fused.Kept._fields)
    return (z1.new_empty(n, dtype=work), z1.new_empty(rows, dtype=work),
            z1.new_empty(cols, dtype=work), *(z1.new_empty(shape, dtype=work) for shape in kept))


def _infonce_forward(z1: Tensor, z2: Tensor, dim: int, temperature: Tensor,
                     temperature_value: float, variant: str, backend: str, group_name: str = "",
                     keep_bytes: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused InfoNCE of this process's rows: (per-pair loss, row LSE, column LSE, and what it
    keeps for the backward, ``fused.Kept``: dots, rows, row stats).
    With a ``group_name``, the rows are this rank's block of the group's global batch (every rank
    of the group calls it with the same N, checked once per (N, group)); with "", the batch is
    z1, z2. temperature: 0-d, any float dtype and device; temperature_value: its value where the
    caller knows it, NaN where it is to be read here (``_temperature_value``). keep_bytes: the
    budget of ``fused.keeps_dots`` (0: the backward recomputes every tile)."""
    tau = _temperature_value(temperature, temperature_value)
    check_temperature(tau, z1.dtype)
    group = resolve_group(group_name)
    if group is not None:
        check_equal_batches(z1.shape[0], z1.device, group_name)
    loss, row_lse, col_lse, kept = fused.forward(z1, z2, dim, tau, variant, backend, group,
                                                 keep_bytes)
    return loss, row_lse, col_lse, *kept


_infonce_op = torch.library.custom_op("directclr::infonce", mutates_args=())(_infonce_forward)


def _temperature_value(temperature: Tensor, known: float) -> float:
    """The temperature as a float: `known`, or where that is NaN (a tensor temperature, or a
    float one under torch.compile, which keeps one graph for every value) read from the tensor,
    a host sync if it is on a GPU."""
    return temperature.item() if math.isnan(known) else known


@_infonce_op.register_fake
def _(z1, z2, dim, temperature, temperature_value, variant, backend, group_name="", keep_bytes=0):
    return _fake_outputs(z1, dim, variant, backend, group_name, keep_bytes)


def _infonce_backward(grad: Tensor, z1: Tensor, z2: Tensor, row_lse: Tensor, col_lse: Tensor,
                      kept_dots: Tensor, kept_rows: Tensor, kept_row_stats: Tensor, dim: int,
                      temperature: Tensor, temperature_value: float, variant: str, backend: str,
                      group_name: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. z1, z2 and the temperature (0-d, in the working dtype on z's device);
    with a group, of the sum over all its ranks' losses (the temperature's: this rank's share)."""
    kept = fused.Kept(kept_dots, kept_rows, kept_row_stats)
    return fused.backward(grad, z1, z2, row_lse, col_lse, kept, dim,
                          _temperature_value(temperature, temperature_value), variant, backend,
                          resolve_group(group_name))


_infonce_backward_op = torch.library.custom_op("directclr::infonce_backward",
                                               mutates_args=())(_infonce_backward)


@_infonce_backward_op.register_fake
def _(grad, z1, z2, row_lse, col_lse, kept_dots, kept_rows, kept_row_stats, dim, temperature,
      temperature_value, variant, backend, group_name=""):
    return (torch.empty(z1.shape, dtype=z1.dtype, device=z1.device),
            torch.empty(z2.shape, dtype=z2.dtype, device=z2.device),
            torch.empty((), dtype=fused.working_dtype(z1.dtype), device=z1.device))


NO_DOUBLE_BACKWARD = ("directclr::infonce has no double backward: its backward "
                      "(directclr::infonce_backward) is a fused kernel with no derivative; use "
                      "backend='reference' for higher-order gradients")
NO_VMAP = ("directclr::infonce (the fused InfoNCE op) has no vmap batching rule; use "
           "backend='reference' under torch.func.vmap")


def _setup_context(ctx, inputs, output):
    z1, z2, dim, temperature, temperature_value, variant, backend, group_name, keep_bytes = inputs
    _, row_lse, col_lse, *kept = output
    ctx.save_for_backward(z1, z2, temperature, row_lse, col_lse, *kept)
    ctx.args = (dim, temperature_value, variant, backend, group_name)
    ctx.mark_non_differentiable(row_lse, col_lse, *kept)
    # Autograd would pass zeros of each output's shape as its gradient: M x C of them for kept.
    ctx.set_materialize_grads(False)


def _op_backward(ctx, grad_loss, *_grads_of_non_differentiable):
    if grad_loss is None:  # no gradient reached the loss (grads are not materialized)
        return (None,) * 9
    z1, z2, temperature, row_lse, col_lse, *kept = ctx.saved_tensors
    dim, temperature_value, variant, backend, group_name = ctx.args
    args = (grad_loss, z1, z2, row_lse, col_lse, *kept, dim, temperature, temperature_value,
            variant, backend, group_name)
    if not torch.is_grad_enabled() and _direct_call(grad_loss, z1, z2, temperature):
        grad_z1, grad_z2, grad_temperature = _infonce_backward(*args)
    else:  # create_graph: _InfoNCEBackward's node raises on a double backward
        grad_z1, grad_z2, grad_temperature = _InfoNCEBackward.apply(*args)
    if ctx.needs_input_grad[3]:  # a CPU temperature with GPU rows: this copy is a host sync
        grad_temperature = grad_temperature.to(temperature.device, temperature.dtype)
    else:
        grad_temperature = None
    return grad_z1, grad_z2, None, grad_temperature, None, None, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(NO_DOUBLE_BACKWARD)


_infonce_op.register_autograd(_op_backward, setup_context=_setup_context)
_infonce_backward_op.register_autograd(_no_double_backward,
                                       setup_context=lambda ctx, inputs, output: None)


# Through the dispatcher a custom op call passes torch.library's Python layers (autograd, backend
# and alias checks): about 50 us (torch 2.14, AMD EPYC), a tenth of the op at N = 64. In plain
# eager mode the ops' bodies run directly, as the dispatcher would run them; whatever must see
# the op (torch.compile, torch.func's transforms, a dispatch or function mode, FakeTensor or
# another subclass) gets it.
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _direct_call(*tensors: Tensor) -> bool:
    return (not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
            and not torch._C._len_torch_dispatch_stack()
            and not torch._C._is_torch_function_mode_enabled()
            and all(type(tensor) in _PLAIN_TENSORS for tensor in tensors))


# torch.func's transforms (grad, vjp, jacrev) take an autograd.Function only in the form with
# setup_context and a forward without ctx; the one torch.library generates for a custom op (torch
# 2.14) is the older form, so the transforms refuse the op itself. The same autograd in that
# form: ``infonce`` calls the op through _InfoNCE, and the backward goes through
# _InfoNCEBackward (also from the op's own registration), whose vmap rule lets jacrev batch the
# cotangents and whose backward names the missing double backward.
class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(z1, z2, dim, temperature, temperature_value, variant, backend, group_name,
                keep_bytes):
        return torch.ops.directclr.infonce(z1, z2, dim, temperature, temperature_value, variant,
                                           backend, group_name, keep_bytes)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_op_backward)

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(NO_VMAP)


class _InfoNCEEager(torch.autograd.Function):
    """_InfoNCE where ``_direct_call`` holds (plain eager mode): the op's body, no dispatcher, in
    the older form (ctx in forward), which apply calls as it is, without binding each call's
    arguments to forward's signature (about 25 us, torch 2.14)."""
    @staticmethod
    def forward(ctx, *inputs):
        output = _infonce_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_op_backward)


class _InfoNCEBackward(torch.autograd.Function):
    @staticmethod
    def forward(grad, z1, z2, row_lse, col_lse, kept_dots, kept_rows, kept_row_stats, dim,
                temperature, temperature_value, variant, backend, group_name):
        return torch.ops.directclr.infonce_backward(
            grad, z1, z2, row_lse, col_lse, kept_dots, kept_rows, kept_row_stats, dim,
            temperature, temperature_value, variant, backend, group_name)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = staticmethod(_no_double_backward)

    @staticmethod
    def vmap(info, in_dims, *args):
        """One backward per batch entry (jacrev batches the cotangents)."""
        outs = [_InfoNCEBackward.apply(*(arg if axis is None else arg.select(axis, i)
                                         for arg, axis in zip(args, in_dims)))
                for i in range(info.batch_size)]
        return tuple(torch.stack(out) for out in zip(*outs)), (0, 0, 0)


# autograd.Function.apply binds each call's arguments to forward's signature (for setup_context);
# inspect.signature rebuilds it every time unless the function carries it: a fifth of a small
# batch's time outside the kernels (torch 2.14).
for _function in (_InfoNCE, _InfoNCEBackward):
    _function.forward.__signature__ = inspect.signature(_function.forward)


# --------------------------------------------------------------------------- public API
def infonce(z1: Tensor, z2: Tensor, dim: int | None = 360, temperature: float | Tensor = 0.1,
            variant: str = "cross", reduction: str = "mean", backend: str = "auto",
            group=None, gather: bool | None = None) -> Tensor:
    """InfoNCE on the first ``dim`` coordinates of two views' embeddings, never forming N x N.

    Args:
        z1, z2: (N, D) embeddings of the two views, any float dtype and strides; only
            ``z[:, :dim]`` is read, and the gradient beyond it is exactly zero. (N, ...) inputs
            are flattened to (N, D) first, as ``z.flatten(1)`` (``dim`` counts the flattened
            coordinates; the gradients keep the inputs' shapes).
        dim: subvector width d0 (DirectCLR: 360 of ResNet-50's 2048); None uses all of D.
        temperature: softmax temperature tau > 0: a Python number, or a 0-d float tensor (any
            dtype and device), which may require grad (learned, CLIP-style: its gradient comes
            from the backward's row dot products, O(N), in the working dtype). A tensor's value
            is read inside the op: on a GPU that is one host sync in the forward and one in the
            backward (a float or a CPU tensor: none). open_clip's ``logit_scale`` is
            ``-log(tau)``: pass ``temperature=logit_scale.exp().reciprocal()``.
        variant: ``"cross"`` (official DirectCLR: N x N cross-view logits, both directions
            averaged) or ``"ntxent"`` (SimCLR: 2N x 2N, self-similarity excluded).
        reduction: ``"mean"`` (scalar), ``"sum"`` (scalar, N times the mean) or ``"none"``
            (one loss per pair; their mean is the loss).
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
            ``directclr.collectives.check_equal_batches``).

    Returns:
        Without gather, the loss of the N pairs (``"mean"``, ``"sum"``) or their N losses
        (``"none"``), each >= 0; one pair alone (N = 1) has the loss 0 and a zero gradient.
        With gather over W ranks (global batch W * N), this rank's share: ``"none"`` gives the
        losses of this rank's N pairs *in the global batch* (their negatives are all W * N
        pairs), and ``"mean"`` their mean over this rank's pairs, not the global loss. The mean
        of the returned scalars over the ranks is the global loss; and the gradient each rank
        gets is that of the *sum* of all ranks' returned values, so DDP's averaging over ranks
        yields exactly the gradient of the global loss (the temperature's too).

    Autograd: ``torch.func.grad``, ``vjp`` and ``jacrev`` work; ``vmap`` and higher-order
    gradients do not (a RuntimeError saying so): use ``backend="reference"`` for those.
    """
    z1, z2, dim = check_args(z1, z2, dim, temperature, variant, reduction, backend)
    group = loss_group(gather, group)
    backend = resolve_backend(backend, z1)
    if backend == "reference":
        if group is not None:
            raise ValueError("backend='reference' is single-process: pass gather=False for this "
                             "rank's rows alone, or use backend='auto' to gather")
        if isinstance(temperature, Tensor) and not torch.compiler.is_compiling():
            check_temperature(temperature.item(), z1.dtype)  # the op checks it inside
        loss = infonce_reference(z1, z2, dim, temperature, variant)
    else:
        # A float travels as a tensor too (one op schema; under torch.compile one graph for every
        # value, read inside the op from host memory) and, in eager mode, as itself: no read.
        temperature_value = math.nan
        if not isinstance(temperature, Tensor):
            if not torch.compiler.is_compiling():
                temperature_value = float(temperature)
            # a product, not torch.tensor(t): dynamo keeps a SymFloat symbolic through it, where
            # torch.tensor would specialize the graph to each value (torch 2.14)
            temperature = torch.ones((), dtype=torch.float64) * temperature
        group_name = "" if group is None else group.group_name
        # Dots kept for a backward only where one will run (no_grad: nothing to keep them for)
        wants_grad = torch.is_grad_enabled() and (z1.requires_grad or z2.requires_grad or (
            isinstance(temperature, Tensor) and temperature.requires_grad))
        keep_bytes = fused.keep_dots_bytes() if wants_grad else 0
        function = _InfoNCEEager if _direct_call(z1, z2, temperature) else _InfoNCE
        loss = function.apply(z1, z2, dim, temperature, temperature_value, variant, backend,
                              group_name, keep_bytes)[0]
    if reduction == "mean":  # summed in float64: N losses below fp32's max can add up past it
        return loss.mean(dtype=torch.float64).to(loss.dtype)
    return loss.sum() if reduction == "sum" else loss


class DirectCLRLoss(torch.nn.Module):
    """``infonce`` as a module: ``DirectCLRLoss(dim=360)(z1, z2)``; ``gather=False`` for a loss a
    rank computes alone (e.g. validation) under torch.distributed. Arguments are checked here,
    at construction (those that depend on the inputs at each call).

    learn_temperature: the temperature becomes a parameter, ``log_temperature`` (log tau,
    initially log ``temperature``; tau = exp(log_temperature) stays > 0 whatever the step), for
    CLIP-style training; ``temperature`` then reads its current value (a 0-d tensor). open_clip's
    ``logit_scale`` is ``-log_temperature``.
    """

    def __init__(self, dim: int | None = 360, temperature: float = 0.1, variant: str = "cross",
                 reduction: str = "mean", backend: str = "auto", group=None,
                 gather: bool | None = None, learn_temperature: bool = False):
        super().__init__()
        if isinstance(temperature, Tensor):
            raise TypeError("temperature must be a float (learn_temperature=True makes it a "
                            "parameter)")
        check_options(dim, temperature, variant, reduction, backend)
        if not isinstance(learn_temperature, bool):
            raise TypeError(f"learn_temperature must be a bool, got {learn_temperature!r}")
        if not (gather is None or isinstance(gather, bool)) or (gather is False
                                                                 and group is not None):
            loss_group(gather, group)  # raises, as each call would (gather=True's group may
            # come later, with torch.distributed's initialization: checked at the call)
        self.dim, self.variant, self.reduction = dim, variant, reduction
        self.backend, self.group, self.gather = backend, group, gather
        self._temperature = float(temperature)
        self.register_parameter("log_temperature", torch.nn.Parameter(
            torch.tensor(math.log(temperature))) if learn_temperature else None)

    @property
    def temperature(self) -> float | Tensor:
        """tau: the fixed float, or exp(log_temperature) with learn_temperature."""
        if self.log_temperature is not None:
            return self.log_temperature.exp()
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        check_options(self.dim, value, self.variant, self.reduction, self.backend)
        if self.log_temperature is not None:
            with torch.no_grad():
                self.log_temperature.fill_(math.log(value))
        self._temperature = float(value)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return infonce(z1, z2, self.dim, self.temperature, self.variant, self.reduction,
                       self.backend, self.group, self.gather)

    def extra_repr(self) -> str:
        if self.log_temperature is None:
            temperature = f"{self.temperature}"
        else:
            temperature = f"{self.log_temperature.detach().exp().item():.4g}, learned"
        return (f"dim={self.dim}, temperature={temperature}, variant={self.variant!r}, "
                f"reduction={self.reduction!r}, gather={self.gather!r}")
