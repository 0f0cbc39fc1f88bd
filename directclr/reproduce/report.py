"""The reproduction's tables: every finished run aggregated by mode (means and spreads over
seeds, gains over the untrained row of the same seed), written as results.json, runs.json and
results.md, beside the figures (plots.py)."""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from ..config import PAPER_D0, PAPER_SIMCLR_OUT, PAPER_WIDTH
from ..provenance import git_commit
from .evaluation import D0_FIELD_SUFFIX, SMALL_EIGENVALUE_FRACTIONS, dynamics_curve
from .plots import plot_dynamics, plot_spectra
from .runs import KNN_K, KNN_TEMPERATURE, LONG_MODES, UNTRAINED, Budget, finished_runs, loss_view

# The paper's ImageNet top-1 (ResNet-50, 100 epochs), Tables 1 and 2
PAPER_TOP1 = {"simclr-mlp": 66.5, "simclr-linear": 61.1, "simclr-none": 51.5, "directclr": 62.7,
              "fixed-lowrank": 62.3, "diagonal": 60.2, "directclr (r[:, :d0] only)": 47.9}
D0_ROW_SUFFIX = " (r[:, :d0] only)"  # appended to the mode: the row of the probes of r[:, :d0]
SPECTRUM_KEYS = ("effective_rank", "rankme_raw", *SMALL_EIGENVALUE_FRACTIONS, "collapsed", "dead")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def dynamics_facts(runs: list[dict], mode: str) -> dict:
    """Per embedding (r, and what the loss sees) and measure, the mean over seeds at step 0, at
    its lowest and highest (and their steps) and at the end."""
    facts = {}
    for view in dict.fromkeys(("r", loss_view(mode))):
        for key in ("effective_rank", "rankme_raw", "below_1e-4", "dead"):
            steps, values = dynamics_curve(runs, view, key)
            if not steps:
                continue
            mean = [statistics.fmean(v) for v in values]
            low = min(range(len(mean)), key=mean.__getitem__)
            high = max(range(len(mean)), key=mean.__getitem__)
            facts.setdefault(view, {})[key] = {
                "start": mean[0], "start_step": steps[0], "min": mean[low],
                "min_step": steps[low], "max": mean[high], "max_step": steps[high],
                "end": mean[-1], "end_step": steps[-1]}
    return facts


def aggregate(results: list[dict], budget: Budget) -> list[dict]:
    """One row per mode (and one per probe of r[:, :d0] alone), means over seeds; probe gains
    over the untrained backbone of the same seed (r[:, :d0] over its r[:, :d0])."""
    base = {r["seed"]: r for r in results if r["mode"] == UNTRAINED}
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in results):
        runs = [r for r in results if r["mode"] == mode]
        variants = [("", mode)]
        if "probe" + D0_FIELD_SUFFIX in runs[0]:
            variants.append((D0_FIELD_SUFFIX, mode + D0_ROW_SUFFIX))
        for suffix, name in variants:
            row = {"mode": name, "epochs": budget.epochs_for(mode),
                   "seeds": [r["seed"] for r in runs]}
            for probe in ("probe", "knn"):
                per_seed = [100 * r[probe + suffix]["top1"] for r in runs]
                mean, std = _mean_std(per_seed)
                row.update({f"{probe}_top1_mean": mean, f"{probe}_top1_std": std,
                            f"{probe}_top1_per_seed": per_seed})
                paired = [r for r in runs if r["seed"] in base and mode != UNTRAINED]
                gains = [100 * (r[probe + suffix]["top1"] - base[r["seed"]][probe + suffix]["top1"])
                         for r in paired]
                mean, std = _mean_std(gains) if gains else (None, None)
                row.update({f"{probe}_gain_mean": mean, f"{probe}_gain_std": std,
                            f"{probe}_gain_per_seed": gains})
            spectra = [r["spectrum" + suffix] for r in runs]
            row["dim"] = spectra[0]["dim"]
            for key in SPECTRUM_KEYS:
                row[key], row[key + "_std"] = _mean_std([s[key] for s in spectra])
            if suffix == "" and "spectrum_projector" in runs[0]:
                projector = [r["spectrum_projector"] for r in runs]
                row["projector_dim"] = projector[0]["dim"]
                for key in SPECTRUM_KEYS:
                    row["projector_" + key] = statistics.fmean(s[key] for s in projector)
            if suffix == "" and any(r.get("dynamics") for r in runs):
                row["dynamics"] = dynamics_facts(runs, mode)
            walls = [r["wall_s"]["pretrain"] for r in runs if "wall_s" in r]
            row["pretrain_wall_s_mean"] = statistics.fmean(walls) if walls else None
            row["paper_imagenet_top1"] = PAPER_TOP1.get(name)
            rows.append(row)
    return rows


