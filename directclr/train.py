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

What a cluster does to a run, and what the run does about it:
- SIGTERM, SIGINT or SIGUSR1 (a scheduler's preemption notice, Ctrl-C): the step in flight ends,
  every rank agrees on the step to stop at, a checkpoint is written and the process exits with
  EXIT_PREEMPTED (75); the same command resumes from it. A second signal stops at once.
- A non-finite loss, probe loss or gradient norm, or an online-probe loss beyond PROBE_BLOWUP x
  chance, stops the run with EXIT_DIVERGED (3) and an error naming the step and the value; no
  checkpoint or backbone.pt holding non-finite weights is ever written.
- Resuming checks the checkpoint's settings (RESUME_FIELDS) against the command's: a change is an
  error listing each, unless named in --accept-changes. Checkpoints are verified against their
  checksums; unreadable ones are skipped, and when none is left the run stops rather than start
  over (--no-resume starts over, moving the old files to previous-<time>/).
- One run per --out (a lock); the steps are free of host syncs except every --log-every steps,
  at checkpoints and at epoch ends.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import build_pretrain_loader, prepare_fashion_mnist
from .data.loader import dali_available
from .distributed import setup_distributed
from .files import (CorruptFile, FolderLock, atomic_write, load_verified,
                    remove_stale_temporaries, save_verified)
from . import native
from .config import ARCHS, RESUME_FIELDS, Config, check_fields, flag, paper_dim
from .gradcache import cached_backward
from .infonce import infonce
from .lars import LARS
from .models import (build_backbone, build_projector, describe_backbone, stem_for,
                     sync_batchnorm)
from .spectrum import SpectrumAccumulator

log = logging.getLogger("directclr.train")
CHECKPOINT_GLOB = "ckpt_*.pt"
KEEP_CHECKPOINTS = 2
SMALL_IMAGE_SIZE = 32  # Fashion-MNIST padded to 32 px: CIFAR stem and the "small" recipe
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# An online probe whose cross-entropy exceeds this many times chance, ln(classes), has logits
# hundreds of nats apart: its features are blowing up (seen at --lr 1e3: 211 at step 2, from 1.3).
PROBE_BLOWUP = 100.0
CHECKPOINT_KEYS = ("model", "optimizer", "loader", "step", "config", "run")


class RunStopped(Exception):
    """The run ended early on purpose; `exit_code` is what the command returns."""
    exit_code = 1


class Preempted(RunStopped):
    exit_code = EXIT_PREEMPTED


class Diverged(RunStopped):
    exit_code = EXIT_DIVERGED


# --------------------------------------------------------------------------- setup


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
    return Path(cfg.data), cfg.image_size or 224


def check_config(cfg: Config, world: int) -> None:
    """Clear errors, each naming its flag, before any work (nothing is created or read)."""
    check_fields(cfg)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the world size "
                         f"{world}")
    if cfg.micro_batch is not None and (cfg.batch_size // world) % cfg.micro_batch:
        raise ValueError(f"--micro-batch {cfg.micro_batch} must divide the batch of each "
                         f"process, {cfg.batch_size // world} (--batch-size / world size)")
    if cfg.dim is not None and cfg.dim > ARCHS[cfg.arch]:
        raise ValueError(f"--dim {cfg.dim} must be in [1, {ARCHS[cfg.arch]}] (the "
                         f"representation width of {cfg.arch})")
    if cfg.loader == "dali" and not dali_available():
        raise ValueError("--loader dali: NVIDIA DALI does not import here (install it: pip "
                         "install nvidia-dali-cuda130, or the build for your CUDA); use "
                         "--loader torchvision or auto")


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

    def __init__(self, cfg: Config, num_classes: int, small_images: bool):
        super().__init__()
        self.backbone, width = build_backbone(cfg.arch, small_images)
        self.projector, self.loss_dim = build_projector(cfg.mode, width, cfg.dim,
                                                        cfg.simclr_out)
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


def train_step(forward, optimizer, cfg: Config, loss_dim, view1, view2, labels, model=None):
    """One optimizer step on a batch of view pairs (bf16 autocast and channels_last on GPU):
    returns rep1, the probe hits and (infonce loss, probe loss, gradient norm), all on the
    device. With cfg.micro_batch smaller than the batch, the gradient is cached
    (directclr.gradcache): one micro-batch's activations at a time; `model` is then the module
    (DDP-wrapped or not) whose BatchNorm statistics and gradient sync that needs."""
    cuda = view1.is_cuda
    if cuda:
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)

    def run(first, second, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
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


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, step: int, state: dict, keep_every: int | None = None) -> None:
    """Atomic, durable and checksummed (directclr.files.save_verified); keeps the last
    KEEP_CHECKPOINTS, and those at multiples of keep_every."""
    save_verified(state, out / f"ckpt_{step:09d}.pt")
    for old in sorted(out.glob(CHECKPOINT_GLOB))[:-KEEP_CHECKPOINTS]:
        if not (keep_every and checkpoint_step(old) % keep_every == 0):
            old.unlink(missing_ok=True)


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's name, ckpt_<step>.pt."""
    return int(path.stem.split("_")[1])


