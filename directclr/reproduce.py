"""The paper's Tables 1 and 2 in miniature: every projector mode pretrained on Fashion-MNIST with
one backbone, budget and seed set, then probed and its spectrum measured.

    directclr reproduce --out docs/results            # or: make reproduce

Scale (Budget): ResNet-18 at base width 16 (a 128-d representation), 32 px images, the first
`images` training images, `epochs` epochs of batches of 256, LARS at the recipe's lr 4.8 with a
tenth of the run as warm-up, temperature 0.1; d0 scaled with the representation as the paper's
360 of 2048 (22 of 128). Each (mode, seed) run is `directclr pretrain` in a subprocess, so a
killed reproduction resumes: finished runs are kept (result.json), an unfinished one resumes
from its checkpoints.

Evaluation, on the final checkpoint: the representation r (and the projector output z, where
there is a projector) of the training subset and of the 10,000 validation images, with the
validation transform. Linear probe on those fixed features: standardized with the training
features' mean and std (a BatchNorm without affine before the linear layer, as MAE probes), then
the recipe's SGD (momentum 0.9, lr 0.1, weight decay 1e-6, batch 256, cosine) for
`probe_epochs`; we report the last epoch's validation top-1, not the best, which would select on
the validation set. Spectra: covariance of the L2-normalized validation embeddings (the official
spectrum script's convention), effective rank (RankMe) and dimensions below 1e-6 of the largest
eigenvalue.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .models import ARCHS, MODES
from .provenance import git_commit
from .spectrum import SpectrumAccumulator

# The paper's ImageNet top-1 (ResNet-50, 100 epochs), Tables 1 and 2
PAPER_TOP1 = {"simclr-mlp": 66.5, "simclr-linear": 61.1, "simclr-none": 51.5, "directclr": 62.7,
              "fixed-lowrank": 62.3, "diagonal": 60.2, "directclr (r[:, :d0] only)": 47.9}
PAPER_D0, PAPER_WIDTH = 360, 2048


@dataclass
class Budget:
    arch: str = "resnet18-w16"
    images: int = 8000  # training images used for pretraining (the first of the train split)
    epochs: int = 4
    batch_size: int = 256
    lr: float = 4.8
    temperature: float = 0.1
    probe_epochs: int = 30
    loader: str = "auto"
    val_images: int | None = None  # None: all 10,000 validation images

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        for name in ("images", "epochs", "batch_size", "probe_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
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
        """d0 scaled with the representation as the paper's 360 of 2048."""
        return max(1, round(self.width * PAPER_D0 / PAPER_WIDTH))


# --------------------------------------------------------------------------- one run
def pretrain_run(mode: str, seed: int, budget: Budget, data: Path, run_dir: Path) -> None:
    """`directclr pretrain` in a subprocess (resumes from run_dir's checkpoints)."""
    cmd = [sys.executable, "-m", "directclr", "pretrain", "--data", str(data / "train"),
           "--out", str(run_dir), "--arch", budget.arch, "--mode", mode,
           "--dim", str(budget.dim), "--temperature", str(budget.temperature),
           "--batch-size", str(budget.batch_size), "--epochs", str(budget.epochs),
           "--lr", str(budget.lr), "--warmup-epochs", str(budget.epochs / 10),
           "--loader", budget.loader, "--seed", str(seed), "--image-size", "32",
           "--ckpt-every", "50"]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ChildProcessError(f"pretraining {mode} seed {seed} failed (exit "
                                f"{proc.returncode}):\n{proc.stderr[-3000:]}")


@torch.no_grad()
def embed(model, root: Path, limit: int | None = None) -> dict:
    """Representations, projector outputs and labels of an ImageFolder split (validation
    transform): all of it, or a seeded random subset of `limit` images (folders are sorted by
    class, so a prefix would be one class)."""
    from .probe import _split, _transforms
    dataset, _ = _split(root, _transforms(32)[1], limit, seed=0)
    reps, outs, labels = [], [], []
    for images, targets in DataLoader(dataset, batch_size=512):
        rep = model.backbone(images)
        reps.append(rep)
        outs.append(model.projector(rep))
        labels.append(targets)
    return {"rep": torch.cat(reps), "out": torch.cat(outs), "labels": torch.cat(labels)}


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


