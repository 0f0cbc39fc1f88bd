"""Each cycle's configuration and faults, drawn from the soak's seed and the cycle's number."""
from __future__ import annotations

import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import pretrain_argv

IMAGE_SIDE_PX = 32
BATCH_PAIRS = 16  # global: 4 steps an epoch on 1 process or 2 ranks
EPOCHS = 3
MAX_STEPS = tuple(range(8, 13))
CKPT_EVERY = (1, 2, 3)
MICRO_BATCH_PAIRS = 4  # per process: 2 or 4 micro-batches a step
KINDS = ("kill-9", "SIGTERM", "SIGINT", "SIGUSR1")
SIGNALS = {"kill-9": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT,
           "SIGUSR1": signal.SIGUSR1}
EARLY_MOMENTS = ("start-up", "resume")  # before the first step: the stop handlers may be missing
WRITE_MOMENTS = ("checkpoint-write", "backbone-write")
# torchrun's default leaves out SIGUSR1 (a scheduler's time-limit warning): it would die of it and
# leave its ranks running without it.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@dataclass(frozen=True)
class Configuration:
    ranks: int
    loader: str
    micro_batch: int | None
    ckpt_every: int
    max_steps: int

    @property
    def name(self) -> str:
        micro = f"micro{self.micro_batch}" if self.micro_batch else "whole"
        return (f"{self.ranks}rank-{self.loader}-{micro}-ckpt{self.ckpt_every}-"
                f"steps{self.max_steps}")

    def command(self, data: Path, out: Path) -> list[str]:
        args = ["-m", "directclr", "pretrain", *pretrain_argv(
            data=data, out=out, arch="resnet18-w16", dim=22, batch_size=BATCH_PAIRS,
            epochs=EPOCHS, lr=0.3, warmup_epochs=0.5, image_size=IMAGE_SIDE_PX,
            loader=self.loader, num_threads=1 if self.loader == "dali" else 0,
            micro_batch=self.micro_batch, max_steps=self.max_steps,
            ckpt_every=self.ckpt_every, log_every=1)]
        if self.ranks == 1:
            return [sys.executable, *args]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={self.ranks}", f"--signals_to_handle={TORCHRUN_SIGNALS}",
                *args]


@dataclass(frozen=True)
class Fault:
    kind: str  # KINDS
    moment: str  # EARLY_MOMENTS, mid-step or WRITE_MOMENTS
    target: str  # process (1 rank), torchrun, rank 0 or rank 1
    position: float  # [0, 1): where in its window (Trigger) the fault lands
    jitter: float  # [0, 1): of a step after its row (mid-step); of SCHEDULER_REAP_S (torchrun)


def plan_cycle(seed: int, cycle: int, faults: int, dali: bool) -> tuple[Configuration,
                                                                          list[Fault]]:
    """Cycle `cycle`'s configuration and faults, from (seed, cycle) alone. The draws are the same
    with or without DALI (torchvision stands in for it), so a cycle replays on any machine."""
    rng = random.Random(f"directclr.soak:{seed}:{cycle}")
    loader = rng.choice(("torchvision", "dali"))
    config = Configuration(ranks=rng.choice((1, 2)),
                           loader=loader if dali else "torchvision",
                           micro_batch=rng.choice((None, MICRO_BATCH_PAIRS)),
                           ckpt_every=rng.choice(CKPT_EVERY), max_steps=rng.choice(MAX_STEPS))
    kinds: list[str] = []
    while len(kinds) < faults:  # each kind once before any repeats
        kinds += rng.sample(KINDS, len(KINDS))
    plan = []
    for index, kind in enumerate(kinds[:faults]):
        moments = ["start-up" if index == 0 else "resume", "mid-step", "checkpoint-write"]
        if index == faults - 1:  # a run that wrote its backbone.pt has no steps left to fault
            moments.append("backbone-write")
        targets = ("process",) if config.ranks == 1 else ("torchrun", "rank 0", "rank 1")
        plan.append(Fault(kind, rng.choice(moments), rng.choice(targets), rng.random(),
                          rng.random()))
    return config, plan


def describe(config: Configuration, faults: list[Fault]) -> str:
    return config.name + ": " + (", ".join(f"{f.kind} to {f.target} at {f.moment}"
                                           for f in faults) or "no faults")