def check_checkpoint(state, path: Path) -> dict:
    """A checkpoint this loop wrote: every key, of the right kind, and finite weights and
    momenta."""
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CorruptFile(f"{path} is not a training checkpoint: it needs keys "
                          f"{list(CHECKPOINT_KEYS)}, has {have}")
    kinds = {"model": dict, "optimizer": dict, "loader": dict, "step": int, "run": dict}
    wrong = [key for key, kind in kinds.items() if not isinstance(state[key], kind)]
    if wrong:
        raise CorruptFile(f"{path} is not a training checkpoint: {wrong} have the wrong type")
    momenta = state["optimizer"].get("state", {})
    tensors = list(state["model"].values()) + [
        value for entry in (momenta.values() if isinstance(momenta, dict) else [])
        if isinstance(entry, dict) for value in entry.values()]
    if not all(torch.isfinite(t).all() for t in tensors
               if isinstance(t, torch.Tensor) and t.is_floating_point()):
        raise CorruptFile(f"{path} holds non-finite weights or momenta")
    return state


def read_checkpoint(path: Path) -> dict:
    return check_checkpoint(load_verified(path), path)


def latest_checkpoint(out: Path) -> tuple[Path | None, dict | None]:
    """The newest usable checkpoint and its path, skipping unusable ones with a warning; an
    error when there were checkpoints and none is usable (starting over would silently throw
    the run away)."""
    paths = sorted(out.glob(CHECKPOINT_GLOB), reverse=True)
    for path in paths:
        try:
            return path, read_checkpoint(path)
        except CorruptFile as err:
            log.warning("skipping checkpoint: %s", err)
    if paths:
        raise ValueError(f"none of the {len(paths)} checkpoints in --out {out} is usable (see the "
                         "warnings above); --no-resume starts over, keeping them in "
                         "previous-<time>/")
    return None, None


def load_latest_checkpoint(out: Path) -> dict | None:
    return latest_checkpoint(out)[1]


def atomic_save(obj, path: Path) -> None:
    save_verified(obj, path)


def resume_settings(cfg: Config, image_size: int, backend: str) -> dict:
    """RESUME_FIELDS as this run resolves them (the image size and the loader backend)."""
    return {**{name: getattr(cfg, name) for name in RESUME_FIELDS}, "image_size": image_size,
            "loader": backend}


def check_resume_config(saved: dict, current: dict, accepted, step: int) -> None:
    """The run in --out continues only with the settings it was started with, or with changes
    named in --accept-changes."""
    # a field added after the checkpoint was written had, in effect, its default then
    saved = {name: saved.get(name, Config.__dataclass_fields__[name].default)
             for name in RESUME_FIELDS}
    changed = [f"  {flag(name)}: {saved[name]!r} -> {current[name]!r}"
               for name in RESUME_FIELDS if saved[name] != current[name] and name not in accepted]
    if changed:
        names = " ".join(line.split(":")[0].strip()[2:] for line in changed)
        raise ValueError(
            f"the checkpoint at step {step} in --out was trained with other settings:\n"
            + "\n".join(changed) + "\nrerun with the checkpoint's values, continue with the new "
            f"ones with --accept-changes {names}, or start over with --no-resume")


def on_rank0(work, rank: int, world: int):
    """work() on global rank 0, its error raised on every rank: a rank-0 failure that only rank
    0 knew of would leave the others in their next collective until the timeout."""
    result, failure = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as err:
            if world == 1:
                raise
            failure = err
    if world > 1:
        box = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        if box[0] is not None:
            raise ValueError(f"rank 0 stopped the run: {box[0]}")
    return result