def mean_pm_std(mean, std, seeds: int, digits: int = 2, sign: bool = False) -> str:
    """A table cell: "mean ± std" over `seeds` seeds, the mean alone for one, "-" for none."""
    if mean is None:
        return "-"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if seeds > 1 else "")


def _provenance(results: list[dict]) -> list[str]:
    machines = sorted({r["machine"] for r in results if "machine" in r})
    dates = sorted(r["finished"] for r in results if "finished" in r)
    pretrain = sum(r["wall_s"]["pretrain"] for r in results if "wall_s" in r)
    evaluate = sum(r["wall_s"]["evaluate"] for r in results if "wall_s" in r)
    lines = []
    if machines:
        lines.append(f"Machine: {'; '.join(machines)}.")
    if dates:
        lines.append(f"Runs finished {dates[0][:16]} to {dates[-1][:16]} (UTC); wall time in "
                     f"all {(pretrain + evaluate) / 3600:.2f} h: pretraining "
                     f"{pretrain / 3600:.2f} h, evaluation {evaluate / 3600:.2f} h (per run: "
                     "runs.json, `wall_s`; pretraining minutes per run in the first table).")
    return lines


def _verdict_facts(rows: list[dict]) -> list[str]:
    """The comparisons the paper's two claims turn on, as numbers (no verdict)."""
    by_mode = {row["mode"]: row for row in rows}
    lines = []
    direct, none = by_mode.get("directclr"), by_mode.get("simclr-none")
    if direct and none:
        for probe, label in (("probe", "linear probe"), ("knn", "k-NN probe")):
            mine = dict(zip(direct["seeds"], direct[f"{probe}_top1_per_seed"]))
            theirs = dict(zip(none["seeds"], none[f"{probe}_top1_per_seed"]))
            seeds = [s for s in mine if s in theirs]
            if not seeds:
                continue
            diffs = [mine[s] - theirs[s] for s in seeds]
            mean, std = _mean_std(diffs)
            lines.append(
                f"- directclr − simclr-none, {label}, paired over seeds {seeds}: "
                f"{mean_pm_std(mean, std, len(seeds), sign=True)} points (per seed "
                f"{', '.join(f'{d:+.2f}' for d in diffs)}); seed std of each: directclr "
                f"{direct[f'{probe}_top1_std']:.2f}, simclr-none {none[f'{probe}_top1_std']:.2f}.")
        for key, label in (("effective_rank", "effective rank (centered)"),
                           ("rankme_raw", "RankMe (raw)"), ("below_1e-4", "eigenvalues < 1e-4"),
                           ("dead", "dead channels")):
            lines.append(f"- r, {label}: directclr "
                         f"{mean_pm_std(direct[key], direct[key + '_std'], 2, 1)}, simclr-none "
                         f"{mean_pm_std(none[key], none[key + '_std'], 2, 1)} (of "
                         f"{direct['dim']}; mean ± std over seeds).")
    for row in rows:
        facts = row.get("dynamics", {})
        mode = row["mode"]
        view = loss_view(mode)
        if mode.startswith("simclr") and view in facts:
            rank, count = facts[view]["effective_rank"], facts[view]["below_1e-4"]
            lines.append(
                f"- {mode}, what the loss sees ({view}): effective rank (centered) "
                f"{rank['start']:.1f} at step 0, lowest {rank['min']:.1f} at step "
                f"{rank['min_step']}, {rank['end']:.1f} at the end (step {rank['end_step']}); "
                f"eigenvalues < 1e-4 of the top {count['start']:.1f} → {count['end']:.1f}.")
    return lines


