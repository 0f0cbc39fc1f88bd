"""A chaos soak of `directclr pretrain`: tiny runs killed and signalled at random moments,
relaunched until they finish, and compared bit for bit with the same run left alone.

    python -m directclr.soak --minutes 30 --seed 1 --out runs/soak
    python -m directclr.soak --seed 1 --cycle 7 --out runs/soak-cycle-7    # cycle 7 again
    python -m directclr.soak --seed 1 --cycles 20 --plan --out runs/soak   # what it would do

Every cycle draws, from --seed and its own number only (so one cycle replays without the ones
before it), a configuration and its faults:
- 1 process or 2 torchrun ranks (gloo), the torchvision or the DALI loader (torchvision where
  DALI does not import), with or without --micro-batch, --ckpt-every 1-3 and --max-steps 8-12,
  on a 64-image dataset made once in --out: 4 steps an epoch, so epochs end and checkpoints are
  written every few steps;
- --faults faults (default: one of each kind, kill -9, SIGTERM, SIGINT and SIGUSR1, in a random
  order), each at a random moment of one launch: start-up (the first launch) or resume (a
  relaunch), mid-step, while a checkpoint is written, or while backbone.pt is written (the last
  fault only); under torchrun to torchrun itself or to one rank.

The run is launched, faulted and relaunched with the same command until it ends with exit 0 and
backbone.pt. Each launch must end as docs/training.md promises for its fault (judge), within a
hang timeout, leaving no process behind. The finished run's final checkpoint (model, optimizer,
loader), backbone.pt and per-step metrics rows must equal those of the run without faults, made
once per configuration (references/). --out/summary.json holds the figures, rewritten after
every cycle; the exit status is 1 when a cycle was inexact or failed.

The runs execute a copy of the package taken when the soak starts (--out/code/<fingerprint>):
edits to the tree during a long soak do not mix two versions into one comparison, and a
reference is reused only by the code that made it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..stop_signals import STOP_SIGNALS
from .judge import KNOWN_DEVIATION, differences, judge
from .plan import IMAGE_SIDE_PX, KINDS, Configuration, describe, plan_cycle
from .processes import RunFolder, Trigger, kill_all, launch, run_environment
from .summary import cycle_line, report, summarize, write_summary

IMAGES = 64
CLASSES = 4
HANG_FLOOR_S = 180.0
HANG_FACTOR = 10  # a launch may take this many times the reference run's wall time
REFERENCE_TIMEOUT_S = 900.0


class Soak:
    """The soak's folder (--out) and what its cycles share: the dataset, the code snapshot,
    the runs' environment and the reference runs."""

    def __init__(self, out: Path, seed: int, faults: int, strict: bool):
        from ..data import dali_available
        from ..provenance import cpu_model, git_commit
        self.commit, self.machine = git_commit(), cpu_model()
        self.out, self.seed, self.faults, self.strict = out, seed, faults, strict
        self.dali = dali_available()
        out.mkdir(parents=True, exist_ok=True)
        self.fingerprint, self.code = snapshot_code(out / "code")
        self.env = run_environment(self.code)
        self.data = make_dataset(out / "data")
        self.cycles: list[dict] = []

    def reference(self, config: Configuration) -> tuple[Path, dict]:
        """The configuration's run without faults and its timing (made once per code)."""
        folder = self.out / "references" / self.fingerprint / config.name
        timing_file = folder / "timing.json"
        if timing_file.exists():
            return folder / "run", json.loads(timing_file.read_text())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        rows: list[tuple[float, int]] = []
        record = launch(config.command(self.data, folder / "run"), self.env, self.code,
                        folder / "run", folder / "launch.log", f"{os.getpid()}/reference", 0,
                        REFERENCE_TIMEOUT_S, rows=rows)
        judge(record, None, config.ranks, (folder / "run" / "backbone.pt").exists())
        if record.verdict != "ok":
            raise ReferenceFailed(f"the run without faults failed: {record.reason} "
                                  f"(log: {record.log})")
        (first_s, first_step), (last_s, last_step) = rows[0], rows[-1]
        timing = {"wall_s": record.seconds, "startup_s": first_s,
                  "step_s": (last_s - first_s) / max(1, last_step - first_step)}
        timing_file.write_text(json.dumps(timing))
        return folder / "run", timing

    def run_cycle(self, cycle: int, progress) -> dict:
        config, faults = plan_cycle(self.seed, cycle, self.faults, self.dali)
        folder = self.out / "cycles" / f"{cycle:04d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        result = {"cycle": cycle, "configuration": {**asdict(config), "name": config.name},
                  "folder": str(folder), "replay": self.replay(cycle), "launches": []}
        start = time.monotonic()
        try:
            progress.set_postfix_str(f"cycle {cycle}: reference")
            reference, timing = self.reference(config)
        except ReferenceFailed as err:
            return {**result, "verdict": "failed", "reason": str(err),
                    "seconds": time.monotonic() - start}
        run = folder / "run"
        command = config.command(self.data, run)
        timeout_s = max(HANG_FLOOR_S, HANG_FACTOR * timing["wall_s"])
        pending = list(faults)
        for number in range(len(faults) + 1):
            progress.set_postfix_str(f"cycle {cycle}: launch {number}")
            fault = pending.pop(0) if pending else None
            trigger = Trigger(fault, timing, RunFolder(run).checkpoint_step(),
                              config.max_steps, len(pending) + 1) if fault else None
            record = launch(command, self.env, self.code, run, folder / f"launch-{number}.log",
                            f"{os.getpid()}/{cycle}/{number}", number, timeout_s, fault,
                            trigger)
            finished = record.exit_code == 0 and (run / "backbone.pt").exists()
            judge(record, fault, config.ranks, finished)
            result["launches"].append(asdict(record))
            if record.verdict == "failure" or finished:
                break
        result["not_reached"] = [asdict(f) for f in pending]
        failures = [r for r in result["launches"] if r["verdict"] == "failure"]
        known = [r for r in result["launches"] if r["verdict"] == "known"]
        if failures:
            verdict, reason = "failed", f"launch {failures[0]['number']}: {failures[0]['reason']}"
        elif not finished:
            verdict, reason = "failed", "the run did not finish"
        else:
            try:
                differ = differences(run, reference)
            except (OSError, ValueError, IndexError) as err:  # CorruptFile is a ValueError
                return {**result, "verdict": "failed", "reason": f"unreadable result: {err}",
                        "seconds": time.monotonic() - start}
            verdict = "inexact" if differ else "exact"
            reason = ("differs from the run without faults: " + ", ".join(differ)) if differ \
                else "same weights, optimizer, loader state and metrics rows"
            result["differs"] = differ
            if not differ and not known:  # the evidence of a passing cycle is its logs
                for path in run.glob("*.pt"):
                    path.unlink()
        return {**result, "verdict": verdict, "reason": reason,
                "seconds": time.monotonic() - start}

    def replay(self, cycle: int) -> str:
        return (f"python -m directclr.soak --seed {self.seed} --cycle {cycle} --faults "
                f"{self.faults} --out {self.out}-cycle-{cycle}")


