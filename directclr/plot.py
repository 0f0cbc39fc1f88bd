"""Seeing a run: PNG figures and TensorBoard scalars from `directclr pretrain`'s metrics.jsonl.

metrics.jsonl holds one row per training step (step, epoch, lr, loss, probe_loss, grad_norm,
pairs_per_s, data_wait) and one row per finished epoch (epoch_end, step, probe_train_top1 and
spectrum: {"representation": summary, "subvector": summary}, each a ``Spectrum.summary()``).
``plot_run`` draws them; ``TensorBoardWriter`` logs the same rows as TensorBoard scalars.

The probe's chance level (1/classes, ln(classes) nats) is drawn where the class count is known:
the epoch rows' "classes", or ``--classes`` for runs written before the rows carried it.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("directclr.plot")

METRICS = "metrics.jsonl"
SPECTRA = {"representation": "r", "subvector": "r[:, :d0]"}


@dataclass
class Metrics:
    """The rows of one metrics.jsonl, in step order (a step logged twice keeps its last row)."""

    path: Path
    steps: list[dict] = field(default_factory=list)   # training-step rows
    epochs: list[dict] = field(default_factory=list)  # epoch-end rows

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a step-row key, skipping rows without it."""
        rows = [r for r in self.steps if isinstance(r.get(key), (int, float))]
        return [r["step"] for r in rows], [float(r[key]) for r in rows]

    def epoch_series(self, *keys: str) -> tuple[list[int], list[float]]:
        """(epochs completed, values) of a nested epoch-row key, e.g. ("spectrum",
        "subvector", "effective_rank"); epoch_end counts from 0, so epoch_end + 1."""
        xs, ys = [], []
        for row in self.epochs:
            value = row
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, (int, float)):
                xs.append(row["epoch_end"] + 1)
                ys.append(float(value))
        return xs, ys


