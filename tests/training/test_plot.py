"""`directclr plot`, TensorBoard scalars, and the spectrum's sample-size bound (issue #15)."""
import argparse
import json
import logging
import math
import sys

import pytest
import torch
from PIL import Image

from directclr import embedding_spectrum
from directclr.config import Config
from directclr.metrics import MetricsLog
from directclr.plot import (
    TensorBoardWriter,
    add_plot_parser,
    build_figures,
    export_tensorboard,
    load_metrics,
    plot_run,
)
from directclr.report import spectrum_figure, write_report
from directclr.spectrum import Spectrum

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS_PER_EPOCH, EPOCHS, WIDTH, D0 = 5, 2, 16, 4


class _NoBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def write_run(run, steps=STEPS_PER_EPOCH * EPOCHS, eigenvalues=False):
    """A metrics.jsonl in the real format: step rows from metrics.MetricsLog itself, epoch rows
    shaped as pretrain() writes them, with real spectrum summaries. Returns what was written."""
    run.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run / "metrics.jsonl", Config(data="", out=str(run), batch_size=8), 1, 4,
                     _NoBar())
    gen = torch.Generator().manual_seed(1)
    written = {"loss": [], "lr": [], "probe_loss": [], "top1": [], "rank": [], "rank_sub": []}
    for step in range(1, steps + 1):
        loss, probe, lr = 5.0 - 0.1 * step + 0.01 * (step % 3), 1.4 - 0.02 * step, 0.3 * step
        log.add(step, (step - 1) // STEPS_PER_EPOCH, lr, torch.tensor([loss, probe, 1.0]), 0.0)
        written["loss"].append(loss)
        written["lr"].append(lr)
        written["probe_loss"].append(probe)
        if step % 3 == 0:
            log.flush()
        if step % STEPS_PER_EPOCH == 0:
            log.flush()
            rank = step // STEPS_PER_EPOCH + 1  # the spectrum changes from epoch to epoch
            rep = torch.randn(64, rank, generator=gen) @ torch.randn(rank, WIDTH, generator=gen)
            summary = {"representation": embedding_spectrum(rep).summary(),
                       "subvector": embedding_spectrum(rep[:, :D0]).summary()}
            if eigenvalues:
                summary["representation"]["eigenvalues"] = (
                    embedding_spectrum(rep).eigenvalues.tolist())
            top1 = 0.25 + 0.1 * rank
            log.epoch_row({"epoch_end": step // STEPS_PER_EPOCH - 1, "step": step,
                           "probe_train_top1": top1, "spectrum": summary})
            written["top1"].append(top1)
            written["rank"].append(summary["representation"]["effective_rank"])
            written["rank_sub"].append(summary["subvector"]["effective_rank"])
    log.flush()
    log.close()
    return written


def line_xy(fig, axis=0, line=0):
    xy = fig.axes[axis].lines[line].get_xydata()
    return xy[:, 0].tolist(), xy[:, 1].tolist()


def test_plot_run_writes_pngs_of_the_files_data(tmp_path):
    run = tmp_path / "my-run"
    written = write_run(run)
    paths = plot_run(run, tmp_path / "figs")
    assert [p.name for p in paths] == ["loss.png", "lr.png", "probe.png", "rank.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path
        with Image.open(path) as image:
            image.verify()
    assert not (run / "loss.png").exists()  # --out was honoured

    metrics = load_metrics(run)
    figs = build_figures(metrics, "my-run")
    steps = list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    assert line_xy(figs["loss.png"]) == (steps, pytest.approx(written["loss"], rel=1e-6))
    assert line_xy(figs["lr.png"]) == (steps, pytest.approx(written["lr"]))
    assert line_xy(figs["probe.png"]) == (steps, pytest.approx(written["probe_loss"], rel=1e-6))
    epochs = list(range(1, EPOCHS + 1))
    assert line_xy(figs["probe.png"], axis=1) == (epochs, pytest.approx(
        [100 * t for t in written["top1"]]))
    assert line_xy(figs["rank.png"], axis=0) == (epochs, pytest.approx(written["rank"]))
    assert line_xy(figs["rank.png"], axis=1) == (epochs, pytest.approx(written["rank_sub"]))
    assert "my-run" in figs["loss.png"].axes[0].get_title()
    assert "step" in figs["loss.png"].axes[0].get_xlabel()
    # rank.png names each spectrum's width in its title instead of drawing it as a ceiling
    assert f"width {WIDTH}" in figs["rank.png"].axes[0].get_title()
    assert f"d0 = {D0} of width {WIDTH}" in figs["rank.png"].axes[1].get_title()


def test_spectra_figure_when_epoch_rows_carry_eigenvalues(tmp_path):
    write_run(tmp_path, eigenvalues=True)
    metrics = load_metrics(tmp_path / "metrics.jsonl")
    fig = build_figures(metrics, "run")["spectra.png"]
    eig = metrics.epochs[-1]["spectrum"]["representation"]["eigenvalues"]
    _, ys = line_xy(fig, axis=0, line=EPOCHS - 1)
    assert ys == pytest.approx([math.log10(v) if v > 0 else math.nan for v in eig], nan_ok=True)
    assert "spectra.png" in [p.name for p in plot_run(tmp_path)]


def test_no_epoch_yet_skips_rank_and_warns(tmp_path, caplog):
    write_run(tmp_path, steps=3)
    with caplog.at_level(logging.WARNING, "directclr.plot"):
        names = [p.name for p in plot_run(tmp_path)]
    assert names == ["loss.png", "lr.png", "probe.png"]
    assert "no epoch has ended" in caplog.text


def test_truncated_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    write_run(tmp_path)
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 11, "epoch": 2, "lr": 0.1, "lo')  # killed mid-row
    with caplog.at_level(logging.WARNING, "directclr.plot"):
        metrics = load_metrics(path)
    assert "truncated last line" in caplog.text and str(path) in caplog.text
    assert metrics.steps[-1]["step"] == STEPS_PER_EPOCH * EPOCHS and len(metrics.epochs) == EPOCHS


def test_a_step_logged_twice_keeps_its_last_row(tmp_path):
    write_run(tmp_path, steps=3)
    path = tmp_path / "metrics.jsonl"
    row = json.loads(path.read_text().splitlines()[1])
    with path.open("a") as f:
        f.write(json.dumps({**row, "loss": 123.0}) + "\n")
    metrics = load_metrics(path)
    assert [r["step"] for r in metrics.steps] == [1, 2, 3]
    assert metrics.steps[1]["loss"] == 123.0


GOOD = '{"step": 1, "epoch": 0, "lr": 0.1, "loss": 4.0, "probe_loss": 1.0}\n'


@pytest.mark.parametrize("content,match", [
    (None, "no such file"),
    ("", "is empty"),
    ("\n  \n", "is empty"),
    (GOOD + "{not json}\n" + GOOD, r":2: not a JSON row"),
    (GOOD + '{"step": 2, "lo\n', r":2: not a JSON row"),  # cut, but a newline after: corrupt
    (GOOD + "[1, 2]\n", r":2: not a metrics row"),
    (GOOD + '{"loss": 3.0}\n', r":2: not a metrics row"),
    (GOOD + '{"step": 2, "what": 1}\n', r":2: neither a step row"),
    ('{"epoch_end": 0, "step": 5, "probe_train_top1": 0.3}\n', "no training-step rows"),
])
def test_malformed_metrics_raise_value_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        plot_run(tmp_path)
    assert str(path) in str(err.value)


def test_plot_subcommand(tmp_path, capsys):
    write_run(tmp_path / "run")
    parser = argparse.ArgumentParser(prog="directclr")
    add_plot_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plot", str(tmp_path / "run")])
    args.run(args)
    printed = capsys.readouterr().out
    for name in ("loss.png", "lr.png", "probe.png", "rank.png"):
        assert (tmp_path / "run" / name).is_file() and str(tmp_path / "run" / name) in printed
    args = parser.parse_args(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "o"),
                              "--tensorboard", str(tmp_path / "tb")])
    args.run(args)
    assert (tmp_path / "o" / "rank.png").is_file()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_round_trip(tmp_path):
    write_run(tmp_path / "run")
    metrics = load_metrics(tmp_path / "run")
    writer = TensorBoardWriter(tmp_path / "tb")
    for row in metrics.steps + metrics.epochs:  # exactly the rows MetricsLog wrote
        writer.write(row)
    writer.close()
    events = read_events(tmp_path / "tb")
    assert events["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6))
                                    for r in metrics.steps]
    assert [s for s, _ in events["train/lr"]] == [r["step"] for r in metrics.steps]
    for key in ("probe_loss", "grad_norm", "pairs_per_s", "data_wait"):
        assert len(events[f"train/{key}"]) == len(metrics.steps)
    rank = events["epoch/spectrum/subvector/effective_rank"]
    assert rank == [(r["step"], pytest.approx(r["spectrum"]["subvector"]["effective_rank"]))
                    for r in metrics.epochs]
    assert [v for _, v in events["epoch/probe_train_top1"]] == pytest.approx(
        [r["probe_train_top1"] for r in metrics.epochs])
    assert "train/step" not in events and "train/epoch" not in events
    # no series of constants (a spectrum's rows, width, threshold and bound; the class count)
    assert "epoch/spectrum/subvector/collapsed" in events
    assert not [tag for tag in events if tag.rsplit("/", 1)[-1] in
                ("n", "dim", "collapsed_rel", "rank_bound", "classes")], sorted(events)
    # the replay of a finished run writes the same scalars
    export_tensorboard(tmp_path / "run", tmp_path / "tb2")
    assert read_events(tmp_path / "tb2")["train/loss"] == events["train/loss"]


