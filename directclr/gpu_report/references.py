"""Reference kernels with published Hopper timings, compiled and costed like ours, so that the
cost model's constants are fitted to measurements rather than assumed.

The published timings are of the original kernels (the Triton tutorials' matmul and fused
attention, Liger-Kernel's layer-norm and rms-norm forwards). The kernels below are our own short
re-implementations that follow the originals' structure: the same tiles, warps and stages, the
same loop (what is loaded, what the loop computes, what is stored), one program per row where the
original has one. Their SASS is therefore close to, not the same as, the originals'; where the
original autotunes, the configuration we compile is named with the reference and is a guess.

Each reference is compiled for sm_90a by the same compile-only driver as ours (small stand-in
tensors: only their dtypes and 16-byte alignment reach the compiler; sizes travel as integers)
and read by the same census (`cost.census`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import triton
import triton.language as tl

from .capture import compile_launch
from .cost import CALIBRATED, GPUS, Calibration, census, cublas_seconds, slot_tiles, triton_seconds


# --------------------------------------------------------------------------- device code
@triton.jit
def _tiled_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """C = A B, fp16 in, fp32 accumulation, fp16 out: one C tile per program, programs ordered in
    groups of GROUP_M row tiles so that a wave reuses A and B tiles from L2 (tutorial 03)."""
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(M, BLOCK_M)
    col_tiles = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * col_tiles
    first_row_tile = (pid // per_group) * GROUP_M
    group_rows = min(row_tiles - first_row_tile, GROUP_M)
    row_tile = first_row_tile + (pid % per_group) % group_rows
    col_tile = (pid % per_group) // group_rows
    offs_m = (row_tile * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (col_tile * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_tile = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        left = K - k0 * BLOCK_K
        a = tl.load(a_tile, mask=offs_k[None, :] < left, other=0.0)
        b = tl.load(b_tile, mask=offs_k[:, None] < left, other=0.0)
        acc = tl.dot(a, b, acc)
        a_tile += BLOCK_K
        b_tile += BLOCK_K * stride_bk
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(tl.float16),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _layer_norm_forward_kernel(y_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, row_stride,
                               n_cols, eps, BLOCK: tl.constexpr):
    """One row per program, held whole in registers: mean, variance, y = (x - mean) rstd w + b,
    and the row's mean and rstd stored for the backward (Liger's layer_norm forward)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(x_ptr + row * row_stride + cols, mask=inside, other=0.0)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    b = tl.load(b_ptr + cols, mask=inside, other=0.0)
    mean = tl.sum(x, axis=0) / n_cols
    centered = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * row_stride + cols, centered * rstd * w + b, mask=inside)


@triton.jit
def _rms_norm_forward_kernel(y_ptr, x_ptr, w_ptr, rstd_ptr, row_stride, n_cols, eps,
                             BLOCK: tl.constexpr):
    """One row per program: rstd = 1 / sqrt(mean(x^2) + eps) in fp32, y = (x rstd in x's dtype)
    times the fp32 weight, stored in x's dtype (Liger's rms_norm forward, "llama" casting)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(x_ptr + row * row_stride + cols, mask=inside, other=0.0)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    wide = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(wide * wide, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    normed = (wide * rstd).to(x.dtype)
    tl.store(y_ptr + row * row_stride + cols, (normed * w).to(x.dtype), mask=inside)


@triton.jit
def _attention_forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, n_ctx, qk_scale,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    """Non-causal flash attention forward, one (query block, batch x head) per program: Q's
    block stays on chip, K and V blocks stream through S = Q K^T, an online base-2 softmax (row
    max, exp2, row sum) and O += P V (tutorial 06's forward; contiguous (B, H, N, D) tensors)."""
    start = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64) * n_ctx * HEAD_DIM
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + head + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    k_block = k_ptr + head + offs_n[None, :] * HEAD_DIM + offs_d[:, None]  # (D, BLOCK_N)
    v_block = v_ptr + head + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    row_max = tl.zeros((BLOCK_M,), dtype=tl.float32) - float("inf")
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32) + 1.0
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for _ in range(0, n_ctx, BLOCK_N):
        scores = tl.dot(q, tl.load(k_block))
        new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
        p = tl.math.exp2(scores * qk_scale - new_max[:, None])
        alpha = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(tl.float16), tl.load(v_block), acc * alpha[:, None])
        row_max = new_max
        k_block += BLOCK_N * HEAD_DIM
        v_block += BLOCK_N * HEAD_DIM
    tl.store(lse_ptr + tl.program_id(1) * n_ctx + offs_m, row_max + tl.math.log2(row_sum))
    tl.store(out_ptr + head + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (acc / row_sum[:, None]).to(tl.float16))


