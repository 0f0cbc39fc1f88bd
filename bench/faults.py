"""The fault campaign: what a cluster does to `directclr pretrain`, tried on tiny runs.

    python bench/faults.py [--only NAME ...] [--work DIR]

Each case does something a scheduler, a disk or a user does to a run (a signal at a random
step, a diverging learning rate, a changed flag on resume, flipped bytes, a full disk, a second
run on the same folder...), checks the outcome the README promises, and prints what was tried
and what happened; the last line counts the cases that behaved. tests/test_faults.py runs every
case under pytest (a case raises AssertionError when the outcome is wrong).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from directclr.data import prepare_synthetic
from directclr.data.loader import dali_available
from directclr.files import FolderLock
from directclr.train import (EXIT_DIVERGED, EXIT_PREEMPTED, RESUME_FIELDS, Config,
                             checkpoint_step, claim_out, flag, pick_checkpoint, resume_settings,
                             save_checkpoint)

CASES: dict[str, tuple[str, Callable[[Path], str]]] = {}
STEPS = 6  # of 10 (2 epochs of 5 batches of 8 from 40 images)
DDP_STEPS = 4  # 2 ranks of 8 pairs: 2 global batches per epoch
ENV_ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def case(name: str, tried: str):
    def register(fn):
        CASES[name] = (tried, fn)
        return fn
    return register


def tiny_data(work: Path) -> Path:
    root = work / "tiny"
    if not (root / ".complete").exists():
        prepare_synthetic(root, n=40, classes=4, min_side=36, max_side=60, progress=False)
        (root / ".complete").touch()
    return root


def pretrain_args(work: Path, out: Path, loader="torchvision", steps=STEPS, batch=8) -> list[str]:
    return ["-m", "directclr", "pretrain", "--data", str(tiny_data(work)), "--out", str(out),
            "--arch", "resnet18-w16", "--dim", "22", "--batch-size", str(batch), "--epochs", "2",
            "--lr", "0.3", "--warmup-epochs", "0.5", "--image-size", "32", "--loader", loader,
            "--num-threads", "1" if loader == "dali" else "0", "--max-steps", str(steps),
            "--log-every", "1", "--ckpt-every", "100"]


def run(args: list[str], *extra: str, launcher=(sys.executable,)) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *args, *extra], capture_output=True, text=True,
                          timeout=900, env=ENV_ONE_THREAD)


def finished(work: Path, name: str, make_args: Callable[[Path], list[str]],
             launcher=(sys.executable,)) -> Path:
    """A run that went straight to its end, made once per work folder."""
    out = work / name
    if not (out / "backbone.pt").exists():
        shutil.rmtree(out, ignore_errors=True)
        proc = run(make_args(out), launcher=launcher)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def straight(work: Path, loader: str = "torchvision", extra: tuple[str, ...] = ()) -> Path:
    return finished(work, "-".join(["straight", loader, *extra]).replace("--", ""),
                    lambda out: pretrain_args(work, out, loader) + list(extra))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(p / "backbone.pt", weights_only=True) for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def wait_for_row(out: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 600
    while not any(r["step"] >= step for r in (rows(out) if (out / "metrics.jsonl").exists()
                                               else [])):
        assert proc.poll() is None, f"the run ended before step {step}"
        assert time.time() < deadline, f"no row for step {step} within 600 s"
        time.sleep(0.1)


def stop_and_resume(work: Path, name: str, sig: signal.Signals, loader: str,
                    workers: int = 0) -> str:
    """A signal after a random step: exit 75 with every finished step in the checkpoint, then a
    resume that ends with the weights of the run that was never stopped. With workers, the
    signal goes to the whole process group, as a terminal's Ctrl-C and srun's SIGTERM do."""
    if loader == "dali" and not dali_available():
        return "skipped: nvidia.dali does not import"
    reference = straight(work, loader)
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    # After the first step a step takes ~0.1 s here and the row is seen by polling: the signal
    # leaves 3 or 4 steps to run, or it may land in the last one, which rightly ends the run
    # (exit 0): seen once in CI, the signal reaching step 6 of 6 after the row of step <= 4.
    at = random.randrange(1, STEPS - 3)
    args = pretrain_args(work, out, loader)
    if workers:
        args[args.index("--num-threads") + 1] = str(workers)
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=ENV_ONE_THREAD, start_new_session=bool(workers))
        wait_for_row(out, at, proc)
        if workers:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        code = proc.wait(timeout=600)
    text = (work / f"{name}.log").read_text()
    assert code == EXIT_PREEMPTED, f"exit {code} after {sig.name}: {text[-2000:]}"
    assert "Traceback" not in text, text[-3000:]
    saved = sorted(out.glob("ckpt_*.pt"))[-1]
    stopped = checkpoint_step(saved)
    done = max(r["step"] for r in rows(out))
    assert stopped == done, f"{done} steps done, checkpoint at step {stopped}: steps lost"
    resumed = run(pretrain_args(work, out, loader))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [r["step"] for r in rows(out)]
    assert steps == list(range(1, STEPS + 1)), f"metrics rows for steps {steps}"
    assert same_weights(reference, out), "resumed weights differ from the straight run's"
    return (f"{sig.name} after the row of step {at}: exit 75, checkpoint at step {stopped} = "
            f"steps done, no traceback; resumed to step {STEPS} with identical weights")


def kill_and_resume(work: Path, loader: str, extra: tuple[str, ...] = ()) -> str:
    """kill -9 after a random checkpoint (one per step), then resume to the straight run's
    weights (both with the `extra` flags)."""
    if loader == "dali" and not dali_available():
        return "skipped: nvidia.dali does not import"
    reference = straight(work, loader, extra)
    out = work / "-".join(["kill", loader, *extra]).replace("--", "")
    shutil.rmtree(out, ignore_errors=True)
    at = random.randrange(1, STEPS - 1)
    args = pretrain_args(work, out, loader) + list(extra)
    args[args.index("--ckpt-every") + 1] = "1"
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV_ONE_THREAD)
    deadline = time.time() + 600
    while not (out / f"ckpt_{at:09d}.pt").exists():
        assert proc.poll() is None and time.time() < deadline, f"no checkpoint for step {at}"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (out / "backbone.pt").exists(), "the run ended before the kill"
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert [r["step"] for r in rows(out)] == list(range(1, STEPS + 1))
    assert same_weights(reference, out), "resumed weights differ from the straight run's"
    return (f"killed once ckpt_{at:09d}.pt appeared; resumed to step {STEPS} with identical "
            "weights, one metrics row per step")


@case("kill-9-torchvision", "kill -9 at a random step, torchvision loader; then resume")
def _(work):
    return kill_and_resume(work, "torchvision")


@case("kill-9-dali", "kill -9 at a random step, DALI loader (CPU); then resume")
def _(work):
    return kill_and_resume(work, "dali")


@case("kill-9-micro-batch", "kill -9 at a random step of a --micro-batch 4 run (gradient "
      "caching, 2 micro-batches a step); then resume")
def _(work):
    return kill_and_resume(work, "torchvision", ("--micro-batch", "4"))


@case("sigterm-torchvision", "SIGTERM at a random step, torchvision loader; then resume")
def _(work):
    return stop_and_resume(work, "sigterm-torchvision", signal.SIGTERM, "torchvision")


@case("sigterm-dali", "SIGTERM at a random step, DALI loader (CPU); then resume")
def _(work):
    return stop_and_resume(work, "sigterm-dali", signal.SIGTERM, "dali")


@case("sigint", "SIGINT (Ctrl-C) at a random step; then resume")
def _(work):
    return stop_and_resume(work, "sigint", signal.SIGINT, "torchvision")


@case("sigterm-process-group", "SIGTERM to the trainer, its 2 workers and their forkserver "
      "at once (as srun does); then resume")
def _(work):
    return stop_and_resume(work, "sigterm-process-group", signal.SIGTERM, "torchvision", 2)


@case("sigint-process-group", "Ctrl-C in a terminal: SIGINT to the trainer and its 2 workers")
def _(work):
    return stop_and_resume(work, "sigint-process-group", signal.SIGINT, "torchvision", 2)


@case("workers-ignore-stop-signals", "SIGTERM, SIGINT and SIGUSR1 to the 2 workers and their "
      "forkserver only, at step 1 of a run that needs new batches after it")
def _(work):
    reference = straight(work)
    out = work / "signalled-workers"
    shutil.rmtree(out, ignore_errors=True)
    args = pretrain_args(work, out)
    args[args.index("--num-threads") + 1] = "2"
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV_ONE_THREAD)
    wait_for_row(out, 1, proc)
    helpers = descendants(proc.pid)
    assert len(helpers) >= 3, f"expected 2 workers and a forkserver below the trainer: {helpers}"
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        for pid in helpers:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert same_weights(reference, out), "weights differ from the run without workers"
    return (f"{len(helpers)} helper processes signalled; the run went on to step {STEPS} with "
            "the weights of the run without workers")


@case("sigusr1", "SIGUSR1 (a scheduler's time-limit warning) at a random step; then resume")
def _(work):
    return stop_and_resume(work, "sigusr1", signal.SIGUSR1, "torchvision")


def torchrun(work: Path, out: Path) -> tuple[list[str], list[str]]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    return launcher, pretrain_args(work, out, steps=DDP_STEPS, batch=16)


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


@case("sigterm-ddp-one-rank", "SIGTERM to rank 1 of 2 (gloo) only; then resume on 2 ranks")
def _(work):
    launcher = torchrun(work, work)[0]
    reference = finished(work, "ddp-straight", lambda o: torchrun(work, o)[1], launcher=launcher)
    out = work / "ddp-stopped"
    shutil.rmtree(out, ignore_errors=True)
    launcher, args = torchrun(work, out)
    with open(work / "ddp-stopped.log", "w") as log:
        proc = subprocess.Popen([*launcher, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=ENV_ONE_THREAD)
        wait_for_row(out, 1, proc)
        ranks = rank_pid(proc.pid, 1)
        assert len(ranks) == 1, f"rank 1 not found below torchrun: {ranks}"
        os.kill(ranks[0], signal.SIGTERM)
        proc.wait(timeout=600)
    text = (work / "ddp-stopped.log").read_text()
    assert "stopped by a signal to another rank" in text, text[-3000:]
    saved = sorted(out.glob("ckpt_*.pt"))[-1]
    stopped = checkpoint_step(saved)
    assert stopped == max(r["step"] for r in rows(out)) < DDP_STEPS, (stopped, rows(out))
    resumed = run(args, launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in rows(out)] == list(range(1, DDP_STEPS + 1))
    assert same_weights(reference, out), "resumed weights differ from the straight 2-rank run's"
    return (f"rank 0 stopped with rank 1 at step {stopped}; resumed on 2 ranks to step "
            f"{DDP_STEPS} with identical weights")


def diverge(work: Path, lr: str) -> str:
    out = work / f"lr-{lr}"
    shutil.rmtree(out, ignore_errors=True)
    args = pretrain_args(work, out)
    args[args.index("--lr") + 1] = lr
    args[args.index("--ckpt-every") + 1] = "2"
    args[args.index("--log-every") + 1] = "3"
    proc = run(args)
    assert proc.returncode == EXIT_DIVERGED, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    message = proc.stderr.strip().splitlines()[-1]
    assert "diverged at step" in message and "Traceback" not in proc.stderr, message
    assert not (out / "backbone.pt").exists()
    for path in out.glob("ckpt_*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values()
                   if t.is_floating_point()), f"{path} holds non-finite weights"
    return f"exit 3: {message}"


@case("lr-1e6", "--lr 1e6 (weights overflow within steps)")
def _(work):
    return diverge(work, "1e6")


@case("lr-1e3", "--lr 1e3 (finite but exploding)")
def _(work):
    return diverge(work, "1e3")


CHANGED = {"arch": "resnet18", "mode": "simclr-none", "dim": 21, "temperature": 0.2,
           "variant": "ntxent", "batch_size": 16, "image_size": 40, "seed": 1, "lr": 0.4,
           "wd": 1e-5, "warmup_epochs": 1.0, "epochs": 3, "max_steps": 7, "loader": "dali",
           "simclr_out": 64, "micro_batch": 4}


@case("config-drift", "resume with each setting of RESUME_FIELDS changed, one at a time")
def _(work):
    reference = straight(work)
    assert set(CHANGED) == set(RESUME_FIELDS)
    base = Config(data="", out="", arch="resnet18-w16", dim=22, batch_size=8, epochs=2, lr=0.3,
                  warmup_epochs=0.5, max_steps=STEPS, loader="torchvision")
    refused = []
    for name, value in CHANGED.items():
        cfg = Config(**{**base.__dict__, name: value})
        settings = resume_settings(cfg, value if name == "image_size" else 32,
                                   value if name == "loader" else "torchvision")
        try:
            pick_checkpoint(reference, cfg, settings)
        except ValueError as err:
            assert flag(name) in str(err), f"{name}: {err}"
            refused.append(flag(name))
        else:
            raise AssertionError(f"a changed {flag(name)} was accepted")
        accepted = Config(**{**cfg.__dict__, "accept_changes": (name,)})
        assert pick_checkpoint(reference, accepted, settings)[1]["step"] == STEPS
    return f"refused, naming the flag: {' '.join(refused)}; each accepted when named"


@case("accept-longer-run", "resume a finished run with --max-steps 8 --accept-changes max-steps")
def _(work):
    out = work / "longer"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(straight(work), out)
    args = pretrain_args(work, out)
    args[args.index("--max-steps") + 1] = "8"
    refused = run(args)
    assert refused.returncode == 2 and "--max-steps: 6 -> 8" in refused.stderr, refused.stderr
    proc = run(args, "--accept-changes", "max-steps")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in rows(out)][-1] == 8
    args[args.index("--max-steps") + 1] = "5"
    shorter = run(args, "--accept-changes", "max-steps")
    assert shorter.returncode == 2 and "past the 5 steps" in shorter.stderr, shorter.stderr
    return "refused without the flag (exit 2, names --max-steps 6 -> 8); trained to 8 with it; " \
           "--max-steps 5 < the checkpoint's 8: exit 2"


def checkpoints(work: Path, name: str) -> Path:
    """A folder holding two real checkpoints (steps 5 and 6) of the straight run."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(straight(work), out)
    return out