def test_tensorboard_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardWriter(tmp_path / "tb")


def test_spectrum_knows_its_sample_size_bound():
    x = torch.randn(200, 512, generator=torch.Generator().manual_seed(0))
    spec = embedding_spectrum(x)
    assert spec.rank_bound == 199 and spec.sample_limited
    assert spec.collapsed() == 313  # all of them by the sample size
    assert "200 rows for 512 dimensions" in spec.sample_size_note
    assert "at most 199 (N - 1)" in spec.sample_size_note
    assert "313 of the 512" in spec.sample_size_note
    assert spec.summary()["rank_bound"] == 199
    square = embedding_spectrum(torch.randn(64, 64))  # N == D: rank <= 63, one forced
    assert square.rank_bound == 63 and square.sample_limited
    wide = embedding_spectrum(torch.randn(65, 64))
    assert wide.rank_bound == 64 and not wide.sample_limited and wide.sample_size_note is None


@pytest.mark.parametrize("n,warns", [(40, True), (64, True), (65, False)])
def test_spectrum_report_warns_when_rows_do_not_exceed_dims(tmp_path, caplog, n, warns):
    spec = embedding_spectrum(torch.randn(n, 64, generator=torch.Generator().manual_seed(n)))
    with caplog.at_level(logging.WARNING, "directclr.report"):
        json_path, png_path = write_report(spec, tmp_path, "representation")
    report = json.loads(json_path.read_text())
    assert report["rank_bound"] == min(n - 1, 64)
    assert png_path.read_bytes().startswith(PNG_MAGIC)
    if warns:
        assert f"at most {n - 1} (N - 1)" in caplog.text
        assert report["sample_size_warning"] == spec.sample_size_note
        assert report["collapsed"] >= 64 - (n - 1)  # the bound shows in the count
    else:
        assert caplog.text == "" and report["sample_size_warning"] is None


