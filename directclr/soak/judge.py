"""The verdicts: whether a launch ended as docs/training.md promises for its fault, and what of
a finished run differs from the run without faults."""
from __future__ import annotations

import json
from pathlib import Path

from .plan import EARLY_MOMENTS, SIGNALS, Fault
from .processes import Launch

# What a rank says when its peer died under it (gloo, the TCP store): expected after a kill.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
             "failed to recv", "Connection refused")
TORCHRUN_EXCEPTIONS = ("SignalException", "ChildFailedError")  # torchrun's own reports
KNOWN_DEVIATION = ("a stop signal before the run installs its handlers ends it by the signal's "
                   "default action (no checkpoint; exit -signal, or KeyboardInterrupt for "
                   "SIGINT) instead of exit 75")


def judge(record: Launch, fault: Fault | None, ranks: int, finished: bool) -> None:
    """Sets record.verdict and .reason: what docs/training.md promises for the fault ("ok"),
    KNOWN_DEVIATION ("known") or anything else ("failure")."""
    code, exceptions = record.exit_code, record.exceptions
    delivered = bool(record.fault and record.fault.get("delivered"))

    def verdict(kind: str, reason: str) -> None:
        record.verdict, record.reason = kind, reason

    def all_of(*kinds: str) -> bool:
        return all(exception_kind(line) in kinds for line in exceptions)

    if record.hung:
        return verdict("failure", f"no exit within {record.seconds:.0f} s (hang)")
    if record.leftovers:
        return verdict("failure", f"processes {record.leftovers} outlived the launch")
    if code == 0:
        if not finished:
            return verdict("failure", "exit 0 without backbone.pt")
        if exceptions:
            return verdict("failure", f"exit 0 after a traceback: {exceptions[-1]}")
        return verdict("ok", "finished" + (" (the fault came after its last step)"
                                           if delivered else ""))
    if not delivered:
        return verdict("failure", f"exit {code} without a fault")
    early = fault.moment in EARLY_MOMENTS
    stop = fault.kind != "kill-9"
    default_death = -SIGNALS[fault.kind]
    if ranks == 1:
        if not stop:
            if code == default_death and not exceptions:
                return verdict("ok", "killed")
        elif code == 75 and not exceptions:
            return verdict("ok", "stopped with a checkpoint, exit 75")
        elif early and all_of("interrupt") and (code == default_death
                                                 or (code == 1 and exceptions)):
            return verdict("known", f"exit {code}: {KNOWN_DEVIATION}")
        return verdict("failure", f"exit {code} after {fault.kind} at {fault.moment}"
                       + (f": {exceptions[-1]}" if exceptions else ""))
    # torchrun: exit 1 when a rank failed or it was signalled itself, -9 when it was killed
    # torchrun signalled itself ends its ranks without reporting their exit codes
    ranks_killed = fault.target == "torchrun" or any(c < 0 for c in record.rank_exits)
    # torchrun still importing has no handlers: SIGINT ends it by a KeyboardInterrupt
    if fault.target == "torchrun" and code == default_death and all_of("peer lost", "interrupt"):
        return verdict("ok", "torchrun ended by the signal" if stop else "killed")
    if code == 1 and not stop and all_of("torchrun", "peer lost"):
        return verdict("ok", "a rank was killed; torchrun stopped the other")
    if code == 1 and stop and all(c in (0, 75) for c in record.rank_exits) and all_of("torchrun"):
        return verdict("ok", "torchrun passed the signal to its ranks" if fault.target ==
                       "torchrun" else "the ranks stopped with a checkpoint, exit 75")
    if code == 1 and stop and early and ranks_killed and all_of("torchrun", "peer lost",
                                                                 "interrupt"):
        return verdict("known", f"rank exits {record.rank_exits}: {KNOWN_DEVIATION}")
    return verdict("failure", f"exit {code}, rank exits {record.rank_exits} after {fault.kind} "
                   f"to {fault.target} at {fault.moment}"
                   + (f": {exceptions[-1]}" if exceptions else ""))


def exception_kind(line: str) -> str:
    """torchrun (its own reports), peer lost (a rank whose peer died), interrupt
    (KeyboardInterrupt) or ours (anything else: a failure wherever it appears)."""
    name = line.split(":", 1)[0]
    if name.endswith(TORCHRUN_EXCEPTIONS):
        return "torchrun"
    if name.endswith("KeyboardInterrupt"):
        return "interrupt"
    if any(marker in line for marker in PEER_LOST):
        return "peer lost"
    return "ours"


def differences(run: Path, reference: Path) -> list[str]:
    """What of the finished run differs from the reference: the final checkpoint's model,
    optimizer, loader and step, backbone.pt, and the per-step metrics rows."""
    from ..files import load_verified
    found = []
    ours, theirs = (load_verified(sorted(folder.glob("ckpt_*.pt"))[-1])
                    for folder in (run, reference))
    for key in ("step", "model", "optimizer", "loader"):
        if not same(ours[key], theirs[key]):
            found.append(f"checkpoint {key}")
    if not same(*(load_verified(folder / "backbone.pt") for folder in (run, reference))):
        found.append("backbone.pt")
    if step_rows(run) != step_rows(reference):
        found.append("metrics rows")
    return found


def same(a, b) -> bool:
    """Equal, tensors bit for bit (dtype and shape too), through dicts and lists."""
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def step_rows(out: Path) -> list[tuple]:
    """Each step's row (step, lr, losses, gradient norm) in file order; timings left out."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["lr"], r["loss"], r["probe_loss"], r["grad_norm"])
            for r in rows if "loss" in r]
