"""The Hopper cost model, calibrated on kernels others wrote and timed (`references`).

Per compiled kernel the SASS census gives what one tile costs an SM, in clocks: its tensor-core
work, the warp instructions it issues, its exp2s on the special-function units and the shared
memory its wgmma operands read. One launch then costs (constants: `Calibration`)

    launch_s + max(compute, memory) + waves x fill_s   (fill: operands staged by cp.async/TMA)
    compute = slot tiles x (max(tensor, smem) / tensor_efficiency + issue + exp2) / (SMs x clock)
    memory  = slot tiles / tiles x HBM bytes / (hbm_efficiency x spec bandwidth)

Programs start in order on (SMs x programs resident per SM) slots, each as soon as one frees;
slot tiles = the last to finish x the slots (the waves' quantization and uneven programs). HBM
bytes are what the launch must move at least: operands read once (again per tile where a wave's
row blocks overflow the L2), outputs and partials written once. Tensor, issue and exp2 time add:
the references without warp specialization (the tutorials' matmul and attention) fit a sum, not
a max (docs/kernels.md). cuBLAS products run at cublas_efficiency in 128 x 256 tiles, one per
SM, in waves; eager PyTorch's other ops move their inputs and outputs through HBM once.

Fitted to the references' published timings (python -m directclr.gpu_report prints the fit and
every reference's predicted / measured); estimates from counts, not measurements."""
from __future__ import annotations

import heapq
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .census import ptxas_info, sass, tile_census

if TYPE_CHECKING:
    from .capture import Launch


@dataclass(frozen=True)
class GPU:
    """What the model needs of one GPU: SMs, the clock of its dense tensor peak, HBM bandwidth
    and L2 capacity, with where the figures come from."""

    name: str
    sms: int
    clock_hz: float
    hbm_bytes_per_s: float
    l2_bytes: int
    source: str


# 989 TFLOP/s dense bf16 = 2048 multiply-adds x 2 x 132 SMs x 1.83 GHz (NVIDIA H100 SXM
# datasheet; the H200 has the same SMs and clocks). L2: 50 MB on both (GH100 whitepaper).
H200 = GPU("H200 SXM", 132, 1.83e9, 4.8e12, 50 * 2**20,
           "NVIDIA H200 datasheet: 4.8 TB/s HBM3e; SMs and clocks of the H100 SXM")
H100_SXM = GPU("H100 SXM 80GB HBM3", 132, 1.83e9, 3.35e12, 50 * 2**20,
               "NVIDIA H100 datasheet: 3.35 TB/s, 989 TFLOP/s dense bf16")
# Only memory-bound references run on it: its compute clock is taken as the SXM's.
H100_NVL = GPU("H100 NVL 94GB", 132, 1.83e9, 3.9e12, 50 * 2**20,
               "NVIDIA H100 NVL datasheet: 3.9 TB/s HBM3, 132 SMs")
GPUS = {gpu.name: gpu for gpu in (H200, H100_SXM, H100_NVL)}

# What one SM does per clock (sm_90): dense tensor-core multiply-adds by operand type (fp32
# without tensor cores is FFMA), warp instructions issued (4 schedulers), exp2 on the
# special-function units, bytes read from shared memory.
TENSOR_MACS_PER_CLOCK = {"bf16": 2048, "fp16": 2048, "tf32": 1024, "fp32": 128}
ISSUE_PER_CLOCK = 4
EXP2_PER_CLOCK = 16
SMEM_BYTES_PER_CLOCK = 128
# Occupancy limits per SM, compute capability 9.0 (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability"): 64 K registers allocated per warp in units of 256,
# 228 KiB of shared memory with 1 KiB reserved per block, 64 warps, 32 blocks.
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32
# cuBLAS's tile for large bf16/fp16 GEMMs on sm_90 (its kernels' names:
# "..._tilesize128x256x64_warpgroupsize2x1x1_..."), one block per SM; K is split when the
# output's tiles cannot fill one wave.
CUBLAS_TILE = (128, 256)


@dataclass(frozen=True)
class Calibration:
    """The model's fitted constants: tensor-core efficiency of a Triton wgmma loop once its
    issue and exp2 time are added, achievable fraction of the HBM spec, cuBLAS's fraction of the
    tensor peak within its waves, fixed cost of one launch (event to event, as the references
    were timed), and the fill of a pipelined program (prologue loads before the first product,
    epilogue after the last), per wave."""

    tensor_efficiency: float
    hbm_efficiency: float
    cublas_efficiency: float
    launch_s: float
    fill_s: float


