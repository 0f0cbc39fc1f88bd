"""The pretraining loop: modes learn, runs resume exactly after kill -9, checkpoints are safe."""
import json
import math
import re
import shutil
import socket
import subprocess

import pytest
import torch

from directclr import train
from directclr.checkpoint import check_resume_config, load_latest_checkpoint, save_checkpoint
from directclr.config import RESUME_FIELDS, Config
from directclr.infonce import infonce
from directclr.lars import LARS
from directclr.metrics import MetricsLog
from directclr.models import MODES, read_description
from directclr.preemption import Diverged
from directclr.train import Model, check_config, learning_rate, warmup_steps
from tests.helpers import (
    ENV_ONE_THREAD,
    RUN,
    TORCHRUN,
    FixedBatches,
    assert_same_training,
    count_host_reads,
    ddp_args,
    run_two_ranks,
)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_lowers_its_loss_on_a_fixed_batch(mode):
    torch.manual_seed(0)
    cfg = Config(data="", out="", arch="resnet18", mode=mode, dim=90)
    model = Model(cfg, num_classes=4, image_size=32)
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


@pytest.mark.parametrize("precision, expected", [("auto", torch.float32),
                                                  ("fp32", torch.float32),
                                                  ("bf16", torch.bfloat16)])
def test_precision_puts_the_model_under_bf16_autocast_on_cpu(precision, expected):
    """--precision bf16 runs the backbone's convolutions in bf16 on CPU (auto: fp32 there); the
    loss and the online probe's loss stay fp32."""
    torch.manual_seed(0)
    cfg = Config(data="", out="", arch="resnet18-w16", dim=22, precision=precision)
    model = Model(cfg, num_classes=4, image_size=32)
    seen = []
    model.backbone.features[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    optimizer = LARS(model.parameters(), lr=0.1)
    views = torch.randn(2, 8, 3, 32, 32)
    _, _, values = train.train_step(model, optimizer, cfg, model.loss_dim, views[0], views[1],
                                    torch.arange(8) % 4)
    assert seen == [expected, expected]  # the two views
    assert values.dtype == torch.float32 and torch.isfinite(values).all()


def train_two_ranks(tiny, mode, out) -> str:
    """ddp_args' run on 2 ranks writing to `out`; returns torchrun's stderr."""
    return run_two_ranks(*ddp_args(tiny, mode), "--out", out, env=ENV_ONE_THREAD, timeout=600)


@pytest.mark.parametrize("mode", ["directclr", "simclr-mlp"])
def test_two_process_ddp_ends_with_the_weights_of_one_process(tiny, tmp_path, one_process, mode):
    """torchrun x 2 (gloo, CpuSyncBatchNorm, rows against all-gathered columns) with 8 pairs per
    rank equals one process with all 16: same global batches, BN over the global batch, the
    gradient of the global loss."""
    two = tmp_path / "two"
    train_two_ranks(tiny, mode, two)
    assert_same_training(one_process(mode), two, mode)


def test_two_process_ddp_with_micro_batches_and_compile(tiny, tmp_path):
    """--micro-batch under torchrun x 2 with --compile: every step logged with a finite loss,
    the gradient all-reduced over ranks (the ranks' weights stay equal: one backbone.pt), and
    the same losses as without --compile up to float reordering. (Under torch 2.11 this caught
    compile losing CpuSyncBatchNorm's backward sum over ranks: 3.8869 against 3.9054 at step
    2, before that sum became an opaque op.)"""
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        run_two_ranks(*ddp_args(tiny, "simclr-mlp"), "--out", out, "--micro-batch", "4", *extra,
                      env=ENV_ONE_THREAD, timeout=900)
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()
                        if '"loss"' in line]
        assert len(losses[name]) == 3 and all(math.isfinite(v) for v in losses[name])
        assert (out / "backbone.pt").exists()
    assert torch.allclose(torch.tensor(losses["eager"]), torch.tensor(losses["compiled"]),
                          rtol=1e-3)


