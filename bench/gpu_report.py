"""Static GPU report: what the Triton kernels will cost on an H200, measured on any CPU machine.

    python bench/gpu_report.py                  # every case, table, rows -> bench/results/
    python bench/gpu_report.py --out rows.jsonl --cases cross:360:bfloat16

For every case (variant x subvector width x dtype) it runs the real op, forward + backward, on
CPU tensors of N = 65,536 rows with Triton's driver replaced by one that compiles for sm_90a or
sm_80 and launches nothing. So every kernel is the specialization the JIT builds for those real
arguments (dtypes, 16-byte alignment and divisibility of each pointer and integer, constexprs),
with the grid the host code computes. For each launch:

* ptxas -v on the PTX: registers, spill bytes, stack; shared memory from Triton's metadata;
* cuobjdump -sass, read as a census: the loops (backward branches), the tensor instructions
  (HGMMA/HMMA shapes) and how many of them wait for the previous one (serialized), the global
  loads by width (LDGSTS = cp.async, UTMALDG = TMA, LDG.E.128 = 16-byte vector), the issued
  instructions of the tile loop per logit (all warps, 4 schedulers per SM) beside the tensor
  clocks per logit (2048 bf16 / 1024 tf32 multiply-adds per clock per SM);
* the multiply-adds the hardware issues: HGMMA shapes x warpgroups x trips, per launch.

Then, in a subprocess under TRITON_INTERPRET=1 with the GPU tile configurations, it counts the
``tl.dot`` multiply-adds and ``exp2``s of one forward + backward at N = 512 (plus the cuBLAS
products of the wide-subvector path), in GEMM-equivalents (1 = 2 R C dim FLOPs, R x C logits).

The H200 time estimate (``--n``, default 65,536, bf16) sums, per launch, the largest of its
tensor time (SASS multiply-adds at TRITON_TENSOR_EFFICIENCY of the bf16 peak), its issue time,
its exp2 time and its compulsory HBM traffic; cuBLAS products and O(N dim) host-side tensor ops
add their own. The eager reference is the same model applied to its aten ops, traced on meta
tensors: matrix products at CUBLAS_EFFICIENCY of the peak, every other op reading its inputs
and writing its outputs once through HBM. Assumptions, not measurements: bench/gpu_check.sh
measures what a lent GPU can.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# H200 (sm_90): the work model of DESIGN.md section 7.
SMS = 132
CLOCK_HZ = 1.83e9
TENSOR_MACS_PER_CLOCK = {"bf16": 2048, "fp16": 2048, "tf32": 1024, "fp32": 128}  # per SM
ISSUE_PER_CLOCK = 4  # warp instructions per SM (4 schedulers)
EXP2_PER_CLOCK = 16  # MUFU per SM
SMEM_BYTES_PER_CLOCK = 128  # per SM
HBM_BYTES_PER_S = 4.8e12
CUBLAS_EFFICIENCY = 0.78  # ~770 of 989 dense bf16 TFLOP/s, large GEMMs
TRITON_TENSOR_EFFICIENCY = 0.65  # no warp specialization: below cuBLAS
LAUNCH_S = 4e-6
REPORT_N = 65536
COUNT_N = 256  # interpreter counts: every tile full (multiples of 128), as at large N

CASES = [(variant, dim, dtype) for variant in ("cross", "ntxent") for dim in (128, 360, 2048)
         for dtype in ("bfloat16", "float32")]
# The widest fused backward of each operand size (the next dims take the G panels).
CASES += [("cross", 256, "bfloat16"), ("cross", 128, "float16")]
ARCHS = (90, 80)
TENSOR_CORE_OPS = ("HGMMA", "HMMA")


# --------------------------------------------------------------------------- capture
@dataclass
class Launch:
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
def compile_only(arch: int, launches: list):
    """Every Triton launch inside compiles for `arch` (the JIT's own specialization of the real
    arguments) and is recorded instead of run; cuBLAS products return empty results."""
    from triton.runtime import driver
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

    previous = driver._active  # None until something asked for the real driver
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = record
    kernels._mm = empty_mm
    kernels._programs_wanted = lambda device: kernels.PROGRAMS_PER_SM * SMS
    try:
        yield
    finally:
        JITFunction.run, kernels._mm, kernels._programs_wanted = run, mm, wanted
        driver._active = previous
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
    op = importlib.import_module("directclr.infonce")
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    z1, z2 = _inputs(n, dim, dtype)
    launches: list[Launch] = []
    with compile_only(arch, launches):
        _, row_lse, col_lse = op._forward(z1, z2, dim, 0.1, variant, "triton", None)
        op._backward(torch.ones(n), z1, z2, row_lse, col_lse, dim, 0.1, variant, "triton", None)
    torch.backends.cuda.matmul.allow_tf32 = False
    return launches


def capture_covariance(arch: int, n: int, width: int = 2048):
    import torch
    from directclr.kernels.covariance import centered_gram
    x = torch.randn(n, width, dtype=torch.bfloat16)
    launches: list[Launch] = []
    with compile_only(arch, launches):
        centered_gram(x, x[:1].float().mean(0))
    return launches


# --------------------------------------------------------------------------- binary tools
def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas_info(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and stack frame, as ptxas -v prints them."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([_tool("ptxas"), f"-arch=sm_{arch}{'a' if arch == 90 else ''}",
                               "-v", str(src), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ptxas -arch=sm_{arch} failed: {proc.stderr[-2000:]}")
    text = proc.stderr + proc.stdout
    number = lambda pattern: int(re.search(pattern, text).group(1))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"),
            "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads"),
            "stack_bytes": number(r"(\d+) bytes stack frame"),
            "serialized_wgmma_note": "wgmma.mma_async instructions are serialized" in text}


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
TENSOR_SHAPE = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")
HMMA_SHAPE = re.compile(r"HMMA\.(16816|1688|884)")
HMMA_MNK = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}


def sass(cubin: bytes) -> list[tuple[int, str, str, bool]]:
    """(address, opcode, operands, predicated) of every instruction."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    return parse_sass(text)