# Fitted 2026-12-06 to the 17 references of directclr/gpu_report/references.py (least squares
# of log(predicted / measured), Triton 3.8 SASS): see docs/kernels.md for the residuals.
CALIBRATED = Calibration(tensor_efficiency=1.0, hbm_efficiency=0.8, cublas_efficiency=0.82,
                         launch_s=4e-6, fill_s=2.5e-6)


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Blocks one SM holds at once: the tightest of registers, shared memory, warps, blocks."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    return max(1, min(REGISTERS_PER_SM // (per_warp * num_warps),
                      SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_BLOCK),
                      WARPS_PER_SM // num_warps, BLOCKS_PER_SM))


def census(launch: Launch, arch: int, tensor_kind: str, tile: tuple[int, int],
           k_steps: int) -> tuple[dict, dict]:
    """What ptxas and the SASS say about one compiled kernel, and what one tile (tile[0] x
    tile[1] outputs: logits, or a row of a norm) costs one SM in clocks; and the SASS census
    itself (tile_census)."""
    info = ptxas_info(launch.ptx, arch)
    counted = tile_census(sass(launch.cubin), launch.num_warps, k_steps)
    return {
        **info, "shared_bytes": launch.shared, "num_warps": launch.num_warps,
        "num_stages": launch.num_stages, "wgmma": "wgmma.mma_async" in launch.ptx,
        "tensor_kind": tensor_kind, "tile": list(tile),
        "programs_per_sm": programs_per_sm(info["registers"], launch.num_warps, launch.shared),
        # Operands staged through shared memory (cp.async or TMA): a pipeline each program
        # fills before its first product.
        "pipelined": launch.num_stages > 1 and any(
            op.startswith(("LDGSTS", "UTMALDG")) for op in counted["tile_loads"]),
        **{k: counted[k] for k in ("tensor_shapes", "serialized_tensor_instructions",
                                   "tile_loads", "tile_macs", "tile_instructions",
                                   "k_loop_trips")},
        "tile_clocks": {
            "tensor": counted["tile_macs"] / TENSOR_MACS_PER_CLOCK[tensor_kind],
            "smem": counted["tile_smem_bytes"] / SMEM_BYTES_PER_CLOCK,
            "issue": counted["tile_instructions"] * launch.num_warps / ISSUE_PER_CLOCK,
            "exp2": counted["tile_exp2"] * launch.num_warps * 32 / EXP2_PER_CLOCK},
    }, counted


# --------------------------------------------------------------------------- our kernels
def _tile(launch: Launch) -> tuple[int, int]:
    """Rows and columns of the logits (or of the Gram matrix) one program's tile covers."""
    c = launch.constexprs
    if launch.kernel == "_centered_gram_kernel":
        return c.get("BLOCK", 64), c.get("BLOCK", 64)
    return c["BLOCK_M"], c["BLOCK_N"]


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


def tiles(launch: Launch) -> int:
    """(row block, column tile) pairs one launch computes."""
    a, (bm, bn) = launch.args, _tile(launch)
    if launch.kernel == "_g_panel_kernel":
        return launch.grid[0] * launch.grid[1]
    if launch.kernel == "_centered_gram_kernel":
        width = launch.constexprs["WIDTH"]
        return _cdiv(width, bm) * (_cdiv(width, bm) + 1) // 2
    return _cdiv(a["n_rows"], bm) * _cdiv(a["n_cols"], bn)


def _shares(items: int, per_part: int, parts: int) -> list[int]:
    """How many of `items` each of `parts` consecutive parts of `per_part` gets."""
    return [max(0, min(per_part, items - i * per_part)) for i in range(parts)]


def program_tiles(launch: Launch) -> list[int]:
    """Tiles of every program, in launch order (program_id(0) fastest): the forward's
    programs sweep a group of row blocks x a split of column tiles, the backward's one row
    block x a split, a panel program one tile."""
    a, c = launch.args, launch.constexprs
    if launch.kernel == "_forward_kernel":
        groups, splits = launch.grid[0], launch.grid[1]
        blocks = _shares(_cdiv(a["n_rows"], c["BLOCK_M"]), a["blocks_per_group"], groups)
        columns = _shares(_cdiv(a["n_cols"], c["BLOCK_N"]), a["tiles_per_split"], splits)
        return [b * t for t in columns for b in blocks]
    if launch.kernel == "_backward_kernel":
        columns = _shares(_cdiv(a["n_cols"], c["BLOCK_N"]), a["tiles_per_split"],
                          launch.grid[1])
        return [t for t in columns for _ in range(launch.grid[0])]
    return [1] * (launch.grid[0] * (launch.grid[1] if len(launch.grid) > 1 else 1))