# --------------------------------------------------------------------------- the references
@dataclass(frozen=True)
class Reference:
    """One published timing: what was timed (the original), the shape, the GPU, the time and
    where it was published; `kernel` names our re-implementation and `build` its launch."""

    name: str
    shape: str
    gpu: str
    measured_s: float
    source: str
    kernel: str  # a key of BUILDS, or "cublas"
    sizes: dict = field(default_factory=dict)


def _tflops_to_s(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e12)


def _attention(batch: int, heads: int, n_ctx: int, tflops: float, source: str) -> Reference:
    flops = 4.0 * batch * heads * n_ctx * n_ctx * 128  # two products, non-causal forward
    return Reference("Triton fused attention fwd (tutorial 06)",
                     f"B={batch} H={heads} N={n_ctx} D=128 fp16", "H100 SXM 80GB HBM3",
                     _tflops_to_s(flops, tflops), source, "attention",
                     {"batch": batch, "heads": heads, "n_ctx": n_ctx})


def _gemm(size: int, tflops: float, source: str, dtype: str = "bf16") -> Reference:
    return Reference("cuBLAS GEMM (torch.matmul)", f"{size}^3 {dtype}", "H100 SXM 80GB HBM3",
                     _tflops_to_s(2.0 * size**3, tflops), source, "cublas", {"size": size})


LIGER_SXM = ("Liger-Kernel benchmark/data/all_benchmark_data.csv, v0.6.0, 2025-07-17, "
             "'NVIDIA H100 80GB HBM3', median of triton.testing.do_bench")
LIGER_NVL = ("Liger-Kernel benchmark/data/h100_all_benchmark_data.csv (commit 3534d44), v0.5.2, "
             "2025-01-25, 'NVIDIA H100 NVL', median of triton.testing.do_bench")
TUTORIAL_MATMUL = ("github triton-lang/triton issue 3672, 2024-04-16: tutorial 03 on H100, "
                   "fp16 (Triton 524.74, cuBLAS 584.69 TFLOPS at 3072^3)")
TORCH_GEMM = ("github zzc0721/torch-performance-test-data issue 79, 2025-10-18: torch 2.7.0 + "
              "cu128, 'NVIDIA H100 80GB HBM3', bf16 torch.matmul")
ATTENTION_PR = ("github facebookexperimental/triton PR 205, 2025-07-07: tutorial 06, "
                "warp_specialize=False, fp16, non-causal (a Hopper GPU; its H100 kind unstated)")
ATTENTION_BENCH = ("github meta-pytorch/tritonbench issue 141, 2025-01-23: "
                   "triton_tutorial_flash_v2 on a 'devgpu H100', fp16")