def _budget_paragraph(budget: Budget) -> str:
    return (f"Budget: {budget.arch} ({budget.width}-d representation), 32 px, {budget.images} "
            f"Fashion-MNIST training images, batches of {budget.batch_size}, LARS lr "
            f"{budget.lr}, warm-up a tenth of each run, temperature {budget.temperature}; "
            f"{budget.long_epochs} epochs for {', '.join(LONG_MODES)}, {budget.epochs} for the "
            f"other modes. Geometry as the paper's: d0 = {budget.dim} of {budget.width} "
            f"({budget.dim / budget.width:.3f}; paper {PAPER_D0}/{PAPER_WIDTH} = "
            f"{PAPER_D0 / PAPER_WIDTH:.3f}), SimCLR projector output {budget.simclr_out} "
            f"({budget.simclr_out / budget.width:.4g} of the width; paper "
            f"{PAPER_SIMCLR_OUT}/{PAPER_WIDTH} = {PAPER_SIMCLR_OUT / PAPER_WIDTH:.4g}), narrower "
            "than d0 as in the paper. `untrained`: each seed's initial weights, evaluated like "
            f"the trained ones. Linear probe on fixed standardized features, "
            f"{budget.probe_epochs} epochs, last-epoch top-1 on "
            f"{budget.val_images or 'the 10,000'} validation images; k-NN: cosine, k = {KNN_K}, "
            f"votes weighted exp(similarity / {KNN_TEMPERATURE}). Gain: points over the "
            "untrained row of the same seed (r[:, :d0] rows over the untrained r[:, :d0]), "
            "mean ± std over seeds.")