def slot_tiles(work: list[int], width: int) -> tuple[int, int]:
    """(tile slots, waves) of programs of `work` tiles each, started in order on `width`
    slots, each as soon as one frees (the block scheduler): slots = the makespan x width."""
    if len(set(work)) <= 1:
        waves = _cdiv(len(work), width)
        return waves * width * (work[0] if work else 0), waves
    free = [0] * min(width, len(work))
    heapq.heapify(free)
    for tiles_of_program in work:
        heapq.heappush(free, heapq.heappop(free) + tiles_of_program)
    return max(free) * width, _cdiv(len(work), width)


def _tensor_kind(launch: Launch, dtype: str) -> str:
    if dtype != "float32":
        return "bf16"
    return "tf32" if launch.constexprs.get("PRECISION") == "tf32" else "fp32"


def analyze(launch: Launch, arch: int, dtype: str) -> dict:
    """The row of one of our compiled kernels: the census, and per-logit clocks for the
    report's budgets."""
    c = launch.constexprs
    k_steps = _cdiv(c["DIM"], c["BLOCK_K"]) if "BLOCK_K" in c else 0
    kind = _tensor_kind(launch, dtype)
    row, counted = census(launch, arch, kind, _tile(launch), k_steps)
    per_tile = launch.kernel != "_centered_gram_kernel"  # its loop runs over rows, not tiles
    if not per_tile:
        row["tile_clocks"] = None
    logits = row["tile"][0] * row["tile"][1]
    clocks = row["tile_clocks"] or {}
    per_logit = {k: v / logits for k, v in clocks.items()}
    return {
        "kernel": launch.kernel, "grid": list(launch.grid),
        "config": {k: v for k, v in c.items() if k.startswith(("BLOCK", "D_"))},
        "flags": {k: v for k, v in c.items()
                  if k in ("WITH_COLS", "HAS_EXCL", "FIXED_SHIFT", "PRECISION", "DIM", "WIDTH",
                           "VEC")},
        **row,
        # Every operand byte a tile needs (its column tile; the row tile too where a K loop
        # streams it) can arrive in 16-byte loads; narrow ones carry per-row/column vectors.
        "operand_loads_16B": counted["tile_wide_load_bytes"] >= _operand_bytes(launch, dtype),
        "narrow_load_bytes_per_logit": counted["tile_narrow_load_bytes"] / logits,
        "issue_clocks_per_logit": per_logit.get("issue"),
        "tensor_clocks_per_logit": per_logit.get("tensor"),
        "smem_clocks_per_logit": per_logit.get("smem"),
        "issue_over_tensor": per_logit["issue"] / per_logit["tensor"]
        if per_tile and per_logit["tensor"] else None,
        "issue_over_tensor_edge_tiles": (counted["tile_instructions_all_paths"] *
                                         launch.num_warps / ISSUE_PER_CLOCK / logits /
                                         per_logit["tensor"])
        if per_tile and per_logit["tensor"] else None,
        "exp2_per_logit": counted["tile_exp2"] * launch.num_warps * 32 / logits
        if per_tile else None,
    }


def _operand_bytes(launch: Launch, dtype: str) -> int:
    """Bytes of z a tile needs: the column tile, and the row tile where a K loop streams it."""
    c = launch.constexprs
    element = 4 if dtype == "float32" else 2
    if launch.kernel == "_centered_gram_kernel":
        return 2 * c["BLOCK_R"] * c["BLOCK"] * element  # one row step of both column blocks
    depth = c.get("D_PAD") or _cdiv(c["DIM"], c["BLOCK_K"]) * c["BLOCK_K"]
    streamed = c["BLOCK_N"] + (c["BLOCK_M"] if "BLOCK_K" in c else 0)
    return streamed * depth * element


