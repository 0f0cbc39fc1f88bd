"""Why a run ends early, and how: stop signals (a scheduler's preemption notice, Ctrl-C), the
vote that makes every rank stop after the same step, and the divergence guard.

- SIGTERM, SIGINT or SIGUSR1 set a flag that the loop reads between steps; the ranks agree on it
  (agreed_stop), a checkpoint is written, and the command exits with EXIT_PREEMPTED.
- The `pretrain` command catches them from its first moment (directclr.cli.main): one received
  before a single-process run takes its --out ends it there, nothing written, with the same exit
  status (StopSignals.stop_before_loop); a later one, or one to a rank of several, stops the run
  at its first step boundary.
- A non-finite loss, probe loss or gradient norm, an online-probe loss beyond PROBE_BLOWUP x
  chance (divergence), or non-finite weights (check_finite_weights) end it with EXIT_DIVERGED.
"""
from __future__ import annotations

import logging
import math
import signal
import threading

import torch
import torch.distributed as dist
from torch import nn

# The run's messages keep the one logger name that users and tests filter on.
log = logging.getLogger("directclr.train")
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# An online probe whose cross-entropy exceeds this many times chance, ln(classes), has logits
# hundreds of nats apart: its features are blowing up (seen at --lr 1e3: 211 at step 2, from 1.3).
PROBE_BLOWUP = 100.0


class RunStopped(Exception):
    """The run ended early on purpose; `exit_code` is what the command returns."""
    exit_code = 1


class Preempted(RunStopped):
    exit_code = EXIT_PREEMPTED


class Diverged(RunStopped):
    exit_code = EXIT_DIVERGED


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 set a flag the loop reads between steps. Repeats are not an
    abort: a worker under srun + torchrun gets the scheduler's SIGTERM and then torchrun's.

    Entered while another StopSignals handles them (the command's, from its start), it takes
    over the signal that one received. `announce=False` records without the log line, which
    promises a checkpoint that only the loop writes."""

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.received: str | None = None
        self.previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
            outer = getattr(self.previous[signal.SIGTERM], "__self__", None)
            if isinstance(outer, StopSignals):
                self.received = outer.received
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
        if self.announce:
            log.warning("%s: stopping after this step with a checkpoint (kill -9 stops at once)",
                        name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def ignore_after(self) -> None:
        """Within the block: on leaving it, the stop signals are ignored instead of handed back.
        For a run that is done: a scheduler's late SIGTERM during the seconds Python takes to
        shut down would otherwise turn its exit 0 into a kill."""
        self.previous = dict.fromkeys(self.previous, signal.SIG_IGN)

    def hand_back(self) -> None:
        """After __exit__: the signal received, if any, to the handlers it had replaced, as if it
        came now (the default ones end the process as they would have)."""
        if self.received is not None:
            signal.raise_signal(signal.Signals[self.received])

    def stop_before_loop(self, world: int) -> None:
        """Raises Preempted when a single process has received a stop signal: called before the
        run writes anything, it ends a start-up with nothing to save. Several ranks stop at the
        first step boundary instead, where they agree on it (agreed_stop) as on any stop
        signal."""
        if world == 1 and self.received is not None:
            raise Preempted(f"stopped by {self.received} during start-up; nothing to save: "
                            "rerun the same command")


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
    # Read once: a signal handled while the vote waits would make this rank stop alone (it read
    # None for the vote, the others saw no vote) and wait in the stop's barrier for ever.
    received = signals.received
    votes = torch.tensor([received is not None], dtype=torch.int32)
    dist.all_reduce(votes, group=group)
    return (received or "a signal to another rank") if votes.item() else None


def probe_limit(num_classes: int) -> float:
    """The online-probe loss beyond which the features are taken to be blowing up."""
    return PROBE_BLOWUP * math.log(max(2, num_classes))


def divergence(row: dict, probe_loss_limit: float) -> str | None:
    """What in a metrics row shows the run diverging, or None."""
    for name in ("loss", "probe_loss", "grad_norm"):
        if not math.isfinite(row[name]):
            return f"{name} = {row[name]}"
    if row["probe_loss"] > probe_loss_limit:
        return (f"probe_loss = {row['probe_loss']:.4g}, over {PROBE_BLOWUP:g} x its chance "
                f"level (the features are blowing up)")
    return None


def check_finite_weights(model: nn.Module, step: int) -> None:
    """Before anything is written: the loss can be finite at the step whose update overflowed."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
        raise Diverged(f"training diverged: the weights hold non-finite values after step {step};"
                       " nothing was saved for it")
