"""`directclr reproduce` end to end at a tiny budget: runs, untrained rows, probes, dynamics,
tables, figures, resume, bad input."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from directclr.reproduce import (
    Budget,
    aggregate,
    build_model,
    feature_probe,
    knn_probe,
    reproduce,
    training_dynamics,
    write_reports,
)

TINY = Budget(images=96, epochs=1, long_epochs=2, batch_size=32, probe_epochs=3,
              loader="torchvision", val_images=200, snapshot_every=2, dynamics_images=150)
MODES = ["directclr", "simclr-mlp"]  # a long mode (2 epochs = 6 steps) and a short one (3)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    return out, reproduce(out, modes=MODES, seeds=[0, 1], budget=TINY, progress=False)


def _run(out, name):
    return json.loads((out / "runs" / name / "result.json").read_text())


def test_reproduce_writes_the_tables_and_figures(reproduced):
    out, rows = reproduced
    assert [r["mode"] for r in rows] == ["untrained", "untrained (r[:, :d0] only)", "directclr",
                                         "directclr (r[:, :d0] only)", "simclr-mlp"]
    assert [r["epochs"] for r in rows] == [0, 0, 2, 2, 1]  # per-mode epochs
    for row in rows:
        assert row["seeds"] == [0, 1]
        for probe in ("probe", "knn"):
            assert 0 <= row[f"{probe}_top1_mean"] <= 100 and row[f"{probe}_top1_std"] >= 0
        assert 0 < row["effective_rank"] <= row["dim"] and 0 < row["rankme_raw"] <= row["dim"]
        assert row["below_1e-6"] <= row["below_1e-4"] <= row["dim"]
    assert [r["dim"] for r in rows] == [128, 22, 128, 22, 128] and TINY.dim == 22
    assert rows[4]["projector_dim"] == TINY.simclr_out == 8  # the official w -> out projector
    assert "projector_dim" not in rows[2]
    # gains: paired by seed over the untrained row (r[:, :d0] over the untrained r[:, :d0])
    for row, name, key in ((rows[2], "directclr", "knn"), (rows[3], "directclr", "knn_subvector"),
                           (rows[4], "simclr-mlp", "probe")):
        gains = [100 * (_run(out, f"{name}-seed{s}")[key]["top1"]
                        - _run(out, f"untrained-seed{s}")[key]["top1"]) for s in (0, 1)]
        probe = key.split("_")[0]
        assert row[f"{probe}_gain_per_seed"] == pytest.approx(gains)
    assert rows[0]["probe_gain_mean"] is None
    # the 200 validation images are a random subset: every class, not the first folder's
    result = _run(out, "directclr-seed0")
    assert result["val_classes"] == 10 and result["budget"]["epochs"] == 2
    assert result["wall_s"]["pretrain"] > 0 and result["machine"] and result["finished"]
    written = json.loads((out / "results.json").read_text())
    assert isinstance(written, list) and len(written) == len(rows)
    for row, saved in zip(rows, written):
        assert {"mode", "probe_top1_mean", "probe_top1_std", "knn_top1_mean", "probe_gain_mean",
                "knn_gain_mean", "seeds", "effective_rank", "rankme_raw", "below_1e-4",
                "below_1e-6", "dead", "collapsed", "commit", "budget"} <= saved.keys()
        assert {k: saved[k] for k in row} == row
    assert written[0]["budget"]["simclr_out"] == 8
    assert len(json.loads((out / "runs.json").read_text())["runs"]) == 6
    table = (out / "results.md").read_text()
    for text in ("| untrained |", "| directclr |", "62.7", "66.5", "k-NN", "gain over untrained",
                 "effective rank (centered)", "RankMe (raw, as published)", "Training dynamics",
                 "| directclr | r[:d0] |", "| simclr-mlp | z |", "d0 = 22 of 128",
                 "SimCLR projector output 8", "Machine:"):
        assert text in table, text
    for figure in ("spectra.png", "dynamics.png"):
        assert (out / figure).stat().st_size > 10_000


def test_dynamics_cover_every_snapshot_from_the_initial_weights(reproduced):
    out, _ = reproduced
    direct, mlp = _run(out, "directclr-seed0"), _run(out, "simclr-mlp-seed0")
    assert [row["step"] for row in direct["dynamics"]] == [0, 2, 4, 6]  # 3 steps an epoch
    assert [row["step"] for row in mlp["dynamics"]] == [0, 2, 3]  # the final step too
    assert sorted(p.name for p in (out / "runs" / "directclr-seed0").glob("ckpt_*.pt")) == [
        "ckpt_000000002.pt", "ckpt_000000004.pt", "ckpt_000000006.pt"]  # kept: --keep-every
    row = direct["dynamics"][-1]
    assert set(row) == {"step", "r", "r[:d0]", "r[d0:]"} and "z" in mlp["dynamics"][0]
    assert (row["r"]["dim"], row["r[:d0]"]["dim"], row["r[d0:]"]["dim"]) == (128, 22, 106)
    assert mlp["dynamics"][0]["z"]["dim"] == 8
    for view in row.values():
        if isinstance(view, dict):
            assert {"effective_rank", "rankme_raw", "below_1e-4", "below_1e-6", "dead"} <= set(view)
    # step 0 is each seed's initial backbone: the same in every mode, another for another seed
    assert direct["dynamics"][0]["r"] == mlp["dynamics"][0]["r"]
    assert direct["dynamics"][0]["r"] != _run(out, "directclr-seed1")["dynamics"][0]["r"]
    assert direct["dynamics"][-1]["r"] != direct["dynamics"][0]["r"]  # it trained
    # measured snapshots are cached: a second pass measures nothing and writes nothing
    run_dir = out / "runs" / "directclr-seed0"
    cache = run_dir / "dynamics.json"
    before = cache.stat().st_mtime_ns
    data = out / "data" / f"images-{TINY.images}"
    again = training_dynamics("directclr", 0, TINY, data, run_dir, 6)
    assert again == direct["dynamics"] and cache.stat().st_mtime_ns == before


def test_untrained_row_is_the_runs_initial_weights(reproduced, tmp_path):
    """One pretraining step at a negligible lr leaves the weights where the run started:
    build_model's untrained backbone must be exactly those."""
    out, _ = reproduced
    data = out / "data" / f"images-{TINY.images}" / "train"
    cmd = [sys.executable, "-m", "directclr", "pretrain", "--data", str(data), "--out",
           str(tmp_path / "run"), "--arch", TINY.arch, "--mode", "directclr", "--dim", "22",
           "--batch-size", "32", "--max-steps", "1", "--lr", "1e-12", "--loader", "torchvision",
           "--seed", "1", "--image-size", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    from directclr.checkpoint import load_latest_checkpoint
    trained = load_latest_checkpoint(tmp_path / "run")["model"]
    for seed, same in ((1, True), (0, False)):
        initial = build_model("untrained", seed, TINY, 10).state_dict()
        convs = [k for k in initial if k.startswith("backbone") and k.endswith("conv1.weight")]
        assert convs and all(torch.allclose(initial[k], trained[k], atol=1e-6) == same
                             for k in convs)


def test_resume_keeps_finished_runs_and_guards_each_modes_budget(reproduced):
    out, rows = reproduced
    done = out / "runs" / "directclr-seed0" / "result.json"
    before = done.stat().st_mtime_ns
    again = reproduce(out, modes=["directclr", "simclr-mlp"], seeds=[0], budget=TINY,
                      progress=False)
    assert done.stat().st_mtime_ns == before  # finished runs are kept, not rerun
    assert again == rows  # the table covers every finished run with this budget
    # --epochs is the short modes': DirectCLR's runs stay valid, simclr-mlp's leave the table
    short = reproduce(out, modes=["directclr"], seeds=[0],
                      budget=dataclasses.replace(TINY, epochs=2), progress=False)
    assert [r["mode"] for r in short] == [r["mode"] for r in rows[:4]]
    assert short[2] == rows[2]
    with pytest.raises(ValueError, match="another budget"):
        reproduce(out, modes=["directclr"], seeds=[0],
                  budget=dataclasses.replace(TINY, long_epochs=3), progress=False)
    with pytest.raises(ValueError, match="another budget"):
        reproduce(out, modes=["simclr-mlp"], seeds=[0],
                  budget=dataclasses.replace(TINY, epochs=2), progress=False)


def test_report_only_rewrites_the_tables_from_copied_runs(reproduced, tmp_path):
    out, rows = reproduced
    for result in (out / "runs").glob("*/result.json"):
        copy = tmp_path / "runs" / result.parent.name / "result.json"
        copy.parent.mkdir(parents=True)
        copy.write_bytes(result.read_bytes())
    assert write_reports(tmp_path, TINY, "directclr reproduce --report-only") == rows
    assert (tmp_path / "results.md").exists() and (tmp_path / "dynamics.png").exists()
    empty = tmp_path / "empty"
    proc = subprocess.run([sys.executable, "-m", "directclr", "reproduce", "--out", str(empty),
                           "--report-only"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no finished run" in proc.stderr, proc.stderr[-2000:]
    assert not empty.exists()  # nothing trained, nothing prepared


def test_budget_keeps_the_papers_geometry():
    """d0 = 360/2048 and SimCLR's output 128/2048 of the width (narrower than d0)."""
    assert (Budget().dim, Budget().simclr_out) == (22, 8)
    wide = Budget(arch="resnet50", dynamics_images=4096)
    assert (wide.dim, wide.simclr_out) == (360, 128)
    assert (Budget(arch="resnet18").dim, Budget(arch="resnet18").simclr_out) == (90, 32)
    with pytest.raises(ValueError, match="--dynamics-images 2000 must exceed the 2048"):
        Budget(arch="resnet50")
    budget = Budget()
    assert [budget.epochs_for(m) for m in ("directclr", "simclr-none", "simclr-linear",
                                           "simclr-mlp", "fixed-lowrank", "diagonal",
                                           "untrained")] == [20, 20, 20, 4, 4, 4, 0]
    settings = budget.run_settings("directclr")
    assert settings["epochs"] == 20 and "long_epochs" not in settings
    assert settings["simclr_out"] == 8 and settings["snapshot_every"] == budget.snapshot_every
    assert "lr" not in budget.run_settings("untrained")


def test_knn_probe_votes_by_temperature_weighted_cosine_similarity():
    """Query [1, 0] against unit rows at similarity 1 (class 0), 0.8 and 0.6 (class 1) and 0
    (class 2): with k = 3 the weights exp(s / T) are 1.6e6 against 9.7e4 at T = 0.07 (class 0)
    and 2.72 against 2.23 + 1.82 at T = 1 (class 1); the nearest alone says class 0. Query
    [0, 1] is the mirror image, with class 2 in the place of class 0."""
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    bank = bank * torch.tensor([[3.0], [0.5], [7.0], [2.0]])  # cosine: the lengths do not count
    labels = torch.tensor([0, 1, 1, 2])
    queries = torch.tensor([[2.0, 0.0], [0.0, 0.1]])
    for k, temperature, expected in ((3, 0.07, [0, 2]), (3, 1.0, [1, 1]), (1, 1.0, [0, 2]),
                                     (20, 0.07, [0, 2])):
        expected = torch.tensor(expected)
        for target, hit in ((expected, 1.0), ((expected + 1) % 3, 0.0)):
            got = knn_probe(bank, labels, queries, target, k=k, temperature=temperature,
                            chunk=1)
            assert got["top1"] == hit, (k, temperature, expected)
    assert knn_probe(bank, labels, queries, torch.tensor([0, 2]), k=20)["k"] == 4


def test_feature_probe_learns_separable_features_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 3
    signal = torch.randn(600, 8, generator=gen) + 4 * torch.nn.functional.one_hot(labels, 8)
    noise = torch.randn(600, 8, generator=gen)
    good = feature_probe(signal[:400], labels[:400], signal[400:], labels[400:], epochs=5)
    bad = feature_probe(noise[:400], labels[:400], noise[400:], labels[400:], epochs=5)
    assert good["top1"] > 0.95 and bad["top1"] < 0.5


def _feature_probe_before_issue_24(train_x, train_y, val_x, val_y, epochs, seed=0,
                                   batch_size=256, lr=0.1):
    """The reproduction's own probe on fixed features before it became probe.py's
    train_linear_head (directclr/reproduce.py at a704843), frozen: the stored runs' numbers."""
    from torch import nn
    F = torch.nn.functional
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    classes = int(train_y.max()) + 1
    head = nn.Linear(train_x.shape[1], classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.zero_()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=1e-6)
    total = epochs * math.ceil(len(train_x) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(head(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            history.append((head(val_x).argmax(1) == val_y).float().mean().item())
    return {"top1": history[-1], "top1_best": max(history), "top1_per_epoch": history}


@pytest.mark.parametrize("columns", [slice(None), slice(0, 5)])  # r, and r[:, :d0] (a view)
def test_feature_probe_gives_the_stored_runs_numbers(columns):
    """feature_probe through probe.py's train_linear_head equals, to the bit, the algorithm that
    measured the stored runs: 301 training rows (a last batch of 13), 997 validation rows (a
    top-1 that float32 rounds), features 4 columns too wide."""
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(1298) % 5
    rep = torch.randn(1298, 12, generator=gen) + torch.nn.functional.one_hot(labels, 12)
    rep = rep * torch.rand(12, generator=gen) * 3  # channels of unequal scales
    x, train_y, val_y = rep[:, columns], labels[:301], labels[301:]
    for seed, epochs, batch_size, lr in ((0, 4, 32, 0.1), (5, 2, 256, 0.5)):
        args = (x[:301], train_y, x[301:], val_y, epochs, seed, batch_size, lr)
        assert feature_probe(*args) == _feature_probe_before_issue_24(*args)


def test_aggregate_means_spreads_and_gains_over_seeds():
    def run(mode, seed, top1, knn):
        spectrum = {"effective_rank": 10.0 + seed, "rankme_raw": 5.0 + seed, "collapsed": seed,
                    "below_1e-4": 2 * seed, "below_1e-6": seed, "dead": 0, "dim": 16}
        return {"mode": mode, "seed": seed, "probe": {"top1": top1}, "knn": {"top1": knn},
                "spectrum": spectrum}
    untrained, row = aggregate([run("untrained", 0, 0.4, 0.3), run("untrained", 1, 0.5, 0.3),
                                run("simclr-none", 0, 0.5, 0.6), run("simclr-none", 1, 0.7, 0.5)],
                               TINY)
    assert row["probe_top1_mean"] == pytest.approx(60.0)
    assert row["probe_top1_std"] == pytest.approx(14.142, abs=1e-3)
    assert row["probe_gain_per_seed"] == pytest.approx([10.0, 20.0])
    assert row["knn_gain_mean"] == pytest.approx(25.0) and row["knn_top1_mean"] == 55.0
    assert row["effective_rank"] == 10.5 and row["collapsed"] == 0.5
    assert row["rankme_raw"] == 5.5 and row["below_1e-4"] == 1.0
    assert row["paper_imagenet_top1"] == 51.5 and row["epochs"] == TINY.long_epochs
    assert untrained["probe_gain_mean"] is None and untrained["epochs"] == 0


@pytest.mark.parametrize("args,match", [(["--modes", "byol"], "byol"),
                                        (["--epochs", "0"], "--epochs must be an integer >= 1"),
                                        (["--long-epochs", "0"],
                                         "--long-epochs must be an integer >= 1"),
                                        (["--snapshot-every", "0"],
                                         "--snapshot-every must be an integer >= 1"),
                                        (["--dynamics-images", "100"], "must exceed the 128"),
                                        (["--images", "100"], "fewer than one batch")])
def test_cli_rejects_bad_budgets_before_any_work(tmp_path, args, match):
    proc = subprocess.run([sys.executable, "-m", "directclr", "reproduce", "--out",
                           str(tmp_path), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "data").exists()