def hbm_bytes(launch: Launch, dtype: str, resident: int, gpu: GPU) -> int:
    """The least HBM traffic of one of our launches: operands read once, per-row vectors,
    outputs and partials written once (a partial that is added to is read too). A forward with
    a K loop streams its row block again for every column tile: from HBM where the wave's row
    blocks do not fit the L2 (dim 2048: 132 x 512 KiB)."""
    a, c = launch.args, launch.constexprs
    element = 4 if dtype == "float32" else 2
    n_rows, n_cols, dim = a["n_rows"], a["n_cols"], c["DIM"]
    operands = (n_rows + n_cols) * dim * element + (n_rows + n_cols) * 4 * 2
    if launch.kernel == "_forward_kernel":
        groups, splits = launch.grid[0], launch.grid[1]
        partials = splits * n_rows * 4 * 2  # row (max, sum) per split
        if c["WITH_COLS"]:
            partials += groups * n_cols * 4 * (2 if c["FIXED_SHIFT"] else 4)
        row_block = c["BLOCK_M"] * _cdiv(dim, c["BLOCK_K"]) * c["BLOCK_K"] * element
        rereads = 0
        if gpu.sms * resident * row_block > gpu.l2_bytes:
            rereads = (tiles(launch) - _cdiv(n_rows, c["BLOCK_M"])) * row_block
        return operands + partials + rereads
    if launch.kernel == "_backward_kernel":
        return operands + n_rows * 4 * 4 + launch.grid[1] * n_rows * dim * 4
    if launch.kernel == "_g_panel_kernel":
        panel = launch.grid[0] * c["BLOCK_M"]
        written = panel * n_cols * element * (2 if c["WITH_COLS"] else 1)
        return (panel + n_cols) * dim * element + (panel + n_cols) * 4 * 6 + written
    return operands


def geometry(launch: Launch, resident: int, gpu: GPU) -> dict:
    """How one launch's programs fill the GPU: waves of (SMs x resident programs), and the
    tile slots they hold (>= its tiles: a partial last wave, and uneven programs, idle)."""
    slots, waves = slot_tiles(program_tiles(launch), gpu.sms * resident)
    return {"waves": waves, "slot_tiles": slots, "tiles": tiles(launch)}


# --------------------------------------------------------------------------- seconds
def triton_seconds(kernel: dict, gpu: GPU, cal: Calibration = CALIBRATED) -> dict:
    """One costed kernel row (census + summed geometry of its launches) in seconds, with its
    parts and which bound it: "triton" (tensor/issue/exp2) or "memory" (HBM)."""
    clocks = kernel["tile_clocks"]
    per_tile = (max(clocks["tensor"], clocks["smem"]) / cal.tensor_efficiency + clocks["issue"]
                + clocks["exp2"])
    compute = kernel["slot_tiles"] * per_tile / (gpu.sms * gpu.clock_hz)
    quantization = kernel["slot_tiles"] / kernel["tiles"]
    memory = quantization * kernel["hbm_bytes"] / (cal.hbm_efficiency * gpu.hbm_bytes_per_s)
    fill = kernel["waves"] * cal.fill_s if kernel["pipelined"] else 0.0
    launch = kernel["launches"] * cal.launch_s
    return {"kernel": kernel["kernel"], "seconds": launch + max(compute, memory) + fill,
            "bound": "triton" if compute >= memory else "memory", "compute_s": compute,
            "memory_s": memory, "fill_s": fill, "launch_s": launch,
            "tensor_s": kernel["slot_tiles"] * clocks["tensor"] / (gpu.sms * gpu.clock_hz)}


def cublas_seconds(m: int, k: int, n: int, element: int, gpu: GPU,
                   cal: Calibration = CALIBRATED) -> dict:
    """C (m x n) = A (m x k) B (k x n) by cuBLAS: its tiles in waves (K split when they
    cannot fill one), at cublas_efficiency of the peak, or its compulsory traffic."""
    tiles_out = _cdiv(m, CUBLAS_TILE[0]) * _cdiv(n, CUBLAS_TILE[1])
    quantization = 1.0 if tiles_out < gpu.sms else \
        _cdiv(tiles_out, gpu.sms) * gpu.sms / tiles_out
    macs = m * k * n
    compute = quantization * macs / (TENSOR_MACS_PER_CLOCK["bf16"] * gpu.sms * gpu.clock_hz *
                                     cal.cublas_efficiency)
    memory = (m * k + k * n + m * n) * element / (cal.hbm_efficiency * gpu.hbm_bytes_per_s)
    return {"kernel": "cublas_mm", "seconds": cal.launch_s + max(compute, memory),
            "bound": "cublas" if compute >= memory else "memory", "compute_s": compute,
            "memory_s": memory, "macs": macs}


def _added(parts: list[dict]) -> dict:
    """Launches of one kernel as one part: seconds added, bound of the largest."""
    largest = max(parts, key=lambda p: p["seconds"])
    return {"kernel": largest["kernel"], "launches": len(parts), "bound": largest["bound"],
            "seconds": sum(p["seconds"] for p in parts)}