def resume_pick(out: Path) -> tuple[Path | None, dict | None]:
    cfg = Config(data="", out="", arch="resnet18-w16", dim=22, batch_size=8, epochs=2, lr=0.3,
                 warmup_epochs=0.5, max_steps=STEPS, loader="torchvision")
    return pick_checkpoint(out, cfg, resume_settings(cfg, 32, "torchvision"))


def flip_bytes(path: Path, count: int, seed: int) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(count):
        at = rng.randrange(len(data) // 4, len(data) * 3 // 4)  # the tensors' bytes
        data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


@case("bit-rot", "64 flipped bytes in the newest checkpoint")
def _(work):
    out = checkpoints(work, "bit-rot")
    newest = sorted(out.glob("ckpt_*.pt"))[-1]
    flip_bytes(newest, 64, seed=0)
    torch.load(newest, weights_only=True)  # torch alone would train on it
    path, state = resume_pick(out)
    assert path is not None and path != newest and state["step"] < STEPS, path
    return f"torch.load accepts it; the checksum does not: resumed from {path.name}"


@case("malformed", "a loadable checkpoint without its optimizer state")
def _(work):
    out = checkpoints(work, "malformed")
    newest = sorted(out.glob("ckpt_*.pt"))[-1]
    state = torch.load(newest, weights_only=True)
    del state["optimizer"]
    save_checkpoint(out, state["step"], state)
    path, picked = resume_pick(out)
    assert path != newest and picked["step"] < STEPS
    return f"skipped with a warning, resumed from {path.name}"


@case("none-readable", "both kept checkpoints unreadable; then --no-resume")
def _(work):
    out = checkpoints(work, "none-readable")
    for path in out.glob("ckpt_*.pt"):
        path.write_bytes(path.read_bytes()[:1000])
    try:
        resume_pick(out)
    except ValueError as err:
        message = str(err)
    else:
        raise AssertionError("resumed with no readable checkpoint")
    assert "none of the 2 checkpoints" in message and "--no-resume" in message
    claim_out(out, resume=False).release()
    kept = list(out.glob("previous-*/ckpt_*.pt"))
    assert not list(out.glob("ckpt_*.pt")) and len(kept) == 2
    return f"error: {message}; --no-resume moved them to {kept[0].parent.name}/"


@case("disk-full", "ENOSPC while a checkpoint is written")
def _(work):
    out = checkpoints(work, "disk-full")
    before = {p.name: p.read_bytes() for p in out.glob("ckpt_*.pt")}
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.write = full
    try:
        save_checkpoint(out, 7, {"step": 7, "w": torch.ones(1000)})
    except OSError as err:
        message = str(err)
    else:
        raise AssertionError("a full disk went unnoticed")
    finally:
        os.write = real_write
    assert "no space left" in message and "ckpt_000000007.pt" in message, message
    assert {p.name: p.read_bytes() for p in out.glob("ckpt_*.pt")} == before
    assert not list(out.glob(".*.tmp"))
    return f"error: {message}; old checkpoints intact, no temporary left"


@case("two-runs-one-out", "a second run on an --out that a live run holds")
def _(work):
    out = work / "locked"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    lock = FolderLock(out).acquire()
    try:
        proc = run(pretrain_args(work, out))
    finally:
        lock.release()
    assert proc.returncode == 2 and "is in use by pid" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "metrics.jsonl").exists()
    return proc.stderr.strip().splitlines()[-1]


