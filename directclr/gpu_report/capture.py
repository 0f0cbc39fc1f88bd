"""The launches of one forward + backward, compiled and not run: Triton's driver replaced by one
that compiles for sm_90a or sm_80 and launches nothing, so every kernel is the specialization
the JIT builds for the real arguments, on the grid the host code computes. Also the work the
kernels ask for, counted under Triton's interpreter (in a subprocess: TRITON_INTERPRET is read
when triton is imported). These patch Triton and directclr.kernels internals while they run."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

from .cost import H200

COUNT_N = 256  # interpreter counts: every tile full (multiples of 128), as at large N


@dataclass
class Launch:
    """One recorded launch: the kernel's name, grid, constexprs and launch options, its shared
    memory, PTX and cubin, and the scalar arguments it was called with."""

    kernel: str
    grid: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    shared: int
    ptx: str
    cubin: bytes
    args: dict = field(default_factory=dict)
    ttgir: str = ""


class _CompileOnlyDriver:
    """Stands in for the CUDA driver: Triton compiles for `arch` and launches nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only_driver(arch: int):
    """Triton's driver, inside, is one that compiles for `arch` and launches nothing."""
    from triton.runtime import driver
    previous = driver._active  # None until something asked for the real driver
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def compile_launch(fn, grid: tuple, args: tuple, arch: int, num_warps: int, num_stages: int,
                   **constexprs) -> Launch:
    """One kernel compiled for `arch` as the JIT specializes these arguments, not run."""
    with compile_only_driver(arch):
        compiled = fn.warmup(*args, grid=grid, num_warps=num_warps, num_stages=num_stages,
                             **constexprs)
    names = [p.name for p in fn.params]
    values = {k: v for k, v in zip(names, args)
              if isinstance(v, (int, float, bool)) and not isinstance(v, type)}
    fn.device_caches.clear()
    return Launch(fn.fn.__name__, tuple(grid), dict(constexprs), num_warps, num_stages,
                  compiled.metadata.shared, compiled.asm["ptx"], compiled.asm["cubin"], values,
                  compiled.asm.get("ttgir", ""))


@contextlib.contextmanager
def compile_only(arch: int, launches: list):
    """Every Triton launch inside compiles for `arch` (the JIT's own specialization of the real
    arguments) and is recorded instead of run; cuBLAS products return empty results."""
    from triton.runtime.jit import JITFunction
    kernels = importlib.import_module("directclr.kernels.infonce")
    run, mm, wanted = JITFunction.run, kernels._mm, kernels._programs_wanted

    def record(self, *args, grid, warmup, **kwargs):
        compiled = run(self, *args, grid=grid, warmup=True, **kwargs)
        names = [p.name for p in self.params]
        bound = dict(zip(names, args))
        values = {k: v for k, v in {**bound, **kwargs}.items()
                  if isinstance(v, (int, float, bool, str)) and not isinstance(v, type)}
        launches.append(Launch(self.fn.__name__, tuple(grid), {
            k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")},
            kwargs.get("num_warps", 4), kwargs.get("num_stages", 3), compiled.metadata.shared,
            compiled.asm["ptx"], compiled.asm["cubin"], values, compiled.asm.get("ttgir", "")))
        return compiled

    def empty_mm(a, b):
        import torch
        launches.append(Launch("cublas_mm", (), {"M": a.shape[0], "K": a.shape[1],
                                                 "N": b.shape[1]}, 0, 0, 0, "", b""))
        return torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32)

    JITFunction.run = record
    kernels._mm = empty_mm
    kernels._programs_wanted = lambda device: kernels.PROGRAMS_PER_SM * H200.sms
    try:
        with compile_only_driver(arch):
            yield
    finally:
        JITFunction.run, kernels._mm, kernels._programs_wanted = run, mm, wanted
        for fn in _jit_functions():
            fn.device_caches.clear()  # the next arch builds its own


def _jit_functions():
    from triton.runtime.jit import JITFunction
    for module in ("directclr.kernels.infonce", "directclr.kernels.covariance"):
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, JITFunction):
                yield value


