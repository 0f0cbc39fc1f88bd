"""Loss benchmark: the fused op vs the reference formula vs torch.compile(reference), fwd+bwd.

Standalone (prints a table, appends JSON rows to bench/results/bench_loss.jsonl):

    python bench/bench_loss.py                       # CPU, fp32, D=2048, dim=360
    python bench/bench_loss.py --device cuda --dtype bfloat16 --n 4096 16384 65536

Every case runs in a fresh subprocess, so its peak memory is its own: on CPU the RSS high-water
mark, reset once the inputs exist, minus the RSS then (common.rss_baseline); on CUDA
torch.cuda.max_memory_allocated minus the inputs. Both count the two input gradients (N x D each),
which every provider must return; `grad_mb` says how much of the peak that is. On CPU glibc keeps
freed buffers of up to 32 MB in its heaps, which moves that high-water mark by tens of MB from run
to run, so a second process per case (one step, MALLOC_MMAP_THRESHOLD_=131072: every buffer above
128 KiB its own mapping, returned when freed) measures `live_peak_mb`, the peak of what is actually
held; the times come from the first process, its allocator in the state --malloc names (MALLOC).

Under pytest-benchmark (small shapes): pytest bench/bench_loss.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

if __package__:  # imported as bench.bench_loss (the tests)
    from . import common
else:  # run as a script, python bench/bench_loss.py: bench/ is sys.path[0]
    import common

# fused: the op as a user gets it, which keeps its dot products for the backward where they fit
# the default budget (directclr.fused.keeps_dots); fused-keep and fused-recompute force one path.
PROVIDERS = ("fused", "fused-keep", "fused-recompute", "reference", "compiled")
PATH_BUDGET_MB = {"fused-keep": "1e9", "fused-recompute": "0"}  # DIRECTCLR_KEEP_DOTS_MB
# fused-keep holds M x C (fp32: 4 GiB for cross at N = 32,768): not run beyond this.
KEEP_MAX_BYTES = 2 << 30
# The fused op with a learnable temperature (a 0-d tensor requiring grad): its cost over "fused"
# (vs_fused) is that of the temperature's gradient. Not in the default sweep.
LEARNED_TAU = "fused-learned-tau"
VARIANTS = ("cross", "ntxent")
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Live N x N buffers of the reference in fwd+bwd (logits, two softmaxes, their grads), fitted to
# measured peaks; used to skip cases that cannot fit instead of letting the OS kill them.
REFERENCE_NN_BUFFERS = 6


def logit_rows(variant: str, n: int) -> int:
    """Rows (and columns) of the logits: N for cross, 2N for ntxent."""
    return n if variant == "cross" else 2 * n


def matmul_flops(variant: str, n: int, dim: int) -> float:
    """FLOPs of the reference's matrix products, forward + backward (3 products)."""
    rows = logit_rows(variant, n)
    return 3 * 2.0 * rows * rows * dim


def logits_bytes(variant: str, n: int, dtype: str) -> int:
    """One N x N (ntxent: 2N x 2N) matrix: the dots fused-keep holds, a sixth of the reference."""
    rows = logit_rows(variant, n)
    return rows * rows * DTYPES[dtype]


def reference_bytes(variant: str, n: int, dtype: str) -> int:
    return REFERENCE_NN_BUFFERS * logits_bytes(variant, n, dtype)


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch
        free, _ = torch.cuda.mem_get_info(device)
        return free
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def make_loss(provider: str, variant: str, dim: int):
    import torch

    from directclr import infonce, infonce_reference

    if provider in ("fused", *PATH_BUDGET_MB):
        return lambda z1, z2: infonce(z1, z2, dim=dim, variant=variant)
    if provider == LEARNED_TAU:
        tau = torch.tensor(0.1, requires_grad=True)
        return lambda z1, z2: infonce(z1, z2, dim=dim, temperature=tau, variant=variant)

    def reference(z1, z2):
        return infonce_reference(z1, z2, dim, 0.1, variant).mean()

    return torch.compile(reference) if provider == "compiled" else reference


def matmul_peak_tflops(device: str, dtype: str, size: int = 8192, repeats: int = 10) -> float:
    """This device's own dense matmul rate in `dtype` (median of `repeats`), measured in the
    same run as the loss so that the fraction of peak is honest for this machine."""
    import torch

    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times[1:]) / 1e12