def spectrum_summary(z) -> dict:
    acc = SpectrumAccumulator(z.shape[1], normalize=True)
    spectrum = acc.update(z.double()).result()
    return {**spectrum.summary(), "eigenvalues": spectrum.eigenvalues.tolist()}


def evaluate_run(mode: str, seed: int, budget: Budget, data: Path, run_dir: Path) -> dict:
    from .train import Config, Model, load_latest_checkpoint
    state = load_latest_checkpoint(run_dir)  # the last one: written at the end of the run
    if state is None:
        raise RuntimeError(f"{run_dir}: no readable checkpoint to evaluate")
    cfg = Config(data="", out="", arch=budget.arch, mode=mode, dim=budget.dim)
    model = Model(cfg, num_classes=state["model"]["probe.weight"].shape[0], small_images=True)
    model.load_state_dict(state["model"])
    model.eval()
    train = embed(model, data / "train", budget.images)
    val = embed(model, data / "val", budget.val_images)
    result = {"mode": mode, "seed": seed, "step": state["step"],
              "probe": feature_probe(train["rep"], train["labels"], val["rep"], val["labels"],
                                     budget.probe_epochs, seed),
              "spectrum": spectrum_summary(val["rep"]), "val_images": len(val["labels"]),
              "val_classes": int(val["labels"].unique().numel())}
    if mode == "directclr":
        sub = slice(0, budget.dim)
        result["probe_subvector"] = feature_probe(train["rep"][:, sub], train["labels"],
                                                  val["rep"][:, sub], val["labels"],
                                                  budget.probe_epochs, seed)
        result["spectrum_subvector"] = spectrum_summary(val["rep"][:, sub])
    elif mode != "simclr-none":  # a projector: the spectrum of its output too
        result["spectrum_projector"] = spectrum_summary(val["out"])
    return result


# --------------------------------------------------------------------------- the comparison
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: list[dict], budget: Budget) -> list[dict]:
    """One row per mode (and one for DirectCLR's subvector probe), means over seeds."""
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in results):
        runs = [r for r in results if r["mode"] == mode]
        variants = [(mode, "probe", "spectrum")]
        if mode == "directclr":
            variants.append(("directclr (r[:, :d0] only)", "probe_subvector",
                             "spectrum_subvector"))
        for name, probe_key, spectrum_key in variants:
            top1, top1_std = _mean_std([100 * r[probe_key]["top1"] for r in runs])
            rank, rank_std = _mean_std([r[spectrum_key]["effective_rank"] for r in runs])
            row = {"mode": name, "probe_top1_mean": top1, "probe_top1_std": top1_std,
                   "seeds": [r["seed"] for r in runs], "effective_rank": rank,
                   "effective_rank_std": rank_std,
                   "collapsed": statistics.fmean(r[spectrum_key]["collapsed"] for r in runs),
                   "dim": runs[0][spectrum_key]["dim"],
                   "probe_top1_per_seed": [100 * r[probe_key]["top1"] for r in runs],
                   "paper_imagenet_top1": PAPER_TOP1.get(name)}
            if name == mode and "spectrum_projector" in runs[0]:
                row["projector_effective_rank"] = statistics.fmean(
                    r["spectrum_projector"]["effective_rank"] for r in runs)
                row["projector_collapsed"] = statistics.fmean(
                    r["spectrum_projector"]["collapsed"] for r in runs)
            rows.append(row)
    return rows


