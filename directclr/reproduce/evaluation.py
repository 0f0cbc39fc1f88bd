"""Evaluation of a run, on its final checkpoint, and of the untrained backbone of each seed (the
run's initial weights: torch.manual_seed(seed), then the model, as pretrain builds it): the
representation r (and the projector output z, where there is a projector) of the training subset
and of the 10,000 validation images, with the validation transform.

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

import functools
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..files import CorruptFile, atomic_write
from ..spectrum import SpectrumAccumulator
from .runs import (
    IMAGE_SIZE,
    KNN_K,
    KNN_TEMPERATURE,
    UNTRAINED,
    Budget,
    has_projector,
    threads,
)

log = logging.getLogger("directclr.reproduce")

# The spectral counts: covariance eigenvalues below these fractions of the largest
SMALL_EIGENVALUE_FRACTIONS = {"below_1e-4": 1e-4, "below_1e-6": 1e-6}
# The result fields of the probes and spectrum of r[:, :d0] alone (DirectCLR, untrained) end so
D0_FIELD_SUFFIX = "_subvector"
DYNAMICS_KEYS = ("effective_rank", "rankme_raw", *SMALL_EIGENVALUE_FRACTIONS, "dead", "dim")
EVAL_BATCH = 500


@functools.lru_cache(maxsize=4)
def split_images(root: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageFolder split (validation transform) as tensors, decoded once per process: all of
    it, or a seeded random subset of `limit` images (probe.load_split)."""
    from ..probe import load_split, probe_transforms  # torchvision: only where images are read
    dataset, _ = load_split(Path(root), probe_transforms(32)[1], limit, seed=0)
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
    """Representations, projector outputs and labels of an ImageFolder split (split_images)."""
    images, labels = split_images(str(root), limit)
    rep, out = _forward(model, images)
    return {"rep": rep, "out": out, "labels": labels}


def feature_probe(train_x, train_y, val_x, val_y, epochs: int, seed: int = 0,
                  batch_size: int = 256, lr: float = 0.1) -> dict:
    """Linear probe on fixed features, standardized with the training statistics: probe.py's
    head (train_linear_head), the training features shuffled each epoch and the head initialized
    from one generator seeded with `seed`. Top-1 in float32, as every stored run has it."""
    from ..probe import FeatureBatches, train_linear_head
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    history = train_linear_head(
        FeatureBatches(train_x, train_y, batch_size, gen), FeatureBatches(val_x, val_y, len(val_x)),
        train_x.shape[1], int(train_y.max()) + 1, epochs=epochs, lr=lr, generator=gen)
    history = torch.tensor(history, dtype=torch.float32).tolist()
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


def spectrum_summary(z, eigenvalues: bool = True) -> dict:
    """The covariance spectrum of the L2-normalized rows (effective rank (centered), counts
    below 1e-4 and 1e-6 of the top; `collapsed` is the latter), RankMe (raw, as published) of
    the rows as they are, and the dead channels (zero on every row)."""
    z = z.double()
    with threads(1):  # D = 128: on a busy machine, 2 threads took 0.3 s an eigvalsh, 1 took 3 ms
        unit = SpectrumAccumulator(z.shape[1], normalize=True).update(z).result(raw=False)
        raw = SpectrumAccumulator(z.shape[1]).update(z).result()
    summary = {**unit.summary(), "rankme_raw": raw.rankme_raw,
               **{name: unit.collapsed(rel) for name, rel in SMALL_EIGENVALUE_FRACTIONS.items()},
               "dead": int((z == 0).all(0).sum())}
    if eigenvalues:
        summary["eigenvalues"] = unit.eigenvalues.tolist()
    return summary


def build_model(mode: str, seed: int, budget: Budget, num_classes: int,
                state: dict | None = None):
    """The run's model in eval mode: its initial weights (torch.manual_seed(seed), then the
    model, as `directclr pretrain` builds it) or, given a checkpoint's state, those."""
    from ..config import Config
    from ..train import Model
    cfg = Config(data="", out="", arch=budget.arch,
                 mode="directclr" if mode == UNTRAINED else mode, dim=budget.dim,
                 simclr_out=budget.simclr_out, seed=seed)
    torch.manual_seed(seed)
    model = Model(cfg, num_classes=num_classes, image_size=IMAGE_SIZE)
    if state is not None:
        model.load_state_dict(state["model"])
    return model.eval()


def _num_classes(data: Path) -> int:
    return sum(1 for p in (data / "train").iterdir() if p.is_dir())


def evaluate_model(model, mode: str, seed: int, budget: Budget, data: Path) -> dict:
    """Linear and k-NN probes and spectra of r (of r[:, :d0] too for DirectCLR and the untrained
    backbone, in the fields ending D0_FIELD_SUFFIX; of the projector output where there is a
    projector)."""
    train = embed(model, data / "train", budget.images)
    val = embed(model, data / "val", budget.val_images)
    result = {"mode": mode, "seed": seed, "val_images": len(val["labels"]),
              "val_classes": int(val["labels"].unique().numel())}
    views = [("", slice(None))]
    if mode in ("directclr", UNTRAINED):
        views.append((D0_FIELD_SUFFIX, slice(0, budget.dim)))
    for suffix, cols in views:
        train_x, val_x = train["rep"][:, cols], val["rep"][:, cols]
        result["probe" + suffix] = feature_probe(train_x, train["labels"], val_x, val["labels"],
                                                 budget.probe_epochs, seed)
        result["knn" + suffix] = knn_probe(train_x, train["labels"], val_x, val["labels"])
        result["spectrum" + suffix] = spectrum_summary(val_x)
    if has_projector(mode):
        result["spectrum_projector"] = spectrum_summary(val["out"])
    return result


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
    from ..checkpoint import CHECKPOINT_GLOB, checkpoint_step, read_checkpoint
    cache_path = run_dir / "dynamics.json"
    rows = {}
    if cache_path.exists():
        cached = json.loads(cache_path.read_text())
        if cached.get("settings") == budget.run_settings(mode):
            rows = {row["step"]: row for row in cached["rows"]}
    images, _ = split_images(str(data / "val"), budget.dynamics_images)
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


def dynamics_curve(runs: list[dict], view: str, key: str) -> tuple[list[int], list[list[float]]]:
    """The steps every run measured `view` at, and the values of the runs at each."""
    tables = [{row["step"]: row[view][key] for row in r.get("dynamics", []) if view in row}
              for r in runs]
    steps = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    return steps, [[t[step] for t in tables] for step in steps]


def evaluate_run(mode: str, seed: int, budget: Budget, data: Path, run_dir: Path) -> dict:
    """A finished run: its final checkpoint evaluated, and its training dynamics."""
    from ..checkpoint import load_latest_checkpoint
    state = load_latest_checkpoint(run_dir)  # the last one: written at the end of the run
    if state is None:
        raise ValueError(f"{run_dir}: no readable checkpoint to evaluate")
    model = build_model(mode, seed, budget, state["model"]["probe.weight"].shape[0], state)
    result = {**evaluate_model(model, mode, seed, budget, data), "step": state["step"]}
    result["dynamics"] = training_dynamics(mode, seed, budget, data, run_dir, state["step"])
    return result


def evaluate(mode: str, seed: int, budget: Budget, data: Path, run_dir: Path) -> dict:
    """A run's evaluation: the untrained row's initial weights (step 0), or a finished run's
    (evaluate_run)."""
    if mode == UNTRAINED:
        model = build_model(mode, seed, budget, _num_classes(data))
        return {**evaluate_model(model, mode, seed, budget, data), "step": 0}
    return evaluate_run(mode, seed, budget, data, run_dir)
