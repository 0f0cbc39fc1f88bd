"""One report row per (arch, case, precision): the case's launches captured, every compiled
kernel read and costed, the interpreter's counts beside them and, on sm_90a in bf16, the H200
estimates at ESTIMATE_NS for the fused op, eager PyTorch and a torch.compile-like fusion; one row
per reference kernel (`references`), whose predicted / measured times set the estimates' bands.
The rows are built in worker processes (spawned: they import this module, which is why it is
not __main__)."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from typing import TYPE_CHECKING

from .capture import capture_covariance, capture_loss
from .cost import (
    CALIBRATED,
    H200,
    analyze,
    fused_parts,
    geometry,
    hbm_bytes,
    reference_parts,
    trace_reference_formula,
)
from .references import REFERENCES, reference_row, residuals

if TYPE_CHECKING:
    from .capture import Launch

REPORT_N = 65536
# Small N: launch costs and partial waves; 65,536: the regime the kernels were built for.
ESTIMATE_NS = (4096, 16384, 65536)
CASES = [(variant, dim, dtype) for variant in ("cross", "ntxent") for dim in (128, 360, 2048)
         for dtype in ("bfloat16", "float32")]
# The widest fused backward of each operand size (the next dims take the G panels).
CASES += [("cross", 256, "bfloat16"), ("cross", 128, "float16")]
ARCHS = (90, 80)


def analyzed(launches: list[Launch], arch: int, dtype: str, census_cache: dict) -> list[dict]:
    """One row per distinct compiled kernel (a panel loop launches the same one many times),
    with its launch count and, summed over its launches, its tiles, waves, tile slots and HBM
    bytes. census_cache holds the census of kernels already read (by their cubin)."""
    groups: dict = {}
    for launch in launches:
        key = (launch.kernel, launch.cubin, tuple(sorted(launch.constexprs.items())))
        groups.setdefault(key, []).append(launch)
    rows = []
    for (kernel, cubin, _), group in groups.items():
        if kernel == "cublas_mm":
            products = [[g.constexprs[k] for k in ("M", "K", "N")] for g in group]
            rows.append({"kernel": kernel, "launches": len(group), "products": products,
                         "macs": sum(m * k * n for m, k, n in products)})
            continue
        key = (kernel, hashlib.sha1(cubin).hexdigest())
        if key not in census_cache:
            census_cache[key] = analyze(group[0], arch, dtype)
        row = dict(census_cache[key], launches=len(group))
        row.update(tiles=0, waves=0, slot_tiles=0, hbm_bytes=0)
        for launch in group:
            shape = geometry(launch, row["programs_per_sm"], H200)
            row["tiles"] += shape["tiles"]
            row["waves"] += shape["waves"]
            row["slot_tiles"] += shape["slot_tiles"]
            if row["tile_clocks"]:
                row["hbm_bytes"] += hbm_bytes(launch, dtype, row["programs_per_sm"], H200)
        row["sass_macs"] = row["tile_macs"] * row["tiles"] if row["tile_clocks"] else 0
        rows.append(row)
    return rows


def _case_row(item) -> dict:
    """The report row of one (arch, case, precision), or of one reference; runs in a worker
    process."""
    os.environ.pop("TRITON_INTERPRET", None)
    started = time.monotonic()
    if isinstance(item, int):
        row = reference_row(REFERENCES[item])
    else:
        row = _case_row_untimed(item)
    row["report_seconds"] = time.monotonic() - started
    return row


def _summed(parts: list[dict]) -> dict:
    return {"seconds": sum(p["seconds"] for p in parts), "parts": parts}


def _estimate(variant: str, dim: int, n: int, kernels: list[dict]) -> dict:
    """The H200 seconds of the fused op (these kernels), eager PyTorch and a torch.compile-like
    fusion of the formula at N = n, with every part and what bounds it."""
    traced = trace_reference_formula(variant, n, dim)
    return {"n": n, "fused": _summed(fused_parts(kernels, n, dim, variant)),
            "eager": _summed(reference_parts(traced, compiled=False)),
            "compiled": _summed(reference_parts(traced, compiled=True)),
            "reference_formula": {k: traced[k] for k in ("bytes", "ops", "small_bytes",
                                                         "small_ops", "products")}}


def _case_row_untimed(item) -> dict:
    arch, (variant, dim, dtype), precision, n, counts, estimate_ns = item
    arch_name = f"sm_{arch}{'a' if arch == 90 else ''}"
    census_cache: dict = {}
    if variant == "covariance":
        return {"case": f"covariance:{dim}:{dtype}", "variant": variant, "dim": dim,
                "dtype": dtype, "precision": "ieee", "arch": arch_name, "n": n,
                "kernels": analyzed(capture_covariance(arch, n, dim), arch, dtype,
                                    census_cache)}
    kernels = analyzed(capture_loss(variant, dim, dtype, precision, arch, n), arch, dtype,
                       census_cache)
    logits = (n if variant == "cross" else 2 * n) ** 2
    row = {"case": f"{variant}:{dim}:{dtype}", "variant": variant, "dim": dim, "dtype": dtype,
           "precision": precision if dtype == "float32" else None, "arch": arch_name, "n": n,
           "kernels": kernels, "interpreter": counts.get(f"{variant}:{dim}:{dtype}"),
           "sass_gemm_equivalents": sum(k.get("sass_macs", k.get("macs", 0))
                                        for k in kernels) / (logits * dim)}
    if arch == 90 and dtype == "bfloat16":
        row["estimates"] = [
            _estimate(variant, dim, size, kernels if size == n else analyzed(
                capture_loss(variant, dim, dtype, precision, arch, size), arch, dtype,
                census_cache))
            for size in estimate_ns]
    return row


def band(seconds_by_part: list[dict], spread: tuple[float, float]) -> tuple[float, float]:
    """(low, high) seconds: the model's predicted / measured on the references ranged over
    `spread` (lowest, highest), so the time measured could lie anywhere from the estimate
    divided by the highest to the estimate divided by the lowest."""
    total = sum(p["seconds"] for p in seconds_by_part)
    return total / spread[1], total / spread[0]


def attach_bands(rows: list[dict]) -> dict:
    """Bands on every estimate from the reference rows' residuals; returns the spread and
    the residuals. Each estimate gains low/high seconds per provider and the point ratios;
    `estimate` is the one at the report's N (the budget test's)."""
    references = [r for r in rows if r.get("kind") == "reference"]
    found = residuals(references, CALIBRATED) if references else []
    spread = (min(r["ratio"] for r in found), max(r["ratio"] for r in found)) if found \
        else (1.0, 1.0)
    for row in rows:
        for estimate in row.get("estimates", []):
            for provider in ("fused", "eager", "compiled"):
                low, high = band(estimate[provider]["parts"], spread)
                estimate[provider].update(low_s=low, high_s=high)
            fused, eager, compiled = (estimate[p]["seconds"]
                                      for p in ("fused", "eager", "compiled"))
            estimate.update(fused_over_eager=fused / eager, fused_over_compiled=fused / compiled,
                            fused_wins_eager=estimate["fused"]["high_s"] <
                            estimate["eager"]["low_s"],
                            fused_wins_compiled=estimate["fused"]["high_s"] <
                            estimate["compiled"]["low_s"])
            if estimate["n"] == row["n"]:
                row["estimate"] = {"fused_s": fused, "eager_s": eager, "compiled_s": compiled,
                                   "fused_over_eager": fused / eager,
                                   "fused_over_compiled": fused / compiled}
    return {"spread": spread, "residuals": found}


def report(cases, archs, n: int, counts: dict, workers: int,
           estimate_ns=ESTIMATE_NS) -> list[dict]:
    """Every (arch, case, precision), the covariance kernel and the references, in `workers`
    processes, with the estimates' bands attached."""
    items: list = list(range(len(REFERENCES)))
    for arch in archs:
        for variant, dim, dtype in cases:
            for precision in (("tf32", "ieee") if dtype == "float32" else ("ieee",)):
                items.append((arch, (variant, dim, dtype), precision, n, counts,
                              tuple(estimate_ns)))
        items.append((arch, ("covariance", 2048, "bfloat16"), "ieee", n, counts, ()))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        rows = pool.map(_case_row, items, chunksize=1)
    attach_bands(rows)
    return rows
