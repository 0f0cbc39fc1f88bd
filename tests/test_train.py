"""The pretraining loop: modes learn, runs resume exactly after kill -9, checkpoints are safe."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from directclr.data import prepare_synthetic
from directclr.infonce import infonce
from directclr.lars import LARS
from directclr.models import MODES
from directclr.train import (Config, Model, check_config, learning_rate, load_latest_checkpoint,
                             save_checkpoint)

RUN = [sys.executable, "-m", "directclr", "pretrain", "--arch", "resnet18", "--batch-size", "8",
       "--epochs", "2", "--lr", "0.3", "--warmup-epochs", "0.5", "--dim", "90",
       "--image-size", "32", "--num-threads", "0", "--ckpt-every", "1", "--loader",
       "torchvision"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("tiny"), n=40, classes=4, min_side=36,
                             max_side=60, progress=False)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_lowers_its_loss_on_a_fixed_batch(mode):
    torch.manual_seed(0)
    cfg = Config(data="", out="", arch="resnet18", mode=mode, dim=90)
    model = Model(cfg, num_classes=4, small_images=True)
    optimizer = LARS(model.parameters(), lr=0.5)
    views = torch.randn(2, 16, 3, 32, 32)
    labels = torch.arange(16) % 4
    losses = []
    for _ in range(8):
        _, z1, z2, probe_loss, _ = model(views[0], views[0] + 0.1 * views[1], labels)
        loss = infonce(z1, z2, dim=model.loss_dim)
        optimizer.zero_grad()
        (loss + probe_loss).backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_kill_minus_9_then_resume_ends_with_identical_weights(tiny, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--data", str(tiny), "--max-steps", "7"]
    subprocess.run(RUN + args + ["--out", str(straight)], check=True, capture_output=True,
                   timeout=600)
    proc = subprocess.Popen(RUN + args + ["--out", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "ckpt_000000003.pt").exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "backbone.pt").exists()
    resumed = subprocess.run(RUN + args + ["--out", str(killed)], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    a = torch.load(straight / "backbone.pt", weights_only=True)
    b = torch.load(killed / "backbone.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["directclr", "simclr-mlp"])
def test_two_process_ddp_ends_with_the_weights_of_one_process(tiny, tmp_path, mode):
    """torchrun x 2 (gloo, CpuSyncBatchNorm, rows against all-gathered columns) with 8 pairs per
    rank equals one process with all 16: same global batches, BN over the global batch, the
    gradient of the global loss."""
    args = RUN + ["--data", str(tiny), "--max-steps", "3", "--batch-size", "16", "--mode", mode]
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--out", str(one)], check=True, capture_output=True, timeout=600,
                   env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    proc = subprocess.run(torchrun + args[1:] + ["--out", str(two)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = load_latest_checkpoint(one)
    b = load_latest_checkpoint(two)
    assert a["step"] == b["step"] == 3
    assert a["model"].keys() == b["model"].keys()
    torch.manual_seed(0)
    init = Model(Config(data="", out="", arch="resnet18", mode=mode, dim=90), 4, True)
    trained = [k for k, v in a["model"].items() if v.is_floating_point()]
    one_w, two_w, init_w = (torch.cat([state[k].flatten() for k in trained])
                            for state in (a["model"], b["model"], init.state_dict()))
    # Relative to how far 3 steps moved the weights: float reordering alone (one process with 1
    # vs 2 threads) gives 7e-7 (directclr) and 2e-4 (simclr-mlp, whose small-batch BN1d
    # amplifies rounding); BN statistics per rank instead (no CpuSyncBatchNorm) give 4e-2 and 0.11.
    update = (one_w - init_w).norm()
    assert update > 0
    assert (one_w - two_w).norm() / update < 2e-3
    for key in a["model"]:
        if not a["model"][key].is_floating_point():
            assert torch.equal(a["model"][key], b["model"][key]), key
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()
               if '"loss"' in line] for run in (one, two)]
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4)


def test_compile_flag_trains_like_eager(tiny, tmp_path):
    """--compile (inductor, through the directclr::infonce op) ends 3 steps where eager does, up
    to float reordering (the same measure and bound as the DDP test)."""
    args = RUN + ["--data", str(tiny), "--max-steps", "3", "--arch", "resnet18-w16",
                  "--dim", "22"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    subprocess.run(args + ["--out", str(eager)], check=True, capture_output=True, timeout=600)
    proc = subprocess.run(args + ["--out", str(compiled), "--compile"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_latest_checkpoint(eager)["model"], load_latest_checkpoint(compiled)["model"]
    torch.manual_seed(0)
    init = Model(Config(data="", out="", arch="resnet18-w16", dim=22), 4, True).state_dict()
    keys = [k for k, v in a.items() if v.is_floating_point()]
    eager_w, compiled_w, init_w = (torch.cat([state[k].flatten() for k in keys])
                                   for state in (a, b, init))
    update = (eager_w - init_w).norm()
    assert update > 0
    assert (eager_w - compiled_w).norm() / update < 2e-3


def test_truncated_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.ones(3) * step})
    newest = tmp_path / "ckpt_000000002.pt"
    newest.write_bytes(newest.read_bytes()[:20])
    state = load_latest_checkpoint(tmp_path)
    assert state["step"] == 1
    assert "skipping unreadable checkpoint" in caplog.text


def test_only_the_last_two_checkpoints_are_kept(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"step": step})
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == [
        "ckpt_000000003.pt", "ckpt_000000004.pt"]
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("change,match", [
    ({"batch_size": 6}, "divisible"),
    ({"dim": 600}, "--dim"),
    ({"arch": "vgg"}, "--arch"),
    ({"mode": "byol"}, "--mode"),
])
def test_bad_flags_fail_before_any_work(change, match):
    cfg = Config(data="x", out="y", arch="resnet18", batch_size=8, dim=90)
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises(ValueError, match=match):
        check_config(cfg, world=4)


def test_missing_data_is_a_clear_cli_error(tmp_path):
    proc = subprocess.run(RUN + ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such directory" in proc.stderr


def test_schedule_warms_up_then_decays_to_a_thousandth():
    cfg = Config(data="", out="", epochs=100, lr=4.8, warmup_epochs=10)
    lrs = [learning_rate(cfg, step, 10) for step in range(1000)]
    assert lrs[0] == 4.8 / 100 and abs(lrs[99] - 4.8) < 1e-12
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))
    assert abs(lrs[-1] - 0.0048) < 1e-3
    capped = Config(data="", out="", epochs=100, lr=1.0, warmup_epochs=10, max_steps=50)
    assert learning_rate(capped, 4, 10) == 1.0  # warm-up shrinks to a tenth of the cut run
    assert learning_rate(capped, 49, 10) < 0.01
