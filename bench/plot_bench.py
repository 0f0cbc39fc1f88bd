"""The loss benchmark as a picture: time and memory against N for the fused op, the eager
reference and torch.compile(reference), from bench/results/bench_loss.jsonl.

    python bench/plot_bench.py                          # -> docs/benchmarks.png
    python bench/plot_bench.py --results DIR --out FILE

For every (device, machine, dtype) in the rows it draws the newest complete sweep: the rows
`bench_loss.py` appended in one run, i.e. of one commit and date (a "+dirty" suffix aside: the
run's own appended rows dirty the tree after its first row) that end with the run's summary row,
every case the summary lists being present. With none complete, the newest sweep is drawn and
its title says it is incomplete. A case run twice in one sweep keeps its last row.

Each sweep is one block of panels, one column per variant (cross, ntxent): fwd+bwd time
(log-log), and peak memory above the inputs (log-log), with lines per implementation. On CPU
two memory measures: `live_peak_mb` (solid; a second one-step process whose buffers above
128 KiB are each mapped and unmapped, so the peak of what is held) and `peak_mem_mb` (dashed;
the RSS high-water mark, which glibc's retained heaps inflate); on CUDA `peak_mem_mb` is
torch.cuda.max_memory_allocated. The input gradients (2 N D, which every implementation
returns) are drawn as the floor. Cases a sweep skipped (too large for memory) are named under
the panel.

Not drawn: bench/results/gpu_static.jsonl. Its H200 numbers are static estimates (SASS and a
roofline, no GPU), at a single N (65,536) in bfloat16, with no compiled provider and no memory:
one point per variant would not make a line against N, and estimated seconds beside measured
ones invite a misreading. `python -m directclr.gpu_report` prints them as a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
OUT = REPO / "docs" / "benchmarks.png"
FILE = "bench_loss.jsonl"

# provider in the rows: (name on the plot, colour, marker)
PROVIDERS = {
    "fused": ("fused (directclr)", "tab:blue", "o"),
    # the CPU op's other path where "fused" keeps its dots (small N): no N x N at all
    "fused-recompute": ("fused, recomputing tiles", "tab:purple", "v"),
    "reference": ("eager reference", "tab:orange", "s"),
    "compiled": ("torch.compile(reference)", "tab:green", "^"),
}
VARIANTS = ("cross", "ntxent")
# The sweeps drawn: bench_loss.py's default, --malloc warm, and the rows from before it existed
# (a fresh process's allocator, recorded as "default").
PLOTTED_MALLOC = ("warm", "default")


class ResultsError(ValueError):
    """The results cannot be plotted: missing, empty or malformed file, or no case rows."""


@dataclass
class Sweep:
    """The rows of one bench_loss.py run on one device and machine."""

    device: str
    machine: str
    dtype: str
    commit: str  # without "+dirty"
    date: str
    malloc: str  # the allocator's state in the timed processes (bench_loss.py --malloc)
    cases: dict = field(default_factory=dict)  # (variant, N, provider) -> its last row
    summary: dict | None = None
    last_line: int = 0  # where in the file its newest row is: orders sweeps of one date

    @property
    def key(self) -> tuple[str, str, str]:
        return self.device, self.machine, self.dtype

    @property
    def complete(self) -> bool:
        """It ended (its summary row was written) and every case the summary lists is here."""
        if self.summary is None:
            return False
        listed = {(c.get("variant"), c.get("N"), c.get("provider"))
                  for c in self.summary.get("cases", [])}
        return listed <= set(self.cases)

    def stamp(self, key: str) -> str | None:
        """A provenance field (torch, triton, the commit as stamped) from its rows."""
        for row in [self.summary or {}, *self.cases.values()]:
            if row.get(key):
                return row[key]
        return None

    def ok(self, variant: str, provider: str) -> list[dict]:
        """Its measured rows of one line, in N order."""
        return sorted((r for (v, _, p), r in self.cases.items()
                       if v == variant and p == provider and r.get("status") == "ok"),
                      key=lambda r: r["N"])

    def skipped(self, variant: str) -> list[dict]:
        return sorted((r for (v, _, _), r in self.cases.items()
                       if v == variant and r.get("status") != "ok"),
                      key=lambda r: (r["N"], list(PROVIDERS).index(r["provider"])
                                     if r["provider"] in PROVIDERS else 99))


def load_rows(results) -> list[dict]:
    """The rows of <results>/bench_loss.jsonl (or of that file itself); ResultsError naming the
    file when it is missing, empty or not JSON rows."""
    path = Path(results)
    if path.is_dir() or not path.suffix:
        path = path / FILE
    if not path.is_file():
        raise ResultsError(f"{path}: no such file (python bench/bench_loss.py, or make bench, "
                           f"appends the loss benchmark's rows there)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ResultsError(f"{path}:{number}: not a JSON row ({err.msg})") from None
        if not isinstance(row, dict):
            raise ResultsError(f"{path}:{number}: not a JSON object")
        rows.append({**row, "_line": number})
    if not rows:
        raise ResultsError(f"{path} is empty: no benchmark has been recorded")
    if not any(_is_case(r) for r in rows):
        raise ResultsError(f"{path} holds no loss benchmark case rows (with provider, variant, "
                           f"N, status, device, machine, commit and date)")
    return rows


def _is_case(row: dict) -> bool:
    return (row.get("kind") != "summary" and all(
        row.get(k) is not None for k in ("provider", "variant", "N", "status", "device",
                                         "machine", "commit", "date")))


def _base(commit: str) -> str:
    return commit.removesuffix("+dirty")


def sweeps(rows: list[dict]) -> list[Sweep]:
    """Every sweep in the rows, oldest first."""
    found: dict[tuple, Sweep] = {}
    for row in rows:
        summary = row.get("kind") == "summary"
        if not (summary or _is_case(row)) or not row.get("device") or not row.get("commit"):
            continue
        malloc = row.get("malloc", "default")
        if malloc not in PLOTTED_MALLOC:  # another experiment (bench_loss.py --malloc)
            continue
        key = (row["device"], row.get("machine") or "?", row.get("dtype") or "?",
               _base(row["commit"]), row.get("date") or "?", malloc)
        sweep = found.setdefault(key, Sweep(*key))
        if summary:
            sweep.summary = row
        else:
            sweep.cases[(row["variant"], row["N"], row["provider"])] = row
        sweep.last_line = max(sweep.last_line, row.get("_line", 0))
    return sorted((s for s in found.values() if s.cases), key=lambda s: (s.date, s.last_line))


def newest_sweeps(rows: list[dict]) -> list[Sweep]:
    """Per (device, machine, dtype), the newest complete sweep (else the newest one), CPU
    first."""
    chosen: dict[tuple, Sweep] = {}
    for sweep in sweeps(rows):  # oldest first: a later one replaces an earlier one
        held = chosen.get(sweep.key)
        if held is None or sweep.complete or not held.complete:
            chosen[sweep.key] = sweep
    return sorted(chosen.values(), key=lambda s: (s.device != "cpu", s.device, s.machine,
                                                  s.dtype))


# --------------------------------------------------------------------------- the figure
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _provenance(sweep: Sweep) -> str:
    versions = ", ".join(f"{name} {sweep.stamp(key)}" for key, name in
                         (("torch", "torch"), ("triton", "Triton")) if sweep.stamp(key))
    text = (f"{sweep.device.upper()}: {sweep.machine}, {sweep.dtype}\n"
            f"{sweep.date}, commit {sweep.stamp('commit') or sweep.commit}, "
            f"allocator {'fresh' if sweep.malloc == 'default' else sweep.malloc}"
            + (f", {versions}" if versions else ""))
    if not sweep.complete:
        text += " (INCOMPLETE: the run wrote no summary row, or cases are missing)"
    return text


def _n_axis(ax, ns) -> None:
    from matplotlib.ticker import NullLocator
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, labels=[f"{n:,}" for n in ns])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("N (rows per view)")
    ax.grid(alpha=0.3, which="both")


def _skipped_note(sweep: Sweep, variant: str) -> str:
    notes: dict[tuple, list[str]] = {}
    for row in sweep.skipped(variant):
        name = PROVIDERS.get(row["provider"], (row["provider"],))[0]
        notes.setdefault((row["N"], row["status"]), []).append(name)
    return "; ".join(f"not run at N={n:,}: {', '.join(names)} ({status})"
                     for (n, status), names in notes.items())


def _draw_sweep(subfig, sweep: Sweep) -> None:
    from matplotlib.lines import Line2D
    variants = [v for v in VARIANTS if any(k[0] == v for k in sweep.cases)]
    variants += sorted({k[0] for k in sweep.cases} - set(variants))
    axes = subfig.subplots(2, len(variants), squeeze=False)
    cpu = sweep.device == "cpu"
    has_live = False
    for column, variant in enumerate(variants):
        time_ax, mem_ax = axes[0][column], axes[1][column]
        rows = [r for (v, _, _), r in sweep.cases.items() if v == variant]
        ns = sorted({r["N"] for r in rows})
        shape = next((r for r in rows if r.get("D")), {})
        about = ", ".join(f"{k}={shape[k]}" for k in ("D", "dim") if shape.get(k))
        for provider, (name, colour, marker) in PROVIDERS.items():
            done = sweep.ok(variant, provider)
            if not done:
                continue
            xs = [r["N"] for r in done]
            time_ax.plot(xs, [r["fwd_bwd_ms"] for r in done], color=colour, marker=marker,
                         lw=1.5, label=name, gid=f"time:{variant}:{provider}")
            live = [(r["N"], r["live_peak_mb"]) for r in done
                    if isinstance(r.get("live_peak_mb"), (int, float))]
            if live:
                has_live = True
                mem_ax.plot(*zip(*live), color=colour, marker=marker, lw=1.5,
                            label=f"{name}: live peak", gid=f"live:{variant}:{provider}")
            peak = [(r["N"], r["peak_mem_mb"]) for r in done
                    if isinstance(r.get("peak_mem_mb"), (int, float))]
            if peak:
                mem_ax.plot(*zip(*peak), color=colour, marker=marker, ms=4 if cpu else 6,
                            lw=1 if cpu else 1.5, ls="--" if cpu else "-",
                            alpha=0.8 if cpu else 1.0, mfc="none" if cpu else colour,
                            label=f"{name}: {'RSS high-water' if cpu else 'peak allocated'}",
                            gid=f"peak:{variant}:{provider}")
        grads = sorted({(r["N"], r["grad_mb"]) for r in rows
                        if isinstance(r.get("grad_mb"), (int, float))})
        if grads:
            mem_ax.plot(*zip(*grads), color="black", ls=":", lw=1,
                        label="input gradients 2 N D", gid=f"grad:{variant}")
        time_ax.set_yscale("log")
        mem_ax.set_yscale("log")
        for ax in (time_ax, mem_ax):
            _n_axis(ax, ns)
        time_ax.set_ylabel("fwd + bwd time (ms)")
        mem_ax.set_ylabel("peak memory above the inputs (MiB)")
        time_ax.set_title(f"{variant}: time" + (f" ({about})" if about else ""), fontsize=9)
        mem_ax.set_title(f"{variant}: memory", fontsize=9)
        note = _skipped_note(sweep, variant)
        if note:
            mem_ax.text(0.5, -0.3, note, transform=mem_ax.transAxes, ha="center", va="top",
                        fontsize=7, color="dimgray", wrap=True)
    handles = [Line2D([], [], color=c, marker=m, lw=1.5, label=name)
               for provider, (name, c, m) in PROVIDERS.items()
               if any(k[2] == provider for k in sweep.cases)]
    if has_live:
        handles += [Line2D([], [], color="gray", lw=1.5, label="memory: live peak (solid)"),
                    Line2D([], [], color="gray", lw=1, ls="--", mfc="none", marker="o", ms=4,
                           label="memory: RSS high-water (dashed)")]
    handles.append(Line2D([], [], color="black", ls=":", lw=1,
                          label="input gradients 2 N D: every provider's floor"))
    subfig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8,
                  frameon=False)
    subfig.suptitle(_provenance(sweep), fontsize=10)


def build_figure(rows: list[dict]):
    """The figure of the newest sweep per (device, machine, dtype): a block of panels each."""
    plt = _pyplot()
    chosen = newest_sweeps(rows)
    if not chosen:
        raise ResultsError("no sweep with device, machine, commit and date in the rows")
    width = max(2, max(len({k[0] for k in s.cases}) for s in chosen))
    fig = plt.figure(figsize=(5.5 * width, 7.4 * len(chosen)), dpi=110, layout="constrained")
    fig.suptitle("InfoNCE loss, forward + backward: fused vs eager vs torch.compile "
                 "(bench/bench_loss.py)", fontsize=12, fontweight="bold")
    subfigs = fig.subfigures(len(chosen), 1, squeeze=False)[:, 0]
    for subfig, sweep in zip(subfigs, chosen):
        _draw_sweep(subfig, sweep)
    fig.sweeps = chosen  # what was drawn, for the caller
    return fig


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS.relative_to(REPO)
                        if Path.cwd() == REPO else RESULTS,
                        help=f"the folder holding {FILE} (or that file)")
    parser.add_argument("--out", type=Path, default=OUT.relative_to(REPO)
                        if Path.cwd() == REPO else OUT, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        rows = load_rows(args.results)
        fig = build_figure(rows)
    except ResultsError as err:
        sys.exit(f"plot_bench.py: {err}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    for sweep in fig.sweeps:
        print(f"{sweep.device} {sweep.machine} {sweep.dtype}: {sweep.date}, commit "
              f"{sweep.stamp('commit')}, {len(sweep.cases)} cases"
              + ("" if sweep.complete else " (incomplete)"))
    _pyplot().close(fig)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