def parse_sass(text: str) -> list[tuple[int, str, str, bool]]:
    return [(int(m.group(1), 16), m.group(3), m.group(4), bool(m.group(2)))
            for m in SASS_LINE.finditer(text)]


def _loops(code):
    """(first, last) instruction indices of every loop: a branch back to an earlier address."""
    index = {address: i for i, (address, *_) in enumerate(code)}
    loops = []
    for i, (address, opcode, operands, _) in enumerate(code):
        target = re.search(r"0x([0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            loops.append((index[int(target.group(1), 16)], i))
    return loops


def _tensor_work(opcode: str, operands: str, num_warps: int) -> tuple[int, int]:
    """Multiply-adds of one issued tensor instruction for the whole CTA, and the shared-memory
    bytes its operands read (wgmma: B always, A unless it comes from registers)."""
    shape = TENSOR_SHAPE.match(opcode)
    if shape:  # one wgmma per warpgroup: every warp of it issues the same instruction
        m, n, k = map(int, shape.groups())
        groups = num_warps // 4
        element = 4 if ".TF32" in opcode else 2
        a_from_smem = operands.split(",")[1].strip().startswith("gdesc")
        smem = (m * k * element if a_from_smem else 0) + k * n * element
        return m * n * k * groups, smem * groups
    shape = HMMA_SHAPE.match(opcode)
    if shape:  # mma.sync: per warp, operands already in registers
        m, n, k = HMMA_MNK[shape.group(1)]
        return m * n * k * num_warps, 0
    return 0, 0


def census(code, num_warps: int, k_steps: int) -> dict:
    """What one tile costs: the tile scope is the innermost loop holding the exp2s (one trip
    per logits tile), or the whole program where a program is one tile. A K loop inside it runs
    k_steps trips less those the pipeliner peeled (their tensor instructions sit outside it)."""
    loops = _loops(code)
    exps = [i for i, (_, op, *_) in enumerate(code) if op.startswith("MUFU.EX2")]
    holding = [(a, b) for a, b in loops if exps and all(a <= i <= b for i in exps)]
    scope = min(holding, key=lambda ab: ab[1] - ab[0]) if holding else (0, len(code) - 1)
    # The K loop holds the products: tensor instructions, or FFMAs where IEEE fp32 has none.
    products = TENSOR_CORE_OPS if any(op.startswith(TENSOR_CORE_OPS) for _, op, *_ in code) \
        else ("FFMA",)
    inner = [(a, b) for a, b in loops if scope[0] <= a and b <= scope[1] and (a, b) != scope
             and any(code[i][1].startswith(products) for i in range(a, b + 1))]
    k_loop = max(inner, key=lambda ab: ab[1] - ab[0]) if inner else None
    in_k = set(range(k_loop[0], k_loop[1] + 1)) if k_loop else set()

    def work(indices):
        macs = smem = 0
        for i in indices:
            m, b = _tensor_work(code[i][1], code[i][2], num_warps)
            macs, smem = macs + m, smem + b
        return macs, smem

    outside = [i for i in range(scope[0], scope[1] + 1) if i not in in_k]
    (out_macs, out_smem), (k_macs, k_smem) = work(outside), work(sorted(in_k))
    trips = (k_steps - out_macs // k_macs) if k_macs else (k_steps if k_loop else 0)
    weight = {i: (trips if i in in_k else 1) for i in range(scope[0], scope[1] + 1)}
    # Bodies of ifs inside the tile (a predicated branch over them, no tensor instructions):
    # edge tiles (padding, excluded or positive columns), a few per row block. Interior tiles,
    # the bulk at large N, skip them.
    index = {address: i for i, (address, *_) in enumerate(code)}
    edge_only = set()
    for i in weight:
        address, op, operands, predicated = code[i]
        target = re.search(r"0x([0-9a-f]+)", operands)
        if op.startswith("BRA") and predicated and target and int(target.group(1), 16) > address:
            body = range(i + 1, index.get(int(target.group(1), 16), i + 1))
            if all(j in weight and not code[j][1].startswith(TENSOR_CORE_OPS) for j in body):
                edge_only.update(body)
    serialized = sum(1 for i in range(len(code) - 1) if code[i][1].startswith("HGMMA")
                     and code[i + 1][1].startswith("WARPGROUP.DEPBAR")
                     and code[i + 1][2].strip().endswith("0x0"))
    loads, wide_bytes, narrow_bytes = {}, 0, 0
    for i, w in weight.items():
        op = code[i][1]
        if op.startswith(("LDG", "UTMALDG")) and not op.startswith("LDGDEPBAR"):
            loads[op] = loads.get(op, 0) + 1
            width = LOAD_BYTES.get(op.rsplit(".", 1)[-1], 4)
            if width >= 16 or op.startswith("UTMALDG"):
                wide_bytes += w * width * 32 * num_warps
            else:
                narrow_bytes += w * width * 32 * num_warps
    return {
        "tile_instructions": sum(w for i, w in weight.items() if i not in edge_only),
        "tile_instructions_all_paths": sum(weight.values()),
        "tile_macs": out_macs + k_macs * trips,
        "tile_smem_bytes": out_smem + k_smem * trips,
        "k_loop_trips": trips if k_loop else None,
        "tensor_shapes": sorted({code[i][1] for i in weight
                                 if code[i][1].startswith(TENSOR_CORE_OPS)}),
        "serialized_tensor_instructions": serialized,
        "tile_loads": loads,
        "tile_wide_load_bytes": wide_bytes,
        "tile_narrow_load_bytes": narrow_bytes,
        "tile_exp2": sum(w for i, w in weight.items()
                         if code[i][1].startswith("MUFU.EX2") and i not in edge_only),
        "tile_scope_is_loop": bool(holding),
    }


# --------------------------------------------------------------------------- per launch
# Rows and columns of the logits each kernel's tile covers, and one tile's contraction depth.
def _tile(launch: Launch) -> tuple[int, int]:
    c = launch.constexprs
    if launch.kernel == "_centered_gram_kernel":
        return c.get("BLOCK", 64), c.get("BLOCK", 64)
    return c["BLOCK_M"], c["BLOCK_N"]


def _tiles(launch: Launch) -> int:
    """(row block, column tile) pairs one launch computes."""
    a, (bm, bn) = launch.args, _tile(launch)
    cdiv = lambda x, y: -(-x // y)  # noqa: E731
    if launch.kernel == "_g_panel_kernel":
        return launch.grid[0] * launch.grid[1]
    if launch.kernel == "_centered_gram_kernel":
        width = launch.constexprs["WIDTH"]
        return cdiv(width, bm) * (cdiv(width, bm) + 1) // 2
    return cdiv(a["n_rows"], bm) * cdiv(a["n_cols"], bn)


def _tensor_kind(launch: Launch, dtype: str) -> str:
    if dtype != "float32":
        return "bf16"
    return "tf32" if launch.constexprs.get("PRECISION") == "tf32" else "fp32"


def analyze(launch: Launch, arch: int, dtype: str) -> dict:
    info = ptxas_info(launch.ptx, arch)
    c = launch.constexprs
    k_steps = -(-c["DIM"] // c["BLOCK_K"]) if "BLOCK_K" in c else 0
    counted = census(sass(launch.cubin), launch.num_warps, k_steps)
    bm, bn = _tile(launch)
    logits = bm * bn
    kind = _tensor_kind(launch, dtype)
    per_tile = launch.kernel != "_centered_gram_kernel"  # its loop runs over rows, not tiles
    issue = counted["tile_instructions"] * launch.num_warps / ISSUE_PER_CLOCK / logits
    tensor = counted["tile_macs"] / TENSOR_MACS_PER_CLOCK[kind] / logits
    smem = counted["tile_smem_bytes"] / SMEM_BYTES_PER_CLOCK / logits
    return {
        "kernel": launch.kernel, "grid": list(launch.grid),
        "config": {k: v for k, v in c.items() if k.startswith(("BLOCK", "D_"))},
        "flags": {k: v for k, v in c.items()
                  if k in ("WITH_COLS", "HAS_EXCL", "FIXED_SHIFT", "PRECISION", "DIM", "WIDTH",
                           "VEC")},
        "num_warps": launch.num_warps, "num_stages": launch.num_stages,
        "shared_bytes": launch.shared, **info,
        "wgmma": "wgmma.mma_async" in launch.ptx, "tensor_kind": kind,
        "tensor_shapes": counted["tensor_shapes"],
        "serialized_tensor_instructions": counted["serialized_tensor_instructions"],
        "tile_loads": counted["tile_loads"],
        # Every operand byte a tile needs (its column tile; the row tile too where a K loop
        # streams it) can arrive in 16-byte loads; narrow ones carry per-row/column vectors.
        "operand_loads_16B": counted["tile_wide_load_bytes"] >= _operand_bytes(launch, dtype),
        "narrow_load_bytes_per_logit": counted["tile_narrow_load_bytes"] / logits,
        "tile_macs": counted["tile_macs"], "tile_instructions": counted["tile_instructions"],
        "k_loop_trips": counted["k_loop_trips"],
        "issue_clocks_per_logit": issue if per_tile else None,
        "tensor_clocks_per_logit": tensor if per_tile else None,
        "smem_clocks_per_logit": smem if per_tile else None,
        "issue_over_tensor": issue / tensor if per_tile and tensor else None,
        "issue_over_tensor_edge_tiles": (counted["tile_instructions_all_paths"] *
                                         launch.num_warps / ISSUE_PER_CLOCK / logits / tensor)
        if per_tile and tensor else None,
        "exp2_per_logit": counted["tile_exp2"] * launch.num_warps * 32 / logits
        if per_tile else None,
        "tiles": _tiles(launch),
        "sass_macs": counted["tile_macs"] * _tiles(launch) if per_tile else 0,
    }


def _operand_bytes(launch: Launch, dtype: str) -> int:
    """Bytes of z a tile needs: the column tile, and the row tile where a K loop streams it."""
    c = launch.constexprs
    element = 4 if dtype == "float32" else 2
    if launch.kernel == "_centered_gram_kernel":
        return 2 * c["BLOCK_R"] * c["BLOCK"] * element  # one row step of both column blocks
    depth = c.get("D_PAD") or -(-c["DIM"] // c["BLOCK_K"]) * c["BLOCK_K"]
    streamed = c["BLOCK_N"] + (c["BLOCK_M"] if "BLOCK_K" in c else 0)
    return streamed * depth * element


# --------------------------------------------------------------------------- interpreter counts
def interpreter_counts(cases, n: int = COUNT_N) -> dict:
    """tl.dot multiply-adds and exp2s of one forward + backward per case, in a subprocess
    under TRITON_INTERPRET=1 with the GPU tile configurations."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, "--interpreter-counts", "--n", str(n),
                           "--cases", *[f"{v}:{d}:{t}" for v, d, t in cases]],
                          capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _count_in_interpreter(cases, n: int) -> dict:
    import torch
    from triton.runtime import interpreter
    kernels = importlib.import_module("directclr.kernels.infonce")
    op = importlib.import_module("directclr.infonce")
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
        _, row_lse, col_lse = op._forward(z1, z2, dim, 0.1, variant, "triton", None)
        op._backward(torch.ones(n), z1, z2, row_lse, col_lse, dim, 0.1, variant, "triton", None)
        rows = n if variant == "cross" else 2 * n
        unit = rows * rows * dim  # multiply-adds of one product over the logits
        out[f"{variant}:{dim}:{dtype}"] = {
            "gemm_equivalents": (counts["macs"] + counts["cublas_macs"]) / unit,
            "kernel_gemm_equivalents": counts["macs"] / unit,
            "exp2_per_logit": counts["exp2"] / (rows * rows), "n": n}
    return out


# --------------------------------------------------------------------------- eager model
def eager_model(variant: str, n: int, dim: int, dtype: str = "bfloat16") -> dict:
    """The reference formula's aten ops on meta tensors: matmul multiply-adds and the bytes
    every other op reads and writes (each once through HBM)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    op = importlib.import_module("directclr.infonce")
    totals = {"macs": 0, "bytes": 0, "ops": 0}

    def nbytes(x):
        return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__
            if name.startswith(("mm", "addmm", "bmm")):
                a, b = (x for x in args if isinstance(x, torch.Tensor) and x.dim() >= 2)
                totals["macs"] += a.shape[-2] * a.shape[-1] * b.shape[-1]
            elif not name.startswith(("view", "t.", "transpose", "expand", "detach", "slice",
                                      "as_strided", "_to_copy", "empty", "zeros_like",
                                      "ones_like", "alias", "select", "unsqueeze", "lift")):
                flat = [x for x in (*args, *(kwargs or {}).values())]
                outs = out if isinstance(out, (tuple, list)) else [out]
                moved = sum(nbytes(x) for x in (*flat, *outs))
                totals["bytes"] += moved
                totals["ops"] += 1
            return out

    z1, z2 = (torch.randn(n, max(dim, 2048), device="meta", dtype=getattr(torch, dtype),
                          requires_grad=True) for _ in range(2))
    with Trace():
        loss = op.infonce_reference(z1, z2, dim, 0.1, variant).mean()
        loss.backward()
    tensor_s = totals["macs"] / (TENSOR_MACS_PER_CLOCK["bf16"] * SMS * CLOCK_HZ *
                                 CUBLAS_EFFICIENCY)
    memory_s = totals["bytes"] / HBM_BYTES_PER_S
    return {"macs": totals["macs"], "bytes": totals["bytes"], "aten_ops": totals["ops"],
            "seconds": tensor_s + memory_s + totals["ops"] * LAUNCH_S}


# --------------------------------------------------------------------------- fused model
def fused_seconds(kernels: list[dict], n: int, dim: int, variant: str) -> dict:
    """Sum over kernels of max(tensor, issue, exp2, shared-memory, HBM) time over all their
    launches; cuBLAS products at CUBLAS_EFFICIENCY; host-side O(N dim) work as HBM traffic."""
    peak = SMS * CLOCK_HZ
    total, parts = 0.0, []
    for k in kernels:
        if k["kernel"] == "cublas_mm":
            seconds = k["macs"] / (TENSOR_MACS_PER_CLOCK["bf16"] * peak * CUBLAS_EFFICIENCY)
            parts.append({"kernel": "cublas_mm", "seconds": seconds})
            total += seconds + k["launches"] * LAUNCH_S
            continue
        bm, bn = k["config"]["BLOCK_M"], k["config"]["BLOCK_N"]
        logits = k["tiles"] * bm * bn
        tensor = k["sass_macs"] / (TENSOR_MACS_PER_CLOCK[k["tensor_kind"]] * peak *
                                   TRITON_TENSOR_EFFICIENCY)
        issue = k["issue_clocks_per_logit"] * logits / peak
        exp2 = k["exp2_per_logit"] * logits / (EXP2_PER_CLOCK * peak)
        smem = k["smem_clocks_per_logit"] * logits / peak
        # G panels: written once per buffer in bf16, read back by cuBLAS.
        hbm = (logits * 2 * 2 * (2 if k["flags"].get("WITH_COLS") else 1) / HBM_BYTES_PER_S
               if k["kernel"] == "_g_panel_kernel" else 0.0)
        seconds = max(tensor, issue, exp2, smem, hbm)
        parts.append({"kernel": k["kernel"], "seconds": seconds, "tensor_s": tensor,
                      "issue_s": issue, "exp2_s": exp2, "smem_s": smem, "hbm_s": hbm})
        total += seconds + k["launches"] * LAUNCH_S
    rows = n if variant == "cross" else 2 * n
    host_bytes = 12 * rows * dim * 4  # normalization, positives, gradient assembly (fp32)
    total += host_bytes / HBM_BYTES_PER_S
    return {"seconds": total, "launches": parts}


# --------------------------------------------------------------------------- main
def _analyzed(launches: list[Launch], arch: int, dtype: str) -> list[dict]:
    """One row per distinct compiled kernel (a panel loop launches the same one many times),
    with its launch count and the tiles of all its launches."""
    groups: dict = {}
    for launch in launches:
        key = (launch.kernel, launch.cubin, tuple(sorted(launch.constexprs.items())))
        groups.setdefault(key, []).append(launch)
    rows = []
    for (kernel, _, _), group in groups.items():
        if kernel == "cublas_mm":
            macs = sum(g.constexprs["M"] * g.constexprs["K"] * g.constexprs["N"] for g in group)
            rows.append({"kernel": kernel, "launches": len(group), "macs": macs})
            continue
        row = analyze(group[0], arch, dtype)
        row["launches"] = len(group)
        row["tiles"] = sum(_tiles(g) for g in group)
        per_tile = row["tensor_clocks_per_logit"] is not None
        row["sass_macs"] = row["tile_macs"] * row["tiles"] if per_tile else 0
        rows.append(row)
    return rows


def _case_row(item) -> dict:
    """The report row of one (arch, case, precision); runs in a worker process."""
    os.environ.pop("TRITON_INTERPRET", None)
    started = time.monotonic()
    row = _case_row_untimed(item)
    row["report_seconds"] = time.monotonic() - started
    return row


def _case_row_untimed(item) -> dict:
    arch, (variant, dim, dtype), precision, n, counts = item
    arch_name = f"sm_{arch}{'a' if arch == 90 else ''}"
    if variant == "covariance":
        return {"case": f"covariance:{dim}:{dtype}", "variant": variant, "dim": dim,
                "dtype": dtype, "precision": "ieee", "arch": arch_name, "n": n,
                "kernels": _analyzed(capture_covariance(arch, n, dim), arch, dtype)}
    kernels = _analyzed(capture_loss(variant, dim, dtype, precision, arch, n), arch, dtype)
    logits = (n if variant == "cross" else 2 * n) ** 2
    row = {"case": f"{variant}:{dim}:{dtype}", "variant": variant, "dim": dim, "dtype": dtype,
           "precision": precision if dtype == "float32" else None, "arch": arch_name, "n": n,
           "kernels": kernels, "interpreter": counts.get(f"{variant}:{dim}:{dtype}"),
           "sass_gemm_equivalents": sum(k.get("sass_macs", k.get("macs", 0))
                                        for k in kernels) / (logits * dim)}
    if arch == 90 and dtype == "bfloat16":
        fused = fused_seconds(kernels, n, dim, variant)
        eager = eager_model(variant, n, dim, dtype)
        row["estimate"] = {"fused_s": fused["seconds"], "eager_s": eager["seconds"],
                           "fused_over_eager": fused["seconds"] / eager["seconds"],
                           "fused_parts": fused["launches"], "eager": eager}
    return row


def report(cases, archs, n: int, counts: dict, workers: int) -> list[dict]:
    """Every (arch, case, precision), plus the covariance kernel, in `workers` processes."""
    items = []
    for arch in archs:
        for variant, dim, dtype in cases:
            for precision in (("tf32", "ieee") if dtype == "float32" else ("ieee",)):
                items.append((arch, (variant, dim, dtype), precision, n, counts))
        items.append((arch, ("covariance", 2048, "bfloat16"), "ieee", n, counts))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        return pool.map(_case_row, items, chunksize=1)


def print_table(rows):
    header = ("case", "arch", "prec", "kernel", "regs", "spill", "smem KB", "wgmma", "16B ld",
              "ser.", "issue/tensor", "GEMM-eq sass/interp", "exp2/logit", "est fused/eager")
    widths = (24, 6, 5, 22, 4, 5, 7, 5, 6, 4, 12, 19, 10, 15)
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for row in rows:
        interp = row.get("interpreter") or {}
        est = row.get("estimate")
        first = True
        for k in row["kernels"]:
            if k["kernel"] == "cublas_mm":
                continue
            ratio = k["issue_over_tensor"]
            work = exp2 = speed = ""
            if first and "sass_gemm_equivalents" in row:
                work = f"{row['sass_gemm_equivalents']:.2f} / " + (
                    f"{interp['gemm_equivalents']:.2f}" if interp else "-")
                exp2 = f"{interp['exp2_per_logit']:.1f}" if interp else ""
                speed = f"{est['fused_over_eager']:.2f}" if est else ""
            cells = (row["case"] if first else "", row["arch"] if first else "",
                     (row["precision"] or "") if first else "", k["kernel"], k["registers"],
                     k["spill_store_bytes"], f"{k['shared_bytes'] / 1024:.1f}", k["wgmma"],
                     k["operand_loads_16B"], k["serialized_tensor_instructions"],
                     f"{ratio:.2f}" if ratio is not None else "-", work, exp2, speed)
            print(" ".join(f"{str(c):>{w}}" for c, w in zip(cells, widths)))
            first = False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", help="variant:dim:dtype (default: all)")
    parser.add_argument("--archs", nargs="*", type=int, default=list(ARCHS))
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSONL rows (default: bench/results/gpu_static.jsonl, appended)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--interpreter-counts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = [(v, int(d), t) for v, d, t in (c.split(":") for c in args.cases)] if args.cases \
        else CASES
    if args.interpreter_counts:
        print(json.dumps(_count_in_interpreter(cases, args.n or COUNT_N)))
        return
    os.environ.pop("TRITON_INTERPRET", None)
    counts = interpreter_counts(cases)
    rows = report(cases, args.archs, args.n or REPORT_N, counts, args.workers)
    import common
    rows = common.stamp(rows, "cpu")
    out = args.out or common.RESULTS / "gpu_static.jsonl"
    with open(out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print_table(rows)
    print(f"rows -> {out}")


if __name__ == "__main__":
    main()