def write_markdown(rows: list[dict], budget: Budget, path: Path, command: str,
                   commit: str) -> None:
    lines = [f"Command: `{command}` (commit {commit}). Budget: {budget.arch} "
             f"({budget.width}-d representation, d0 = {budget.dim}), 32 px, "
             f"{budget.images} Fashion-MNIST training images, {budget.epochs} epochs of "
             f"{budget.batch_size}, LARS lr {budget.lr}; linear probe on fixed features, "
             f"{budget.probe_epochs} epochs, top-1 on "
             f"{budget.val_images or 'the 10,000'} validation images (last epoch). Spectra "
             "of L2-normalized validation representations; collapsed = "
             "eigenvalues below 1e-6 of the largest.", "",
             "| mode | probe top-1 % (mean ± std) | seeds | effective rank | collapsed dims | "
             "projector output eff. rank | paper ImageNet top-1 % |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        projector = row.get("projector_effective_rank")
        spread = f" ± {row['probe_top1_std']:.2f}" if len(row["seeds"]) > 1 else ""
        lines.append(
            f"| {row['mode']} | {row['probe_top1_mean']:.2f}{spread} | "
            f"{len(row['seeds'])} | {row['effective_rank']:.1f} of {row['dim']} | "
            f"{row['collapsed']:.3g} | {'-' if projector is None else f'{projector:.1f}'} | "
            f"{row['paper_imagenet_top1'] if row['paper_imagenet_top1'] is not None else '-'} |")
    path.write_text("\n".join(lines) + "\n")


def plot_spectra(results: list[dict], path: Path) -> None:
    """Log spectra of seed-0 (or the first seed's) runs overlaid: the representation of each
    mode (solid), DirectCLR's subvector and the projectors' outputs (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    first = {}
    for r in results:
        first.setdefault(r["mode"], r)
    for mode, r in first.items():
        color = f"C{MODES.index(mode)}"  # one colour per mode in both panels
        eig = torch.tensor(r["spectrum"]["eigenvalues"]).clamp_min(1e-30).log10()
        left.plot(range(1, len(eig) + 1), eig.numpy(), lw=1.4, label=mode, color=color)
        for key, label in (("spectrum_projector", f"{mode}: projector output"),
                           ("spectrum_subvector", f"{mode}: r[:, :d0]")):
            if key in r:
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


def reproduce(out, modes=MODES, seeds=(0, 1, 2), budget: Budget | None = None,
              command: str = "directclr reproduce", progress: bool = True) -> list[dict]:
    """Runs (or resumes) every mode x seed, then writes, over every finished run in `out` with
    this budget: results.json (the table's rows, with command, commit and budget), runs.json
    (every run's probe history and spectra), results.md and spectra.png; returns the rows."""
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
    jobs = [(mode, seed) for mode in modes for seed in seeds]
    for mode, seed in tqdm(jobs, desc="reproduce", unit="run", disable=not progress):
        run_dir = out / "runs" / f"{mode}-seed{seed}"
        done = run_dir / "result.json"
        started = run_dir / "budget.json"  # written before pretraining: guards resumed runs
        if started.exists() and json.loads(started.read_text()) != asdict(budget):
            raise ValueError(f"--out {out}: {run_dir.name} was started with another budget "
                             f"({started}); use a new --out, or the same --epochs/--images/...")
        if done.exists():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps(asdict(budget)))
        pretrain_run(mode, seed, budget, data, run_dir)
        result = {**evaluate_run(mode, seed, budget, data, run_dir), "budget": asdict(budget)}
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(done)
    # every finished run in `out` with this budget, e.g. from earlier calls with other --modes
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    results = sorted((r for r in results if r["budget"] == asdict(budget)),
                     key=lambda r: (MODES.index(r["mode"]), r["seed"]))
    rows = aggregate(results, budget)
    commit = git_commit()
    meta = {"command": command, "commit": commit,
            "budget": {**asdict(budget), "dim": budget.dim, "width": budget.width}}
    (out / "results.json").write_text(json.dumps([{**row, **meta} for row in rows], indent=1))
    (out / "runs.json").write_text(json.dumps({**meta, "runs": results}))
    write_markdown(rows, budget, out / "results.md", command, commit)
    plot_spectra(results, out / "spectra.png")
    return rows