REFERENCES = (
    _gemm(4096, 788.72, TORCH_GEMM),
    _gemm(8192, 797.51, TORCH_GEMM),
    _gemm(10240, 719.72, TORCH_GEMM),
    _gemm(3072, 584.685, TUTORIAL_MATMUL, "fp16"),
    Reference("Triton matmul (tutorial 03)", "3072^3 fp16", "H100 SXM 80GB HBM3",
              _tflops_to_s(2.0 * 3072**3, 524.74), TUTORIAL_MATMUL, "matmul", {"size": 3072}),
    *(_attention(4, 32, n, tflops, ATTENTION_PR) for n, tflops in (
        (1024, 406.800371), (2048, 427.772150), (4096, 459.605666), (8192, 464.417289),
        (16384, 486.990956))),
    _attention(8, 16, 8192, 469.105, ATTENTION_BENCH),
    Reference("Liger layer_norm fwd", "4096 x 16384 fp32", "H100 SXM 80GB HBM3",
              0.18476800620555878e-3, LIGER_SXM, "layer_norm", {"rows": 4096, "cols": 16384}),
    Reference("Liger layer_norm fwd", "4096 x 4096 fp32", "H100 SXM 80GB HBM3",
              0.05104000121355057e-3, LIGER_SXM, "layer_norm", {"rows": 4096, "cols": 4096}),
    Reference("Liger layer_norm fwd", "4096 x 16384 fp32", "H100 NVL 94GB",
              0.18240000307559967e-3, LIGER_NVL, "layer_norm", {"rows": 4096, "cols": 16384}),
    Reference("Liger layer_norm fwd", "4096 x 4096 fp32", "H100 NVL 94GB",
              0.04553600028157234e-3, LIGER_NVL, "layer_norm", {"rows": 4096, "cols": 4096}),
    Reference("Liger rms_norm fwd", "2048 x 32768 bf16", "H100 NVL 94GB",
              0.1106560006737709e-3, LIGER_NVL, "rms_norm", {"rows": 2048, "cols": 32768}),
    Reference("Liger rms_norm fwd", "2048 x 8192 bf16", "H100 NVL 94GB",
              0.03033600002527237e-3, LIGER_NVL, "rms_norm", {"rows": 2048, "cols": 8192}),
)


def _liger_warps(block: int) -> int:
    """Liger's warps for a row of `block` (a power of two) elements."""
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def _stand_in(dtype: str):
    """A small 16-byte-aligned tensor: what the JIT specializes on is its dtype and alignment."""
    import torch
    return torch.empty(64, dtype=getattr(torch, dtype))


