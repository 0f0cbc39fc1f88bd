"""`directclr reproduce` end to end at a tiny budget: runs, tables, figure, resume, bad input."""
import json
import subprocess
import sys

import pytest
import torch

from directclr.reproduce import Budget, aggregate, feature_probe, reproduce

TINY = Budget(images=96, epochs=1, batch_size=32, probe_epochs=3, loader="torchvision",
              val_images=200)


def test_reproduce_writes_the_table_and_resumes(tmp_path):
    rows = reproduce(tmp_path, modes=["directclr", "simclr-linear"], seeds=[0, 1], budget=TINY,
                     progress=False)
    assert [r["mode"] for r in rows] == ["directclr", "directclr (r[:, :d0] only)",
                                         "simclr-linear"]
    for row in rows:
        assert row["seeds"] == [0, 1]
        assert 0 <= row["probe_top1_mean"] <= 100 and row["probe_top1_std"] >= 0
        assert 0 < row["effective_rank"] <= row["dim"]
    assert rows[0]["dim"] == 128 and rows[1]["dim"] == TINY.dim == 22
    # the 200 validation images are a random subset: every class, not the first folder's
    result = json.loads((tmp_path / "runs" / "directclr-seed0" / "result.json").read_text())
    assert result["val_classes"] == 10
    assert "projector_effective_rank" in rows[2]
    written = json.loads((tmp_path / "results.json").read_text())
    assert isinstance(written, list) and len(written) == len(rows)
    for row, saved in zip(rows, written):
        assert {"mode", "probe_top1_mean", "probe_top1_std", "seeds", "effective_rank",
                "collapsed", "commit", "budget"} <= saved.keys()
        assert {k: saved[k] for k in row} == row
    assert len(json.loads((tmp_path / "runs.json").read_text())["runs"]) == 4
    table = (tmp_path / "results.md").read_text()
    assert "| directclr |" in table and "62.7" in table and "61.1" in table
    assert (tmp_path / "spectra.png").stat().st_size > 10_000
    done = tmp_path / "runs" / "directclr-seed0" / "result.json"
    before = done.stat().st_mtime_ns
    again = reproduce(tmp_path, modes=["directclr"], seeds=[0], budget=TINY, progress=False)
    assert done.stat().st_mtime_ns == before  # finished runs are kept, not rerun
    assert again == rows  # the table covers every finished run with this budget
    with pytest.raises(ValueError, match="another budget"):
        reproduce(tmp_path, modes=["directclr"], seeds=[0],
                  budget=Budget(**{**TINY.__dict__, "epochs": 2}), progress=False)


def test_feature_probe_learns_separable_features_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 3
    signal = torch.randn(600, 8, generator=gen) + 4 * torch.nn.functional.one_hot(labels, 8)
    noise = torch.randn(600, 8, generator=gen)
    good = feature_probe(signal[:400], labels[:400], signal[400:], labels[400:], epochs=5)
    bad = feature_probe(noise[:400], labels[:400], noise[400:], labels[400:], epochs=5)
    assert good["top1"] > 0.95 and bad["top1"] < 0.5


def test_aggregate_means_and_spreads_over_seeds():
    def run(seed, top1):
        spectrum = {"effective_rank": 10.0 + seed, "collapsed": seed, "dim": 16}
        return {"mode": "simclr-none", "seed": seed, "probe": {"top1": top1},
                "spectrum": spectrum}
    (row,) = aggregate([run(0, 0.5), run(1, 0.7)], TINY)
    assert row["probe_top1_mean"] == pytest.approx(60.0)
    assert row["probe_top1_std"] == pytest.approx(14.142, abs=1e-3)
    assert row["effective_rank"] == 10.5 and row["collapsed"] == 0.5
    assert row["paper_imagenet_top1"] == 51.5


@pytest.mark.parametrize("args,match", [(["--modes", "byol"], "byol"),
                                        (["--epochs", "0"], "--epochs must be >= 1"),
                                        (["--images", "100"], "fewer than one batch")])
def test_cli_rejects_bad_budgets_before_any_work(tmp_path, args, match):
    proc = subprocess.run([sys.executable, "-m", "directclr", "reproduce", "--out",
                           str(tmp_path), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "data").exists()
