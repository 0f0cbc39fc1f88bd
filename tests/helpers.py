"""Shared test helpers: float64 references and error-relative comparisons."""
import torch

from directclr import infonce, infonce_reference


def make_views(n, width, dtype=torch.float32, layout="contiguous", seed=0):
    """Two (n, width) views with the asked memory layout, as leaf tensors requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    views = []
    for _ in range(2):
        if layout == "contiguous":
            z = torch.randn(n, width, generator=gen)
        elif layout == "transposed":  # column-major: row stride 1
            z = torch.randn(width, n, generator=gen).T
        elif layout == "strided":  # every other column of a wider tensor
            z = torch.randn(n, 2 * width, generator=gen)[:, ::2]
        else:
            raise ValueError(layout)
        z = z.to(dtype).detach()
        views.append(z.requires_grad_())
    return views


def loss_and_grads(z1, z2, reduction="mean", weights=None, **kwargs):
    """Loss and input gradients of `infonce`; with reduction='none' the upstream gradient is
    `weights` (arbitrary), so per-row gradient weighting is exercised too."""
    z1 = z1.detach().requires_grad_()
    z2 = z2.detach().requires_grad_()
    loss = infonce(z1, z2, reduction=reduction, **kwargs)
    upstream = torch.ones_like(loss) if weights is None else weights.to(loss.dtype)
    loss.backward(upstream)
    return loss.detach(), z1.grad, z2.grad


def reference_loss_and_grads(z1, z2, reduction="mean", weights=None, dtype=torch.float64, **kwargs):
    """The plain PyTorch formula, computed in `dtype` (float64 = the ground truth)."""
    z1 = z1.detach().to(dtype).requires_grad_()
    z2 = z2.detach().to(dtype).requires_grad_()
    loss = infonce_reference(z1, z2, **kwargs)
    if reduction == "mean":
        loss = loss.mean()
    upstream = torch.ones_like(loss) if weights is None else weights.to(loss.dtype)
    loss.backward(upstream)
    return loss.detach(), z1.grad, z2.grad


# The fused GPU kernels take every logit relative to the fixed max 1/tau (10 at the default
# tau = 0.1), so a loss or gradient that is exactly zero (a batch of one pair: P = 1) comes out
# as a difference of O(1/tau) terms, each rounded in fp32: a few ulp of 1/tau.
ROUNDING_FLOOR = 8 * torch.finfo(torch.float32).eps / 0.1


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def assert_rel_close(x, ref, rel, what="", atol=0.0):
    """max |x - ref| <= rel * max |ref| + atol."""
    scale = ref.double().abs().max().item()
    err = max_err(x, ref)
    bound = rel * scale + atol
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} (max |ref| {scale:.3e})"
