"""The paper's Tables 1 and 2 in miniature: every projector mode pretrained on Fashion-MNIST with
one backbone, budget and seed set, then probed and its spectrum measured, beside the untrained
backbone, with the training dynamics of the spectrum.

    directclr reproduce --out docs/results            # or: make reproduce

Scale (Budget): ResNet-18 at base width 16 (a 128-d representation), 32 px images, the first
`images` training images, batches of 256, LARS at the recipe's lr 4.8 with a tenth of the run as
warm-up, temperature 0.1. The paper's geometry, scaled with the representation: d0 = 22 of 128
(the paper's 360 of 2048, 0.18) and the SimCLR projectors' output 8 (its 128 of 2048, 1/16,
narrower than d0). The modes the paper's claims rest on (LONG_MODES: directclr, simclr-none,
simclr-linear) train `long_epochs` (20), the others `epochs` (4). Each (mode, seed) run is
`directclr pretrain` in a subprocess, so a killed reproduction resumes: finished runs are kept
(result.json), an unfinished one resumes from its checkpoints; each run's budget.json holds the
settings it depends on (its own epochs), so changing one mode's epochs leaves the others' runs.

Evaluation, on the final checkpoint and on the untrained backbone of each seed (the run's initial
weights: torch.manual_seed(seed), then the model, as pretrain builds it): the representation r
(and the projector output z, where there is a projector) of the training subset and of the
10,000 validation images, with the validation transform.
* Linear probe on those fixed features: standardized with the training features' mean and std
  (a BatchNorm without affine before the linear layer, as MAE probes), then the recipe's SGD
  (momentum 0.9, lr 0.1, weight decay 1e-6, batch 256, cosine) for `probe_epochs`; we report the
  last epoch's validation top-1, not the best, which would select on the validation set.
* k-NN probe (InstDisc, DINO, solo-learn): cosine similarity of L2-normalized features, the 20
  nearest training images vote with weights exp(similarity / 0.07), top-1 on validation.
* Spectra of the validation embeddings: the covariance of the L2-normalized rows (the official
  spectrum script's convention), its effective rank (centered) and the eigenvalues below 1e-4
  and 1e-6 of the largest; RankMe as published (Garrido et al. 2023: singular values of the raw,
  uncentered embedding matrix); dead channels (exactly zero on every image) counted apart.
* Training dynamics: the same spectral measures of r, r[:, :d0], r[:, d0:] and z on a fixed
  subset of `dynamics_images` validation images, at step 0, every `snapshot_every` steps (kept
  checkpoints, --keep-every) and at the end.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .files import CorruptFile, atomic_write
from .config import (ARCHS, MODES, PAPER_D0, PAPER_SIMCLR_OUT, PAPER_WIDTH, paper_dim,
                     pretrain_argv)
from .provenance import cpu_model, git_commit
from .spectrum import SpectrumAccumulator

log = logging.getLogger("directclr.reproduce")

# The paper's ImageNet top-1 (ResNet-50, 100 epochs), Tables 1 and 2
PAPER_TOP1 = {"simclr-mlp": 66.5, "simclr-linear": 61.1, "simclr-none": 51.5, "directclr": 62.7,
              "fixed-lowrank": 62.3, "diagonal": 60.2, "directclr (r[:, :d0] only)": 47.9}
LONG_MODES = ("directclr", "simclr-none", "simclr-linear")  # the paper's claims rest on these
UNTRAINED = "untrained"  # the backbone at its initial weights: the baseline row
ORDER = (UNTRAINED, *MODES)
SUBVECTOR = " (r[:, :d0] only)"  # the row name of a probe on r[:, :d0] alone
KNN_K, KNN_TEMPERATURE = 20, 0.07
WEAK = {"below_1e-4": 1e-4, "below_1e-6": 1e-6}  # eigenvalues under these x the largest
EVAL_BATCH = 500


@dataclass
class Budget:
    arch: str = "resnet18-w16"
    images: int = 8000  # training images used for pretraining (the first of the train split)
    epochs: int = 4  # pretraining epochs of the modes outside LONG_MODES
    long_epochs: int = 20  # pretraining epochs of LONG_MODES
    batch_size: int = 256
    lr: float = 4.8
    temperature: float = 0.1
    probe_epochs: int = 30
    loader: str = "auto"
    val_images: int | None = None  # None: all 10,000 validation images
    snapshot_every: int = 20  # steps between training-dynamics snapshots (--keep-every)
    dynamics_images: int = 2000  # the fixed validation subset the snapshots are measured on

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        for name in ("images", "epochs", "long_epochs", "batch_size", "probe_epochs",
                     "snapshot_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.dynamics_images <= self.width:  # n rows span at most n - 1 dimensions
            raise ValueError(f"--dynamics-images {self.dynamics_images} must exceed the "
                             f"{self.width} dimensions of the representation: fewer images "
                             "leave dimensions 'collapsed' for want of rows")
        if self.images < self.batch_size:
            raise ValueError(f"--images {self.images} is fewer than one batch of "
                             f"{self.batch_size}")
        if self.val_images is not None and self.val_images < 1:
            raise ValueError(f"val_images must be >= 1 or None, got {self.val_images}")

    @property
    def width(self) -> int:
        return ARCHS[self.arch]

    @property
    def dim(self) -> int:
        return paper_dim(self.width)

    @property
    def simclr_out(self) -> int:
        """The SimCLR projectors' output width scaled as the paper's 128 of 2048 (1/16)."""
        return max(1, round(self.width * PAPER_SIMCLR_OUT / PAPER_WIDTH))

    def epochs_for(self, mode: str) -> int:
        if mode == UNTRAINED:
            return 0
        return self.long_epochs if mode in LONG_MODES else self.epochs

    def run_settings(self, mode: str) -> dict:
        """What one (mode, seed) run depends on, and nothing else: its budget.json and the
        `budget` of its result.json (so --long-epochs leaves the other modes' runs valid)."""
        settings = {**asdict(self), "mode": mode, "epochs": self.epochs_for(mode),
                    "dim": self.dim, "width": self.width, "simclr_out": self.simclr_out,
                    "knn_k": KNN_K, "knn_temperature": KNN_TEMPERATURE}
        del settings["long_epochs"]
        if mode == UNTRAINED:  # evaluated only: no pretraining settings
            for name in ("lr", "temperature", "batch_size", "loader", "snapshot_every",
                         "dynamics_images"):
                del settings[name]
        return settings


def has_projector(mode: str) -> bool:
    return mode not in ("directclr", "simclr-none", UNTRAINED)


def loss_view(mode: str) -> str:
    """What the InfoNCE loss sees, as a dynamics key: r[:d0], all of r, or the projector's z."""
    return {"directclr": "r[:d0]", "simclr-none": "r"}.get(mode, "z")


def machine() -> str:
    """The CPU model and core count, the OS and torch: where a run's wall time was measured."""
    return f"{cpu_model()}, {platform.system()} {platform.release()}, torch {torch.__version__}"


# --------------------------------------------------------------------------- one run
def pretrain_run(mode: str, seed: int, budget: Budget, data: Path, run_dir: Path) -> None:
    """`directclr pretrain` in a subprocess (resumes from run_dir's checkpoints), keeping a
    checkpoint every `snapshot_every` steps for the training dynamics, on compute_threads()."""
    epochs = budget.epochs_for(mode)
    cmd = [sys.executable, "-m", "directclr", "pretrain", *pretrain_argv(
        data=data / "train", out=run_dir, arch=budget.arch, mode=mode, dim=budget.dim,
        simclr_out=budget.simclr_out, temperature=budget.temperature,
        batch_size=budget.batch_size, epochs=epochs, lr=budget.lr, warmup_epochs=epochs / 10,
        loader=budget.loader, seed=seed, image_size=32, ckpt_every=50,
        keep_every=budget.snapshot_every)]
    env = {**os.environ, "OMP_NUM_THREADS": str(compute_threads())}
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env)
    if proc.returncode != 0:
        raise ChildProcessError(f"pretraining {mode} seed {seed} failed (exit "
                                f"{proc.returncode}):\n{proc.stderr[-3000:]}")