@case("stale-temporaries", "temporary files a killed writer left in --out")
def _(work):
    out = checkpoints(work, "stale")
    stale = [out / ".ckpt_000000007.pt.0123abcd.tmp", out / ".backbone.pt.4567ef.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    claim_out(out, resume=True).release()
    assert not any(p.exists() for p in stale)
    return "removed when the next run took the folder"


@case("huge-embeddings", "infonce and the spectrum on fp32 rows with |z| = 1e30")
def _(work):
    from directclr import SpectrumAccumulator, infonce, infonce_reference
    gen = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(16, 32, generator=gen) for _ in range(2))
    for backend in ("cpu", "reference"):
        huge = [(1e30 * z).requires_grad_() for z in (z1, z2)]
        loss = infonce(huge[0], huge[1], dim=24, backend=backend)
        loss.backward()
        exact = infonce_reference(z1.double(), z2.double(), dim=24).mean()
        assert abs(loss.item() - exact.item()) < 1e-5 * exact.item(), (backend, loss, exact)
        assert huge[0].grad.abs().max() > 0, f"{backend}: zero gradient"
    spectrum = SpectrumAccumulator(32).update(1e30 * z1).result()
    exact = torch.linalg.eigvalsh(torch.cov(z1.double().T, correction=0)).flip(0) * 1e60
    # 16 rows in 32 dimensions: half the eigenvalues are 0 up to fp32 rounding (~1e-8 of the top)
    assert torch.allclose(spectrum.eigenvalues, exact, rtol=1e-5, atol=1e-7 * exact[0]), \
        (spectrum.eigenvalues, exact)
    return (f"loss {loss.item():.6f} = the float64 loss of z / 1e30 on both backends, non-zero "
            "gradients; the spectrum is 1e60 x that of z / 1e30")


@case("tiny-temperature", "infonce with temperature = 1e-40 (1/t overflows fp32)")
def _(work):
    from directclr import infonce
    z = torch.randn(8, 16)
    try:
        infonce(z, z, dim=16, temperature=1e-40)
    except ValueError as err:
        assert "temperature" in str(err), err
        return f"ValueError: {err}"
    raise AssertionError("accepted")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--work", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="directclr-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    good = 0
    for name in args.only:
        tried, fn = CASES[name]
        start = time.perf_counter()
        try:
            happened, ok = fn(work), True
        except AssertionError as err:
            happened, ok = f"UNEXPECTED: {err}", False
        good += ok
        print(f"[{'ok' if ok else 'FAIL'}] {name} ({time.perf_counter() - start:.0f} s)\n"
              f"    tried:    {tried}\n    happened: {happened}", flush=True)
    print(f"{good} of {len(args.only)} cases behaved as promised (work folder: {work})")
    return 0 if good == len(args.only) else 1


if __name__ == "__main__":
    sys.exit(main())