# --------------------------------------------------------------------------- issue 23 item 7
@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


def write_wide_run(run, ranks, width=512, d0=64, bound=None, extra=None, steps_per_epoch=4):
    """A run whose epoch rows report the given centered effective ranks of a `width`-wide r (and
    half of each for r[:, :d0]), through MetricsLog as pretrain() writes them; `bound`: the
    rank_bound (N - 1) of each epoch's spectrum, `extra`: keys added to every epoch row."""
    run.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run / "metrics.jsonl", Config(data="", out=str(run), batch_size=8), 1, 10,
                     _NoBar())
    step = 0
    for epoch, rank in enumerate(ranks):
        for _ in range(steps_per_epoch):
            step += 1
            log.add(step, epoch, 0.1, torch.tensor([5.0 - 0.01 * step, 2.3, 1.0]), 0.0)
        log.flush()
        summary = {key: {"n": 256, "dim": dim, "effective_rank": value, "rankme_raw": value / 2,
                         "collapsed": 0, "collapsed_rel": 1e-6, "top_eigenvalue": 1.0,
                         "rank_bound": min(dim, bound if bound is not None else 10**6)}
                   for key, dim, value in (("representation", width, rank),
                                           ("subvector", d0, rank / 2))}
        log.epoch_row({"epoch_end": epoch, "step": step, "probe_train_top1": 0.2 + 0.01 * epoch,
                       "spectrum": summary, **(extra or {})})
    log.close()
    return load_metrics(run)


