"""Checkpoints of a pretraining run and resuming from them.

Checkpoints are ckpt_<step>.pt in --out, written atomically, durably and with checksums
(directclr.files) by global rank 0 only; the last KEEP_CHECKPOINTS are kept, and those at
multiples of --keep-every. Resuming: rank 0 picks the newest usable one (unreadable ones are
skipped, with a warning), checks its settings (RESUME_FIELDS) against the command's, and every
rank loads that very file. One run per --out: a lock (claim_out).
"""
from __future__ import annotations

import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import RESUME_FIELDS, Config, flag
from .files import (
    CorruptFile,
    FolderLock,
    atomic_write,
    load_verified,
    remove_stale_temporaries,
    save_verified,
)
from .preemption import check_finite_weights

# The run's messages keep the one logger name that users and tests filter on.
log = logging.getLogger("directclr.train")
CHECKPOINT_GLOB = "ckpt_*.pt"
KEEP_CHECKPOINTS = 2
CHECKPOINT_KEYS = ("model", "optimizer", "loader", "step", "config", "run")
# What a run leaves in --out besides its checkpoints, moved aside together by --no-resume (a
# W&B run id left behind would make the new run log into the old W&B run).
RUN_FILES = ("metrics.jsonl", "backbone.pt", "config.toml", "wandb-run-id", "wandb",
             "tensorboard")


def save_checkpoint(out: Path, step: int, state: dict, keep_every: int | None = None) -> None:
    """Atomic, durable and checksummed (directclr.files.save_verified); keeps the last
    KEEP_CHECKPOINTS, and those at multiples of keep_every. Anything but a file in a
    checkpoint's name (a directory, which a resume skips) is renamed aside, never deleted, so the
    run goes on saving."""
    target = out / f"ckpt_{step:09d}.pt"
    if target.exists() and not target.is_file():
        aside = target.with_name(f"{target.name}.not-a-checkpoint-{uuid.uuid4().hex[:8]}")
        target.rename(aside)
        log.warning("%s is not a file: renamed to %s to save step %d there", target, aside.name,
                    step)
    save_verified(state, target)
    for old in sorted(p for p in out.glob(CHECKPOINT_GLOB) if p.is_file())[:-KEEP_CHECKPOINTS]:
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
        out / name for name in RUN_FILES if (out / name).exists()]
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
        raise ValueError(f"rank 0 resumes from {chosen[0]} in --out {out}, which ranks "
                           f"{ranks} cannot read: --out must be a folder every node sees, such "
                           "as a shared filesystem")
    return state


def restore_checkpoint(state: dict, last_step: int, model: nn.Module, optimizer,
                       loader) -> int:
    """Loads a checkpoint into the model, its optimizer and the loader; returns its step."""
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
    return step


class Checkpointer:
    """Writes the run's checkpoints, at most one per step. Every rank calls save() at the same
    steps: the metrics flush and the finite-weights check before it are collective; rank 0 alone
    writes. `state_at(step)` is what a checkpoint holds (CHECKPOINT_KEYS and the optional
    "epoch_stats"), called on every rank."""

    def __init__(self, out: Path, keep_every: int | None, master: bool, model: nn.Module,
                 metrics, state_at: Callable[[int], dict], saved_step: int | None = None):
        self.out, self.keep_every, self.master = out, keep_every, master
        self.model, self.metrics, self.state_at = model, metrics, state_at
        self.saved_step = saved_step  # a resumed run need not write its first step again

    def save(self, step: int) -> None:
        self.metrics.flush()  # its divergence guard sees every step before anything is written
        if self.saved_step == step:
            return
        check_finite_weights(self.model, step)
        state = self.state_at(step)  # on every rank: it may be collective
        if self.master:
            save_checkpoint(self.out, step, state, self.keep_every)
        self.saved_step = step
