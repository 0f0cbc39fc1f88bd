"""The fault campaign: what a scheduler, a disk or a user does to `directclr pretrain`, tried on
tiny runs, each case a test that checks the outcome docs/training.md promises: signals at a random
step (seeded by the case's name: `random.Random(name)`), kill -9, a diverging learning rate, a
changed flag on resume, flipped bytes, malformed and unreadable checkpoints, a full disk, a
locked or littered --out, huge embeddings, a tiny temperature. Run one case with -k NAME."""
import errno
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from directclr.checkpoint import (
    checkpoint_step,
    claim_out,
    pick_checkpoint,
    resume_settings,
    save_checkpoint,
)
from directclr.config import RESUME_FIELDS, Config, flag
from directclr.data.loader import dali_available
from directclr.files import FolderLock
from directclr.preemption import EXIT_DIVERGED
from directclr.stop_signals import EXIT_PREEMPTED
from tests.faults.helpers import (
    DDP_STEPS,
    STEPS,
    Work,
    copy_of_straight,
    ddp_pretrain_args,
    descendants,
    epoch_rows,
    finished,
    flip_bytes,
    fresh,
    kill_at_checkpoint,
    newest_checkpoint,
    pretrain_args,
    rank_pid,
    resume_pick,
    rows,
    run,
    same_weights,
    set_arg,
    signalled,
    steps,
    straight,
    tiny_config,
    wait_for_row,
)
from tests.helpers import ENV_ONE_THREAD, TWO_RANKS


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny):
    """One folder for the module (the straight runs the cases compare with are made once) and
    the session's tiny dataset."""
    return Work(tmp_path_factory.mktemp("faults"), tiny)


def needs(loader: str) -> None:
    if loader == "dali" and not dali_available():
        pytest.skip("nvidia.dali does not import")


# (case, loader, signal, data-loader worker processes): with workers, the signal goes to the
# whole process group, as a terminal's Ctrl-C and srun's SIGTERM do.
STOPS = [("sigterm-torchvision", "torchvision", signal.SIGTERM, 0),
         ("sigterm-dali", "dali", signal.SIGTERM, 0),
         ("sigint", "torchvision", signal.SIGINT, 0),
         ("sigusr1", "torchvision", signal.SIGUSR1, 0),  # a scheduler's time-limit warning
         ("sigterm-process-group", "torchvision", signal.SIGTERM, 2),
         ("sigint-process-group", "torchvision", signal.SIGINT, 2)]


@pytest.mark.parametrize("name, loader, sig, workers", STOPS, ids=[s[0] for s in STOPS])
def test_stop_signal_then_resume(work, name, loader, sig, workers):
    """A stop signal after a random step: exit 75 with every finished step in the checkpoint and
    no traceback, then a resume that ends with the weights of the run that was never stopped."""
    needs(loader)
    reference = straight(work, loader)
    out = fresh(work / name)
    # After the first step a step takes ~0.1 s here and the row is seen by polling: the signal
    # leaves 3 or 4 steps to run, or it may land in the last one, which rightly ends the run
    # (exit 0): seen once in CI, the signal reaching step 6 of 6 after the row of step <= 4.
    at = random.Random(name).randrange(1, STEPS - 3)
    args = pretrain_args(work, out, loader)
    if workers:
        set_arg(args, "--num-threads", str(workers))
    send = (lambda proc: os.killpg(proc.pid, sig)) if workers else \
        (lambda proc: proc.send_signal(sig))
    code, text = signalled([sys.executable, *args], out, work / f"{name}.log", at, send,
                           new_session=bool(workers))
    assert code == EXIT_PREEMPTED, f"exit {code} after {sig.name} at step {at}: {text[-2000:]}"
    assert "Traceback" not in text, text[-3000:]
    stopped, done = checkpoint_step(newest_checkpoint(out)), max(steps(out))
    assert stopped == done, f"{done} steps done, checkpoint at step {stopped}: steps lost"
    resumed = run(pretrain_args(work, out, loader))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps(out) == list(range(1, STEPS + 1)), f"metrics rows for steps {steps(out)}"
    assert same_weights(reference, out), "resumed weights differ from the straight run's"
    # The checkpoint holds the epoch's spectra so far, merged as the straight run merges them.
    assert epoch_rows(out) == epoch_rows(reference), "the resumed epoch's row differs"


KILLS = [("kill-9-torchvision", "torchvision", ()),
         ("kill-9-dali", "dali", ()),
         # gradient caching, 2 micro-batches a step
         ("kill-9-micro-batch", "torchvision", ("--micro-batch", "4"))]