def _inputs(n: int, dim: int, dtype: str):
    import torch
    width = max(dim, 2048)  # ResNet-50's representation; z[:, :dim] is what the op reads
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, width, generator=gen, dtype=getattr(torch, dtype))
            for _ in range(2)]


def capture_loss(variant: str, dim: int, dtype: str, precision: str, arch: int, n: int):
    """The launches of one forward + backward of the loss, compiled for `arch`."""
    import torch
    fused = importlib.import_module("directclr.fused")
    z1, z2 = _inputs(n, dim, dtype)
    launches: list[Launch] = []
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        with compile_only(arch, launches):
            _, row_lse, col_lse, kept = fused.forward(z1, z2, dim, 0.1, variant, "triton",
                                                      None, 0)
            fused.backward(torch.ones(n), z1, z2, row_lse, col_lse, kept, dim, 0.1, variant,
                           "triton", None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return launches


def capture_covariance(arch: int, n: int, width: int = 2048):
    import torch

    from directclr.kernels.covariance import centered_gram
    x = torch.randn(n, width, dtype=torch.bfloat16)
    launches: list[Launch] = []
    with compile_only(arch, launches):
        centered_gram(x, x[:1].float().mean(0))
    return launches


def interpreter_counts(cases, n: int = COUNT_N) -> dict:
    """tl.dot multiply-adds and exp2s of one forward + backward per case, in a subprocess
    under TRITON_INTERPRET=1 with the GPU tile configurations."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "directclr.gpu_report", "--interpreter-counts",
                           "--n", str(n), "--cases", *[f"{v}:{d}:{t}" for v, d, t in cases]],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def count_in_interpreter(cases, n: int) -> dict:
    """The counts of interpreter_counts, in the process it starts (TRITON_INTERPRET=1): patches
    the interpreter and the kernels' configurations for the rest of the process."""
    import torch
    from triton.runtime import interpreter
    kernels = importlib.import_module("directclr.kernels.infonce")
    fused = importlib.import_module("directclr.fused")
    counts = {"macs": 0, "exp2": 0, "cublas_macs": 0}
    dot, exp2, mm = (interpreter.InterpreterBuilder.create_dot,
                     interpreter.InterpreterBuilder.create_exp2, kernels._mm)

    def counting_dot(self, a, b, d, *rest):
        counts["macs"] += a.data.shape[0] * a.data.shape[1] * b.data.shape[1]
        return dot(self, a, b, d, *rest)

    def counting_exp2(self, arg):
        counts["exp2"] += arg.data.size
        return exp2(self, arg)

    def counting_mm(a, b):
        counts["cublas_macs"] += a.shape[0] * a.shape[1] * b.shape[1]
        return mm(a, b)

    interpreter.InterpreterBuilder.create_dot = counting_dot
    interpreter.InterpreterBuilder.create_exp2 = counting_exp2
    kernels._mm = counting_mm
    kernels.configs = lambda dtype, interpret=False: kernels.CONFIGS["hopper"][
        kernels.operand_kind(dtype)]
    out = {}
    for variant, dim, dtype in cases:
        counts.update(macs=0, exp2=0, cublas_macs=0)
        z1, z2 = (z[:, :max(dim, 16) * 2].contiguous() for z in _inputs(n, dim, dtype))
        _, row_lse, col_lse, kept = fused.forward(z1, z2, dim, 0.1, variant, "triton", None, 0)
        fused.backward(torch.ones(n), z1, z2, row_lse, col_lse, kept, dim, 0.1, variant, "triton",
                       None)
        rows = n if variant == "cross" else 2 * n
        unit = rows * rows * dim  # multiply-adds of one product over the logits
        out[f"{variant}:{dim}:{dtype}"] = {
            "gemm_equivalents": (counts["macs"] + counts["cublas_macs"]) / unit,
            "kernel_gemm_equivalents": counts["macs"] / unit,
            "exp2_per_logit": counts["exp2"] / (rows * rows), "n": n}
    return out
