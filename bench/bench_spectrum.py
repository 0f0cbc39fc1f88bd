"""Spectrum benchmark: SpectrumAccumulator.update / the whole spectrum vs torch.cov (+ eigvalsh).

Standalone (prints a table, appends JSON rows to bench/results/bench_spectrum.jsonl):

    python bench/bench_spectrum.py                              # CPU, fp32, N=65536, D=2048
    python bench/bench_spectrum.py --device cuda --dtype bfloat16 --n 50000

Both sides get the same input tensor in one process, timed alternately (median of --repeats).
`update` is one SpectrumAccumulator.update (batch mean, centered Gram of the upper triangle,
Chan merge); `cov` is torch.cov on the same input. `spectrum` adds the float64 eigvalsh.
Under pytest-benchmark (small shapes): pytest bench/bench_spectrum.py
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from directclr import SpectrumAccumulator

if __package__:  # imported as bench.bench_spectrum (the tests)
    from . import common
else:  # run as a script, python bench/bench_spectrum.py: bench/ is sys.path[0]
    import common


def providers(z):
    width = z.shape[1]
    return {
        "update": lambda: SpectrumAccumulator(width).update(z),
        "cov": lambda: torch.cov(z.T),
        "spectrum": lambda: SpectrumAccumulator(width).update(z).result(),
        "cov+eigvalsh": lambda: torch.linalg.eigvalsh(torch.cov(z.T).double().cpu()),
    }


def measure(n, width, dtype, device, repeats):
    torch.manual_seed(0)
    z = torch.randn(n, width, device=device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fns = providers(z)
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up: autotune, thread pools
        fn()
    for _ in range(repeats):  # alternate the providers so that noise hits them alike
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, ts in times.items():
        rows.append({"op": "spectrum", "provider": name, "N": n, "D": width, "dtype": dtype,
                     "device": device, "median_ms": 1e3 * statistics.median(ts),
                     "repeats": repeats, "status": "ok"})
    by = {r["provider"]: r for r in rows}
    by["update"]["vs_cov"] = by["update"]["median_ms"] / by["cov"]["median_ms"]
    by["spectrum"]["vs_cov"] = by["spectrum"]["median_ms"] / by["cov+eigvalsh"]["median_ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--n", type=int, nargs="+", default=[65536])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results-dir", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for n in args.n:
        rows += measure(n, args.width, args.dtype, args.device, args.repeats)
    rows = common.stamp(rows, args.device)
    path = common.append_rows(rows, "bench_spectrum", args.results_dir)
    print(common.format_table(rows, ["N", "D", "dtype", "device", "provider", "median_ms",
                                     "vs_cov", "status"]))
    print(f"rows appended to {path}")
    return rows

try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("provider", ["update", "cov"])
    def test_spectrum_update(benchmark, provider):
        z = torch.randn(8192, 512)
        fn = providers(z)[provider]
        fn()
        benchmark(fn)


if __name__ == "__main__":
    main()
