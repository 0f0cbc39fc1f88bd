"""Why a run ends early, and how: stop signals (a scheduler's preemption notice, Ctrl-C), the
vote that makes every rank stop after the same step, and the divergence guard.

- SIGTERM, SIGINT or SIGUSR1 set a flag that the loop reads between steps
  (directclr.stop_signals); the ranks agree on it (agreed_stop), a checkpoint is written, and the
  command exits with EXIT_PREEMPTED.
- The `pretrain` command catches them from its first moment (directclr.cli.main): one received
  before a single-process run takes its --out ends it there, nothing written, with the same exit
  status (StopSignals.stop_before_loop); a later one, or one to a rank of several, stops the run
  at its first step boundary.
- A non-finite loss, probe loss or gradient norm, an online-probe loss beyond PROBE_BLOWUP x
  chance (divergence), or non-finite weights (check_finite_weights) end it with EXIT_DIVERGED.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .stop_signals import RunStopped, StopSignals

EXIT_DIVERGED = 3
# An online probe whose cross-entropy exceeds this many times chance, ln(classes), has logits
# hundreds of nats apart: its features are blowing up (seen at --lr 1e3: 211 at step 2, from 1.3).
PROBE_BLOWUP = 100.0


class Diverged(RunStopped):
    exit_code = EXIT_DIVERGED


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
