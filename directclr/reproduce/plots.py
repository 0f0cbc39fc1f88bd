"""The reproduction's figures: spectra.png (the final spectra of each mode) and dynamics.png
(the spectral measures over training)."""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..config import MODES
from ..plot import pyplot
from .evaluation import D0_FIELD_SUFFIX, dynamics_curve
from .runs import UNTRAINED, Budget, loss_view

DYNAMICS_PANELS = (("r", "effective_rank", "r: effective rank (centered)"),
                   ("r", "rankme_raw", "r: RankMe (raw, as published)"),
                   ("r[:d0]", "effective_rank", "r[:, :d0]: effective rank (centered)"),
                   ("r[d0:]", "effective_rank", "r[:, d0:]: effective rank (centered)"),
                   ("loss", "effective_rank",
                    "what the loss sees: eff. rank (centered) of\nz (projectors), r[:, :d0] "
                    "(directclr), r (simclr-none)"),
                   ("r", "below_1e-4", "r: eigenvalues < 1e-4 of the largest"),
                   ("r", "below_1e-6", "r: eigenvalues < 1e-6 of the largest"),
                   ("r", "dead", "r: dead channels (zero on every image)"))


def _color(mode: str) -> str:
    return f"C{MODES.index(mode)}" if mode in MODES else "0.45"  # the untrained row: grey


def plot_spectra(results: list[dict], path: Path) -> None:
    """Log spectra of seed-0 (or the first seed's) runs overlaid: the representation of each
    mode (solid; the untrained backbone grey, dotted), DirectCLR's r[:, :d0] and the projectors'
    outputs (dashed)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    first = {}
    for r in results:
        first.setdefault(r["mode"], r)
    for mode, r in first.items():
        color = _color(mode)  # one colour per mode in both panels
        eig = torch.tensor(r["spectrum"]["eigenvalues"]).clamp_min(1e-30).log10()
        left.plot(range(1, len(eig) + 1), eig.numpy(), lw=1.4, label=mode, color=color,
                  ls=":" if mode == UNTRAINED else "-")
        for key, label in (("spectrum_projector", f"{mode}: projector output"),
                           ("spectrum" + D0_FIELD_SUFFIX, f"{mode}: r[:, :d0]")):
            if key in r and mode != UNTRAINED:
                eig = torch.tensor(r[key]["eigenvalues"]).clamp_min(1e-30).log10()
                right.plot(range(1, len(eig) + 1), eig.numpy(), lw=1.4, ls="--", label=label,
                           color=color)
    left.set_title("representation r (what the probe sees)", fontsize=10)
    right.set_title("what the loss sees: projector output, or DirectCLR's r[:, :d0]",
                    fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("eigenvalue index (descending)")
        ax.set_ylabel("log10 eigenvalue of covariance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Fashion-MNIST, embedding spectra of the validation set (seed "
                 f"{next(iter(first.values()))['seed']}; exact zeros drawn at -30)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_dynamics(results: list[dict], path: Path, budget: Budget) -> None:
    """One panel per measure, one line per mode against the step: the mean over seeds, the band
    from the lowest to the highest seed."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5), dpi=100)
    modes = [m for m in MODES if any(r["mode"] == m and r.get("dynamics") for r in results)]
    for ax, (view, key, title) in zip(axes.flat, DYNAMICS_PANELS):
        for mode in modes:
            runs = [r for r in results if r["mode"] == mode and r.get("dynamics")]
            steps, values = dynamics_curve(runs, loss_view(mode) if view == "loss" else view, key)
            if not steps:
                continue
            mean = [statistics.fmean(v) for v in values]
            ax.plot(steps, mean, lw=1.3, color=_color(mode),
                    label=f"{mode} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
            if len(runs) > 1:
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                                color=_color(mode), alpha=0.15, lw=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Training dynamics on {budget.dynamics_images} fixed validation images "
                 f"(every {budget.snapshot_every} steps; step 0 = untrained; mean over seeds, "
                 "band = lowest to highest seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