def claim_out(out: Path, resume: bool) -> FolderLock:
    """The run folder, locked for this run, without temporaries a killed writer left; with
    --no-resume the previous run's files move to previous-<time>/."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out).acquire()
    for path in remove_stale_temporaries(out):
        log.warning("removed %s, left by a killed writer", path.name)
    previous = sorted(out.glob(CHECKPOINT_GLOB)) + [
        out / name for name in ("metrics.jsonl", "backbone.pt") if (out / name).exists()]
    if not resume and previous:
        keep = out / time.strftime("previous-%Y%m%d-%H%M%S")
        keep.mkdir()
        for path in previous:
            path.rename(keep / path.name)
        log.warning("--no-resume: moved the previous run's files to %s", keep)
    return lock


def pick_checkpoint(out: Path, cfg: Config, run: dict) -> tuple[Path | None, dict | None]:
    """Rank 0's choice: the newest usable checkpoint, whose settings must match; metrics.jsonl is
    cut back to its step, so that the steps redone are not logged twice."""
    path, state = latest_checkpoint(out) if cfg.resume else (None, None)
    step = 0 if state is None else state["step"]
    if state is not None:
        check_resume_config(state["run"], run, cfg.accept_changes, step)
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        kept = [line for line in metrics.read_text().splitlines() if _row_step(line) <= step]
        atomic_write(metrics, lambda tmp: tmp.write_text("".join(f"{r}\n" for r in kept)))
    return path, state


def _row_step(line: str) -> float:
    """A metrics row's step; a row cut short by a kill counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def resume_state(out: Path, cfg: Config, run: dict, rank: int, world: int,
                 device: torch.device) -> dict | None:
    """The checkpoint every rank resumes from: rank 0 picks the newest usable one and the others
    load that very file. Were ranks to resume from different ones, DDP would quietly take
    rank 0's weights while momenta, data order and run length differ, and the ranks would hang
    apart; so a rank that cannot read it stops them all, with an error on each."""
    path, state = on_rank0(lambda: pick_checkpoint(out, cfg, run), rank, world) or (None, None)
    if world == 1:
        return state
    chosen = [None if path is None else path.name]
    dist.broadcast_object_list(chosen, src=0)
    failed = torch.zeros(world, dtype=torch.int64, device=device)
    if chosen[0] is not None and rank != 0:
        try:
            state = read_checkpoint(out / chosen[0])
        except (CorruptFile, FileNotFoundError) as err:
            log.error("rank %d cannot read %s: %s", rank, out / chosen[0], err)
            failed[rank] = 1
    dist.all_reduce(failed)
    if failed.any():
        ranks = failed.nonzero().flatten().tolist()
        raise RuntimeError(f"rank 0 resumes from {chosen[0]} in --out {out}, which ranks "
                           f"{ranks} cannot read: --out must be a folder every node sees, such "
                           "as a shared filesystem")
    return state