def build(ref: Reference, arch: int = 90) -> dict:
    """Our re-implementation of `ref` compiled for `arch`: its launch and what the model needs
    beyond the census (tile, K steps, tile count, tiles per program, compulsory HBM bytes)."""
    s = ref.sizes
    if ref.kernel == "matmul":
        m = s["size"]
        block_m, block_n, block_k = 128, 256, 64  # the tutorial's first CUDA configuration
        grid = (triton.cdiv(m, block_m) * triton.cdiv(m, block_n),)
        launch = compile_launch(_tiled_matmul_kernel, grid, (
            _stand_in("float16"), _stand_in("float16"), _stand_in("float16"), m, m, m, m, m, m),
            arch, 8, 3, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8)
        return {"launch": launch, "tensor_kind": "fp16", "tile": (block_m, block_n),
                "k_steps": triton.cdiv(m, block_k), "tiles": grid[0], "tiles_per_program": 1,
                "hbm_bytes": 3 * m * m * 2}
    if ref.kernel == "attention":
        block = 128  # BLOCK_M = BLOCK_N = 128, 8 warps, 3 stages: a guess (autotuned original)
        n_ctx, heads = s["n_ctx"], s["batch"] * s["heads"]
        grid = (n_ctx // block, heads)
        launch = compile_launch(_attention_forward_kernel, grid, (
            *(_stand_in("float16") for _ in range(4)), _stand_in("float32"), n_ctx, 0.125),
            arch, 8, 3, HEAD_DIM=128, BLOCK_M=block, BLOCK_N=block)
        trips = n_ctx // block
        return {"launch": launch, "tensor_kind": "fp16", "tile": (block, block), "k_steps": 0,
                "tiles": grid[0] * heads * trips, "tiles_per_program": trips,
                "hbm_bytes": 4 * heads * n_ctx * 128 * 2 + heads * n_ctx * 4}
    rows, cols = s["rows"], s["cols"]
    block = triton.next_power_of_2(cols)
    if ref.kernel == "layer_norm":
        f32 = [_stand_in("float32") for _ in range(6)]
        launch = compile_launch(_layer_norm_forward_kernel, (rows,), (*f32, cols, cols, 1e-6),
                                arch, _liger_warps(block), 3, BLOCK=block)
        moved = 2 * rows * cols * 4 + 2 * cols * 4 + 2 * rows * 4
    else:
        launch = compile_launch(_rms_norm_forward_kernel, (rows,), (
            _stand_in("bfloat16"), _stand_in("bfloat16"), _stand_in("float32"),
            _stand_in("float32"), cols, cols, 1e-6), arch, _liger_warps(block), 3, BLOCK=block)
        moved = 2 * rows * cols * 2 + cols * 4 + rows * 4
    return {"launch": launch, "tensor_kind": "fp32", "tile": (1, block), "k_steps": 0,
            "tiles": rows, "tiles_per_program": 1, "hbm_bytes": moved}


def reference_row(ref: Reference, arch: int = 90) -> dict:
    """The report row of one reference: its census and geometry (costed later, in seconds,
    by `predicted`, so that a refit needs no recompilation)."""
    row = {"case": f"reference:{ref.name}:{ref.shape}:{ref.gpu}", "kind": "reference",
           "name": ref.name, "shape": ref.shape, "gpu": ref.gpu, "measured_s": ref.measured_s,
           "source": ref.source, "arch": f"sm_{arch}{'a' if arch == 90 else ''}"}
    gpu = GPUS[ref.gpu]
    if ref.kernel == "cublas":
        return {**row, "kernel": "cublas", "size": ref.sizes["size"]}
    built = build(ref, arch)
    launch = built["launch"]
    counted, _ = census(launch, arch, built["tensor_kind"], built["tile"], built["k_steps"])
    programs = built["tiles"] // built["tiles_per_program"]
    slots, waves = slot_tiles([built["tiles_per_program"]] * programs,
                              gpu.sms * counted["programs_per_sm"])
    return {**row, "kernel": launch.kernel, "grid": list(launch.grid),
            "constexprs": launch.constexprs, **counted, "launches": 1, "waves": waves,
            "slot_tiles": slots, "tiles": built["tiles"], "hbm_bytes": built["hbm_bytes"]}


def predicted(row: dict, cal: Calibration = CALIBRATED) -> dict:
    """A reference row's predicted seconds on its GPU and which bound the model says it has."""
    gpu = GPUS[row["gpu"]]
    if row["kernel"] == "cublas":
        size = row["size"]
        return cublas_seconds(size, size, size, 2, gpu, cal)
    return triton_seconds(row, gpu, cal)


def residuals(rows: list[dict], cal: Calibration = CALIBRATED) -> list[dict]:
    """predicted / measured of every reference row (below 1: the model is optimistic)."""
    out = []
    for row in rows:
        cost = predicted(row, cal)
        out.append({"case": row["case"], "name": row["name"], "shape": row["shape"],
                    "gpu": row["gpu"], "measured_s": row["measured_s"],
                    "predicted_s": cost["seconds"], "bound": cost["bound"],
                    "ratio": cost["seconds"] / row["measured_s"], "source": row["source"]})
    return out


# The values the fit tries, per constant: wide enough that its optimum lies inside; efficiencies
# are fractions of a peak, so at most 1.
FIT_GRID = {"tensor_efficiency": [round(0.70 + 0.01 * i, 2) for i in range(31)],
            "hbm_efficiency": [round(0.60 + 0.01 * i, 2) for i in range(36)],
            "cublas_efficiency": [round(0.70 + 0.01 * i, 2) for i in range(26)],
            "fill_s": [round(0.5e-6 * i, 12) for i in range(13)]}


def fit(rows: list[dict], cal: Calibration = CALIBRATED) -> Calibration:
    """The constants minimizing the sum of squared log(predicted / measured) over the
    references, one constant at a time over FIT_GRID, twice round (each constant moves few
    references: cuBLAS's the GEMMs, HBM's the norms, the tensor efficiency and the fill the
    matmul and the attention); the launch cost stays as given."""
    def loss(candidate):
        return sum(math.log(r["ratio"]) ** 2 for r in residuals(rows, candidate))

    best = cal
    for _ in range(2):
        for name, values in FIT_GRID.items():
            best = min((replace(best, **{name: v}) for v in values), key=loss)
    return best