def load_metrics(path) -> Metrics:
    """Parses a metrics.jsonl (or the run folder holding one). Raises ValueError naming the
    file when it is missing, empty or malformed; a truncated last line (no newline: a writer
    killed mid-row) is dropped with a warning."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a `directclr pretrain --out` folder holds "
                         f"{METRICS})")
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    complete = text.endswith("\n")
    if complete:
        lines.pop()  # the empty string after the last newline
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path} is empty: the run has logged no step yet (rows are written "
                         f"every --log-every steps)")
    metrics = Metrics(path)
    steps: dict[int, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not complete:
                log.warning("%s: ignoring the truncated last line %d (%s): the writer was "
                            "probably killed mid-row", path, number, err.msg)
                continue
            raise ValueError(f"{path}:{number}: not a JSON row ({err.msg}): "
                             f"{line[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: not a metrics row (a JSON object with an "
                             f"integer 'step'): {line[:80]!r}")
        if "epoch_end" in row:
            if not isinstance(row["epoch_end"], int):
                raise ValueError(f"{path}:{number}: 'epoch_end' is not an integer")
            metrics.epochs.append(row)
        elif isinstance(row.get("loss"), (int, float)):
            steps[row["step"]] = row
        else:
            raise ValueError(f"{path}:{number}: neither a step row (with 'loss') nor an epoch "
                             f"row (with 'epoch_end'): {line[:80]!r}")
    if not steps:
        raise ValueError(f"{path} holds no training-step rows")
    metrics.steps = [steps[s] for s in sorted(steps)]
    by_epoch = {row["epoch_end"]: row for row in metrics.epochs}
    metrics.epochs = [by_epoch[e] for e in sorted(by_epoch)]
    return metrics


# --------------------------------------------------------------------------- figures
def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no display needed), imported on use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _style(ax, xlabel: str, ylabel: str, title: str) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def _legend_below(ax, ncol: int = 2) -> None:
    """The axes' legend under its x label, outside the data (constrained layout makes room);
    none for a single entry, which the axis label already names."""
    if len(ax.get_legend_handles_labels()[0]) < 2:
        return
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol,
              frameon=False)


def _step_plot(ax, metrics: Metrics, key: str, color: str, label: str):
    """A step-row series: every point (with markers when few), a moving average over long runs,
    and the epoch ends as faint vertical lines. Returns the line of the raw data."""
    xs, ys = metrics.series(key)
    few = len(xs) <= 40
    raw = ax.plot(xs, ys, marker="o" if few else None, ms=3, lw=1.2 if few else 0.8,
                  color=color, alpha=1.0 if few else 0.35, label=label)[0]
    if not few:
        window = max(5, len(xs) // 40)
        smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1])
                  for i in range(len(ys))]
        ax.plot(xs, smooth, lw=1.6, color=color, label=f"mean of the last {window} steps")
    for row in metrics.epochs:
        ax.axvline(row["step"], color="gray", lw=0.6, ls=":", alpha=0.6)
    return raw


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, fontsize=9,
            color="gray")


def probe_classes(metrics: Metrics) -> int | None:
    """The online probe's class count, as epoch rows record it ("classes"); None in runs
    written before they did."""
    for row in metrics.epochs:
        classes = row.get("classes")
        if isinstance(classes, int) and not isinstance(classes, bool) and classes >= 2:
            return classes
    return None


def _data_limits(values: list[float], floor: float = 0.0) -> tuple[float, float]:
    """y limits that bracket the values with a margin (at least 5% of the largest, and one
    unit), never below `floor`."""
    low, high = min(values), max(values)
    pad = max(0.1 * (high - low), 0.05 * abs(high), 1.0)
    return max(floor, low - pad), high + pad


def build_figures(metrics: Metrics, name: str, classes: int | None = None) -> dict:
    """{file name: matplotlib Figure}: loss, lr, probe, rank (when an epoch has ended) and
    spectra (when epoch rows carry eigenvalues). `classes`: the probe's class count, for its
    chance level (default: what the rows record, see ``probe_classes``; None: not drawn).
    The caller saves and closes them."""
    plt = pyplot()
    figures = {}
    ends = " (dotted: epoch ends)" if metrics.epochs else ""
    classes = classes if classes is not None else probe_classes(metrics)

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120, layout="constrained")
    _step_plot(ax, metrics, "loss", "tab:blue", "InfoNCE loss")
    _style(ax, "training step", "InfoNCE loss (nats)", f"{name}: training loss{ends}")
    _legend_below(ax)  # with a moving average over long runs
    figures["loss.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120, layout="constrained")
    _step_plot(ax, metrics, "lr", "tab:green", "learning rate")
    _style(ax, "training step", "learning rate (LARS, base lr)",
           f"{name}: learning rate (warm-up, then cosine)")
    _legend_below(ax)
    figures["lr.png"] = fig

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120, layout="constrained")
    _step_plot(left, metrics, "probe_loss", "tab:orange", "probe loss")
    unknown = "chance level not drawn: no class count in the rows; see --classes"
    if classes:
        left.axhline(math.log(classes), color="black", ls="--", lw=1,
                     label=f"chance: ln {classes} = {math.log(classes):.2f} nats")
    _style(left, "training step", "cross-entropy (nats)", f"{name}: online-probe loss{ends}")
    _legend_below(left)
    xs, ys = metrics.epoch_series("probe_train_top1")
    percents = [100 * y for y in ys]
    if xs:
        right.plot(xs, percents, marker="o", ms=4, color="tab:orange",
                   label="top-1 on training views")
    else:
        _no_data(right, "no epoch has ended yet")
        right.set_xlim(0, 1)
    shown = percents + ([100 / classes] if classes else [])
    # A percent axis from 0: to 100 with no accuracy yet, else a little above the highest point.
    top = 100.0 if not percents else min(100.0, 10 * math.ceil(max(shown) * 1.15 / 10 + 1e-9))
    right.set_ylim(0, max(top, 10.0))
    if classes:
        right.axhline(100 / classes, color="black", ls="--", lw=1,
                      label=f"chance: 1/{classes} = {100 / classes:.3g}%")
    _style(right, "epochs completed", "top-1 on training views (%)",
           f"{name}: online-probe accuracy per epoch"
           + ("" if classes else f"\n({unknown})"))
    _legend_below(right)
    figures["probe.png"] = fig

    if metrics.epochs:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120, layout="constrained")
        widths = metrics.epoch_series("spectrum", "representation", "dim")[1]
        for ax, (key, label), color in zip(axes, SPECTRA.items(), ("tab:blue", "tab:red")):
            ylabel = "centered effective rank (dims)"
            xs, ys = metrics.epoch_series("spectrum", key, "effective_rank")
            if not xs:
                _no_data(ax, "the epoch rows carry no spectrum")
                _style(ax, "epochs completed", ylabel, f"{name}: {label}")
                continue
            ax.plot(xs, ys, marker="o", ms=4, color=color,
                    label=f"centered effective rank of {label}")
            dims = metrics.epoch_series("spectrum", key, "dim")[1]
            about = []
            if dims and key == "subvector":
                about.append(f"d0 = {int(dims[-1])}"
                             + (f" of width {int(widths[-1])}" if widths else ""))
            elif dims:
                about.append(f"width {int(dims[-1])}")
            shown = list(ys)
            bound_x, bound = metrics.epoch_series("spectrum", key, "rank_bound")
            if dims and any(b < dims[-1] for b in bound):  # fewer rows than dims in an epoch
                about.append(f"rank <= N - 1 = {int(min(bound))}")
                if min(bound) <= 2 * max(ys):  # near enough to the data to draw
                    ax.plot(bound_x, bound, color="gray", ls=":", lw=1,
                            label="N - 1 rows: the most the sample can span")
                    shown += bound
            ax.set_ylim(*_data_limits(shown))
            _style(ax, "epochs completed", ylabel,
                   f"{name}: effective rank of {label}"
                   + (f"\n({', '.join(about)})" if about else ""))
            _legend_below(ax)
        figures["rank.png"] = fig

    eigen = [(row["epoch_end"] + 1, key, row["spectrum"][key]["eigenvalues"])
             for row in metrics.epochs for key in SPECTRA
             if isinstance(row.get("spectrum"), dict)
             and isinstance(row["spectrum"].get(key), dict)
             and isinstance(row["spectrum"][key].get("eigenvalues"), list)]
    if eigen:
        keys = [key for key in SPECTRA if any(k == key for _, k, _ in eigen)]
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), dpi=120,
                                 layout="constrained", squeeze=False)
        cmap = plt.get_cmap("viridis")
        first, last = min(e for e, _, _ in eigen), max(e for e, _, _ in eigen)
        for ax, key in zip(axes[0], keys):
            for epoch, _, values in (e for e in eigen if e[1] == key):
                logs = [math.log10(v) if v > 0 else math.nan for v in values]  # zeros: a gap
                ax.plot(range(1, len(logs) + 1), logs, lw=1.2, label=f"epoch {epoch}",
                        color=cmap((epoch - first) / max(last - first, 1)))
            if len(ax.lines) <= 8:
                ax.legend(fontsize=7, ncol=2)
            _style(ax, "singular value rank", "log10 eigenvalue of covariance",
                   f"{name}: spectrum of {SPECTRA[key]} per epoch")
        if len({e for e, _, _ in eigen}) > 8:  # too many for a legend: a colour bar
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize
            bar = fig.colorbar(ScalarMappable(Normalize(first, last), cmap), ax=axes[0].tolist())
            bar.set_label("epochs completed")
        figures["spectra.png"] = fig
    return figures


def plot_run(run_dir, out_dir=None, classes: int | None = None) -> list[Path]:
    """Writes the run's figures (loss.png, lr.png, probe.png, and rank.png / spectra.png when
    an epoch has ended / the epoch rows carry eigenvalues) into out_dir (default run_dir) and
    returns their paths. `classes`: the probe's class count for its chance level, where the
    rows do not record it."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    name = metrics.path.resolve().parent.name
    out = Path(out_dir) if out_dir is not None else metrics.path.parent
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    written = []
    for filename, fig in build_figures(metrics, name, classes).items():
        fig.savefig(out / filename)
        plt.close(fig)
        written.append(out / filename)
    if not metrics.epochs:
        log.warning("%s: no epoch has ended yet, so no rank.png (the spectra are logged at "
                    "epoch ends)", metrics.path)
    return written