@functools.lru_cache(maxsize=4)
def _images(root: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageFolder split (validation transform) as tensors, decoded once per process: all of
    it, or a seeded random subset of `limit` images (folders are sorted by class, so a prefix
    would be one class)."""
    from .probe import _split, _transforms
    dataset, _ = _split(Path(root), _transforms(32)[1], limit, seed=0)
    images, labels = zip(*DataLoader(dataset, batch_size=512))
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def _forward(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    reps, outs = [], []
    for batch in images.split(EVAL_BATCH):
        rep = model.backbone(batch)
        reps.append(rep)
        outs.append(model.projector(rep))
    return torch.cat(reps), torch.cat(outs)


def embed(model, root: Path, limit: int | None = None) -> dict:
    """Representations, projector outputs and labels of an ImageFolder split (see _images)."""
    images, labels = _images(str(root), limit)
    rep, out = _forward(model, images)
    return {"rep": rep, "out": out, "labels": labels}


def feature_probe(train_x, train_y, val_x, val_y, epochs: int, seed: int = 0,
                  batch_size: int = 256, lr: float = 0.1) -> dict:
    """Linear probe on fixed features (standardized with the training statistics)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    classes = int(train_y.max()) + 1
    head = nn.Linear(train_x.shape[1], classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.zero_()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=1e-6)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(head(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            history.append((head(val_x).argmax(1) == val_y).float().mean().item())
    return {"top1": history[-1], "top1_best": max(history), "top1_per_epoch": history}


def knn_probe(train_x, train_y, val_x, val_y, k: int = KNN_K,
              temperature: float = KNN_TEMPERATURE, chunk: int = 1000) -> dict:
    """Weighted k-NN (InstDisc, DINO, solo-learn): cosine similarity of L2-normalized features
    against the training features as the memory bank; the k most similar vote for their class
    with weight exp(similarity / temperature); top-1 of the vote on the validation features."""
    bank = F.normalize(train_x.float(), dim=1)
    classes = int(max(train_y.max(), val_y.max())) + 1
    k = min(k, len(bank))
    hits = 0
    for start in range(0, len(val_x), chunk):
        query = F.normalize(val_x[start:start + chunk].float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(query), classes).scatter_add_(
            1, train_y[index], (similarity / temperature).exp())
        hits += int((votes.argmax(1) == val_y[start:start + chunk]).sum())
    return {"top1": hits / len(val_x), "k": k, "temperature": temperature}


def compute_threads() -> int:
    """Half the cores for the math (torch's intra-op threads), the other half for the loader's
    workers: on 2 cores beside another job, 1 thread ran an epoch in 67 s, 2 threads in 222 s
    (threads that wait on each other, and on the workers, for a core). OMP_NUM_THREADS, where
    set, wins."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))  # the user's choice
    except (KeyError, ValueError):
        return max(1, (os.cpu_count() or 2) // 2)


@contextlib.contextmanager
def _threads(count: int):
    """torch's intra-op threads set to `count` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spectrum_summary(z, eigenvalues: bool = True) -> dict:
    """The covariance spectrum of the L2-normalized rows (effective rank (centered), counts
    below 1e-4 and 1e-6 of the top; `collapsed` is the latter), RankMe (raw, as published) of
    the rows as they are, and the dead channels (zero on every row)."""
    z = z.double()
    with _threads(1):  # D = 128: on a busy machine, 2 threads took 0.3 s an eigvalsh, 1 took 3 ms
        unit = SpectrumAccumulator(z.shape[1], normalize=True).update(z).result(raw=False)
        raw = SpectrumAccumulator(z.shape[1]).update(z).result()
    summary = {**unit.summary(), "rankme_raw": raw.rankme_raw,
               **{name: unit.collapsed(rel) for name, rel in WEAK.items()},
               "dead": int((z == 0).all(0).sum())}
    if eigenvalues:
        summary["eigenvalues"] = unit.eigenvalues.tolist()
    return summary


def build_model(mode: str, seed: int, budget: Budget, num_classes: int,
                state: dict | None = None):
    """The run's model in eval mode: its initial weights (torch.manual_seed(seed), then the
    model, as `directclr pretrain` builds it) or, given a checkpoint's state, those."""
    from .train import Config, Model
    cfg = Config(data="", out="", arch=budget.arch,
                 mode="directclr" if mode == UNTRAINED else mode, dim=budget.dim,
                 simclr_out=budget.simclr_out, seed=seed)
    torch.manual_seed(seed)
    model = Model(cfg, num_classes=num_classes, small_images=True)
    if state is not None:
        model.load_state_dict(state["model"])
    return model.eval()


def _num_classes(data: Path) -> int:
    return sum(1 for p in (data / "train").iterdir() if p.is_dir())


def evaluate_model(model, mode: str, seed: int, budget: Budget, data: Path) -> dict:
    """Linear and k-NN probes and spectra of r (of r[:, :d0] too for DirectCLR and the untrained
    backbone; of the projector output where there is a projector)."""
    train = embed(model, data / "train", budget.images)
    val = embed(model, data / "val", budget.val_images)
    result = {"mode": mode, "seed": seed, "val_images": len(val["labels"]),
              "val_classes": int(val["labels"].unique().numel())}
    views = [("", slice(None))]
    if mode in ("directclr", UNTRAINED):
        views.append(("_subvector", slice(0, budget.dim)))
    for suffix, cols in views:
        train_x, val_x = train["rep"][:, cols], val["rep"][:, cols]
        result["probe" + suffix] = feature_probe(train_x, train["labels"], val_x, val["labels"],
                                                 budget.probe_epochs, seed)
        result["knn" + suffix] = knn_probe(train_x, train["labels"], val_x, val["labels"])
        result["spectrum" + suffix] = spectrum_summary(val_x)
    if has_projector(mode):
        result["spectrum_projector"] = spectrum_summary(val["out"])
    return result


DYNAMICS_KEYS = ("effective_rank", "rankme_raw", *WEAK, "dead", "dim")


def snapshot_metrics(model, mode: str, budget: Budget, images: torch.Tensor) -> dict:
    """The spectral measures of r, r[:, :d0], r[:, d0:] and (with a projector) z on `images`."""
    rep, out = _forward(model, images)
    views = {"r": rep, "r[:d0]": rep[:, :budget.dim], "r[d0:]": rep[:, budget.dim:]}
    if has_projector(mode):
        views["z"] = out
    metrics = {}
    for name, z in views.items():
        if z.shape[1]:
            summary = spectrum_summary(z, eigenvalues=False)
            metrics[name] = {key: summary[key] for key in DYNAMICS_KEYS}
    return metrics


def training_dynamics(mode: str, seed: int, budget: Budget, data: Path, run_dir: Path,
                      final_step: int) -> list[dict]:
    """Measures every kept snapshot (checkpoints at multiples of snapshot_every, the final one,
    and the initial weights as step 0) on the fixed validation subset; rows already measured
    are kept in run_dir/dynamics.json and not measured again."""
    from .train import CHECKPOINT_GLOB, checkpoint_step, read_checkpoint
    cache_path = run_dir / "dynamics.json"
    rows = {}
    if cache_path.exists():
        cached = json.loads(cache_path.read_text())
        if cached.get("settings") == budget.run_settings(mode):
            rows = {row["step"]: row for row in cached["rows"]}
    images, _ = _images(str(data / "val"), budget.dynamics_images)
    snapshots = {0: None}
    for path in run_dir.glob(CHECKPOINT_GLOB):
        step = checkpoint_step(path)
        if step % budget.snapshot_every == 0 or step == final_step:
            snapshots[step] = path
    classes = _num_classes(data)
    for step, path in sorted(snapshots.items()):
        if step in rows:
            continue
        try:
            state = None if path is None else read_checkpoint(path)
        except CorruptFile as err:
            log.warning("training dynamics: skipping %s", err)
            continue
        model = build_model(mode, seed, budget, classes, state)
        rows[step] = {"step": step, **snapshot_metrics(model, mode, budget, images)}
        cached = {"settings": budget.run_settings(mode), "rows": [rows[s] for s in sorted(rows)]}
        atomic_write(cache_path, lambda tmp: tmp.write_text(json.dumps(cached)))
    return [rows[s] for s in sorted(rows)]


def evaluate_run(mode: str, seed: int, budget: Budget, data: Path, run_dir: Path) -> dict:
    """A finished run: its final checkpoint evaluated, and its training dynamics."""
    from .train import load_latest_checkpoint
    state = load_latest_checkpoint(run_dir)  # the last one: written at the end of the run
    if state is None:
        raise RuntimeError(f"{run_dir}: no readable checkpoint to evaluate")
    model = build_model(mode, seed, budget, state["model"]["probe.weight"].shape[0], state)
    result = {**evaluate_model(model, mode, seed, budget, data), "step": state["step"]}
    result["dynamics"] = training_dynamics(mode, seed, budget, data, run_dir, state["step"])
    return result


# --------------------------------------------------------------------------- the comparison
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _curve(runs: list[dict], view: str, key: str) -> tuple[list[int], list[list[float]]]:
    """The steps every run measured `view` at, and the values of the runs at each."""
    tables = [{row["step"]: row[view][key] for row in r.get("dynamics", []) if view in row}
              for r in runs]
    steps = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    return steps, [[t[step] for t in tables] for step in steps]


def dynamics_facts(runs: list[dict], mode: str) -> dict:
    """Per embedding (r, and what the loss sees) and measure, the mean over seeds at step 0, at
    its lowest and highest (and their steps) and at the end."""
    facts = {}
    for view in dict.fromkeys(("r", loss_view(mode))):
        for key in ("effective_rank", "rankme_raw", "below_1e-4", "dead"):
            steps, values = _curve(runs, view, key)
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


SPECTRUM_KEYS = ("effective_rank", "rankme_raw", *WEAK, "collapsed", "dead")


def aggregate(results: list[dict], budget: Budget) -> list[dict]:
    """One row per mode (and one per probe of r[:, :d0] alone), means over seeds; probe gains
    over the untrained backbone of the same seed (r[:, :d0] over its r[:, :d0])."""
    base = {r["seed"]: r for r in results if r["mode"] == UNTRAINED}
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in results):
        runs = [r for r in results if r["mode"] == mode]
        variants = [("", mode)]
        if "probe_subvector" in runs[0]:
            variants.append(("_subvector", mode + SUBVECTOR))
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


def _pm(mean, std, seeds: int, digits: int = 2, sign: bool = False) -> str:
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
                f"{_pm(mean, std, len(seeds), sign=True)} points (per seed "
                f"{', '.join(f'{d:+.2f}' for d in diffs)}); seed std of each: directclr "
                f"{direct[f'{probe}_top1_std']:.2f}, simclr-none {none[f'{probe}_top1_std']:.2f}.")
        for key, label in (("effective_rank", "effective rank (centered)"),
                           ("rankme_raw", "RankMe (raw)"), ("below_1e-4", "eigenvalues < 1e-4"),
                           ("dead", "dead channels")):
            lines.append(f"- r, {label}: directclr {_pm(direct[key], direct[key + '_std'], 2, 1)}"
                         f", simclr-none {_pm(none[key], none[key + '_std'], 2, 1)} (of "
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


def write_markdown(rows: list[dict], budget: Budget, path: Path, command: str,
                   commit: str, results: list[dict] = ()) -> None:
    long = ", ".join(LONG_MODES)
    lines = [f"Command: `{command}` (commit {commit}).", *_provenance(list(results)), "",
             f"Budget: {budget.arch} ({budget.width}-d representation), 32 px, {budget.images} "
             f"Fashion-MNIST training images, batches of {budget.batch_size}, LARS lr "
             f"{budget.lr}, warm-up a tenth of each run, temperature {budget.temperature}; "
             f"{budget.long_epochs} epochs for {long}, {budget.epochs} for the other modes. "
             f"Geometry as the paper's: d0 = {budget.dim} of {budget.width} "
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
             "mean ± std over seeds.", "", "### Probes", "",
             "| mode | epochs | seeds | linear probe top-1 % | gain over untrained | "
             "k-NN top-1 % | gain over untrained | pretraining min/run | "
             "paper ImageNet top-1 % |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        seeds = len(row["seeds"])
        wall = row["pretrain_wall_s_mean"]
        lines.append(
            f"| {row['mode']} | {row['epochs']} | {seeds} | "
            f"{_pm(row['probe_top1_mean'], row['probe_top1_std'], seeds)} | "
            f"{_pm(row['probe_gain_mean'], row['probe_gain_std'], seeds, sign=True)} | "
            f"{_pm(row['knn_top1_mean'], row['knn_top1_std'], seeds)} | "
            f"{_pm(row['knn_gain_mean'], row['knn_gain_std'], seeds, sign=True)} | "
            f"{'-' if not wall else f'{wall / 60:.1f}'} | "
            f"{row['paper_imagenet_top1'] if row['paper_imagenet_top1'] is not None else '-'} |")
    lines += ["", "### Spectra at the end of training", "",
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
            f"{_pm(row['effective_rank'], row['effective_rank_std'], seeds, 1)} | "
            f"{_pm(row['rankme_raw'], row['rankme_raw_std'], seeds, 1)} | "
            f"{row['below_1e-4']:.3g} | {row['below_1e-6']:.3g} | {row['dead']:.3g} | "
            f"{projector} |")
    dynamic = [row for row in rows if row.get("dynamics")]
    if dynamic:
        lines += ["", "### Training dynamics", "",
                  f"On a fixed subset of {budget.dynamics_images} validation images, every "
                  f"{budget.snapshot_every} steps; step 0 is the untrained network. Means over "
                  "seeds: at step 0 → lowest (at step) → at the end. The curves: dynamics.png.",
                  "", "| mode | embedding | effective rank (centered) | RankMe (raw) | "
                  "< 1e-4 (step 0 → end) | dead (step 0 → end) |", "|---|---|---|---|---|---|"]
        for row in dynamic:
            for view, facts in row["dynamics"].items():
                cells = []
                for key in ("effective_rank", "rankme_raw"):
                    f = facts[key]
                    cells.append(f"{f['start']:.1f} → {f['min']:.1f} ({f['min_step']}) → "
                                 f"{f['end']:.1f} ({f['end_step']})")
                for key in ("below_1e-4", "dead"):
                    cells.append(f"{facts[key]['start']:.3g} → {facts[key]['end']:.3g}")
                lines.append(f"| {row['mode']} | {view} | {' | '.join(cells)} |")
    facts = _verdict_facts(rows)
    if facts:
        lines += ["", "### The comparisons the paper's claims turn on (numbers only)", "", *facts]
    path.write_text("\n".join(lines) + "\n")


def _color(mode: str) -> str:
    return f"C{MODES.index(mode)}" if mode in MODES else "0.45"  # the untrained row: grey


def plot_spectra(results: list[dict], path: Path) -> None:
    """Log spectra of seed-0 (or the first seed's) runs overlaid: the representation of each
    mode (solid; the untrained backbone grey, dotted), DirectCLR's subvector and the projectors'
    outputs (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
                           ("spectrum_subvector", f"{mode}: r[:, :d0]")):
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


def plot_dynamics(results: list[dict], path: Path, budget: Budget) -> None:
    """One panel per measure, one line per mode against the step: the mean over seeds, the band
    from the lowest to the highest seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5), dpi=100)
    modes = [m for m in MODES if any(r["mode"] == m and r.get("dynamics") for r in results)]
    for ax, (view, key, title) in zip(axes.flat, DYNAMICS_PANELS):
        for mode in modes:
            runs = [r for r in results if r["mode"] == mode and r.get("dynamics")]
            steps, values = _curve(runs, loss_view(mode) if view == "loss" else view, key)
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


def _run_one(mode: str, seed: int, budget: Budget, data: Path, run_dir: Path) -> dict:
    """Pretrains (resuming) and evaluates one run; the untrained row is evaluated only. The
    pretraining wall time adds up over resumed calls in run_dir/wall.json."""
    wall_path = run_dir / "wall.json"
    wall = json.loads(wall_path.read_text()) if wall_path.exists() else {"pretrain": 0.0}
    if mode != UNTRAINED:
        start = time.perf_counter()
        try:
            pretrain_run(mode, seed, budget, data, run_dir)
        finally:
            wall["pretrain"] += time.perf_counter() - start
            wall_path.write_text(json.dumps(wall))
    start = time.perf_counter()
    with _threads(compute_threads()):
        if mode == UNTRAINED:
            model = build_model(mode, seed, budget, _num_classes(data))
            result = {**evaluate_model(model, mode, seed, budget, data), "step": 0}
        else:
            result = evaluate_run(mode, seed, budget, data, run_dir)
    wall["evaluate"] = time.perf_counter() - start
    return {**result, "budget": budget.run_settings(mode), "wall_s": wall,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine()}


def reproduce(out, modes=MODES, seeds=(0, 1, 2), budget: Budget | None = None,
              command: str = "directclr reproduce", progress: bool = True) -> list[dict]:
    """Runs (or resumes) the untrained row and every mode, for each seed, then writes the reports
    over every finished run in `out` with this budget (``write_reports``); returns the rows."""
    from .data import prepare_fashion_mnist
    budget = budget or Budget()
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"--modes: unknown {bad}; choose from {MODES}")
    if not seeds:
        raise ValueError("--seeds: at least one seed")
    out = Path(out)
    data = out / "data" / f"images-{budget.images}"  # its own folder: preparing only adds files
    prepared = data / ".prepared"
    if not prepared.exists():
        prepare_fashion_mnist(data, limit=budget.images, limit_val=False, progress=progress)
        prepared.touch()
    from tqdm import tqdm
    jobs = [(UNTRAINED, seed) for seed in seeds] + [(m, s) for m in modes for s in seeds]
    for mode, seed in tqdm(jobs, desc="reproduce", unit="run", disable=not progress):
        run_dir = out / "runs" / f"{mode}-seed{seed}"
        done = run_dir / "result.json"
        started = run_dir / "budget.json"  # written before pretraining: guards resumed runs
        settings = budget.run_settings(mode)
        if started.exists() and json.loads(started.read_text()) != settings:
            raise ValueError(f"--out {out}: {run_dir.name} was started with another budget "
                             f"({started}); use a new --out, or the same --epochs/--images/...")
        if done.exists():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps(settings))
        result = _run_one(mode, seed, budget, data, run_dir)
        atomic_write(done, lambda tmp: tmp.write_text(json.dumps(result)))
    return write_reports(out, budget, command)


def write_reports(out, budget: Budget, command: str) -> list[dict]:
    """Over every finished run in `out` with this budget (e.g. from earlier calls with other
    --modes, or copied from other machines), writes results.json (the table's rows, with command,
    commit and budget), runs.json (every run's probes, spectra and dynamics), results.md,
    spectra.png and dynamics.png; returns the rows (none: nothing written)."""
    out = Path(out)
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    results = sorted((r for r in results if r.get("mode") in ORDER
                      and r.get("budget") == budget.run_settings(r["mode"])),
                     key=lambda r: (ORDER.index(r["mode"]), r["seed"]))
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