def test_a_one_process_run_resumes_on_two_ranks_and_ends_where_it_would_have(tiny, tmp_path,
                                                                          one_process):
    """Killed after step 2 of 3 on one process, resumed on 2 ranks (same global batch)."""
    one = one_process("directclr")
    elastic = tmp_path / "elastic"
    shutil.copytree(one, elastic)
    (elastic / "ckpt_000000003.pt").unlink()
    (elastic / "backbone.pt").unlink()
    rows = (elastic / "metrics.jsonl").read_text().splitlines()
    (elastic / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")
    assert "resumed from step 2" in train_two_ranks(tiny, "directclr", elastic)
    assert_same_training(one, elastic, "directclr")


def launch_two_nodes(args, outs):
    """Two torchrun launches as two nodes of one process each (static rendezvous on loopback):
    both have LOCAL_RANK 0, only one has RANK 0. Returns their (returncode, stderr)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    logs = [out.with_name(f"{out.name}-node{node}.log") for node, out in enumerate(outs)]
    procs = []
    for node, (out, log) in enumerate(zip(outs, logs)):
        with log.open("w") as stderr:  # a file, not a pipe: a chatty node cannot block
            procs.append(subprocess.Popen(
                TORCHRUN + ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
                            "--master_addr=127.0.0.1", f"--master_port={port}"]
                + args + ["--out", str(out)],
                stdout=subprocess.DEVNULL, stderr=stderr, env=ENV_ONE_THREAD))
    try:
        codes = [proc.wait(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


def test_two_nodes_train_like_one_process_and_need_a_shared_out(tiny, tmp_path, one_process):
    two = tmp_path / "two-nodes"
    results = launch_two_nodes(ddp_args(tiny, "directclr"), [two, two])
    for node, (code, err) in enumerate(results):
        assert code == 0, f"node {node}: {err[-3000:]}"
    assert_same_training(one_process("directclr"), two, "directclr")

    # Resumed where node 0 sees the checkpoint at step 3 in its --out and node 1 sees none.
    seen, unseen = tmp_path / "node0", tmp_path / "node1"
    shutil.copytree(two, seen)
    args = ddp_args(tiny, "directclr") + ["--accept-changes", "max-steps"]
    args[args.index("--max-steps") + 1] = "5"
    for node, (code, err) in enumerate(launch_two_nodes(args, [seen, unseen])):
        assert code != 0, f"node {node} did not fail"
        assert "rank 0 resumes from ckpt_000000003.pt" in err, err[-3000:]
        assert "which ranks [1] cannot read" in err and "shared filesystem" in err
    assert not (seen / "ckpt_000000004.pt").exists()


def test_a_run_describes_itself_to_probe_spectrum_plot_and_tensorboard(tiny, tmp_path, capsys):
    """backbone.pt says what it is: probe and spectrum need no --arch or --image-size."""
    from directclr.cli import main
    from directclr.plot import load_metrics
    out = tmp_path / "run"
    args = RUN[4:] + ["--data", str(tiny), "--max-steps", "2", "--arch", "resnet18-w16",
                      "--dim", "22", "--out", str(out), "--tensorboard"]
    assert main(["pretrain", *args]) == 0
    raw = torch.load(out / "backbone.pt", weights_only=True)
    assert read_description(raw) == {"arch": "resnet18-w16", "stem": "cifar",
                                         "image_size": 32, "mode": "directclr", "dim": 22,
                                         "width": 128}
    splits = tmp_path / "splits"
    splits.mkdir()
    for split in ("train", "val"):
        (splits / split).symlink_to(tiny)
    assert main(["probe", "--checkpoint", str(out / "backbone.pt"), "--data", str(splits),
                 "--epochs", "1", "--batch-size", "20"]) == 0
    probe = json.loads((out / "probe-backbone.json").read_text())
    assert probe["arch"] == "resnet18-w16" and probe["image_size"] == 32
    assert main(["spectrum", "--checkpoint", str(out / "backbone.pt"), "--data", str(tiny),
                 "--out", str(tmp_path / "spectrum")]) == 0
    assert json.loads((tmp_path / "spectrum" / "spectrum.json").read_text())["dim"] == 128
    assert main(["plot", str(out)]) == 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [event.value for event in events.Scalars("train/loss")]
    assert logged == pytest.approx([row["loss"] for row in load_metrics(out).steps])


def test_keep_every_keeps_snapshots_that_pruning_would_remove(tiny, tmp_path):
    from directclr.cli import main
    out = tmp_path / "run"
    args = RUN[4:] + ["--data", str(tiny), "--max-steps", "5", "--arch", "resnet18-w16",
                      "--dim", "22", "--out", str(out), "--ckpt-every", "100", "--keep-every", "2"]
    assert main(["pretrain", *args]) == 0
    kept = sorted(int(path.stem.split("_")[1]) for path in out.glob("ckpt_*.pt"))
    assert kept == [2, 4, 5]  # the snapshots, and the last two (4 and 5)


def test_a_setting_added_later_resumes_at_its_old_default():
    current = {name: None for name in RESUME_FIELDS} | {"simclr_out": 128}
    saved = {name: None for name in RESUME_FIELDS if name != "simclr_out"}
    check_resume_config(saved, current, (), step=7)  # written before --simclr-out: fine
    with pytest.raises(ValueError, match="--simclr-out: 128 -> 64"):
        check_resume_config(saved, current | {"simclr_out": 64}, (), step=7)


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
    init = Model(Config(data="", out="", arch="resnet18-w16", dim=22), 4, 32).state_dict()
    keys = [k for k, v in a.items() if v.is_floating_point()]
    eager_w, compiled_w, init_w = (torch.cat([state[k].flatten() for k in keys])
                                   for state in (a, b, init))
    update = (eager_w - init_w).norm()
    assert update > 0
    assert (eager_w - compiled_w).norm() / update < 2e-3


def checkpoint_state(step, weight=1.0):
    return {"model": {"w": torch.full((3,), weight)}, "optimizer": {"state": {}},
            "loader": {}, "step": step, "config": {}, "run": {}}


def test_truncated_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, checkpoint_state(step))
    newest = tmp_path / "ckpt_000000002.pt"
    newest.write_bytes(newest.read_bytes()[:20])
    state = load_latest_checkpoint(tmp_path)
    assert state["step"] == 1
    assert "skipping checkpoint" in caplog.text and "ckpt_000000002.pt" in caplog.text


def test_a_checkpoint_with_non_finite_weights_is_skipped(tmp_path, caplog):
    save_checkpoint(tmp_path, 1, checkpoint_state(1))
    save_checkpoint(tmp_path, 2, checkpoint_state(2, weight=float("inf")))
    assert load_latest_checkpoint(tmp_path)["step"] == 1
    assert "non-finite" in caplog.text


def test_a_directory_in_a_checkpoints_place_is_skipped_then_moved_aside(tmp_path, caplog):
    """A resume skips it (issue 26: the next save then failed with "Is a directory", so the run
    could never finish); the save of that step renames it aside (its files kept) and writes the
    checkpoint; the clean-up of old checkpoints leaves directories alone."""
    save_checkpoint(tmp_path, 1, checkpoint_state(1))
    in_the_way = tmp_path / "ckpt_000000002.pt"
    in_the_way.mkdir()
    (in_the_way / "notes.txt").write_text("kept")
    assert load_latest_checkpoint(tmp_path)["step"] == 1
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, checkpoint_state(step))
    assert load_latest_checkpoint(tmp_path)["step"] == 4
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == [
        "ckpt_000000003.pt", "ckpt_000000004.pt"]
    [aside] = tmp_path.glob("ckpt_000000002.pt.not-a-checkpoint-*")
    assert (aside / "notes.txt").read_text() == "kept"
    assert "is not a file" in caplog.text


def test_only_the_last_two_checkpoints_are_kept(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"step": step})
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == [
        "ckpt_000000003.pt", "ckpt_000000004.pt"]
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("change,match", [
    ({"batch_size": 6}, "divisible"),
    ({"ckpt_every": 0}, "--ckpt-every"),
    ({"log_every": 0}, "--log-every"),
    ({"accept_changes": ("num_threads",)}, "--accept-changes"),
    ({"dim": 600}, "--dim"),
    ({"arch": "vgg"}, "--arch"),
    ({"mode": "byol"}, "--mode"),
])
def test_bad_flags_fail_before_any_work(tmp_path, change, match):
    cfg = Config(data=str(tmp_path), out="y", arch="resnet18", batch_size=8, dim=90)
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


@pytest.mark.parametrize("steps", [1, 5, 1000])
@pytest.mark.parametrize("warmup_epochs", [0, 0.3, 1, 10])
def test_lr_peaks_at_exactly_lr_whatever_the_run_length(steps, warmup_epochs):
    cfg = Config(data="", out="", epochs=1000, lr=4.8, warmup_epochs=warmup_epochs,
                 max_steps=steps)
    lrs = [learning_rate(cfg, step, 6) for step in range(steps)]
    assert max(lrs) == 4.8
    warmup = warmup_steps(cfg, 6)
    assert warmup == math.ceil(min(warmup_epochs * 6, steps / 10))
    if warmup:  # linear ramp to the peak, reached on the warm-up's last step
        assert lrs[:warmup] == pytest.approx([4.8 * (s + 1) / warmup for s in range(warmup)])
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))


@pytest.mark.parametrize("flags, message", [
    (["--out", "A_FILE"], r"--out .*a_file is a file"),
    (["--ckpt-every", "0"], r"--ckpt-every must be an integer >= 1, got 0"),
    (["--loader", "dali"], r"--loader dali: NVIDIA DALI does not import here"),
    (["--image-size", "0"], r"--image-size must be an integer >= 8, got 0"),
    (["--max-steps", "0"], r"--max-steps must be an integer >= 1, got 0"),
    (["--log-every", "-2"], r"--log-every must be an integer >= 1"),
    (["--batch-size", "1"], r"--batch-size must be an integer >= 2"),
    (["--epochs", "0"], r"--epochs must be an integer >= 1"),
    (["--seed", "-1"], r"--seed must be an integer >= 0"),
    (["--seed", str(2 ** 32)], r"--seed must be below 2\*\*32"),
    (["--num-threads", "-1"], r"--num-threads must be an integer >= 0"),
    (["--dim", "0"], r"--dim must be an integer >= 1, got 0"),
    (["--dim", "129"], r"--dim 129 must be in \[1, 128\]"),
    (["--lr", "nan"], r"--lr must be finite and > 0"),
    (["--lr", "0"], r"--lr must be finite and > 0"),
    (["--wd=-1e-6"], r"--wd must be finite and >= 0"),
    (["--warmup-epochs", "inf"], r"--warmup-epochs must be finite and >= 0"),
    (["--temperature", "1e-40"], r"--temperature must be finite and >= 1e-30"),
    (["--data", "A_FILE"], r"--data .*a_file is a file"),
    (["--accept-changes", "cache"], r"--accept-changes must be among"),
])
def test_each_bad_flag_is_a_one_line_error_before_any_work(tmp_path, capsys, monkeypatch,
                                                           flags, message):
    from directclr.cli import main
    monkeypatch.setattr(train, "dali_available", lambda: False)  # as on a machine without it
    (tmp_path / "a_file").write_text("not a directory")
    out = tmp_path / "run"
    (tmp_path / "data").mkdir()  # empty: a case that got past the checks would fail reading it
    flags = [str(tmp_path / "a_file") if flag == "A_FILE" else flag for flag in flags]
    code = main(["pretrain", "--data", str(tmp_path / "data"), "--out", str(out), "--arch",
                 "resnet18-w16", "--dim", "8", *flags])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1, errors
    assert re.search(message, errors[0]), errors[0]
    assert not out.exists()  # nothing created


def test_a_training_step_syncs_with_the_host_only_at_log_steps(tmp_path, monkeypatch):
    """Every way a tensor's value reaches Python is counted, per step: steps that neither log,
    checkpoint nor end an epoch must have none (on a GPU each would stall the launch queue)."""
    cfg = Config(data=str(tmp_path), out=str(tmp_path / "out"), arch="resnet18-w16", dim=22,
                 batch_size=8, epochs=1, lr=0.3, warmup_epochs=0.5, image_size=32,
                 loader="torchvision", log_every=3, ckpt_every=100)
    monkeypatch.setattr(train, "build_pretrain_loader", lambda *a, **k: FixedBatches(6, 8))
    real_step, marks = train.train_step, []
    with count_host_reads() as counts:
        def marked(*args, **kwargs):
            marks.append(dict(counts))
            return real_step(*args, **kwargs)
        monkeypatch.setattr(train, "train_step", marked)
        train.pretrain(cfg)
        marks.append(dict(counts))
    # Step k: from its train_step to the next one (its logging, the next step's stop vote and
    # batch); the last one ends with the run.
    per_step = {k: {name: marks[k].get(name, 0) - marks[k - 1].get(name, 0)
                    for name in marks[k] if marks[k][name] != marks[k - 1].get(name, 0)}
                for k in range(1, len(marks))}
    assert sorted(per_step) == [1, 2, 3, 4, 5, 6]
    quiet = {step: found for step, found in per_step.items() if step % 3}
    assert quiet == {1: {}, 2: {}, 4: {}, 5: {}}, quiet
    assert per_step[3], "the log step read nothing: the count does not see the reads"


def test_the_guard_names_the_first_non_finite_step(tmp_path):
    class NoBar:
        def update(self, n): pass
        def set_postfix(self, **kw): pass
        def close(self): pass
    cfg = Config(data="", out="", lr=4.8)
    log = MetricsLog(tmp_path / "metrics.jsonl", cfg, world=1, num_classes=10, progress=NoBar())
    log.add(1, 0, 4.8, torch.tensor([2.0, 2.3, 1.0]), 0.0)
    log.add(2, 0, 4.8, torch.tensor([2.0, 2.3, float("inf")]), 0.0)
    log.add(3, 0, 4.8, torch.tensor([float("nan")] * 3), 0.0)
    with pytest.raises(Diverged, match="at step 2: grad_norm = inf"):
        log.flush()
    written = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(written) == 2  # up to the step that diverged


def test_help_shows_the_config_defaults_and_the_choices(capsys):
    from directclr.cli import main
    assert main(["pretrain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    d = Config(data="", out="")
    for value in (d.lr, d.batch_size, d.epochs, d.warmup_epochs, d.log_every):
        assert f"(default: {value})" in text, value
    assert "(default: the paper's 360/2048 of the backbone's width" in text
    assert "{" + ",".join(MODES) + "}" in text
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("directclr 0.")
