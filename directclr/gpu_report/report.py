"""One report row per (arch, case, precision): the case's launches captured, every compiled
kernel read and costed, the interpreter's counts beside them and, on sm_90a in bf16, the
estimate against eager PyTorch. The rows are built in worker processes (spawned: they import
this module, which is why it is not __main__)."""
from __future__ import annotations

import multiprocessing
import os
import time
from typing import TYPE_CHECKING

from .capture import capture_covariance, capture_loss
from .cost import analyze, eager_model, fused_seconds, tiles

if TYPE_CHECKING:
    from .capture import Launch

REPORT_N = 65536
CASES = [(variant, dim, dtype) for variant in ("cross", "ntxent") for dim in (128, 360, 2048)
         for dtype in ("bfloat16", "float32")]
# The widest fused backward of each operand size (the next dims take the G panels).
CASES += [("cross", 256, "bfloat16"), ("cross", 128, "float16")]
ARCHS = (90, 80)


def analyzed(launches: list[Launch], arch: int, dtype: str) -> list[dict]:
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
        row["tiles"] = sum(tiles(g) for g in group)
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
                "kernels": analyzed(capture_covariance(arch, n, dim), arch, dtype)}
    kernels = analyzed(capture_loss(variant, dim, dtype, precision, arch, n), arch, dtype)
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
