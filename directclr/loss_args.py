"""The loss's arguments, checked before any kernel runs: the options ``DirectCLRLoss`` checks at
construction, the inputs ``infonce`` checks at each call, a temperature's value (also inside the
op, where a tensor's is concrete), and the backend that ``"auto"`` stands for. Errors name the
argument (docs/loss.md, "Argument checks")."""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .config import VARIANTS
from .fused import working_dtype

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "cpu", "triton", "reference")


def check_options(dim, temperature, variant, reduction, backend) -> None:
    """The checks that need no input (``DirectCLRLoss`` runs them at construction): types, the
    choices, and a Python number's temperature (finite, > 0). A tensor temperature's value is
    checked inside the op, where it is concrete; so is a float that torch.compile(dynamic=True)
    made symbolic (``math.isfinite`` cannot take it)."""
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
    if dim is not None and dim < 1:
        raise ValueError(f"dim must be >= 1 (at most the width of z1), got {dim}")
    if isinstance(temperature, Tensor):
        if not temperature.dtype.is_floating_point:
            raise TypeError(f"temperature must be a floating-point tensor, got {temperature.dtype}")
        if temperature.dim() != 0:
            raise ValueError(f"temperature must be a float or a 0-d tensor, got shape "
                             f"{tuple(temperature.shape)}")
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a 0-d tensor, got "
                        f"{type(temperature).__name__}")
    elif not torch.compiler.is_compiling():  # under dynamic=True a float may be a SymFloat
        check_temperature(temperature, torch.float64)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_temperature(temperature: float, dtype: torch.dtype) -> None:
    """A concrete temperature: finite, > 0, and 1/temperature finite in the working dtype of
    ``dtype`` inputs (the kernels scale every logit by it)."""
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    work = working_dtype(dtype)
    if temperature * torch.finfo(work).max < 1.0:
        raise ValueError(f"temperature must be >= {1.0 / torch.finfo(work).max:.4g} for {dtype} "
                         f"input (its inverse must be finite in {work}), got {temperature}")


def check_args(z1, z2, dim, temperature, variant, reduction, backend
                ) -> tuple[Tensor, Tensor, int]:
    """Validates everything before any kernel runs; returns z1, z2 as (N, D) (trailing dims
    flattened, as lightly does: z.flatten(1)) and the resolved subvector width."""
    check_options(dim, temperature, variant, reduction, backend)
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (N, D, ...), got shape "
                             f"{tuple(z.shape)}")
        if not z.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if z1.dtype != z2.dtype:
        raise TypeError(f"z1 and z2 must have the same dtype, got {z1.dtype} and {z2.dtype}")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 must be on the same device, got {z1.device} and {z2.device}")
    z1, z2 = z1.flatten(1), z2.flatten(1)
    n, width = z1.shape
    if n < 1:
        raise ValueError("z1 must hold at least one row")
    if dim is None:
        dim = width
    if not 1 <= dim <= width:
        raise ValueError(f"dim must be in [1, {width}] (the width of z1), got {dim}")
    if isinstance(temperature, (int, float)) and not torch.compiler.is_compiling():
        check_temperature(temperature, z1.dtype)
    return z1, z2, dim


def resolve_backend(backend: str, z: Tensor) -> str:
    device = z.device
    if backend == "auto":
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='auto' has no kernel for device {device}; "
                             "use backend='reference'")
        backend = "cpu" if device.type == "cpu" else "triton"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, z1 is on {device}")
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with "
                             f"TRITON_INTERPRET=1), z1 is on {device}")
        if z.dtype == torch.float64:
            raise TypeError("backend='triton' takes float32/bfloat16/float16 z1, got float64; "
                            "use backend='cpu' or 'reference' for float64")
    return backend


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
