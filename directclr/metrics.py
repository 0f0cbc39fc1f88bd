"""What a pretraining run reports: metrics.jsonl rows (one per step, one per epoch end), the
same rows to TensorBoard with --tensorboard and to Weights & Biases with --wandb, and the progress
bar; all on global rank 0."""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import on_rank0
from .config import Config
from .preemption import Diverged, divergence, probe_limit
from .spectrum import SpectrumAccumulator

log = logging.getLogger("directclr.train")


class MetricsLog:
    """One row per step, kept on the device and fetched in one copy per flush (every
    --log-every steps, and before anything is written): the only host syncs of a GPU step.
    The flush also guards against divergence, in step order, before the rows are trusted."""

    def __init__(self, path: Path | None, cfg: Config, world: int, num_classes: int, progress,
                 sinks: tuple = ()):
        self.file = path.open("a") if path is not None else None
        # rank 0's other writers of the rows: TensorBoardWriter, WandbWriter
        self.sinks = list(sinks)
        self.cfg, self.world, self.progress = cfg, world, progress
        self.probe_limit = probe_limit(num_classes)
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
            problem = divergence(row, self.probe_limit)
            if problem:
                self.close()
                raise Diverged(f"training diverged at step {row['step']}: {problem}. Nothing was "
                               f"saved after it; lower --lr (now {self.cfg.lr:g}) and resume "
                               "with --accept-changes lr, or start over with --no-resume")
        if self.file is not None:
            self.file.flush()
        self.progress.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}")

    def _write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            if "epoch_end" in row:  # in the file before a sink's figures read it
                self.file.flush()
        for sink in self.sinks:
            sink.write(row)

    def epoch_row(self, row: dict) -> None:
        self._write(row)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        self.progress.close()


def open_metrics(out: Path, cfg: Config, rank: int, world: int, num_classes: int,
                 last_step: int, step: int) -> MetricsLog:
    """The run's MetricsLog from `step` on: files, TensorBoard, W&B and the bar on rank 0 only
    (every rank still flushes, for the all-reduce of the losses and the divergence guard). A sink
    that cannot start stops every rank with its error, not rank 0 alone."""
    def sinks() -> list:
        opened = []
        if cfg.tensorboard:
            from .plot import TensorBoardWriter
            opened.append(TensorBoardWriter(out / "tensorboard", purge_step=step))
        if cfg.wandb:
            from .wandb_writer import WandbWriter
            opened.append(WandbWriter(out, cfg))
        return opened
    master = rank == 0
    return MetricsLog(out / "metrics.jsonl" if master else None, cfg, world, num_classes,
                      progress_bar(master, last_step, step), on_rank0(sinks, rank, world) or [])


def progress_bar(enabled: bool, total: int, initial: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                desc="pretrain", mininterval=1.0)


class EpochStats:
    """An epoch's summary row, accumulated on the device over its steps: the spectra of the
    representation and of its first d0 dimensions, and the online probe's hits. A checkpoint
    holds the epoch so far (state_dict), so a resumed epoch's row covers all of its images."""

    def __init__(self, epoch: int, width: int, dim: int, device: torch.device):
        self.epoch, self.dim = epoch, dim
        self.spectra = {"representation": SpectrumAccumulator(width, dtype=torch.float64),
                        "subvector": SpectrumAccumulator(min(dim, width), dtype=torch.float64)}
        self.steps = 0  # this process's, since it started: the same on every rank
        self.seen, self.correct = 0, torch.zeros((), dtype=torch.int64, device=device)

    def add(self, rep1: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor) -> None:
        rep = rep1.detach().float()
        self.spectra["representation"].update(rep)
        self.spectra["subvector"].update(rep[:, :self.dim])
        self.steps += 1
        self.seen += len(labels)
        self.correct += correct

    def _hits(self, world: int) -> torch.Tensor:
        """(correct, seen) over all ranks: collective when world > 1."""
        hits = torch.stack([self.correct.double(),
                            torch.tensor(float(self.seen), device=self.correct.device)])
        if world > 1:
            dist.all_reduce(hits)
        return hits

    def row(self, step: int, classes: int, world: int) -> dict:
        """Collective: every rank calls it at the same epoch end."""
        summary = {name: acc.all_reduce().result().summary()
                   for name, acc in self.spectra.items()}
        hits = self._hits(world)  # the global batch's online-probe accuracy, not rank 0's share
        return {"epoch_end": self.epoch, "step": step, "classes": classes,
                "probe_train_top1": (hits[0] / hits[1].clamp_min(1)).item(),
                "spectrum": summary}

    def state_dict(self, world: int) -> dict:
        """The epoch so far over all ranks, for rank 0's checkpoint: collective when world > 1
        (every rank saves at the same steps); this process's state is left as it is."""
        spectra = {name: copy.deepcopy(acc).all_reduce().state_dict()
                   for name, acc in self.spectra.items()}
        correct, seen = (int(x) for x in self._hits(world).tolist())
        return {"epoch": self.epoch, "seen": seen, "correct": correct, "spectra": spectra}

    def resume(self, state: dict | None, rank: int) -> None:
        """Takes over a checkpoint's share of this epoch (state_dict's): on rank 0 only, since
        the row's all-reduce adds every rank's state. A checkpoint without it (one written
        before it held it) leaves the row to the images seen from now on; its spectrum's `n`
        says how many."""
        if rank != 0 or not isinstance(state, dict) or state.get("epoch") != self.epoch:
            return
        try:
            seen, correct = int(state["seen"]), int(state["correct"])
            for name, acc in self.spectra.items():
                acc.load_state_dict(state["spectra"][name], self.correct.device)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            self.spectra = {name: SpectrumAccumulator(acc.dim, dtype=acc.dtype)
                            for name, acc in self.spectra.items()}
            log.warning("epoch %d's row will cover the images after the resume only: the "
                        "checkpoint's share of it does not fit this run (%s)", self.epoch, err)
            return
        self.seen = seen
        self.correct += correct