def _probe_table(rows: list[dict]) -> list[str]:
    lines = ["### Probes", "",
             "| mode | epochs | seeds | linear probe top-1 % | gain over untrained | "
             "k-NN top-1 % | gain over untrained | pretraining min/run | "
             "paper ImageNet top-1 % |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        seeds = len(row["seeds"])
        wall = row["pretrain_wall_s_mean"]
        lines.append(
            f"| {row['mode']} | {row['epochs']} | {seeds} | "
            f"{mean_pm_std(row['probe_top1_mean'], row['probe_top1_std'], seeds)} | "
            f"{mean_pm_std(row['probe_gain_mean'], row['probe_gain_std'], seeds, sign=True)} | "
            f"{mean_pm_std(row['knn_top1_mean'], row['knn_top1_std'], seeds)} | "
            f"{mean_pm_std(row['knn_gain_mean'], row['knn_gain_std'], seeds, sign=True)} | "
            f"{'-' if not wall else f'{wall / 60:.1f}'} | "
            f"{row['paper_imagenet_top1'] if row['paper_imagenet_top1'] is not None else '-'} |")
    return lines


def _spectrum_table(rows: list[dict]) -> list[str]:
    lines = ["### Spectra at the end of training", "",
             "Validation embeddings. Effective rank (centered): exp of the entropy of the "
             "singular values of the centered, L2-normalized rows (the covariance the paper "
             "plots); RankMe (raw, as published): Garrido et al. 2023, the singular values of the "
             "raw embedding matrix (uncentered, not normalized), p = s / sum(s) + 1e-7. "
             "< 1e-4, < 1e-6: covariance eigenvalues below that fraction of the largest; dead: "
             "channels exactly zero on every image (among the former). Means over seeds.", "",
             "| mode | dims | effective rank (centered) | RankMe (raw, as published) | "
             "< 1e-4 | < 1e-6 | dead | projector output: dims, eff. rank (centered), "
             "RankMe (raw), < 1e-4 |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        seeds = len(row["seeds"])
        projector = "-"
        if "projector_dim" in row:
            projector = (f"{row['projector_dim']}, {row['projector_effective_rank']:.1f}, "
                         f"{row['projector_rankme_raw']:.1f}, {row['projector_below_1e-4']:.3g}")
        lines.append(
            f"| {row['mode']} | {row['dim']} | "
            f"{mean_pm_std(row['effective_rank'], row['effective_rank_std'], seeds, 1)} | "
            f"{mean_pm_std(row['rankme_raw'], row['rankme_raw_std'], seeds, 1)} | "
            f"{row['below_1e-4']:.3g} | {row['below_1e-6']:.3g} | {row['dead']:.3g} | "
            f"{projector} |")
    return lines


def _dynamics_table(rows: list[dict], budget: Budget) -> list[str]:
    lines = ["### Training dynamics", "",
             f"On a fixed subset of {budget.dynamics_images} validation images, every "
             f"{budget.snapshot_every} steps; step 0 is the untrained network. Means over "
             "seeds: at step 0 → lowest (at step) → at the end. The curves: dynamics.png.",
             "", "| mode | embedding | effective rank (centered) | RankMe (raw) | "
             "< 1e-4 (step 0 → end) | dead (step 0 → end) |", "|---|---|---|---|---|---|"]
    for row in rows:
        for view, facts in row["dynamics"].items():
            cells = []
            for key in ("effective_rank", "rankme_raw"):
                f = facts[key]
                cells.append(f"{f['start']:.1f} → {f['min']:.1f} ({f['min_step']}) → "
                             f"{f['end']:.1f} ({f['end_step']})")
            for key in ("below_1e-4", "dead"):
                cells.append(f"{facts[key]['start']:.3g} → {facts[key]['end']:.3g}")
            lines.append(f"| {row['mode']} | {view} | {' | '.join(cells)} |")
    return lines


def write_markdown(rows: list[dict], budget: Budget, path: Path, command: str,
                   commit: str, results: list[dict] = ()) -> None:
    """results.md: where and how the runs were made, the probe and spectrum tables, the
    training dynamics (where measured) and the comparisons the paper's claims turn on."""
    lines = [f"Command: `{command}` (commit {commit}).", *_provenance(list(results)), "",
             _budget_paragraph(budget), "", *_probe_table(rows), "", *_spectrum_table(rows)]
    dynamic = [row for row in rows if row.get("dynamics")]
    if dynamic:
        lines += ["", *_dynamics_table(dynamic, budget)]
    facts = _verdict_facts(rows)
    if facts:
        lines += ["", "### The comparisons the paper's claims turn on (numbers only)", "", *facts]
    path.write_text("\n".join(lines) + "\n")


def write_reports(out, budget: Budget, command: str) -> list[dict]:
    """Over every finished run in `out` with this budget (e.g. from earlier calls with other
    --modes, or copied from other machines), writes results.json (the table's rows, with command,
    commit and budget), runs.json (every run's probes, spectra and dynamics), results.md,
    spectra.png and dynamics.png; returns the rows (none: nothing written)."""
    out = Path(out)
    results = finished_runs(out, budget)
    rows = aggregate(results, budget)
    if not rows:
        return rows
    commit = git_commit()
    meta = {"command": command, "commit": commit,
            "budget": {**asdict(budget), "dim": budget.dim, "width": budget.width,
                       "simclr_out": budget.simclr_out, "long_modes": list(LONG_MODES),
                       "knn_k": KNN_K, "knn_temperature": KNN_TEMPERATURE}}
    (out / "results.json").write_text(json.dumps([{**row, **meta} for row in rows], indent=1))
    (out / "runs.json").write_text(json.dumps({**meta, "runs": results}))
    write_markdown(rows, budget, out / "results.md", command, commit, results)
    plot_spectra(results, out / "spectra.png")
    plot_dynamics(results, out / "dynamics.png", budget)
    return rows