# --------------------------------------------------------------------------- TensorBoard
# Row keys that index or describe a run rather than measure it (the step, the class count, a
# spectrum's rows, width, threshold and rank bound): no TensorBoard series of constants.
CONSTANT_KEYS = ("step", "epoch", "epoch_end", "classes", "n", "dim", "collapsed_rel",
                 "rank_bound")


class TensorBoardWriter:
    """The rows MetricsLog writes, as TensorBoard scalars at their step: a step row's numbers
    as train/<key> (train/loss, train/lr, ...), an epoch row's as epoch/<key>, nested keys
    joined by '/' (epoch/spectrum/subvector/effective_rank). purge_step: on a resumed run,
    the step it resumes from (TensorBoard then drops the earlier run's later points)."""

    def __init__(self, log_dir, purge_step: int | None = None, flush_secs: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("TensorBoard logging needs the tensorboard package: "
                              "pip install tensorboard") from err
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step,
                                    flush_secs=flush_secs)

    @staticmethod
    def scalars(row: dict) -> tuple[int, dict[str, float]]:
        """(step, {tag: value}) of one metrics row; lists (eigenvalues), text and CONSTANT_KEYS
        are skipped."""
        prefix = "epoch" if "epoch_end" in row else "train"
        tags: dict[str, float] = {}

        def walk(value, tag):
            if isinstance(value, dict):
                for key, inner in value.items():
                    if key not in CONSTANT_KEYS:
                        walk(inner, f"{tag}/{key}")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                tags[tag] = float(value)

        for key, value in row.items():
            if key not in CONSTANT_KEYS:
                walk(value, f"{prefix}/{key}")
        return int(row["step"]), tags

    def write(self, row: dict) -> None:
        step, tags = self.scalars(row)
        for tag, value in tags.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def export_tensorboard(run_dir, log_dir) -> Path:
    """Replays an existing metrics.jsonl into TensorBoard event files under log_dir."""
    metrics = load_metrics(run_dir)
    writer = TensorBoardWriter(log_dir)
    try:
        for row in sorted(metrics.steps + metrics.epochs,
                          key=lambda r: (r["step"], "epoch_end" in r)):
            writer.write(row)
    finally:
        writer.close()
    return Path(log_dir)


