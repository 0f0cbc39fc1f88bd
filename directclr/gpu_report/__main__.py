"""Static GPU report: what the Triton kernels will cost on an H200, measured on any CPU machine.

    python -m directclr.gpu_report              # every case, table, rows -> bench/results/
    python -m directclr.gpu_report --out rows.jsonl --cases cross:360:bfloat16

Appends one JSON row per (arch, case, precision) and per reference kernel to
bench/results/gpu_static.jsonl of this checkout (or --out), stamped like the benchmarks' rows,
and prints the kernels' table, the references' predicted / measured with the constants' fit,
and the H200 estimates with their bands.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

from ..provenance import REPO, cpu_model, git_commit
from .capture import COUNT_N, count_in_interpreter, interpreter_counts
from .cost import CALIBRATED, H200
from .references import fit, residuals
from .report import ARCHS, CASES, REPORT_N, report

RESULTS = REPO / "bench" / "results"


def stamp(rows: list[dict]) -> list[dict]:
    """The commit, date, machine (this CPU) and torch/Triton versions on every row, the fields
    bench/common.py stamps the benchmarks' rows with."""
    import torch
    import triton
    meta = {"commit": git_commit(REPO), "date": datetime.date.today().isoformat(),
            "machine": cpu_model(), "torch": torch.__version__, "triton": triton.__version__}
    return [{**row, **meta} for row in rows]


def print_references(rows):
    """The references: published time, our prediction, predicted / measured; then the fit."""
    references = [r for r in rows if r.get("kind") == "reference"]
    if not references:
        return
    found = residuals(references)
    print("\nReferences (predicted / measured; below 1: the model is optimistic):")
    header = ("reference", "shape", "GPU", "measured us", "predicted us", "bound", "pred/meas")
    widths = (42, 30, 18, 11, 12, 7, 9)
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for r in found:
        cells = (r["name"], r["shape"], r["gpu"], f"{r['measured_s'] * 1e6:.1f}",
                 f"{r['predicted_s'] * 1e6:.1f}", r["bound"], f"{r['ratio']:.3f}")
        print(" ".join(f"{str(c):>{w}}" for c, w in zip(cells, widths)))
    best = fit(references)
    print(f"constants in use: {CALIBRATED}\nleast-squares fit:  {best}")
    for source in sorted({r["source"] for r in found}):
        print(f"  source: {source}")


def print_estimates(rows):
    """Every estimate: point (low-high band) ms of fused, eager and compiled-like, ratios."""
    header = ("case", "N", "fused ms", "eager ms", "compiled ms", "f/eager", "f/compiled")
    widths = (22, 6, 24, 24, 24, 7, 10)
    print(f"\nH200 estimates ({H200.name}; bands: the references' predicted/measured "
          "spread; * where fused's band is clear of the other's):")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for row in rows:
        for e in row.get("estimates", []):
            cell = lambda p: (f"{e[p]['seconds'] * 1e3:.3g} "  # noqa: E731
                              f"({e[p]['low_s'] * 1e3:.3g}-{e[p]['high_s'] * 1e3:.3g})")
            cells = (row["case"], e["n"], cell("fused"), cell("eager"), cell("compiled"),
                     f"{e['fused_over_eager']:.2f}{'*' if e['fused_wins_eager'] else ''}",
                     f"{e['fused_over_compiled']:.2f}"
                     f"{'*' if e['fused_wins_compiled'] else ''}")
            print(" ".join(f"{str(c):>{w}}" for c, w in zip(cells, widths)))


def print_table(rows):
    header = ("case", "arch", "prec", "kernel", "regs", "spill", "smem KB", "wgmma", "16B ld",
              "ser.", "issue/tensor", "GEMM-eq sass/interp", "exp2/logit", "est fused/eager")
    widths = (24, 6, 5, 22, 4, 5, 7, 5, 6, 4, 12, 19, 10, 15)
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for row in rows:
        if row.get("kind") == "reference":
            continue
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
    parser = argparse.ArgumentParser(prog="python -m directclr.gpu_report",
                                     description=__doc__.split("\n")[0])
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
        print(json.dumps(count_in_interpreter(cases, args.n or COUNT_N)))
        return
    os.environ.pop("TRITON_INTERPRET", None)
    counts = interpreter_counts(cases)
    rows = stamp(report(cases, args.archs, args.n or REPORT_N, counts, args.workers))
    out = args.out or RESULTS / "gpu_static.jsonl"
    with open(out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print_table(rows)
    print_references(rows)
    print_estimates(rows)
    print(f"rows -> {out}")


if __name__ == "__main__":
    main()