def check_finite_weights(model: nn.Module, step: int) -> None:
    """Before anything is written: the loss can be finite at the step whose update overflowed."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
        raise Diverged(f"training diverged: the weights hold non-finite values after step {step};"
                       " nothing was saved for it")


# --------------------------------------------------------------------------- signals, metrics
class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 set a flag the loop reads between steps. Repeats are not an
    abort: a worker under srun + torchrun gets the scheduler's SIGTERM and then torchrun's."""

    def __init__(self):
        self.received: str | None = None
        self.previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
        log.warning("%s: stopping after this step with a checkpoint (kill -9 stops at once)",
                    name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def stop_group(world: int, device: torch.device):
    """A gloo group for the per-step stop vote: a CPU all-reduce, which makes the ranks agree
    without a device sync (the default group is already gloo on CPU)."""
    if world == 1 or device.type != "cuda":
        return None
    return dist.new_group(backend="gloo")


def agreed_stop(signals: StopSignals, world: int, group) -> str | None:
    """The signal this rank received, or any rank's: all ranks stop after the same step."""
    if world == 1:
        return signals.received
    votes = torch.tensor([signals.received is not None], dtype=torch.int32)
    dist.all_reduce(votes, group=group)
    return signals.received or ("a signal to another rank" if votes.item() else None)


class MetricsLog:
    """One row per step, kept on the device and fetched in one copy per flush (every
    --log-every steps, and before anything is written): the only host syncs of a GPU step.
    The flush also guards against divergence, in step order, before the rows are trusted."""

    def __init__(self, path: Path | None, cfg: Config, world: int, num_classes: int, progress,
                 tensorboard=None):
        self.file = path.open("a") if path is not None else None
        self.tensorboard = tensorboard  # a plot.TensorBoardWriter on rank 0 with --tensorboard
        self.cfg, self.world, self.progress = cfg, world, progress
        self.probe_limit = PROBE_BLOWUP * math.log(max(2, num_classes))
        self.values: list[torch.Tensor] = []
        self.host: list[dict] = []
        self.since = time.perf_counter()
        self.waited = 0.0

    def add(self, step: int, epoch: int, lr: float, values: torch.Tensor, waited: float) -> None:
        self.values.append(values)
        self.host.append({"step": step, "epoch": epoch, "lr": lr})
        self.waited += waited
        self.progress.update(1)

    def flush(self) -> None:
        if not self.values:
            return
        values = torch.stack(self.values)
        if self.world > 1:  # the global batch's losses, not this rank's share
            dist.all_reduce(values)
            values /= self.world
        rows = values.tolist()  # the one device-to-host copy
        elapsed = time.perf_counter() - self.since
        rate = len(rows) * self.cfg.batch_size / elapsed
        wait = self.waited / elapsed
        host, self.values, self.host = self.host, [], []
        self.since, self.waited = time.perf_counter(), 0.0
        for info, (loss, probe_loss, grad_norm) in zip(host, rows):
            row = {**info, "loss": loss, "probe_loss": probe_loss, "grad_norm": grad_norm,
                   "pairs_per_s": rate, "data_wait": wait}
            self._write(row)
            problem = self._divergence(row)
            if problem:
                self.close()
                raise Diverged(f"training diverged at step {row['step']}: {problem}. Nothing was "
                               f"saved after it; lower --lr (now {self.cfg.lr:g}) and resume "
                               "with --accept-changes lr, or start over with --no-resume")
        if self.file is not None:
            self.file.flush()
        self.progress.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}")

    def _divergence(self, row: dict) -> str | None:
        for name in ("loss", "probe_loss", "grad_norm"):
            if not math.isfinite(row[name]):
                return f"{name} = {row[name]}"
        if row["probe_loss"] > self.probe_limit:
            return (f"probe_loss = {row['probe_loss']:.4g}, over {PROBE_BLOWUP:g} x its chance "
                    f"level (the features are blowing up)")
        return None

    def _write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(row)

    def epoch_row(self, row: dict) -> None:
        self._write(row)
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        self.progress.close()


