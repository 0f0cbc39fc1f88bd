"""DirectCLR pretraining, the whole loop in one file (nanoGPT's habit).

    directclr pretrain --data fashion-mnist --arch resnet18 --epochs 2 --out runs/fmnist
    torchrun --nproc_per_node=8 -m directclr pretrain --data /imagenet/train --arch resnet50 \
        --batch-size 4096 --epochs 100 --out runs/in1k
    # several nodes: the same command on each, with its --node-rank; --out on a shared filesystem
    torchrun --nnodes=4 --node-rank=$NODE --nproc_per_node=8 --master-addr=$HEAD \
        --master-port=29500 -m directclr pretrain ... --out /shared/runs/in1k

One process per device under torchrun (NCCL on GPUs, gloo on CPU), or plain. Global rank 0 logs
(metrics.jsonl, a progress bar) and writes checkpoints; every rank resumes from the one rank 0
picks (a node that cannot read it is a clear error on every rank, not a hang).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import build_pretrain_loader, prepare_fashion_mnist
from .files import atomic_write
from .infonce import infonce
from .lars import LARS
from .models import ARCHS, MODES, build_backbone, build_projector, sync_batchnorm
from .spectrum import SpectrumAccumulator

log = logging.getLogger("directclr.train")
CHECKPOINT_GLOB = "ckpt_*.pt"
KEEP_CHECKPOINTS = 2
SMALL_IMAGE_SIZE = 32  # Fashion-MNIST padded to 32 px: CIFAR stem and the "small" recipe


@dataclass
class Config:
    data: str
    out: str
    arch: str = "resnet50"
    mode: str = "directclr"
    dim: int = 360
    temperature: float = 0.1
    variant: str = "cross"
    batch_size: int = 4096  # global, over all ranks
    epochs: int = 100
    max_steps: int | None = None
    lr: float = 4.8
    wd: float = 1e-6
    warmup_epochs: float = 10.0
    loader: str = "auto"
    ckpt_every: int = 500
    resume: bool = True
    compile: bool = False
    seed: int = 0
    image_size: int | None = None  # default: 32 for fashion-mnist, else 224
    num_threads: int | None = None
    cache: str = "~/.cache/directclr"


# --------------------------------------------------------------------------- setup
def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun's environment, or one plain process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def resolve_data(cfg: Config, rank: int) -> tuple[Path, int]:
    """The ImageFolder root for pretraining and the image size; fashion-mnist is prepared into
    the cache on first use by each node's first process (the cache may be node-local or shared:
    concurrent writers are safe), while the others wait."""
    if cfg.data == "fashion-mnist":
        root = Path(cfg.cache).expanduser() / "fashion-mnist"
        if int(os.environ.get("LOCAL_RANK", rank)) == 0:
            prepare_fashion_mnist(root)
        if dist.is_initialized():
            dist.barrier()
        return root / "train", cfg.image_size or SMALL_IMAGE_SIZE
    root = Path(cfg.data)
    if not root.is_dir():
        raise ValueError(f"--data {cfg.data}: no such directory (an ImageFolder root, or "
                         "'fashion-mnist')")
    return root, cfg.image_size or 224


def check_config(cfg: Config, world: int) -> None:
    """Clear errors before any work."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"--arch must be one of {sorted(ARCHS)}, got {cfg.arch!r}")
    if cfg.mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.batch_size < 2 or cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be >= 2 and divisible by the "
                         f"world size {world}")
    if not 1 <= cfg.dim <= ARCHS[cfg.arch]:
        raise ValueError(f"--dim {cfg.dim} must be in [1, {ARCHS[cfg.arch]}] (the "
                         f"representation width of {cfg.arch})")
    if cfg.epochs < 1 or cfg.temperature <= 0 or cfg.lr <= 0:
        raise ValueError("--epochs, --temperature and --lr must be positive")


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The run's length: --epochs, cut by --max-steps (the schedule then spans the cut run)."""
    total = cfg.epochs * steps_per_epoch
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def learning_rate(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up (--warmup-epochs, at most a tenth of the run), then per-step cosine from
    lr to 0.001 x lr."""
    total = total_steps(cfg, steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total / 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
    floor = 0.001 * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Model(nn.Module):
    """Backbone, projector and the online linear probe (on detached features)."""

    def __init__(self, cfg: Config, num_classes: int, small_images: bool):
        super().__init__()
        self.backbone, width = build_backbone(cfg.arch, small_images)
        self.projector, self.loss_dim = build_projector(cfg.mode, width, cfg.dim)
        self.probe = nn.Linear(width, num_classes)

    def forward(self, view1, view2, labels):
        rep1, rep2 = self.backbone(view1), self.backbone(view2)
        logits = self.probe(rep1.detach())
        probe_loss = F.cross_entropy(logits.float(), labels)
        correct = (logits.argmax(1) == labels).sum()
        return rep1, self.projector(rep1), self.projector(rep2), probe_loss, correct


def build_model(cfg: Config, num_classes: int, small_images: bool, device: torch.device,
                world: int = 1) -> Model:
    """The model on its device: channels_last on GPU, global-batch BatchNorm when world > 1."""
    model = Model(cfg, num_classes, small_images).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return sync_batchnorm(model, device) if world > 1 else model


def train_step(forward, optimizer, cfg: Config, loss_dim, view1, view2, labels):
    """One optimizer step on a batch of view pairs (bf16 autocast and channels_last on GPU):
    returns (rep1, infonce loss, probe loss, probe hits)."""
    cuda = view1.is_cuda
    if cuda:
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        rep1, z1, z2, probe_loss, correct = forward(view1, view2, labels)
    loss = infonce(z1.float(), z2.float(), dim=loss_dim, temperature=cfg.temperature,
                   variant=cfg.variant)
    optimizer.zero_grad(set_to_none=True)
    (loss + probe_loss).backward()
    optimizer.step()
    return rep1, loss, probe_loss, correct


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, step: int, state: dict) -> None:
    """Atomic (directclr.files.atomic_write); keeps the last KEEP_CHECKPOINTS."""
    atomic_save(state, out / f"ckpt_{step:09d}.pt")
    for old in sorted(out.glob(CHECKPOINT_GLOB))[:-KEEP_CHECKPOINTS]:
        old.unlink()


def latest_checkpoint(out: Path) -> tuple[Path | None, dict | None]:
    """The newest readable checkpoint and its path; a corrupt one is skipped with a warning."""
    for path in sorted(out.glob(CHECKPOINT_GLOB), reverse=True):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or corrupt: fall back to the one before
            log.warning("skipping unreadable checkpoint %s: %s", path, err)
    return None, None


def load_latest_checkpoint(out: Path) -> dict | None:
    return latest_checkpoint(out)[1]


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def resume_state(out: Path, resume: bool, rank: int, world: int,
                 device: torch.device) -> dict | None:
    """The checkpoint every rank resumes from: rank 0 picks the newest readable one and the
    others load that very file. Were ranks to resume from different ones, DDP would quietly take
    rank 0's weights while momenta, data order and run length differ, and the ranks would hang
    apart; so a rank that cannot read it stops them all, with an error on each."""
    path, state = latest_checkpoint(out) if resume and rank == 0 and out.is_dir() else (None, None)
    if world == 1:
        return state
    chosen = [path.name if path is not None else None]
    dist.broadcast_object_list(chosen, src=0)
    failed = torch.zeros(world, dtype=torch.int64, device=device)
    if chosen[0] is not None and rank != 0:
        try:
            state = torch.load(out / chosen[0], map_location="cpu", weights_only=True)
        except Exception as err:
            log.error("rank %d cannot read %s: %s", rank, out / chosen[0], err)
            failed[rank] = 1
    dist.all_reduce(failed)
    if failed.any():
        ranks = failed.nonzero().flatten().tolist()
        raise RuntimeError(f"rank 0 resumes from {chosen[0]} in --out {out}, which ranks {ranks} "
                           "cannot read: --out must be a folder every node sees, such as a "
                           "shared filesystem")
    return state


# --------------------------------------------------------------------------- the loop
def pretrain(cfg: Config) -> Path:
    rank, world, device = setup_distributed()
    master = rank == 0
    check_config(cfg, world)
    root, image_size = resolve_data(cfg, rank)
    small = image_size <= 64
    out = Path(cfg.out)
    if master:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    loader = build_pretrain_loader(
        root, cfg.batch_size // world, backend=cfg.loader, device=device, image_size=image_size,
        num_threads=cfg.num_threads, seed=cfg.seed, rank=rank, world_size=world,
        recipe="small" if small else "directclr")
    model = build_model(cfg, len(loader.classes), small, device, world)
    optimizer = LARS(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    steps_per_epoch = len(loader)
    step = 0
    state = resume_state(out, cfg.resume, rank, world, device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        step = state["step"]
        if master:
            log.warning("resumed from step %d (epoch %d)", step, loader.epoch)
    raw_model = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(model) if cfg.compile else model
    last_step = total_steps(cfg, steps_per_epoch)
    metrics = (out / "metrics.jsonl").open("a") if master else None
    progress = _progress_bar(master, last_step, step)

    def checkpoint():
        if master:
            save_checkpoint(out, step, {"model": raw_model.state_dict(),
                                        "optimizer": optimizer.state_dict(),
                                        "loader": loader.state_dict(), "step": step,
                                        "config": asdict(cfg)})

    while step < last_step:
        width = raw_model.probe.in_features
        spectra = {"representation": SpectrumAccumulator(width, dtype=torch.float64),
                   "subvector": SpectrumAccumulator(min(cfg.dim, width), dtype=torch.float64)}
        seen = correct_total = 0
        epoch = loader.epoch
        fetch_start = time.perf_counter()
        for view1, view2, labels in loader:
            compute_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, steps_per_epoch)
            rep1, loss, probe_loss, correct = train_step(forward, optimizer, cfg,
                                                         raw_model.loss_dim, view1, view2, labels)
            step += 1
            rep = rep1.detach().float()
            spectra["representation"].update(rep)
            spectra["subvector"].update(rep[:, :cfg.dim])
            seen += len(labels)
            correct_total += int(correct)
            end = time.perf_counter()
            losses = torch.stack([loss.detach(), probe_loss.detach()])
            if world > 1:  # log the global batch's losses, not rank 0's share
                dist.all_reduce(losses)
                losses /= world
            if master:
                wait = compute_start - fetch_start
                row = {"step": step, "epoch": epoch, "loss": losses[0].item(),
                       "probe_loss": losses[1].item(), "lr": optimizer.param_groups[0]["lr"],
                       "pairs_per_s": cfg.batch_size / (end - fetch_start),
                       "data_wait": wait / (end - fetch_start)}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                progress.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}")
                progress.update(1)
            if step % cfg.ckpt_every == 0:
                checkpoint()
            if step >= last_step:
                break
            fetch_start = time.perf_counter()
        if loader.batches_done in (0, steps_per_epoch):  # a whole epoch ended: summaries
            summary = {name: acc.all_reduce().result().summary()
                       for name, acc in spectra.items()}
            hits = torch.tensor([correct_total, seen], dtype=torch.float64, device=device)
            if world > 1:  # the global batch's online-probe accuracy, not rank 0's share
                dist.all_reduce(hits)
            if master:
                metrics.write(json.dumps({"epoch_end": epoch, "step": step,
                                          "probe_train_top1": (hits[0] / hits[1].clamp_min(1))
                                          .item(),
                                          "spectrum": summary}) + "\n")
                metrics.flush()
        checkpoint()
    if master:
        progress.close()
        metrics.close()
        atomic_save(raw_model.backbone.state_dict(), out / "backbone.pt")
    if dist.is_initialized():
        dist.barrier()  # every rank done before gloo/NCCL is torn down
        dist.destroy_process_group()
    return out / "backbone.pt"


def _progress_bar(enabled: bool, total: int, initial: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                desc="pretrain", mininterval=1.0)