def run_case(provider, variant, n, width, dim, dtype, device, repeats, warm=False) -> dict:
    """Times fwd+bwd in this process (meant to be a fresh one); returns one result row. warm:
    first allocate and free WARM_MALLOC_BYTES (--malloc warm)."""
    import os

    import torch

    from directclr import fused
    if provider in PATH_BUDGET_MB:
        os.environ[fused.KEEP_DOTS_ENV] = PATH_BUDGET_MB[provider]
    if warm:
        warm_malloc()

    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    loss_fn = make_loss(provider, variant, dim)
    # Imports, library loading and thread pools happen here, before the memory baseline
    # (compilation for the real shape still counts: it happens at its first call).
    tiny = [torch.randn(4, width, device=device, dtype=torch_dtype, requires_grad=True)
            for _ in range(2)]
    make_loss("fused" if provider == "compiled" else provider, variant, dim)(*tiny).backward()
    z1 = torch.randn(n, width, device=device, dtype=torch_dtype, requires_grad=True)
    z2 = torch.randn(n, width, device=device, dtype=torch_dtype, requires_grad=True)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = common.rss_baseline()

    def step():
        loss_fn(z1, z2).backward()
        z1.grad = z2.grad = None

    step()  # warm-up: compilation, allocator, thread pool
    times = []
    faults_before = common.minor_faults()
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    faults = (common.minor_faults() - faults_before) / repeats
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = common.rss_peak() - base
    median = statistics.median(times)
    return {
        "op": "infonce", "provider": provider,
        "backend": "reference" if provider in ("reference", "compiled") else "auto",
        "variant": variant, "N": n, "D": width, "dim": dim, "dtype": dtype,
        "device": device, "fwd_bwd_ms": 1e3 * median, "repeats": repeats,
        "tflops": matmul_flops(variant, n, dim) / median / 1e12,
        "path": path_of(provider, variant, n, torch_dtype, cuda),
        "peak_mem_mb": max(peak, 0) / 2**20, "grad_mb": 2 * n * width * DTYPES[dtype] / 2**20,
        # pages this process faulted in per timed step (memory the allocator returned to the
        # system and took back): on CPU a cost of its own, up to milliseconds a step
        "faults_per_step": faults,
        "status": "ok",
        "malloc_env": {k: v for k, v in os.environ.items() if k in RETAIN_ENV},
        "malloc_warmed_mb": WARM_MALLOC_BYTES / 2**20 if warm else 0,
    }


def path_of(provider: str, variant: str, n: int, dtype, cuda: bool) -> str | None:
    """A fused row's path: "keep" (three products) or "recompute" (four)."""
    if provider not in ("fused", *PATH_BUDGET_MB, LEARNED_TAU):
        return None
    from directclr import fused
    keeps = fused.keeps_dots("triton" if cuda else "cpu", n, variant, 1, dtype,
                             fused.keep_dots_bytes())
    return "keep" if keeps else "recompute"


# glibc's mmap threshold for the live-peak process: buffers above it are mapped on their own.
LIVE_PEAK_MMAP_THRESHOLD_BYTES = 128 * 1024
# The state of glibc's allocator in each provider's timed process (--malloc), every provider's
# alike. glibc serves a buffer from its heap (kept when freed, unless the heap's free top exceeds
# the trim threshold) only if it is below the mmap threshold, else maps it and unmaps it when
# freed; a process starts at 128 KiB / 128 KiB, and freeing a mapped buffer of up to 32 MiB raises
# them to its size / twice its size. A training process has long freed buffers of that size; a
# fresh benchmark process has not, and then returns a step's freed buffers to the system and
# faults them back in every step (what faults_per_step counts), unless it happened to free one
# while warming up (torch.compile's process does while compiling).
#   fresh: as a new process starts (the rows' "default" before 2026-12-06).
#   warm (default): the process first frees one WARM_MALLOC_BYTES buffer, as a training process
#       has: buffers below it come from the heap, which keeps up to twice it free.
#   retain: glibc's thresholds fixed by its environment variables (32 MiB, trimming above
#       1 GiB free), close to what jemalloc or tcmalloc do anyway.
MALLOC = ("fresh", "warm", "retain")
WARM_MALLOC_BYTES = 30 << 20  # below glibc's 32 MiB cap on the dynamic threshold
RETAIN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def warm_malloc() -> None:
    """--malloc warm: one WARM_MALLOC_BYTES buffer allocated and freed (glibc maps it and, when
    it is unmapped, raises its thresholds to its size)."""
    import torch
    torch.empty(WARM_MALLOC_BYTES, dtype=torch.uint8)


