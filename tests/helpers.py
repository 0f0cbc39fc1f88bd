"""Shared test helpers: float64 references, error-relative comparisons, host-sync counts,
2-rank launches, and the training tests' runs (argv built from the Config's flags)."""
import collections
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from directclr import infonce, infonce_reference
from directclr.config import pretrain_argv


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


# The fused kernels take every logit relative to the fixed max 1/tau (10 at the default tau =
# 0.1), so a loss or gradient entry that is (near) zero comes out as a difference of O(1/tau)
# terms, each rounded in fp32: a few ulp of 1/tau. (One pair alone is exactly 0: no kernel runs.)
ROUNDING_FLOOR = 8 * torch.finfo(torch.float32).eps / 0.1


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def assert_rel_close(x, ref, rel, what="", atol=0.0):
    """max |x - ref| <= rel * max |ref| + atol."""
    scale = ref.double().abs().max().item()
    err = max_err(x, ref)
    bound = rel * scale + atol
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} (max |ref| {scale:.3e})"


OUTPUTS = ("loss", "grad z1", "grad z2")


def assert_fp32_exact(ours, exact, atol=0.0):
    """(loss, grad z1, grad z2) computed in fp32 against float64's: the loss within 1e-5 and
    the gradients within 1e-4 of their largest entry, plus atol."""
    for name, got, ref in zip(OUTPUTS, ours, exact):
        assert_rel_close(got, ref, 1e-5 if name == "loss" else 1e-4, name, atol)


def assert_within_pytorch_error(ours, exact, pytorch, floor=0.0):
    """Low precision judged by PyTorch's own error, for the loss and both gradients:
    |x - x64| <= 2 |x_pytorch - x64| + max(1e-3 max |x64|, floor), x_pytorch being the formula
    run in the inputs' dtype."""
    for name, got, ref, theirs in zip(OUTPUTS, ours, exact, pytorch):
        atol = max(1e-3 * ref.abs().max().item(), floor)
        assert max_err(got, ref) <= 2 * max_err(theirs, ref) + atol, name


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


ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TWO_RANKS = [*TORCHRUN, "--standalone", "--nproc_per_node=2"]
ENV_ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_two_ranks(*args, env=None, timeout=300):
    """torchrun --standalone with 2 processes of `args` (a script or `-m MODULE`, and its
    arguments); asserts that every rank ended well and returns torchrun's stderr."""
    env = dict(os.environ if env is None else env)
    # The checkout first, so `-m tests.workers.NAME` and `-m directclr` import these files.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([*TWO_RANKS, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stderr


def run_worker(name, *args):
    """tests/workers/<name>.py on 2 ranks (gloo in the workers)."""
    return run_two_ranks("-m", f"tests.workers.{name}", *args)


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


# --------------------------------------------------------------------------- training runs
# `directclr pretrain` as the training tests launch it: tiny, deterministic, one loader thread.
RUN = [sys.executable, "-m", "directclr", "pretrain", *pretrain_argv(
    arch="resnet18", batch_size=8, epochs=2, lr=0.3, warmup_epochs=0.5, dim=90, image_size=32,
    num_threads=0, ckpt_every=1, loader="torchvision")]


def ddp_args(tiny, mode):
    """8 pairs per rank on 2 ranks, or all 16 in one process."""
    return RUN[1:] + pretrain_argv(data=tiny, max_steps=3, batch_size=16, mode=mode)


def assert_same_training(one, two, mode):
    """`two` (2 ranks) ended where `one` (1 process) did: same steps, weights, logged losses."""
    from directclr.checkpoint import load_latest_checkpoint
    from directclr.config import Config
    from directclr.train import Model
    a = load_latest_checkpoint(one)
    b = load_latest_checkpoint(two)
    assert a["step"] == b["step"] == 3
    assert a["model"].keys() == b["model"].keys()
    torch.manual_seed(0)
    init = Model(Config(data="", out="", arch="resnet18", mode=mode, dim=90), 4, 32)
    trained = [k for k, v in a["model"].items() if v.is_floating_point()]
    one_w, two_w, init_w = (torch.cat([state[k].flatten() for k in trained])
                            for state in (a["model"], b["model"], init.state_dict()))
    # Relative to how far 3 steps moved the weights: float reordering alone (one process with 1
    # vs 2 threads) gives 7e-7 (directclr) and 2e-4 (simclr-mlp, whose small-batch BN1d
    # amplifies rounding); BN statistics per rank instead (no CpuSyncBatchNorm) give 4e-2 and 0.11.
    update = (one_w - init_w).norm()
    assert update > 0
    assert (one_w - two_w).norm() / update < 2e-3
    for key in a["model"]:
        if not a["model"][key].is_floating_point():
            assert torch.equal(a["model"][key], b["model"][key]), key
    # One row per step, written by global rank 0 only (a second writer would double the rows).
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()
               if '"loss"' in line] for run in (one, two)]
    assert len(losses[1]) == len(losses[0]) == 3
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4)


class FixedBatches:
    """A loader stand-in that hands out the same batches every epoch: the sync count below is
    the training step's, not the data pipeline's."""
    classes = ["a", "b", "c", "d"]

    def __init__(self, steps, batch):
        self.steps, self.epoch, self.batches_done = steps, 0, 0
        self.index = range(steps * batch)  # the images, as the start-up summary counts them
        self.views = torch.randn(2, batch, 3, 32, 32)
        self.labels = torch.arange(batch) % 4

    def __len__(self):
        return self.steps

    def __iter__(self):
        while self.batches_done < self.steps:
            self.batches_done += 1
            yield self.views[0], self.views[1], self.labels
        self.epoch, self.batches_done = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state):
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
