"""DirectCLR pretraining: the loop, read top to bottom (pretrain, then train_one_epoch).

    directclr pretrain --data fashion-mnist --arch resnet18 --epochs 2 --out runs/fmnist
    torchrun --nproc_per_node=8 -m directclr pretrain --data /imagenet/train --arch resnet50 \
        --batch-size 4096 --epochs 100 --out runs/in1k
    # several nodes: the same command on each, with its --node-rank; --out on a shared filesystem
    torchrun --nnodes=4 --node-rank=$NODE --nproc_per_node=8 --master-addr=$HEAD \
        --master-port=29500 -m directclr pretrain ... --out /shared/runs/in1k

One process per device under torchrun (NCCL on GPUs, gloo on CPU), or plain. Global rank 0 logs
(metrics.jsonl, a progress bar) and writes checkpoints; every rank resumes from the one rank 0
picks (a node that cannot read it is a clear error on every rank, not a hang).

What a cluster does to a run, and what the run does about it:
- SIGTERM, SIGINT or SIGUSR1 (a scheduler's preemption notice, Ctrl-C): the step in flight ends,
  every rank agrees on the step to stop at, a checkpoint is written and the process exits with
  EXIT_PREEMPTED (75); the same command resumes from it. Repeated signals are ignored (srun
  and torchrun deliver two); kill -9 stops at once.
- A non-finite loss, probe loss or gradient norm, or an online-probe loss beyond PROBE_BLOWUP x
  chance, stops the run with EXIT_DIVERGED (3) and an error naming the step and the value; no
  checkpoint or backbone.pt holding non-finite weights is ever written.
- Resuming checks the checkpoint's settings (RESUME_FIELDS) against the command's: a change is an
  error listing each, unless named in --accept-changes. Checkpoints are verified against their
  checksums; unreadable ones are skipped, and when none is left the run stops rather than start
  over (--no-resume starts over, moving the old files to previous-<time>/).
- One run per --out (a lock); the steps are free of host syncs except every --log-every steps,
  at checkpoints and at epoch ends.

Here: the data, the config's checks, the schedule, the model, one step and the loop. Elsewhere:
checkpoints, resuming and the --out lock in directclr.checkpoint; stop signals, the stop vote
and the divergence guard in directclr.preemption; metrics rows, TensorBoard, the progress bar
and epoch summaries in directclr.metrics; process groups in directclr.distributed.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import native
from .checkpoint import (
    Checkpointer,
    claim_out,
    on_rank0,
    restore_checkpoint,
    resume_settings,
    resume_state,
)
from .config import INVOCATION_FIELDS, Config, check_fields, paper_dim
from .config_file import WRITTEN_NAME, write_settings
from .data import build_pretrain_loader, prepare_fashion_mnist
from .data.loader import PretrainLoader, dali_available
from .distributed import setup_distributed
from .files import save_verified
from .gradcache import cached_backward
from .infonce import infonce
from .lars import LARS
from .metrics import EpochStats, MetricsLog, open_metrics
from .models import (
    SMALL_IMAGE_MAX,
    attach_description,
    backbone_width,
    build_backbone,
    build_projector,
    stem_for,
    sync_batchnorm,
)
from .preemption import agreed_stop, stop_group
from .stop_signals import Preempted, StopSignals

log = logging.getLogger("directclr.train")
SMALL_IMAGE_SIZE = 32  # Fashion-MNIST padded to 32 px: CIFAR stem and the "small" recipe


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
        return root / "train", image_size_of(cfg)
    return Path(cfg.data), image_size_of(cfg)


def image_size_of(cfg: Config) -> int:
    """--image-size, or 32 px for fashion-mnist and 224 for other data."""
    return cfg.image_size or (SMALL_IMAGE_SIZE if cfg.data == "fashion-mnist" else 224)


def absolute_paths(cfg: Config) -> dict[str, str]:
    """--data, --out and --cache as absolute paths (a shard pattern's braces stay as they are)."""
    paths = {"out": cfg.out, "cache": cfg.cache}
    if cfg.data != "fashion-mnist":
        paths["data"] = cfg.data
    return {name: str(Path(value).expanduser().absolute()) for name, value in paths.items()}


def check_config(cfg: Config, world: int) -> int:
    """Clear errors, each naming its flag, before any work (nothing is created or read);
    returns the backbone's representation width."""
    check_fields(cfg)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the world size "
                         f"{world}")
    if cfg.micro_batch is not None and (cfg.batch_size // world) % cfg.micro_batch:
        raise ValueError(f"--micro-batch {cfg.micro_batch} must divide the batch of each "
                         f"process, {cfg.batch_size // world} (--batch-size / world size)")
    width = backbone_width(cfg.arch, image_size_of(cfg))
    if cfg.dim is not None and cfg.dim > width:
        raise ValueError(f"--dim {cfg.dim} must be in [1, {width}] (the representation width "
                         f"of {cfg.arch})")
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("--wandb needs Weights & Biases: pip install wandb")
    if cfg.loader == "dali" and not dali_available():
        raise ValueError("--loader dali: NVIDIA DALI does not import here (install it: pip "
                         "install nvidia-dali-cuda130, or the build for your CUDA); use "
                         "--loader torchvision or auto")
    return width


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The run's length: --epochs, cut by --max-steps (the schedule then spans the cut run)."""
    total = cfg.epochs * steps_per_epoch
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    """--warmup-epochs in whole steps, at most a tenth of the run (rounded up: a run of any
    length with a warm-up spends at least its first step on it)."""
    total = total_steps(cfg, steps_per_epoch)
    return math.ceil(min(cfg.warmup_epochs * steps_per_epoch, total / 10))


def learning_rate(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up whose last step is at --lr (the peak: never above it, for any run length),
    then per-step cosine from --lr towards 0.001 x --lr."""
    total = total_steps(cfg, steps_per_epoch)
    warmup = warmup_steps(cfg, steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = 0.001 * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Model(nn.Module):
    """Backbone, projector and the online linear probe (on detached features)."""

    def __init__(self, cfg: Config, num_classes: int, image_size: int):
        super().__init__()
        self.backbone, width = build_backbone(cfg.arch, stem_for(image_size, cfg.arch) == "cifar",
                                              image_size)
        self.projector, self.loss_dim = build_projector(cfg.mode, width, cfg.dim,
                                                        cfg.simclr_out)
        self.probe = nn.Linear(width, num_classes)

    def forward(self, view1, view2, labels):
        rep1, rep2 = self.backbone(view1), self.backbone(view2)
        logits = self.probe(rep1.detach())
        probe_loss = F.cross_entropy(logits.float(), labels)
        correct = (logits.argmax(1) == labels).sum()
        return rep1, self.projector(rep1), self.projector(rep2), probe_loss, correct


def build_model(cfg: Config, num_classes: int, image_size: int, device: torch.device,
                world: int = 1) -> Model:
    """The model on its device: channels_last on GPU, global-batch BatchNorm when world > 1."""
    model = Model(cfg, num_classes, image_size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return sync_batchnorm(model, device) if world > 1 else model


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether --precision puts the model under bf16 autocast on `device`."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def train_step(forward, optimizer, cfg: Config, loss_dim, view1, view2, labels, model=None):
    """One optimizer step on a batch of view pairs (bf16 autocast as --precision says,
    channels_last on GPU):
    returns rep1, the probe hits and (infonce loss, probe loss, gradient norm), all on the
    device. With cfg.micro_batch smaller than the batch, the gradient is cached
    (directclr.gradcache): one micro-batch's activations at a time; `model` is then the module
    (DDP-wrapped or not) whose BatchNorm statistics and gradient sync that needs."""
    cuda = view1.is_cuda
    if cuda:
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)

    def run(first, second, targets):
        with torch.autocast(view1.device.type, dtype=torch.bfloat16,
                            enabled=uses_bf16(cfg, view1.device)):
            return forward(first, second, targets)

    def loss_of(z1, z2):
        return infonce(z1.float(), z2.float(), dim=loss_dim, temperature=cfg.temperature,
                       variant=cfg.variant)

    optimizer.zero_grad(set_to_none=True)
    if cfg.micro_batch is None or cfg.micro_batch >= len(labels):
        rep1, z1, z2, probe_loss, correct = run(view1, view2, labels)
        loss = loss_of(z1, z2)
        (loss + probe_loss).backward()
        loss, probe_loss = loss.detach(), probe_loss.detach()
    else:
        def chunk(first, second, targets):
            rep, z1, z2, probe, hits = run(first, second, targets)
            return (z1, z2), probe, (rep.detach(), hits)
        loss, probe_loss, extras = cached_backward(chunk, (view1, view2, labels),
                                                   cfg.micro_batch, loss_of,
                                                   forward if model is None else model)
        rep1 = torch.cat([rep for rep, _ in extras])
        correct = torch.stack([hits for _, hits in extras]).sum()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)
    optimizer.step()
    return rep1, correct, torch.stack([loss, probe_loss, grad_norm.float()])



# --------------------------------------------------------------------------- the loop
def pretrain(cfg: Config) -> Path:
    """Trains to the end and returns the path of backbone.pt; raises Preempted after a stop
    signal (a checkpoint written; nothing, for one process signalled before it claims --out)
    and Diverged on a non-finite or exploding run."""
    rank, world, device = setup_distributed()
    width = check_config(cfg, world)
    if cfg.dim is None:
        cfg = replace(cfg, dim=paper_dim(width))
        if rank == 0:
            log.info("--dim not given: d0 = %d, the paper's 360/2048 of %s's %d dimensions",
                     cfg.dim, cfg.arch, width)
    out = Path(cfg.out)
    with StopSignals() as signals:
        signals.stop_before_loop(world)
        lock = on_rank0(lambda: claim_out(out, cfg.resume), rank, world)
        try:
            return _train(cfg, rank, world, device, out, signals)
        finally:
            if lock is not None:
                lock.release()


def _train(cfg: Config, rank: int, world: int, device: torch.device, out: Path,
           signals: StopSignals) -> Path:
    master = rank == 0
    root, image_size = resolve_data(cfg, rank)
    backend = cfg.loader if cfg.loader != "auto" else (
        "dali" if dali_available() else "torchvision")
    run = resume_settings(cfg, image_size, backend)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    loader = build_pretrain_loader(
        root, cfg.batch_size // world, backend=backend, device=device, image_size=image_size,
        num_threads=cfg.num_threads, seed=cfg.seed, rank=rank, world_size=world,
        recipe="small" if image_size <= SMALL_IMAGE_MAX else "directclr",
        index_cache=Path(cfg.cache).expanduser() / "shard-index")
    model = build_model(cfg, len(loader.classes), image_size, device, world)
    optimizer = LARS(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    steps_per_epoch = len(loader)
    last_step = total_steps(cfg, steps_per_epoch)
    state = resume_state(out, cfg, run, rank, world, device)
    step = 0 if state is None else restore_checkpoint(state, last_step, model, optimizer, loader)
    if master and state is not None:
        log.info("resumed from step %d (epoch %d)", step, loader.epoch)
    # Once the resume has accepted them: the settings the run goes on with, its paths absolute
    # (the file repeats the run from any directory).
    on_rank0(lambda: write_settings(out / WRITTEN_NAME, {
        f.name: absolute_paths(cfg).get(f.name, getattr(cfg, f.name)) for f in fields(cfg)
        if f.name not in INVOCATION_FIELDS}), rank, world)
    if master:
        log.info("%d images in %d classes from %s; %d steps of %d pairs per epoch, %d steps in "
                 "all; %s loader, %d process(es) on %s; %s on %s, d0 = %d", len(loader.index),
                 len(loader.classes), root, steps_per_epoch, cfg.batch_size, last_step, backend,
                 world, device.type, cfg.mode, cfg.arch, cfg.dim)
    if step >= last_step and (out / "backbone.pt").exists():
        if master:
            log.info("already complete: step %d of %d; to train longer, raise --epochs or "
                     "--max-steps with --accept-changes", step, last_step)
        return _finish(out)
    if device.type == "cpu":
        native.available()  # a first-use build says so here, not inside the progress bar
    module = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(module) if cfg.compile else module
    if cfg.compile and master:
        log.info("--compile: the first step waits for torch.compile (minutes on CPU)")
    votes = stop_group(world, device)
    metrics = open_metrics(out, cfg, rank, world, len(loader.classes), last_step, step)
    stats = EpochStats(loader.epoch, model.probe.in_features, cfg.dim, device)
    stats.resume(None if state is None else state.get("epoch_stats"), rank)
    checkpoints = Checkpointer(
        out, cfg.keep_every, master, model, metrics,
        lambda at: {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "loader": loader.state_dict(), "step": at, "config": asdict(cfg),
                    "run": run, "epoch_stats": stats.state_dict(world)},
        saved_step=step if state is not None else None)
    training = Training(cfg, world, loader, model, module, forward, optimizer, steps_per_epoch,
                        last_step, metrics, checkpoints, signals, votes)
    try:
        while step < last_step:
            step = train_one_epoch(training, step, stats)
            if loader.epoch > stats.epoch:
                if stats.steps:  # this process saw the epoch end
                    metrics.flush()  # a diverged run stops here, not in the spectrum
                    metrics.epoch_row(stats.row(step, len(loader.classes), world))
                stats = EpochStats(loader.epoch, model.probe.in_features, cfg.dim, device)
            checkpoints.save(step)
        checkpoints.save(step)
        if master:
            save_verified(attach_description(
                model.backbone.state_dict(), arch=cfg.arch, stem=stem_for(image_size, cfg.arch),
                image_size=image_size, mode=cfg.mode, dim=cfg.dim,
                width=model.probe.in_features), out / "backbone.pt")
    finally:
        metrics.close()
    return _finish(out)


@dataclass
class Training:
    """What every step of a run uses, fixed once the run is set up."""
    cfg: Config
    world: int
    loader: PretrainLoader
    model: Model  # whose weights are saved
    module: nn.Module  # the model as a step runs it: DDP-wrapped with several ranks
    forward: nn.Module  # the module, compiled with --compile
    optimizer: LARS
    steps_per_epoch: int
    last_step: int
    metrics: MetricsLog
    checkpoints: Checkpointer
    signals: StopSignals
    stop_votes: dist.ProcessGroup | None  # stop_group's


def train_one_epoch(training: Training, step: int, stats: EpochStats) -> int:
    """The steps left in the loader's epoch, up to the run's last; returns the step reached.
    Between steps, a stop signal on any rank ends the run with a checkpoint (Preempted)."""
    cfg, loader, checkpoints = training.cfg, training.loader, training.checkpoints
    batches = iter(loader)
    while step < training.last_step:
        stop = agreed_stop(training.signals, training.world, training.stop_votes)
        if stop:
            checkpoints.save(step)
            if training.world > 1:  # torchrun kills the others once one rank exits
                dist.barrier()
            raise Preempted(f"stopped by {stop} after step {step}; the checkpoint is "
                            f"in {checkpoints.out}: rerun the same command to resume")
        fetch_start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        view1, view2, labels = batch
        waited = time.perf_counter() - fetch_start
        lr = learning_rate(cfg, step, training.steps_per_epoch)
        for group in training.optimizer.param_groups:
            group["lr"] = lr
        rep1, correct, values = train_step(training.forward, training.optimizer, cfg,
                                           training.model.loss_dim, view1, view2, labels,
                                           training.module)
        step += 1
        stats.add(rep1, labels, correct)
        training.metrics.add(step, stats.epoch, lr, values, waited)
        if loader.batches_done == training.steps_per_epoch:
            # Let the loader close the epoch now, so that a checkpoint or a stop at this step
            # resumes at the next epoch, not at the end of this one.
            next(batches, None)
            break
        if step % cfg.ckpt_every == 0 or (cfg.keep_every and step % cfg.keep_every == 0):
            checkpoints.save(step)
        elif step % cfg.log_every == 0:
            training.metrics.flush()
    return step


def _finish(out: Path) -> Path:
    if dist.is_initialized():
        dist.barrier()  # every rank done before gloo/NCCL is torn down
        dist.destroy_process_group()
    return out / "backbone.pt"