class ReferenceFailed(RuntimeError):
    """The configuration's run without faults did not finish: no cycle of it can be judged."""


def snapshot_code(folder: Path) -> tuple[str, Path]:
    """A copy of the package (and its kernels) that the runs import, named by a hash of its
    files and the torch version; reused when the code is unchanged."""
    import importlib.util

    import torch
    package, kernels = (Path(importlib.util.find_spec(name).submodule_search_locations[0])
                        for name in ("directclr", "directclr.kernels"))
    files = {}
    for root, prefix in ((package, Path("directclr")), (kernels, Path("directclr/kernels"))):
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files[prefix / path.relative_to(root)] = path.read_bytes()
    digest = hashlib.sha256(torch.__version__.encode())
    for name, data in sorted(files.items()):
        digest.update(str(name).encode() + b"\0" + data)
    fingerprint = digest.hexdigest()[:12]
    target = folder / fingerprint
    if not target.exists():
        staging = folder / f".{fingerprint}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        staging.rename(target)
    return fingerprint, target


def make_dataset(folder: Path) -> Path:
    """IMAGES JPEGs of IMAGE_SIDE_PX in CLASSES folders, made once (renamed into place whole)."""
    from ..data import prepare_synthetic
    if not folder.exists():
        staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        prepare_synthetic(staging, n=IMAGES, classes=CLASSES, min_side=IMAGE_SIDE_PX,
                          max_side=IMAGE_SIDE_PX, progress=False)
        staging.rename(folder)
    return folder