def run_in_subprocess(case: dict, timeout: float, malloc: str = "warm",
                      live_peak: bool = True) -> dict:
    """The timed row (its process's allocator as `malloc` says); on CPU with `live_peak_mb` from
    a second, one-step process (see above) if `live_peak`."""
    started = time.monotonic()
    row = common.run_child(__file__, {**case, "warm": malloc == "warm"}, timeout,
                           RETAIN_ENV if malloc == "retain" else None)
    row.pop("warm", None)
    if row["status"] == "ok" and case["device"] == "cpu" and live_peak:
        env = {"MALLOC_MMAP_THRESHOLD_": str(LIVE_PEAK_MMAP_THRESHOLD_BYTES)}
        left = timeout - (time.monotonic() - started)
        live = common.run_child(__file__, {**case, "repeats": 1}, max(left, 1.0), env)
        row["live_peak_mb"] = live["peak_mem_mb"] if live["status"] == "ok" else None
    return row


def median_of_rounds(rounds: list[dict]) -> dict:
    """One provider's rows of a case's rounds as one row: the first round's, with the median of
    the rounds' step times (and faults), each round's time kept in `round_ms`; a round that did
    not finish, as it ended."""
    failed = [r for r in rounds if r["status"] != "ok"]
    row = dict(failed[0] if failed else rounds[0])
    if len(rounds) > 1 and not failed:
        times = [r["fwd_bwd_ms"] for r in rounds]
        row["fwd_bwd_ms"] = statistics.median(times)
        row["tflops"] *= rounds[0]["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        row["faults_per_step"] = statistics.median(r["faults_per_step"] for r in rounds)
        row["round_ms"] = times
    return row


def repeats_for(n: int, variant: str) -> int:
    """Timed steps: at least ~0.3 s of them on 2 CPU cores at the small sizes, whose medians a
    shared machine's noise moves most."""
    rows = logit_rows(variant, n)
    for most_rows, repeats in ((1024, 31), (2048, 15), (4096, 9), (8192, 5), (16384, 3)):
        if rows <= most_rows:
            return repeats
    return 1


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 32768])
    parser.add_argument("--ntxent-max-n", type=int, default=8192,
                        help="largest N for the ntxent variant (it has 4x the work of cross)")
    parser.add_argument("--width", type=int, default=2048, help="D, the embedding width")
    parser.add_argument("--dim", type=int, default=360)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--providers", nargs="+", default=None,
                        choices=(*PROVIDERS, LEARNED_TAU),
                        help="default: all; on CUDA without the CPU op's two paths")
    parser.add_argument("--repeats", type=int, default=None, help="default: by size")
    parser.add_argument("--compiled-max-n", type=int, default=None,
                        help="largest N for torch.compile(reference) (its compile time grows)")
    parser.add_argument("--matmul-peak", action="store_true",
                        help="measure this device's matmul rate in --dtype; adds pct_of_peak")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per case")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: a case starts only if the time left "
                             "covers its timeout's floor (--min-case-s), and its timeout is "
                             "cut to what is left")
    parser.add_argument("--min-case-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="processes per provider and case, run in turn (A B C A B C ...); "
                             "each row is the median of its rounds: a shared machine's slow "
                             "spells then hit every provider alike")
    parser.add_argument("--malloc", choices=MALLOC, default="warm",
                        help="the allocator's state in every provider's timed process: fresh "
                             "(as a process starts), warm (having freed a 30 MiB buffer, as a "
                             "training process has) or retain (glibc keeps freed memory)")
    args = common.parse_or_run_child(parser, argv, lambda case: run_case(**case))
    if args is None:
        return []

    if args.providers is None:
        args.providers = [p for p in PROVIDERS
                          if args.device == "cpu" or p not in PATH_BUDGET_MB]
    rows = []
    deadline = time.monotonic() + args.budget if args.budget else None
    path = args.results_dir / "bench_loss.jsonl"
    for variant in args.variants:
        for n in args.n:
            if variant == "ntxent" and n > args.ntxent_max_n:
                continue
            rounds: dict[str, list[dict]] = {}
            for round_index in range(max(1, args.rounds)):
                for provider in args.providers:
                    if provider == "compiled" and args.compiled_max_n and n > args.compiled_max_n:
                        continue
                    done = rounds.get(provider)
                    if done and done[-1]["status"] != "ok":
                        continue  # skipped or failed: not run again
                    case = dict(provider=provider, variant=variant, n=n, width=args.width,
                                dim=args.dim, dtype=args.dtype, device=args.device,
                                repeats=args.repeats or repeats_for(n, variant))
                    rounds.setdefault(provider, []).append(
                        run_case_or_skip(case, args, deadline, live_peak=round_index == 0))
            for provider, provider_rounds in rounds.items():
                row = median_of_rounds(provider_rounds)
                row.setdefault("N", n)
                row["malloc"] = args.malloc  # skipped cases too: one sweep's rows
                # Appended as each case ends: a later timeout or kill loses nothing before it.
                row = common.stamp([row], args.device)[0]
                common.append_rows([row], "bench_loss", args.results_dir)
                rows.append(row)
                print(json.dumps(row), flush=True)
    add_ratios(rows)
    if args.matmul_peak:
        peak = matmul_peak_tflops(args.device, args.dtype, size=8192 if "cuda" in args.device
                                  else 2048)
        print(f"{args.dtype} matmul peak on {args.device}: {peak:.1f} TFLOP/s")
        for row in rows:
            row["matmul_peak_tflops"] = peak
            if row["status"] == "ok":
                row["pct_of_peak"] = 100 * row["tflops"] / peak
    # The same run's ratios (and peak) as one summary row: the case rows are already written.
    summary = {"op": "infonce", "kind": "summary", "device": args.device, "dtype": args.dtype,
               "malloc": args.malloc,
               "cases": [{k: row.get(k) for k in ("variant", "N", "provider", "fwd_bwd_ms",
                                                  "vs_reference", "vs_compiled", "vs_fused",
                                                  "pct_of_peak", "status")} for row in rows]}
    common.append_rows(common.stamp([summary], args.device), "bench_loss", args.results_dir)
    print(common.format_table(rows, ["variant", "N", "dtype", "provider", "path", "fwd_bwd_ms",
                                     "vs_reference", "vs_compiled", "vs_fused", "tflops",
                                     "pct_of_peak",
                                     "peak_mem_mb", "live_peak_mb", "grad_mb",
                                     "faults_per_step", "status"]))
    print(f"rows appended to {path}")
    return rows