def test_rank_axis_brackets_the_data_not_the_width(tmp_path):
    ranks = [23.0, 31.5, 38.0, 45.0]
    fig = build_figures(write_wide_run(tmp_path, ranks), "wide")["rank.png"]
    for ax, values, what in zip(fig.axes, (ranks, [r / 2 for r in ranks]),
                                ("width 512", "d0 = 64 of width 512")):
        low, high = ax.get_ylim()
        assert low < min(values) and max(values) < high  # every point inside, with a margin
        assert low > 0 and high < 64  # scaled to the data: not 0..width (512, or 64 for d0)
        assert (high - low) < 3 * (max(values) - min(values))
        assert what in ax.get_title()  # the width is stated, not drawn
        assert not any(512 in line.get_ydata() or 64 in line.get_ydata() for line in ax.lines)
        # labelled for what it is: exp(entropy) of the centered spectrum, not RankMe
        assert ax.get_ylabel() == "centered effective rank (dims)"
        assert "RankMe" not in ax.get_ylabel() + ax.get_title()
    assert line_xy(fig, axis=0) == ([1, 2, 3, 4], pytest.approx(ranks))


def test_rank_draws_the_sample_bound_when_near_the_data(tmp_path):
    fig = build_figures(write_wide_run(tmp_path, [20.0, 30.0], bound=39), "b")["rank.png"]
    ax = fig.axes[0]
    bound = [line for line in ax.lines if line.get_label().startswith("N - 1")]
    assert len(bound) == 1 and list(bound[0].get_ydata()) == [39, 39]
    assert ax.get_ylim()[1] > 39 and ax.get_ylim()[1] < 100
    assert "rank <= N - 1 = 39" in ax.get_title()
    # far above the data (255 vs ~30): named in the title, not drawn, the axis stays on the data
    fig = build_figures(write_wide_run(tmp_path / "far", [20.0, 30.0], bound=255),
                        "b")["rank.png"]
    assert "N - 1 = 255" in fig.axes[0].get_title()
    assert len(fig.axes[0].lines) == 1 and fig.axes[0].get_ylim()[1] < 40


def _disjoint(a, b) -> bool:
    return a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0


def test_legends_sit_outside_the_data(tmp_path):
    metrics = write_wide_run(tmp_path, [23.0, 45.0], bound=40, steps_per_epoch=30)
    figs = build_figures(metrics, "run", classes=10)
    legends = 0
    for name in ("loss.png", "probe.png", "rank.png"):
        fig = figs[name]
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            legends += 1
            box = legend.get_window_extent(renderer)
            assert _disjoint(box, ax.get_window_extent(renderer)), (name, ax.get_title())
            for line in ax.lines:  # and so no data point lies under it
                for x, y in ax.transData.transform(line.get_xydata()):
                    assert not box.contains(x, y), (name, line.get_label())
    # loss (moving average), probe loss and accuracy (chance), both ranks (N - 1 = 40 near both)
    assert legends == 5


def chance_lines(ax):
    return [line for line in ax.lines if line.get_label().startswith("chance")]


