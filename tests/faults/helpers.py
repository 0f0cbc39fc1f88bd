"""What the fault tests (test_faults.py, test_launcher.py) share: tiny `directclr pretrain` runs in
subprocesses, the straight runs they are compared with, and the processes below a run (from
/proc)."""
from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from directclr.checkpoint import pick_checkpoint, resume_settings
from directclr.config import Config, pretrain_argv
from tests.helpers import ENV_ONE_THREAD

STEPS = 6  # of 10 (2 epochs of 5 batches of 8 from 40 images)
DDP_STEPS = 4  # 2 ranks of 8 pairs: 2 global batches per epoch


@dataclass(frozen=True)
class Work:
    """The module's folder, where the straight runs are made once, and the tiny dataset."""
    root: Path
    data: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def tiny_config(loader="torchvision", steps=STEPS, batch=8) -> Config:
    """The settings of the fault tests' runs, as a resume compares them."""
    return Config(data="", out="", arch="resnet18-w16", dim=22, batch_size=batch, epochs=2,
                  lr=0.3, warmup_epochs=0.5, max_steps=steps, loader=loader)


def pretrain_args(work: Work, out: Path, loader="torchvision", steps=STEPS, batch=8) -> list[str]:
    """`python` arguments of tiny_config's run on the tiny dataset, logging every step."""
    cfg = tiny_config(loader, steps, batch)
    return ["-m", "directclr", "pretrain", *pretrain_argv(
        data=work.data, out=out, arch=cfg.arch, dim=cfg.dim, batch_size=cfg.batch_size,
        epochs=cfg.epochs, lr=cfg.lr, warmup_epochs=cfg.warmup_epochs, image_size=32,
        loader=cfg.loader, num_threads=1 if loader == "dali" else 0, max_steps=cfg.max_steps,
        log_every=1, ckpt_every=100)]


def ddp_pretrain_args(work: Work, out: Path) -> list[str]:
    """pretrain_args of a 2-rank run: 16 pairs a step, 8 per rank."""
    return pretrain_args(work, out, steps=DDP_STEPS, batch=16)


def set_arg(args: list[str], name: str, value: str) -> list[str]:
    """`args` with the value after `name` replaced (in place)."""
    args[args.index(name) + 1] = value
    return args


def fresh(out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    return out


def run(args: list[str], *extra: str, launcher=(sys.executable,)) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *args, *extra], capture_output=True, text=True,
                          timeout=900, env=ENV_ONE_THREAD)


def finished(work: Work, name: str, make_args: Callable[[Path], list[str]],
             launcher=(sys.executable,)) -> Path:
    """A run that went straight to its end, made once per work folder."""
    out = work / name
    if not (out / "backbone.pt").exists():
        proc = run(make_args(fresh(out)), launcher=launcher)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def straight(work: Work, loader: str = "torchvision", extra: tuple[str, ...] = ()) -> Path:
    return finished(work, "-".join(["straight", loader, *extra]).replace("--", ""),
                    lambda out: pretrain_args(work, out, loader) + list(extra))


def copy_of_straight(work: Work, name: str) -> Path:
    """A folder holding the straight run's files: two real checkpoints (steps 5 and 6)."""
    out = fresh(work / name)
    shutil.copytree(straight(work), out)
    return out


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def steps(out: Path) -> list[int]:
    """The steps of the metrics rows, in file order."""
    return [r["step"] for r in rows(out)]


def epoch_rows(out: Path) -> list[dict]:
    """The epoch-end rows (spectra, probe accuracy), the step rows left out."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"epoch_end"' in line]


def newest_checkpoint(out: Path) -> Path:
    return sorted(out.glob("ckpt_*.pt"))[-1]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(p / "backbone.pt", weights_only=True) for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def resume_pick(out: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint a resume of tiny_config's run in `out` picks."""
    cfg = tiny_config()
    return pick_checkpoint(out, cfg, resume_settings(cfg, 32, "torchvision"))


def flip_bytes(path: Path, count: int, seed: int) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(count):
        at = rng.randrange(len(data) // 4, len(data) * 3 // 4)  # the tensors' bytes
        data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def wait_for_row(out: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 600
    while not any(r["step"] >= step for r in (rows(out) if (out / "metrics.jsonl").exists()
                                               else [])):
        assert proc.poll() is None, f"the run ended before step {step}"
        assert time.time() < deadline, f"no row for step {step} within 600 s"
        time.sleep(0.1)


def signalled(cmd: list[str], out: Path, log: Path, step: int,
              send: Callable[[subprocess.Popen], None],
              new_session: bool = False) -> tuple[int, str]:
    """Starts `cmd` (a run writing to `out`), calls send(process) once the metrics row of
    `step` is written, and returns the exit code and the output (also in `log`)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV_ONE_THREAD,
                                start_new_session=new_session)
        try:
            wait_for_row(out, step, proc)
            send(proc)
            code = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    return code, log.read_text()


def kill_at_checkpoint(args: list[str], out: Path, step: int) -> None:
    """Starts the run of `args` and kill -9s it once its checkpoint of `step` exists."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV_ONE_THREAD)
    deadline = time.time() + 600
    try:
        while not (out / f"ckpt_{step:09d}.pt").exists():
            assert proc.poll() is None and time.time() < deadline, f"no checkpoint for {step}"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    below: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the command name in parentheses may hold spaces; state and ppid follow it
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            below.setdefault(ppid, []).append(int(entry.name))
    return below


def descendants(pid: int) -> list[int]:
    below, found, todo = children(), [], [pid]
    while todo:
        below_this = below.get(todo.pop(), [])
        found += below_this
        todo += below_this
    return found


def rank_pid(parent: int, rank: int) -> list[int]:
    """The children of `parent` whose environment says RANK=`rank`."""
    found = []
    for pid in children().get(parent, []):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            continue
    return found


def running(pids: list[int]) -> list[int]:
    """Those of `pids` that still run (a zombie has ended: only its exit status is left)."""
    found = []
    for pid in pids:
        try:  # the state follows the command name in parentheses
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(pid)
    return found


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
