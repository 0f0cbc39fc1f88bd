"""The benchmarks run end to end and write well-formed rows (smoke tests, not timings)."""
import json
import os
import re
import subprocess
import sys

import pytest

from bench import bench_data, bench_loss, bench_spectrum, bench_train, common
from directclr.data.loader import dali_available
from tests.helpers import ROOT


def test_minor_faults_counts_the_pages_a_fresh_buffer_takes():
    """faults_per_step's counter: a fresh 64 MiB mapping faults when first written, at least
    once per page of its size (4 KiB pages, or 2 MiB ones where transparent huge pages serve it),
    and nothing when written again."""
    import mmap
    size = 64 << 20
    payload = b"\x01" * size  # its own pages fault here, before the count
    with mmap.mmap(-1, size) as buffer:
        before = common.minor_faults()
        buffer.write(payload)
        first = common.minor_faults() - before
        buffer.seek(0)
        buffer.write(payload)
        again = common.minor_faults() - before - first
    assert first >= size // (2 << 20) and again < first / 4, (first, again)


def test_bench_loss_writes_rows(tmp_path):
    rows = bench_loss.main(["--n", "32", "--width", "48", "--dim", "20", "--repeats", "1",
                            "--variants", "cross", "ntxent", "--providers", "fused", "reference",
                            "fused-learned-tau", "fused-keep", "fused-recompute",
                            "--results-dir", str(tmp_path)])
    assert [r["status"] for r in rows] == ["ok"] * 10, rows
    # N = 32 fits the default budget: "fused" keeps its dots, as "fused-keep" does
    assert [r["path"] for r in rows[:5]] == ["keep", None, "keep", "keep", "recompute"], rows
    written = [json.loads(line)
               for line in (tmp_path / "bench_loss.jsonl").read_text().splitlines()]
    # One row per case as it ended, then the run's summary (ratios).
    assert [{k: v for k, v in w.items()} for w in written[:-1]] == [
        {k: v for k, v in r.items() if k not in ("vs_reference", "vs_compiled", "vs_fused")}
        for r in rows]
    assert written[-1]["kind"] == "summary" and len(written[-1]["cases"]) == 10
    assert all(c["vs_reference"] > 0 for c in written[-1]["cases"] if c["provider"] == "fused")
    for row in written[:-1]:
        assert {"op", "backend", "variant", "N", "dim", "dtype", "device", "fwd_bwd_ms",
                "peak_mem_mb", "commit", "date", "torch"} <= row.keys()
        assert row["fwd_bwd_ms"] > 0 and row["peak_mem_mb"] >= 0
        assert row["faults_per_step"] >= 0
        assert row["live_peak_mb"] >= 0  # the second, one-step process under a fixed mmap threshold
    fused = [r for r in rows if r["provider"] == "fused"]
    assert all(r["vs_reference"] > 0 for r in fused)
    learned = [r for r in rows if r["provider"] == "fused-learned-tau"]
    assert len(learned) == 2 and all(r["vs_fused"] > 0 and r["backend"] == "auto" for r in learned)


@pytest.mark.parametrize("malloc", bench_loss.MALLOC)
def test_bench_loss_malloc_reaches_the_timed_process(tmp_path, malloc):
    rows = bench_loss.main(["--n", "32", "--width", "48", "--dim", "20", "--repeats", "1",
                            "--variants", "cross", "--providers", "fused", "--malloc", malloc,
                            "--results-dir", str(tmp_path)])
    assert [(r["status"], r["malloc"]) for r in rows] == [("ok", malloc)], rows
    assert rows[0]["malloc_env"] == (bench_loss.RETAIN_ENV if malloc == "retain" else {})
    assert rows[0]["malloc_warmed_mb"] == (30 if malloc == "warm" else 0)
    assert "warm" not in rows[0]


