"""The runs of the reproduction: its budget, each (mode, seed) run's pretraining as `directclr
pretrain` in a subprocess, and the run's records in out/runs/<mode>-seed<seed>/.

A killed reproduction resumes: a finished run is kept (result.json), an unfinished one resumes
from its checkpoints; each run's budget.json, written before it pretrains, holds the settings it
depends on (its own epochs), so changing one mode's epochs leaves the others' runs valid, and a
run started with other settings is refused. wall.json adds up the pretraining time over resumed
calls.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..config import ARCHS, MODES, PAPER_SIMCLR_OUT, PAPER_WIDTH, paper_dim, pretrain_argv
from ..files import atomic_write
from ..provenance import cpu_model

LONG_MODES = ("directclr", "simclr-none", "simclr-linear")  # the paper's claims rest on these
UNTRAINED = "untrained"  # the backbone at its initial weights: the baseline row
ORDER = (UNTRAINED, *MODES)
# The k-NN probe's settings (evaluation.knn_probe), recorded in every run's budget
KNN_K, KNN_TEMPERATURE = 20, 0.07
IMAGE_SIZE = 32  # pixels: Fashion-MNIST's 28 padded, the CIFAR stem and the "small" recipe


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
def threads(count: int):
    """torch's intra-op threads set to `count` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare_data(out: Path, budget: Budget, progress: bool = True) -> Path:
    """Fashion-MNIST's first `images` training images and its validation images, prepared once
    in their own folder out/data/images-<images> (preparing only adds files)."""
    from ..data import prepare_fashion_mnist
    data = out / "data" / f"images-{budget.images}"
    prepared = data / ".prepared"
    if not prepared.exists():
        prepare_fashion_mnist(data, limit=budget.images, limit_val=False, progress=progress)
        prepared.touch()
    return data


def start_run(out: Path, mode: str, seed: int, budget: Budget) -> Path | None:
    """The run's folder, its budget.json written: None where the run has finished; a run
    started with other settings is refused."""
    run_dir = out / "runs" / f"{mode}-seed{seed}"
    started = run_dir / "budget.json"  # written before pretraining: guards resumed runs
    settings = budget.run_settings(mode)
    if started.exists() and json.loads(started.read_text()) != settings:
        raise ValueError(f"--out {out}: {run_dir.name} was started with another budget "
                         f"({started}); use a new --out, or the same --epochs/--images/...")
    if (run_dir / "result.json").exists():
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(settings))
    return run_dir


def pretrain_run(mode: str, seed: int, budget: Budget, data: Path, run_dir: Path) -> None:
    """`directclr pretrain` in a subprocess (resumes from run_dir's checkpoints), keeping a
    checkpoint every `snapshot_every` steps for the training dynamics, on compute_threads()."""
    epochs = budget.epochs_for(mode)
    cmd = [sys.executable, "-m", "directclr", "pretrain", *pretrain_argv(
        data=data / "train", out=run_dir, arch=budget.arch, mode=mode, dim=budget.dim,
        simclr_out=budget.simclr_out, temperature=budget.temperature,
        batch_size=budget.batch_size, epochs=epochs, lr=budget.lr, warmup_epochs=epochs / 10,
        loader=budget.loader, seed=seed, image_size=IMAGE_SIZE, ckpt_every=50,
        keep_every=budget.snapshot_every)]
    env = {**os.environ, "OMP_NUM_THREADS": str(compute_threads())}
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env)
    if proc.returncode != 0:
        raise ChildProcessError(f"pretraining {mode} seed {seed} failed (exit "
                                f"{proc.returncode}):\n{proc.stderr[-3000:]}")


def timed_pretrain(mode: str, seed: int, budget: Budget, data: Path, run_dir: Path) -> dict:
    """Pretrains the run (resuming; the untrained row has nothing to pretrain) and returns its
    wall times: "pretrain" adds up over resumed calls in run_dir/wall.json."""
    wall_path = run_dir / "wall.json"
    wall = json.loads(wall_path.read_text()) if wall_path.exists() else {"pretrain": 0.0}
    if mode != UNTRAINED:
        start = time.perf_counter()
        try:
            pretrain_run(mode, seed, budget, data, run_dir)
        finally:
            wall["pretrain"] += time.perf_counter() - start
            wall_path.write_text(json.dumps(wall))
    return wall


def save_run(run_dir: Path, result: dict, budget: Budget, wall: dict) -> None:
    """The finished run's result.json: its evaluation, with the settings it depends on, its
    wall times, when it finished and on which machine."""
    record = {**result, "budget": budget.run_settings(result["mode"]), "wall_s": wall,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine()}
    atomic_write(run_dir / "result.json", lambda tmp: tmp.write_text(json.dumps(record)))


def finished_runs(out: Path, budget: Budget) -> list[dict]:
    """Every finished run in out/runs with this budget (whichever call or machine ran it), in
    table order: the untrained row, then the modes as MODES lists them; by seed within each."""
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    return sorted((r for r in results if r.get("mode") in ORDER
                   and r.get("budget") == budget.run_settings(r["mode"])),
                  key=lambda r: (ORDER.index(r["mode"]), r["seed"]))
