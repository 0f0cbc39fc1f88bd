"""The H200 cost model: per compiled kernel, the clocks per logit of its tensor, issue, exp2
and shared-memory work (from the SASS census); per case, the estimated seconds of the fused op
and of the eager reference formula. Estimates from counts, not measurements."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .census import ptxas_info, sass, tile_census

if TYPE_CHECKING:
    from .capture import Launch

# The H200 (sm_90) the estimates model: 132 SMs at a 1.83 GHz boost clock, 4.8 TB/s of HBM3e.
# What one SM does per clock: dense tensor-core multiply-adds by operand type (2048 bf16 x 132
# x 1.83 GHz = the 989 TFLOP/s dense bf16 peak; fp32 without tensor cores is FFMA), 4 warp
# instructions issued (one per scheduler), 16 exp2 on the special-function units, 128 bytes
# read from shared memory.
SMS = 132
CLOCK_HZ = 1.83e9
TENSOR_MACS_PER_CLOCK = {"bf16": 2048, "fp16": 2048, "tf32": 1024, "fp32": 128}  # per SM
ISSUE_PER_CLOCK = 4  # warp instructions per SM (4 schedulers)
EXP2_PER_CLOCK = 16  # MUFU per SM
SMEM_BYTES_PER_CLOCK = 128  # per SM
HBM_BYTES_PER_S = 4.8e12
# Fractions of the tensor peak reached: assumptions, not measurements.
CUBLAS_EFFICIENCY = 0.78  # ~770 of 989 dense bf16 TFLOP/s, large GEMMs
TRITON_TENSOR_EFFICIENCY = 0.65  # no warp specialization: below cuBLAS
LAUNCH_S = 4e-6  # fixed cost of one kernel launch


# Rows and columns of the logits (or of the Gram matrix) one program's tile covers.
def _tile(launch: Launch) -> tuple[int, int]:
    c = launch.constexprs
    if launch.kernel == "_centered_gram_kernel":
        return c.get("BLOCK", 64), c.get("BLOCK", 64)
    return c["BLOCK_M"], c["BLOCK_N"]


def tiles(launch: Launch) -> int:
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
    """The row of one compiled kernel: what ptxas and its SASS say, and its clocks per logit."""
    info = ptxas_info(launch.ptx, arch)
    c = launch.constexprs
    k_steps = -(-c["DIM"] // c["BLOCK_K"]) if "BLOCK_K" in c else 0
    counted = tile_census(sass(launch.cubin), launch.num_warps, k_steps)
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
        "tiles": tiles(launch),
        "sass_macs": counted["tile_macs"] * tiles(launch) if per_tile else 0,
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