@pytest.mark.parametrize("name, loader, extra", KILLS, ids=[k[0] for k in KILLS])
def test_kill_9_then_resume(work, name, loader, extra):
    """kill -9 once the checkpoint of a random step is written (one per step), then a resume to
    the straight run's weights (both with the `extra` flags), one metrics row per step."""
    needs(loader)
    reference = straight(work, loader, extra)
    out = fresh(work / name)
    at = random.Random(name).randrange(1, STEPS - 1)
    args = set_arg(pretrain_args(work, out, loader) + list(extra), "--ckpt-every", "1")
    kill_at_checkpoint(args, out, at)
    assert not (out / "backbone.pt").exists(), f"the run ended before the kill at step {at}"
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert steps(out) == list(range(1, STEPS + 1))
    assert same_weights(reference, out), "resumed weights differ from the straight run's"
    assert epoch_rows(out) == epoch_rows(reference), "the resumed epoch's row differs"


def test_workers_ignore_stop_signals(work):
    """SIGTERM, SIGINT and SIGUSR1 to the 2 workers and their forkserver only, at step 1 of a
    run that needs new batches after it: the run goes on to its end, with the weights of the
    run without workers."""
    reference = straight(work)
    out = fresh(work / "signalled-workers")
    args = set_arg(pretrain_args(work, out), "--num-threads", "2")
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


def test_sigterm_ddp_one_rank(work):
    """SIGTERM to rank 1 of 2 (gloo) only: rank 0 stops with it, the checkpoint at the last
    step done; a resume on 2 ranks ends with the weights of the straight 2-rank run."""
    reference = finished(work, "ddp-straight", lambda o: ddp_pretrain_args(work, o),
                         launcher=TWO_RANKS)
    out = fresh(work / "ddp-stopped")
    args = ddp_pretrain_args(work, out)

    def rank_1(proc):
        ranks = rank_pid(proc.pid, 1)
        assert len(ranks) == 1, f"rank 1 not found below torchrun: {ranks}"
        os.kill(ranks[0], signal.SIGTERM)
    _, text = signalled([*TWO_RANKS, *args], out, work / "ddp-stopped.log", 1, rank_1)
    assert "stopped by a signal to another rank" in text, text[-3000:]
    stopped = checkpoint_step(newest_checkpoint(out))
    assert stopped == max(steps(out)) < DDP_STEPS, (stopped, rows(out))
    resumed = run(args, launcher=TWO_RANKS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps(out) == list(range(1, DDP_STEPS + 1))
    assert same_weights(reference, out), "resumed weights differ from the straight 2-rank run's"
    # Rank 0's checkpoint holds both ranks' spectra merged: the same rows up to that rounding.
    resumed_rows, straight_rows = epoch_rows(out), epoch_rows(reference)
    assert len(resumed_rows) == len(straight_rows) == DDP_STEPS // 2
    for got, want in zip(resumed_rows, straight_rows):
        assert got["probe_train_top1"] == want["probe_train_top1"]
        for name, spectrum in want["spectrum"].items():
            assert got["spectrum"][name] == pytest.approx(spectrum, rel=1e-9), name


@pytest.mark.parametrize("lr", ["1e6", "1e3"], ids=["lr-1e6", "lr-1e3"])
def test_diverging_lr(work, lr):
    """--lr 1e6 (weights overflow within steps) or 1e3 (finite but exploding): exit 3 with a
    one-line "diverged at step" message, no backbone, every kept checkpoint finite."""
    out = fresh(work / f"lr-{lr}")
    args = pretrain_args(work, out)
    for name, value in (("--lr", lr), ("--ckpt-every", "2"), ("--log-every", "3")):
        set_arg(args, name, value)
    proc = run(args)
    assert proc.returncode == EXIT_DIVERGED, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    message = proc.stderr.strip().splitlines()[-1]
    assert "diverged at step" in message and "Traceback" not in proc.stderr, message
    assert not (out / "backbone.pt").exists()
    for path in out.glob("ckpt_*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values()
                   if t.is_floating_point()), f"{path} holds non-finite weights"


CHANGED = {"arch": "resnet18", "mode": "simclr-none", "dim": 21, "temperature": 0.2,
           "variant": "ntxent", "batch_size": 16, "image_size": 40, "seed": 1, "lr": 0.4,
           "wd": 1e-5, "warmup_epochs": 1.0, "epochs": 3, "max_steps": 7, "loader": "dali",
           "simclr_out": 64, "micro_batch": 4, "precision": "bf16"}


def test_config_drift_changes_every_resume_field():
    assert set(CHANGED) == set(RESUME_FIELDS)


@pytest.mark.parametrize("name", list(CHANGED), ids=[f"config-drift-{n}" for n in CHANGED])
def test_config_drift(work, name):
    """A resume with one setting of RESUME_FIELDS changed is refused with an error naming its
    flag, and accepted when --accept-changes names it."""
    reference = straight(work)
    value = CHANGED[name]
    cfg = Config(**{**tiny_config().__dict__, name: value})
    settings = resume_settings(cfg, value if name == "image_size" else 32,
                               value if name == "loader" else "torchvision")
    with pytest.raises(ValueError) as refused:
        pick_checkpoint(reference, cfg, settings)
    assert flag(name) in str(refused.value), f"{name}: {refused.value}"
    accepted = Config(**{**cfg.__dict__, "accept_changes": (name,)})
    assert pick_checkpoint(reference, accepted, settings)[1]["step"] == STEPS


def test_accept_longer_run(work):
    """A finished run resumed with --max-steps 8: refused without --accept-changes max-steps
    (exit 2, naming --max-steps 6 -> 8), trained to 8 with it; --max-steps 5, below the
    checkpoint's 8: exit 2."""
    out = copy_of_straight(work, "longer")
    args = set_arg(pretrain_args(work, out), "--max-steps", "8")
    refused = run(args)
    assert refused.returncode == 2 and "--max-steps: 6 -> 8" in refused.stderr, refused.stderr
    proc = run(args, "--accept-changes", "max-steps")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert steps(out)[-1] == 8
    shorter = run(set_arg(args, "--max-steps", "5"), "--accept-changes", "max-steps")
    assert shorter.returncode == 2 and "past the 5 steps" in shorter.stderr, shorter.stderr


def test_bit_rot(work):
    """64 flipped bytes in the newest checkpoint: torch.load accepts it, the checksum does not;
    the resume takes the older one."""
    out = copy_of_straight(work, "bit-rot")
    newest = newest_checkpoint(out)
    flip_bytes(newest, 64, seed=0)
    torch.load(newest, weights_only=True)  # torch alone would train on it
    path, state = resume_pick(out)
    assert path is not None and path != newest and state["step"] < STEPS, path


def test_malformed(work):
    """A loadable newest checkpoint without its optimizer state: skipped (with a warning), the
    resume takes the older one."""
    out = copy_of_straight(work, "malformed")
    newest = newest_checkpoint(out)
    state = torch.load(newest, weights_only=True)
    del state["optimizer"]
    save_checkpoint(out, state["step"], state)
    path, picked = resume_pick(out)
    assert path != newest and picked["step"] < STEPS, path


def test_none_readable(work):
    """Both kept checkpoints unreadable: an error naming --no-resume; --no-resume moves them to
    previous-*/."""
    out = copy_of_straight(work, "none-readable")
    for path in out.glob("ckpt_*.pt"):
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError) as raised:
        resume_pick(out)
    message = str(raised.value)
    assert "none of the 2 checkpoints" in message and "--no-resume" in message, message
    claim_out(out, resume=False).release()
    kept = list(out.glob("previous-*/ckpt_*.pt"))
    assert not list(out.glob("ckpt_*.pt")) and len(kept) == 2, kept


