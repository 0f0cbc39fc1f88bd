"""The paper's Tables 1 and 2 in miniature: every projector mode pretrained on Fashion-MNIST with
one backbone, budget and seed set, then probed and its spectrum measured, beside the untrained
backbone, with the training dynamics of the spectrum.

    directclr reproduce --out docs/results            # or: make reproduce

Scale (Budget): ResNet-18 at base width 16 (a 128-d representation), 32 px images, the first
`images` training images, batches of 256, LARS at the recipe's lr 4.8 with a tenth of the run as
warm-up, temperature 0.1. The paper's geometry, scaled with the representation: d0 = 22 of 128
(the paper's 360 of 2048, 0.18) and the SimCLR projectors' output 8 (its 128 of 2048, 1/16,
narrower than d0). The modes the paper's claims rest on (LONG_MODES: directclr, simclr-none,
simclr-linear) train `long_epochs` (20), the others `epochs` (4).

runs.py: the budget, each (mode, seed) run's pretraining in a subprocess and its records
(resuming); evaluation.py: the probes, spectra and training dynamics of a run; report.py: the
tables (results.md, results.json, runs.json); plots.py: spectra.png and dynamics.png.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..config import MODES
from .evaluation import (
    build_model,
    embed,
    evaluate,
    evaluate_model,
    evaluate_run,
    feature_probe,
    knn_probe,
    spectrum_summary,
    training_dynamics,
)
from .report import aggregate, write_markdown, write_reports
from .runs import (
    LONG_MODES,
    UNTRAINED,
    Budget,
    compute_threads,
    prepare_data,
    save_run,
    start_run,
    threads,
    timed_pretrain,
)

__all__ = ["Budget", "LONG_MODES", "UNTRAINED", "aggregate", "build_model", "embed",
           "evaluate_model", "evaluate_run", "feature_probe", "knn_probe", "reproduce",
           "spectrum_summary", "training_dynamics", "write_markdown", "write_reports"]


def reproduce(out, modes=MODES, seeds=(0, 1, 2), budget: Budget | None = None,
              command: str = "directclr reproduce", progress: bool = True) -> list[dict]:
    """Runs (or resumes) the untrained row and every mode, for each seed, then writes the reports
    over every finished run in `out` with this budget (``write_reports``); returns the rows."""
    budget = budget or Budget()
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"--modes: unknown {bad}; choose from {MODES}")
    if not seeds:
        raise ValueError("--seeds: at least one seed")
    out = Path(out)
    data = prepare_data(out, budget, progress)
    from tqdm import tqdm
    jobs = [(UNTRAINED, seed) for seed in seeds] + [(m, s) for m in modes for s in seeds]
    for mode, seed in tqdm(jobs, desc="reproduce", unit="run", disable=not progress):
        run_dir = start_run(out, mode, seed, budget)
        if run_dir is None:  # finished
            continue
        wall = timed_pretrain(mode, seed, budget, data, run_dir)
        start = time.perf_counter()
        with threads(compute_threads()):
            result = evaluate(mode, seed, budget, data, run_dir)
        wall["evaluate"] = time.perf_counter() - start
        save_run(run_dir, result, budget, wall)
    return write_reports(out, budget, command)
