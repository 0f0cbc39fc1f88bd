"""Power-of-two rescaling that keeps any finite input inside the working dtype's range.

A row's (or batch's) sum of squares overflows fp32 once its values reach ~2^64 / sqrt(width)
(fp64: 2^512) and underflows below ~2^-63 (fp64: 2^-511), while the quantities built from it
(unit rows, covariances) are scale-equivariant. Dividing by a power of two changes no digit of the
values (unless the quotient is subnormal), so the rescaled problem has exactly the same answer up
to that power of two, and the caller undoes the scale where the result needs it.

Maxima below 2^HIGH (and, where tiny ones are scaled up too, from 2^(LOW-1) up) leave the values
as they are, so typical embeddings and every fp16 tensor (max 65504 < 2^16) go through unchanged:
scaling fp16 down would push its small values into subnormals, where they lose digits.
"""
from __future__ import annotations

import torch
from torch import Tensor

HIGH = 16  # squares and products of values below 2^16 stay far below fp32's overflow,
LOW = -16  # and those of values from 2^-17 up far above its underflow


def max_abs(x: Tensor, dim: int | tuple = ()) -> Tensor:
    """max |x| along ``dim`` (all of x by default), NaN where x holds one. Not the inf-norm: on
    CPU that reduction is not vectorized, ~10x the time of amax and amin together."""
    return torch.maximum(x.amax(dim), -x.amin(dim))


def power_of_two_scale(maxabs: Tensor, scale_up: bool) -> Tensor:
    """A power of two s per element of ``maxabs`` (an fp32/fp64 tensor of maxima of |x|) with
    maxabs / s in [2^(HIGH-1), 2^HIGH) where maxabs >= 2^HIGH and, if scale_up, in
    [2^(LOW-1), 2^LOW) where 0 < maxabs < 2^(LOW-1); 1 elsewhere (zero included). A NaN or inf
    maximum gives an s that keeps the data non-finite."""
    mantissa, exponent = torch.frexp(maxabs)  # maxabs = mantissa * 2^exponent, mantissa in [.5, 1)
    # maxabs * 2^-t is exact (t is small) and dividing by the mantissa leaves 2^(exponent - t),
    # exactly, even where 2^exponent itself would overflow.
    scale = torch.where(exponent > HIGH, maxabs * 2.0**-HIGH / mantissa, 1.0)
    if scale_up:
        scale = torch.where(exponent < LOW, maxabs * 2.0**-LOW / mantissa, scale)
    return scale


def scaled_rows(x: Tensor, dtype: torch.dtype, out: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """(x / s, s) with s a power of two per row (``dtype``, 1-D) that only ever scales rows down,
    those whose max |x| reaches 2^HIGH: their norms then fit any dtype, while rows below (zero
    and tiny ones included) keep their values, so a norm floor applies to them as before. The
    quotient is a new tensor in x's dtype, or written into ``out`` (any dtype that holds x's
    values); s carries no gradient."""
    maxabs = max_abs(x.detach(), dim=1).to(dtype)
    scale = power_of_two_scale(maxabs, scale_up=False)
    divisor = scale.to(x.dtype if out is None else out.dtype).unsqueeze(1)
    return torch.div(x, divisor, out=out), scale