def test_disk_full(work, monkeypatch):
    """ENOSPC while a checkpoint is written: an error naming the file; the old checkpoints are
    intact and no temporary is left."""
    out = copy_of_straight(work, "disk-full")
    before = {p.name: p.read_bytes() for p in out.glob("ckpt_*.pt")}

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", full)
        with pytest.raises(OSError) as raised:
            save_checkpoint(out, 7, {"step": 7, "w": torch.ones(1000)})
    message = str(raised.value)
    assert "no space left" in message and "ckpt_000000007.pt" in message, message
    assert {p.name: p.read_bytes() for p in out.glob("ckpt_*.pt")} == before
    assert not list(out.glob(".*.tmp"))


def test_two_runs_one_out(work):
    """A second run on an --out that a live run holds: exit 2, "is in use by pid", nothing
    written."""
    out = fresh(work / "locked")
    out.mkdir()
    lock = FolderLock(out).acquire()
    try:
        proc = run(pretrain_args(work, out))
    finally:
        lock.release()
    assert proc.returncode == 2 and "is in use by pid" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "metrics.jsonl").exists()


def test_stale_temporaries(work):
    """Temporary files a killed writer left in --out are removed when the next run takes the
    folder."""
    out = copy_of_straight(work, "stale")
    stale = [out / ".ckpt_000000007.pt.0123abcd.tmp", out / ".backbone.pt.4567ef.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    claim_out(out, resume=True).release()
    assert not any(p.exists() for p in stale)


def test_huge_embeddings():
    """infonce and the spectrum on fp32 rows with |z| = 1e30: the loss is the float64 loss of
    z / 1e30 on both CPU backends with non-zero gradients; the spectrum is 1e60 x that of
    z / 1e30."""
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


def test_tiny_temperature():
    """infonce with temperature = 1e-40 (1/t overflows fp32): a ValueError naming it."""
    from directclr import infonce
    z = torch.randn(8, 16)
    with pytest.raises(ValueError, match="temperature"):
        infonce(z, z, dim=16, temperature=1e-40)