# --------------------------------------------------------------------------- CLI
def _plot(args) -> None:
    for path in plot_run(args.run_dir, args.out, args.classes):
        print(f"wrote {path}")
    if args.tensorboard:
        print(f"wrote TensorBoard events to {export_tensorboard(args.run_dir, args.tensorboard)}")


def add_plot_parser(commands) -> None:
    """`directclr plot RUN [--out DIR] [--classes C] [--tensorboard DIR]`."""
    from .config import bounded, path_type
    p = commands.add_parser(
        "plot", help="figures of a pretraining run's metrics.jsonl",
        description="PNG figures of a `directclr pretrain` run's metrics.jsonl: loss.png, "
                    "lr.png, probe.png, and rank.png / spectra.png once an epoch has ended.")
    p.add_argument("run_dir", metavar="RUN", type=path_type("existing"),
                   help="a `directclr pretrain --out` folder, or its metrics.jsonl")
    p.add_argument("--out", default=None, metavar="DIR", type=path_type("output_dir"),
                   help="where the PNGs go (default: the folder holding RUN's metrics.jsonl)")
    p.add_argument("--classes", type=bounded(int, low=2), default=None, metavar="C",
                   help="the online probe's class count, for its chance level (1/C, ln C) in "
                        "probe.png (default: what the rows record, else no chance line)")
    p.add_argument("--tensorboard", default=None, metavar="DIR", type=path_type("output_dir"),
                   help="also replay the metrics as TensorBoard scalars into DIR (default: not)")
    p.set_defaults(run=_plot)