def run_case_or_skip(case: dict, args, deadline: float | None, live_peak: bool) -> dict:
    """The case's row: run, or skipped (what it needs does not fit, or the budget is spent)."""
    provider, variant, n = case["provider"], case["variant"], case["n"]
    need = reference_bytes(variant, n, args.dtype)
    kept = logits_bytes(variant, n, args.dtype)
    left = deadline - time.monotonic() if deadline else args.timeout
    if provider in ("reference", "compiled") and need > 0.8 * available_bytes(args.device):
        return {**case, "status": f"skipped: needs ~{need / 2**30:.0f} GiB"}
    if provider == "fused-keep" and kept > KEEP_MAX_BYTES:
        return {**case, "status": f"skipped: would keep {kept / 2**30:.0f} GiB of dots"}
    if left < args.min_case_s:
        return {**case, "status": f"skipped: {left:.0f} s of the budget left"}
    return run_in_subprocess(case, min(args.timeout, left), args.malloc, live_peak)


def add_ratios(rows: list[dict]) -> None:
    """time(provider) / time(reference | compiled) for the same variant and N, same run."""
    by_case = {(r["variant"], r["N"], r["provider"]): r for r in rows if r["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok":
            continue
        for other, key in (("reference", "vs_reference"), ("compiled", "vs_compiled"),
                           ("fused", "vs_fused")):
            base = by_case.get((row["variant"], row["N"], other))
            if base:
                row[key] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]


# --------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # standalone use needs no pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("provider", PROVIDERS)
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_loss_fwd_bwd(benchmark, provider, variant):
        import torch

        z1 = torch.randn(1024, 2048, requires_grad=True)
        z2 = torch.randn(1024, 2048, requires_grad=True)
        loss_fn = make_loss(provider, variant, 360)

        def step():
            loss_fn(z1, z2).backward()

        step()
        benchmark(step)


if __name__ == "__main__":
    main()
