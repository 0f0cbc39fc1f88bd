"""Shared test helpers: float64 references, error-relative comparisons, host-sync counts and
2-rank launches."""
import collections
import contextlib
import subprocess
import sys

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


# The Tensor methods through which Python code reads a tensor's value on the host: on a GPU each
# waits for the device (a host sync). On CPU tensors they are counted all the same.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_reads():
    """Counts calls of HOST_READS on any tensor while inside; yields a Counter by method name."""
    counts = collections.Counter()
    own = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}

    def counted(name, method):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)
        return wrapper

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    try:
        yield counts
    finally:
        for name, method in own.items():
            if method is None:  # inherited from torch._C.TensorBase
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)


def run_two_ranks(worker, *args):
    """torchrun --standalone with 2 processes (gloo in the workers) of tests/<worker> args."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(worker), *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def row_scales(dtype):
    """Per-row scales from 1e-5 up to the dtype's max, for inputs no plain sum of squares
    survives; rows below the norm floor are left to their own tests."""
    largest = 0.99 * torch.finfo(dtype).max
    if dtype == torch.float64:
        return [largest, 1e200, 1e30, 1.0, 1e-5, 2.0**16]
    if dtype == torch.bfloat16:  # its subnormal gradients at the very top would keep 1 digit
        return [1e35, 1e30, 3e19, 1.0, 1e-5, 2.0**16]
    return [largest, 1e30, 3e19, 1.0, 1e-5, 2.0**16]


def assert_scale_invariant(dtype, variant, backend, rel_loss, rel_grad, device="cpu"):
    """Rows of (6, 24) views at the scales of row_scales (dim 16) against the float64 reference
    on the rows divided by their scales: the same loss, and that gradient times 1/scale."""
    scales = torch.tensor(row_scales(dtype), dtype=torch.float64)
    views, bases, row_scale = [], [], []
    for seed, order in ((0, scales), (1, scales.flip(0))):
        base = make_views(len(order), 24, dtype=torch.float64, seed=seed)[0].detach()
        base = base / base.abs().amax(1, keepdim=True)  # max |row| = 1, times its scale below
        z = (base * order[:, None]).to(dtype)
        views.append(z.to(device))
        bases.append(z.double() / order[:, None])  # what z holds, divided by its scale
        row_scale.append(order[:, None])
    loss, g1, g2 = loss_and_grads(*views, dim=16, variant=variant, backend=backend)
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(*bases, dim=16, variant=variant)
    assert_rel_close(loss.cpu(), ref_loss, rel_loss, f"{dtype} {backend} loss", ROUNDING_FLOOR)
    for name, got, ref, scale in (("grad z1", g1, ref_g1, row_scale[0]),
                                  ("grad z2", g2, ref_g2, row_scale[1])):
        assert torch.equal(got[:, 16:], torch.zeros_like(got[:, 16:]))
        assert_rel_close(got.cpu().double() * scale, ref, rel_grad, f"{dtype} {backend} {name}",
                         ROUNDING_FLOOR)
