"""bench/plot_bench.py: the loss benchmark's picture draws the rows it is given (issue 23)."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from bench import plot_bench
from tests.helpers import ROOT

SCRIPT = ROOT / "bench" / "plot_bench.py"
CPU = "Intel(R) Xeon(R) Processor, 2 cores"
GPU = "NVIDIA H100 80GB HBM3"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


def stamp(commit, date, device):
    return {"commit": commit, "date": date, "machine": CPU if device == "cpu" else GPU,
            "torch": "2.14.1+cu130", "triton": "3.8.0"}


def case(provider, variant, n, ms, peak, *, commit, date, device="cpu", live=None):
    """A row as bench_loss.run_case + run_in_subprocess + common.stamp write it."""
    row = {"op": "infonce", "provider": provider,
           "backend": "auto" if provider == "fused" else "reference", "variant": variant,
           "N": n, "D": 2048, "dim": 360, "dtype": "float32", "device": device,
           "fwd_bwd_ms": ms, "repeats": 5, "tflops": 0.1, "peak_mem_mb": peak,
           "grad_mb": 2 * n * 2048 * 4 / 2**20, "status": "ok"}
    if device == "cpu":
        row["live_peak_mb"] = live if live is not None else 0.9 * peak
    return {**row, **stamp(commit, date, device)}


def skipped(provider, variant, n, *, commit, date, device="cpu"):
    return {"provider": provider, "variant": variant, "n": n, "width": 2048, "dim": 360,
            "dtype": "float32", "device": device, "repeats": 1,
            "status": "skipped: needs ~24 GiB", "N": n, **stamp(commit, date, device)}


def summary(rows, *, commit, date, device="cpu"):
    return {"op": "infonce", "kind": "summary", "device": device, "dtype": "float32",
            "cases": [{k: r.get(k) for k in ("variant", "N", "provider", "fwd_bwd_ms",
                                             "vs_reference", "vs_compiled", "pct_of_peak",
                                             "status")} for r in rows],
            **stamp(commit, date, device)}


def sweep(commit, date, scale, device="cpu", ns=(2048, 8192), finish=True, skip_big=False):
    """One bench_loss.py run: every provider x variant x N, times scaled by `scale` (so the
    sweeps are told apart), the first row stamped with the clean commit and the rest "+dirty"
    (the run's own rows dirty the tree, as in the real file), then its summary row."""
    rows = []
    for variant in ("cross", "ntxent"):
        for n in ns:
            for k, provider in enumerate(("fused", "reference", "compiled")):
                ms = scale * (1 + k) * n / 100 * (2 if variant == "ntxent" else 1)
                peak = (k + 1) * n / 50
                rows.append(case(provider, variant, n, ms, peak, commit=commit + "+dirty",
                                 date=date, device=device))
        if skip_big and variant == "cross":
            rows.append(case("fused", "cross", 32768, scale * 9000, 700.0,
                             commit=commit + "+dirty", date=date, device=device))
            rows += [skipped(p, "cross", 32768, commit=commit + "+dirty", date=date,
                             device=device) for p in ("reference", "compiled")]
    rows[0]["commit"] = commit
    if finish:
        rows.append(summary(rows, commit=commit + "+dirty", date=date, device=device))
    return rows


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines_by_gid(fig):
    return {line.get_gid(): line for ax in fig.axes for line in ax.lines if line.get_gid()}


def test_figure_draws_the_newest_complete_sweep(tmp_path):
    old = sweep("aaaaaaa", "2026-11-29", 3.0)
    new = sweep("bbbbbbb", "2026-11-30", 1.0, skip_big=True)
    unfinished = sweep("ccccccc", "2026-12-01", 5.0, finish=False)  # killed: no summary row
    write(tmp_path / "bench_loss.jsonl", old + new + unfinished)
    rows = plot_bench.load_rows(tmp_path)
    fig = plot_bench.build_figure(rows)
    (chosen,) = fig.sweeps
    assert (chosen.commit, chosen.date, chosen.complete) == ("bbbbbbb", "2026-11-30", True)
    assert len(chosen.cases) == 15  # the clean-commit first row belongs to the same sweep
    lines = lines_by_gid(fig)
    for variant in ("cross", "ntxent"):
        for provider in ("fused", "reference", "compiled"):
            measured = sorted((r for r in new if r.get("variant") == variant
                               and r.get("provider") == provider and r["status"] == "ok"),
                              key=lambda r: r["N"])
            time = lines[f"time:{variant}:{provider}"]
            assert list(time.get_xdata()) == [r["N"] for r in measured]
            assert list(time.get_ydata()) == pytest.approx([r["fwd_bwd_ms"] for r in measured])
            live = lines[f"live:{variant}:{provider}"]
            assert list(live.get_ydata()) == pytest.approx([r["live_peak_mb"] for r in measured])
            peak = lines[f"peak:{variant}:{provider}"]
            assert list(peak.get_ydata()) == pytest.approx([r["peak_mem_mb"] for r in measured])
            assert peak.get_linestyle() == "--"  # on CPU: the RSS high-water mark, dashed
    # the fused op alone ran at N = 32768; the two skipped cases are named, not drawn
    assert list(lines["time:cross:fused"].get_xdata()) == [2048, 8192, 32768]
    notes = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "not run at N=32,768: eager reference, torch.compile(reference)" in notes
    assert list(lines["grad:cross"].get_xdata()) == [2048, 8192, 32768]
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    title = fig.subfigs[0]._suptitle.get_text()
    assert CPU in title and "2026-11-30" in title and "bbbbbbb" in title and "torch 2.14.1" in title


def test_an_incomplete_sweep_only_when_nothing_else(tmp_path):
    rows = sweep("ccccccc", "2026-12-01", 5.0, finish=False)
    fig = plot_bench.build_figure(plot_bench.load_rows(write(tmp_path / "r.jsonl", rows)))
    (chosen,) = fig.sweeps
    assert chosen.commit == "ccccccc" and not chosen.complete
    assert "INCOMPLETE" in fig.subfigs[0]._suptitle.get_text()


def test_warm_allocator_sweeps_are_drawn_others_are_not(tmp_path):
    """bench_loss.py's default (--malloc warm) is drawn, titled so; a fresh or retain sweep of
    the same commit and date is neither drawn nor merged into it."""
    def mark(rows, malloc):
        return [{**row, "malloc": malloc} for row in rows]
    warm = mark(sweep("bbbbbbb", "2026-12-06", 1.0), "warm")
    others = (mark(sweep("bbbbbbb", "2026-12-06", 7.0), "fresh")
              + mark(sweep("bbbbbbb", "2026-12-06", 9.0), "retain"))
    fig = plot_bench.build_figure(plot_bench.load_rows(write(tmp_path / "r.jsonl",
                                                                warm + others)))
    (chosen,) = fig.sweeps
    assert chosen.malloc == "warm" and chosen.complete and len(chosen.cases) == 12
    fused = lines_by_gid(fig)["time:cross:fused"]
    assert list(fused.get_ydata()) == pytest.approx(
        [r["fwd_bwd_ms"] for r in warm if r.get("variant") == "cross"
         and r.get("provider") == "fused"])
    assert "allocator warm" in fig.subfigs[0]._suptitle.get_text()
    older = plot_bench.build_figure(plot_bench.load_rows(write(
        tmp_path / "old.jsonl", sweep("aaaaaaa", "2026-12-01", 1.0))))  # no malloc field
    assert "allocator fresh" in older.subfigs[0]._suptitle.get_text()


def test_one_block_per_device_and_machine(tmp_path):
    rows = (sweep("aaaaaaa", "2026-11-30", 1.0) + sweep("ddddddd", "2026-11-29", 0.01,
                                                          device="cuda", ns=(4096, 16384, 65536)))
    fig = plot_bench.build_figure(plot_bench.load_rows(write(tmp_path / "bench_loss.jsonl",
                                                                rows)))
    assert [(s.device, s.machine, s.commit) for s in fig.sweeps] == [
        ("cpu", CPU, "aaaaaaa"), ("cuda", GPU, "ddddddd")]
    assert len(fig.subfigs) == 2 and GPU in fig.subfigs[1]._suptitle.get_text()
    gpu_lines = {line.get_gid(): line for ax in fig.subfigs[1].axes for line in ax.lines}
    assert list(gpu_lines["time:cross:fused"].get_xdata()) == [4096, 16384, 65536]
    assert "live:cross:fused" not in gpu_lines  # no live_peak_mb on CUDA: the allocator's peak
    assert gpu_lines["peak:cross:fused"].get_linestyle() == "-"


@pytest.mark.parametrize("content,match", [
    (None, "no such file"),
    ("", "is empty"),
    ("\n\n", "is empty"),
    ('{"op": "infonce"}\n{oops\n', r":2: not a JSON row"),
    ('{"kind": "summary", "cases": []}\n', "no loss benchmark case rows"),
])
def test_unusable_results_are_one_clear_error(tmp_path, content, match):
    if content is not None:
        (tmp_path / "bench_loss.jsonl").write_text(content)
    with pytest.raises(plot_bench.ResultsError, match=match):
        plot_bench.load_rows(tmp_path)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path), "--out",
                           str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 1 and not (tmp_path / "x.png").exists()
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert "bench_loss.jsonl" in proc.stderr


def test_script_writes_the_png(tmp_path):
    write(tmp_path / "bench_loss.jsonl", sweep("aaaaaaa", "2026-11-30", 1.0, skip_big=True))
    out = tmp_path / "figs" / "x.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path), "--out",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "commit aaaaaaa" in proc.stdout
    with Image.open(out) as image:
        image.verify()
        assert image.size[0] > 800 and image.size[1] > 600