@pytest.mark.parametrize("extra,classes,expected", [
    ({"classes": 10}, None, 10),
    ({}, 10, 10),                 # --classes where the rows do not say
    ({"classes": 10}, 4, 4),      # --classes wins
])
def test_probe_draws_the_chance_level(tmp_path, extra, classes, expected):
    metrics = write_wide_run(tmp_path, [23.0, 45.0], extra=extra)
    left, right = build_figures(metrics, "run", classes=classes)["probe.png"].axes
    (accuracy,) = chance_lines(right)
    assert accuracy.get_ydata()[0] == pytest.approx(100 / expected)  # in percent, like the data
    assert accuracy.get_linestyle() == "--" and f"1/{expected}" in accuracy.get_label()
    (loss,) = chance_lines(left)
    assert loss.get_ydata()[0] == pytest.approx(math.log(expected))
    assert f"ln {expected}" in loss.get_label()
    assert right.get_ylim()[0] == 0 and right.get_ylim()[1] > 100 / expected
    assert right.get_ylim()[1] > max(line_xy(right.figure, axis=1)[1])


def test_probe_without_class_count_says_so(tmp_path):
    metrics = write_wide_run(tmp_path, [23.0, 45.0])
    left, right = build_figures(metrics, "run")["probe.png"].axes
    assert not chance_lines(left) and not chance_lines(right)
    assert "--classes" in right.get_title()


def test_probe_percent_axis_without_epochs(tmp_path):
    write_run(tmp_path, steps=3)  # no epoch has ended: no accuracy point
    fig = build_figures(load_metrics(tmp_path), "run")["probe.png"]
    right = fig.axes[1]
    assert "(%)" in right.get_ylabel()
    assert right.get_ylim() == (0, 100)  # percent units, not matplotlib's empty 0..1
    fig.canvas.draw()
    assert max(right.get_yticks()) == 100
    fig = build_figures(load_metrics(tmp_path), "run", classes=10)["probe.png"]
    assert fig.axes[1].get_ylim() == (0, 100) and chance_lines(fig.axes[1])


def spectrum_with_zeros(values, zeros, n=1000):
    eig = torch.tensor(sorted(values, reverse=True) + [0.0] * zeros, dtype=torch.float64)
    return Spectrum(eig, n)


def texts(fig):
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_spectrum_figure_draws_positive_values_threshold_and_zero_count():
    values = [2.0, 1.0, 0.5, 1e-3, 1e-9, 1e-12]
    spec = spectrum_with_zeros(values, zeros=4)
    fig = spectrum_figure(spec, "representation")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    data = [line for line in ax.lines if line.get_label() == "eigenvalues > 0"]
    assert len(data) == 1
    assert list(data[0].get_xdata()) == [1, 2, 3, 4, 5, 6]  # the zeros are not drawn at all
    assert list(data[0].get_ydata()) == pytest.approx(sorted(values, reverse=True))
    assert min(ax.get_ylim()) > 0
    (threshold,) = [line for line in ax.lines if "collapse threshold" in line.get_label()]
    assert threshold.get_ydata()[0] == pytest.approx(1e-6 * 2.0)  # Spectrum.collapsed's default
    assert threshold.get_linestyle() == "--"
    assert f"({spec.collapsed()} below)" in threshold.get_label() and spec.collapsed() == 6
    assert "4 of 10 eigenvalues are exactly 0" in texts(fig)
    assert ax.get_legend() is not None
    # another relative threshold moves the line and the count
    fig = spectrum_figure(spec, "representation", rel=1e-2)
    (threshold,) = [line for line in fig.axes[0].lines if "collapse" in line.get_label()]
    assert threshold.get_ydata()[0] == pytest.approx(2e-2) and "(7 below)" in threshold.get_label()


def test_spectrum_figure_without_zeros_and_all_zero():
    fig = spectrum_figure(spectrum_with_zeros([3.0, 2.0, 1.0], zeros=0), "r")
    assert "no eigenvalue is exactly 0" in texts(fig)
    fig = spectrum_figure(spectrum_with_zeros([], zeros=8), "r")
    assert "all 8 eigenvalues are 0" in texts(fig)
    assert not fig.axes[0].lines  # nothing drawable, and no threshold at 0


def test_write_report_png_is_the_figure(tmp_path):
    spec = spectrum_with_zeros([2.0, 1.0, 1e-8], zeros=2)
    json_path, png_path = write_report(spec, tmp_path, "representation", rel=1e-3)
    assert json.loads(json_path.read_text())["collapsed"] == 3
    with Image.open(png_path) as image:
        image.verify()