WARM_PROBE = """
import resource, sys, torch
sys.path.insert(0, "bench")
import bench_loss
if sys.argv[1] == "warm":
    bench_loss.warm_malloc()
faults = []
for _ in range(4):  # a step's four 4 MiB buffers, written and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step = [torch.ones(1 << 20) for _ in range(4)]
    del step
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))  # the steps after the first
"""


def test_warm_malloc_keeps_a_steps_buffers_in_the_process():
    """A step holding four 4 MiB buffers: in a fresh process glibc, whose thresholds the first
    step's freed 4 MiB mapping set (heap below 4 MiB, trim above 8 MiB free), returns the 16 MiB
    of heap they took to the system and faults them in again every step; after warm_malloc it
    keeps them. (A fresh process sometimes stops faulting after a few steps, when some thread of
    torch's frees a larger mapping: the test counts three steps.)"""
    faults = {}
    for state in ("fresh", "warm"):
        done = subprocess.run([sys.executable, "-c", WARM_PROBE, state], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr
        faults[state] = int(done.stdout.split()[-1])
    step_pages = (16 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults["fresh"] >= step_pages // 2 and 2 * faults["warm"] < faults["fresh"], faults


def test_bench_loss_rounds_take_the_median_of_processes_in_turn(tmp_path, monkeypatch):
    order = []

    def fake_run(case, timeout, malloc="warm", live_peak=True):
        order.append((case["provider"], live_peak))
        time_ms = {"fused": [3.0, 1.0, 2.0], "reference": [5.0, 9.0, 4.0]}[case["provider"]]
        return {**case, "status": "ok", "fwd_bwd_ms": time_ms[sum(
            p == case["provider"] for p, _ in order) - 1], "tflops": 1.0, "faults_per_step": 0}

    monkeypatch.setattr(bench_loss, "run_in_subprocess", fake_run)
    rows = bench_loss.main(["--n", "32", "--variants", "cross", "--providers", "fused",
                            "reference", "--rounds", "3", "--results-dir", str(tmp_path)])
    assert order == [("fused", True), ("reference", True), ("fused", False),
                     ("reference", False), ("fused", False), ("reference", False)]
    assert [(r["provider"], r["fwd_bwd_ms"], r["round_ms"]) for r in rows] == [
        ("fused", 2.0, [3.0, 1.0, 2.0]), ("reference", 5.0, [5.0, 9.0, 4.0])]
    assert rows[0]["vs_reference"] == 2.0 / 5.0 and rows[0]["tflops"] == 1.5


def test_bench_loss_budget_skips_what_cannot_start(tmp_path):
    rows = bench_loss.main(["--n", "32", "--width", "48", "--dim", "20", "--repeats", "1",
                            "--variants", "cross", "--providers", "fused", "reference",
                            "--budget", "1", "--min-case-s", "5", "--results-dir", str(tmp_path)])
    assert all(r["status"].startswith("skipped") and "budget" in r["status"] for r in rows), rows
    assert len(rows) == 2


def test_cases_that_cannot_fit_are_skipped_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_loss, "available_bytes", lambda device: 1)
    rows = bench_loss.main(["--n", "16", "--width", "16", "--dim", "8", "--repeats", "1",
                            "--variants", "cross", "--providers", "reference",
                            "--results-dir", str(tmp_path)])
    assert rows[0]["status"].startswith("skipped")
    assert rows[0]["malloc"] == "warm"  # the plot groups a sweep's rows by it


def test_fused_never_allocates_the_n_by_n_matrix_beyond_its_budget():
    """Peak RSS of a fresh process: recomputing, below one N x N fp32 buffer; keeping the dots,
    one such buffer and less than the reference's (several)."""
    n, width = 4096, 64
    nxn_mb = n * n * 4 / 2**20  # 64 MiB
    peaks = {}
    for provider in ("fused-recompute", "fused-keep", "reference"):
        case = dict(provider=provider, variant="cross", n=n, width=width, dim=width,
                    dtype="float32", device="cpu", repeats=1)
        row = bench_loss.run_in_subprocess(case, timeout=300)
        assert row["status"] == "ok", row
        peaks[provider] = row["live_peak_mb"]
    assert peaks["fused-recompute"] < 0.5 * nxn_mb, peaks
    assert nxn_mb < peaks["fused-keep"] < 1.5 * nxn_mb < peaks["reference"], peaks


def test_bench_train_times_the_model_and_the_whole_loop(tmp_path):
    from directclr.data import prepare_synthetic
    data = prepare_synthetic(tmp_path / "jpegs", n=24, classes=3, min_side=36, max_side=48,
                             progress=False)
    rows = bench_train.main(["--data", str(data), "--batch-size", "8", "--warmup", "1",
                             "--steps", "2", "--loader", "torchvision", "--threads", "0",
                             "--micro-batch", "4", "--results-dir", str(tmp_path)])
    assert [(r["what"], r["status"]) for r in rows] == [
        ("model", "ok"), ("model-micro", "ok"), ("loop", "ok")], rows
    assert all(r["pairs_per_s"] > 0 for r in rows)
    micro = rows[1]
    assert micro["micro_batch"] == 4 and micro["time_vs_plain"] > 0
    assert micro["memory_vs_plain"] > 0 and rows[0]["step_peak_mb"] > 0
    loop = rows[2]
    assert 0 <= loop["data_wait"] < 1 and loop["vs_model"] > 0
    assert {"commit", "date", "machine", "torch"} <= loop.keys()


def test_bench_data_rates_both_backends_with_a_simulated_step(tmp_path):
    rows = bench_data.main(["--data", str(tmp_path / "jpegs"), "--images", "16",
                            "--batch-size", "4", "--batches", "3", "--image-size", "32",
                            "--step-ms", "5", "--results-dir", str(tmp_path)]
                           + ([] if dali_available() else ["--backends", "torchvision"]))
    backends = (["dali"] if dali_available() else []) + ["torchvision"]
    assert [(r["format"], r["backend"], r["status"]) for r in rows] == [
        (f, b, "ok") for f in ("folder", "shards") for b in backends], rows
    for row in rows:
        assert row["pairs_per_s"] > 0 and row["step_ms"] == 5 and row["batches"] == 3
        # The consumer sleeps 5 ms per batch of 4: a rate above 4 / 5 ms means no sleep.
        assert row["pairs_per_s"] < 4 / 0.005
        assert row["vs_torchvision"] > 0


def test_bench_spectrum_writes_rows(tmp_path):
    rows = bench_spectrum.main(["--n", "300", "--width", "64", "--repeats", "1",
                                "--results-dir", str(tmp_path)])
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"update", "cov", "spectrum", "cov+eigvalsh"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows), rows
    assert by["update"]["vs_cov"] > 0 and by["spectrum"]["vs_cov"] > 0
    written = (tmp_path / "bench_spectrum.jsonl").read_text().splitlines()
    assert len(written) == 4


def test_commit_is_dirty_for_code_changes_not_for_appended_results(tmp_path):
    """A benchmark appends to its tracked results file as each case ends: the rows after the
    first must still carry the commit of the code, not "+dirty"."""
    from directclr.provenance import git_commit
    assert git_commit(tmp_path) == "unknown"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    clean = git_commit(tmp_path)
    assert clean and "+dirty" not in clean and clean != "unknown"
    with open(tmp_path / "bench" / "results" / "rows.jsonl", "a") as f:
        f.write("{}\n")
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "+dirty"


def test_the_gpu_check_selects_gpu_tests_that_exist():
    """bench/gpu_check.sh runs only on a GPU host: a moved or renamed test file, or a -k that
    matches nothing, would make it pass there having tested nothing."""
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    files = re.findall(r"\btests/\S+\.py\b", script)
    selection = re.search(r'-k "([^"]+)"', script).group(1)
    assert files and all((ROOT / f).exists() for f in files), files
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *files, "-k", selection],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any("cuda" in line for line in collected), proc.stdout[-2000:]
    assert {f.split("::")[0] for f in collected} == set(files)