def memory_seconds(nbytes: float, ops: int, gpu: GPU, cal: Calibration = CALIBRATED) -> dict:
    """Elementwise and reduction ops: each reads its inputs and writes its outputs once."""
    return {"kernel": "memory_ops", "bound": "memory",
            "seconds": ops * cal.launch_s + nbytes / (cal.hbm_efficiency * gpu.hbm_bytes_per_s)}


def fused_parts(kernels: list[dict], n: int, dim: int, variant: str, gpu: GPU = H200,
                cal: Calibration = CALIBRATED) -> list[dict]:
    """The fused op's parts in seconds: its Triton kernels, its cuBLAS products (G panels),
    and its host-side O(N dim) ops (normalization, positives, gradient assembly: fp32)."""
    parts = []
    for k in kernels:
        if k["kernel"] == "cublas_mm":
            parts.append(_added([cublas_seconds(m, depth, cols, 2, gpu, cal)
                                 for m, depth, cols in k["products"]]))
        elif k.get("tile_clocks"):
            parts.append(triton_seconds(k, gpu, cal))
    rows = n if variant == "cross" else 2 * n
    parts.append(memory_seconds(12 * rows * dim * 4, 0, gpu, cal))
    return parts


# --------------------------------------------------------------------------- the references
def trace_reference_formula(variant: str, n: int, dim: int, dtype: str = "bfloat16") -> dict:
    """The reference formula's aten ops, forward + backward, on meta tensors: its matrix
    products (shapes) and the bytes every other op reads and writes, and of those the bytes of
    ops that touch no N x N tensor (what a compiler fusing the N x N passes still moves)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    op = importlib.import_module("directclr.infonce")
    rows = n if variant == "cross" else 2 * n
    totals = {"products": [], "bytes": 0, "ops": 0, "small_bytes": 0, "small_ops": 0,
              "logit_element_bytes": 0}

    def nbytes(x):
        return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__
            if name.startswith(("mm", "addmm", "bmm")):
                a, b = (x for x in args if isinstance(x, torch.Tensor) and x.dim() >= 2)
                totals["products"].append((a.shape[-2], a.shape[-1], b.shape[-1]))
                if a.shape[-2] * b.shape[-1] >= rows * rows:
                    totals["logit_element_bytes"] = out.element_size()
            elif not name.startswith(("view", "t.", "transpose", "expand", "detach", "slice",
                                      "as_strided", "_to_copy", "empty", "zeros_like",
                                      "ones_like", "alias", "select", "unsqueeze", "lift")):
                tensors = [x for x in (*args, *(kwargs or {}).values(),
                                       *(out if isinstance(out, (tuple, list)) else [out]))
                           if isinstance(x, torch.Tensor)]
                moved = sum(nbytes(x) for x in tensors)
                totals["bytes"] += moved
                totals["ops"] += 1
                if max((x.numel() for x in tensors), default=0) < rows * rows:
                    totals["small_bytes"] += moved
                    totals["small_ops"] += 1
            return out

    z1, z2 = (torch.randn(n, max(dim, 2048), device="meta", dtype=getattr(torch, dtype),
                          requires_grad=True) for _ in range(2))
    with Trace():
        loss = op.infonce_reference(z1, z2, dim, 0.1, variant).mean()
        loss.backward()
    totals["rows"] = rows
    return totals


# One fused pass per direction over the N x N logits, as a compiler's fusion of the formula:
# the forward reads S (written by its product) for both softmaxes' LSEs; the backward reads S
# and writes G for its two products.
COMPILED_LOGIT_PASSES = 4  # S written, S read, S read, G written
COMPILED_LOGIT_KERNELS = 2


def reference_parts(traced: dict, compiled: bool, gpu: GPU = H200,
                    cal: Calibration = CALIBRATED) -> list[dict]:
    """Eager PyTorch (every aten op through HBM once) or a torch.compile-like fusion of it
    (products by cuBLAS, the N x N work in COMPILED_LOGIT_PASSES passes), in seconds."""
    parts = [_added([cublas_seconds(m, k, n, 2, gpu, cal)
                     for m, k, n in traced["products"]])]
    if compiled:
        logit_bytes = COMPILED_LOGIT_PASSES * traced["rows"] ** 2 * \
            traced["logit_element_bytes"]
        parts.append(memory_seconds(traced["small_bytes"] + logit_bytes,
                                    traced["small_ops"] + COMPILED_LOGIT_KERNELS, gpu, cal))
    else:
        parts.append(memory_seconds(traced["bytes"], traced["ops"], gpu, cal))
    return parts