class SoakStopped(Exception):
    """The soak itself got a stop signal: it kills its runs and writes the summary so far."""


def _stop(signum, frame):
    for sig in STOP_SIGNALS:  # a second signal (srun and torchrun send two) must not cut the
        signal.signal(sig, signal.SIG_IGN)  # clean-up short
    raise SoakStopped(signal.Signals(signum).name)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m directclr.soak", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="wall time: no cycle starts after it (one in flight finishes)")
    parser.add_argument("--cycles", type=int, default=None,
                        help="stop after this many cycles (default: as many as --minutes allow)")
    parser.add_argument("--cycle", type=int, default=None,
                        help="run only this cycle, as a soak with this --seed drew it (replay)")
    parser.add_argument("--seed", type=int, default=0, help="draws every cycle's plan")
    parser.add_argument("--faults", type=int, default=len(KINDS),
                        help="faults per cycle; kinds repeat only after each came once")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"),
                        help="dataset, code snapshot, reference runs, cycles' logs, summary.json")
    parser.add_argument("--strict", action="store_true",
                        help=f"count known deviations as failures ({KNOWN_DEVIATION})")
    parser.add_argument("--plan", action="store_true",
                        help="print the cycles' configurations and faults; run nothing")
    args = parser.parse_args(argv)
    if args.faults < 0 or (args.cycles is not None and args.cycles < 1) or args.minutes <= 0:
        parser.error("--faults must be >= 0, --cycles >= 1 and --minutes > 0")
    if args.cycle is not None and args.cycle < 0:
        parser.error("--cycle must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    numbers = [args.cycle] if args.cycle is not None else None
    if args.plan:
        from ..data import dali_available
        dali = dali_available()
        for cycle in numbers or range(args.cycles or 10):
            print(f"cycle {cycle}: " + describe(*plan_cycle(args.seed, cycle, args.faults, dali)))
        return 0
    from tqdm import tqdm
    for sig in STOP_SIGNALS:
        # Also why the runs start with these signals at their defaults, however the soak was
        # launched (a shell's `&` ignores SIGINT, and an ignored signal stays so across exec).
        signal.signal(sig, _stop)
    started = time.monotonic()
    soak = Soak(args.out, args.seed, args.faults, args.strict)
    limit = 1 if numbers else args.cycles
    progress = tqdm(total=limit or round(args.minutes * 60), unit="cycle" if limit else "s",
                    desc="soak", mininterval=1.0, dynamic_ncols=True)
    interrupted = None
    summary_path = args.out / "summary.json"
    try:
        for cycle in numbers or range(sys.maxsize):
            result = soak.run_cycle(cycle, progress)
            soak.cycles.append(result)
            progress.write(cycle_line(result))
            write_summary(summarize(soak, started, args, None), summary_path)
            elapsed = time.monotonic() - started
            if limit:
                progress.update(1)
            else:
                progress.update(min(progress.total, round(elapsed)) - progress.n)
            if (limit and len(soak.cycles) >= limit) or elapsed >= args.minutes * 60:
                break
    except SoakStopped as stop:
        interrupted = str(stop)
    finally:
        kill_all(str(os.getpid()))
        progress.close()
    summary = summarize(soak, started, args, interrupted)
    write_summary(summary, summary_path)
    print(report(summary, summary_path))
    if interrupted:
        return 128 + signal.Signals[interrupted].value
    totals = summary["totals"]
    bad = totals["inexact"] + totals["failed"] + (totals["known_deviations"] if args.strict
                                                  else 0)
    return 1 if bad else 0