# --------------------------------------------------------------------------- the loop
def pretrain(cfg: Config) -> Path:
    """Trains to the end and returns the path of backbone.pt; raises Preempted after a stop
    signal (a checkpoint written) and Diverged on a non-finite or exploding run."""
    rank, world, device = setup_distributed()
    check_config(cfg, world)
    if cfg.dim is None:
        cfg = replace(cfg, dim=paper_dim(ARCHS[cfg.arch]))
        if rank == 0:
            log.info("--dim not given: d0 = %d, the paper's 360/2048 of %s's %d dimensions",
                     cfg.dim, cfg.arch, ARCHS[cfg.arch])
    out = Path(cfg.out)
    lock = on_rank0(lambda: claim_out(out, cfg.resume), rank, world)
    try:
        with StopSignals() as signals:
            return _train(cfg, rank, world, device, out, signals)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, rank: int, world: int, device: torch.device, out: Path,
           signals: StopSignals) -> Path:
    master = rank == 0
    root, image_size = resolve_data(cfg, rank)
    small = stem_for(image_size) == "cifar"
    backend = cfg.loader if cfg.loader != "auto" else (
        "dali" if dali_available() else "torchvision")
    run = resume_settings(cfg, image_size, backend)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    loader = build_pretrain_loader(
        root, cfg.batch_size // world, backend=backend, device=device, image_size=image_size,
        num_threads=cfg.num_threads, seed=cfg.seed, rank=rank, world_size=world,
        recipe="small" if small else "directclr")
    model = build_model(cfg, len(loader.classes), small, device, world)
    optimizer = LARS(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    steps_per_epoch = len(loader)
    last_step = total_steps(cfg, steps_per_epoch)
    step = 0
    state = resume_state(out, cfg, run, rank, world, device)
    if state is not None:
        step = state["step"]
        if step > last_step:
            raise ValueError(f"the checkpoint in --out is at step {step}, past the {last_step} "
                             "steps --epochs/--max-steps now ask for")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as err:  # an accepted --arch, --mode or --dim change
            detail = " ".join(str(err).split())[:300]
            raise ValueError(f"the checkpoint at step {step} does not fit this model ({detail}"
                             "); start over with --no-resume") from err
        loader.load_state_dict(state["loader"])
        if master:
            log.info("resumed from step %d (epoch %d)", step, loader.epoch)
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
    raw_model = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(model) if cfg.compile else model
    if cfg.compile and master:
        log.info("--compile: the first step waits for torch.compile (minutes on CPU)")
    votes = stop_group(world, device)
    tensorboard = None
    if cfg.tensorboard and master:
        from .plot import TensorBoardWriter
        tensorboard = TensorBoardWriter(out / "tensorboard", purge_step=step)
    metrics = MetricsLog(out / "metrics.jsonl" if master else None, cfg, world,
                         len(loader.classes), _progress_bar(master, last_step, step), tensorboard)
    saved_step = step if state is not None else None

    def checkpoint():
        nonlocal saved_step
        metrics.flush()
        if saved_step == step:
            return
        check_finite_weights(raw_model, step)
        if master:
            save_checkpoint(out, step, {"model": raw_model.state_dict(),
                                        "optimizer": optimizer.state_dict(),
                                        "loader": loader.state_dict(), "step": step,
                                        "config": asdict(cfg), "run": run}, cfg.keep_every)
        saved_step = step

    try:
        while step < last_step:
            width = raw_model.probe.in_features
            spectra = {"representation": SpectrumAccumulator(width, dtype=torch.float64),
                       "subvector": SpectrumAccumulator(min(cfg.dim, width),
                                                        dtype=torch.float64)}
            seen, correct_total = 0, torch.zeros((), dtype=torch.int64, device=device)
            epoch = loader.epoch
            batches = iter(loader)
            while step < last_step:
                stop = agreed_stop(signals, world, votes)
                if stop:
                    checkpoint()
                    if world > 1:  # torchrun kills the others once one rank exits
                        dist.barrier()
                    raise Preempted(f"stopped by {stop} after step {step}; the checkpoint is "
                                    f"in {out}: rerun the same command to resume")
                fetch_start = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                view1, view2, labels = batch
                waited = time.perf_counter() - fetch_start
                lr = learning_rate(cfg, step, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                rep1, correct, values = train_step(forward, optimizer, cfg, raw_model.loss_dim,
                                                   view1, view2, labels, model)
                step += 1
                rep = rep1.detach().float()
                spectra["representation"].update(rep)
                spectra["subvector"].update(rep[:, :cfg.dim])
                seen += len(labels)
                correct_total += correct
                metrics.add(step, epoch, lr, values, waited)
                if loader.batches_done == steps_per_epoch:
                    # Let the loader close the epoch now, so that a checkpoint or a stop at this
                    # step resumes at the next epoch, not at the end of this one.
                    next(batches, None)
                    break
                if step % cfg.ckpt_every == 0 or (cfg.keep_every and step % cfg.keep_every == 0):
                    checkpoint()
                elif step % cfg.log_every == 0:
                    metrics.flush()
            if loader.epoch > epoch and seen:  # this process saw a whole epoch end: summaries
                metrics.flush()  # a diverged run stops here, not in the spectrum
                summary = {name: acc.all_reduce().result().summary()
                           for name, acc in spectra.items()}
                hits = torch.stack([correct_total.double(),
                                    torch.tensor(float(seen), device=device)])
                if world > 1:  # the global batch's online-probe accuracy, not rank 0's share
                    dist.all_reduce(hits)
                metrics.epoch_row({"epoch_end": epoch, "step": step,
                                   "classes": len(loader.classes),
                                   "probe_train_top1": (hits[0] / hits[1].clamp_min(1)).item(),
                                   "spectrum": summary})
            checkpoint()
        checkpoint()
        if master:
            atomic_save(describe_backbone(
                raw_model.backbone.state_dict(), arch=cfg.arch, stem=stem_for(image_size),
                image_size=image_size, mode=cfg.mode, dim=cfg.dim,
                width=ARCHS[cfg.arch]), out / "backbone.pt")
    finally:
        metrics.close()
    return _finish(out)


def _finish(out: Path) -> Path:
    if dist.is_initialized():
        dist.barrier()  # every rank done before gloo/NCCL is torn down
        dist.destroy_process_group()
    return out / "backbone.pt"


def _progress_bar(enabled: bool, total: int, initial: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                desc="pretrain", mininterval=1.0)
