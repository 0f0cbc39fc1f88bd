"""--wandb in W&B's offline mode (no network): the rows of metrics.jsonl, the rank figures and
the settings reach the W&B run, and a resume continues the same run."""
import json

import pytest

from directclr.plot import TensorBoardWriter
from tests.helpers import RUN

wandb = pytest.importorskip("wandb")


@pytest.fixture
def logged(monkeypatch, tmp_path):
    """Every Run.log call of this test, with its run's id, passed on to the real (offline) run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    calls = []
    real_log = wandb.sdk.wandb_run.Run.log

    def log(run, data, step=None, **kwargs):
        calls.append((run.id, step, data, dict(run.config)))
        return real_log(run, data, step=step, **kwargs)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    return calls


def test_a_run_and_its_resume_log_the_metrics_rows_to_one_wandb_run(tiny, tmp_path, logged):
    from directclr.cli import main
    out = tmp_path / "run"
    args = ["pretrain", *RUN[4:], "--data", str(tiny), "--arch", "resnet18-w16", "--dim", "22",
            "--out", str(out), "--wandb", "--max-steps", "3"]
    assert main(args) == 0
    assert main([*args[:-1], "6", "--accept-changes", "max-steps"]) == 0  # resumes at step 3

    run_id = (out / "wandb-run-id").read_text().strip()
    assert {call[0] for call in logged} == {run_id}
    assert list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [TensorBoardWriter.scalars(row) for row in rows]
    got = [(step, {key: value for key, value in data.items() if not key.startswith("plots/")})
           for _, step, data, _ in logged]
    assert got == expected and [step for step, _ in got] == [1, 2, 3, 4, 5, 5, 6]
    epoch_end = next(data for _, _, data, _ in logged if "epoch/probe_train_top1" in data)
    assert isinstance(epoch_end["plots/rank"], wandb.Image)
    config = logged[-1][3]
    assert (config["arch"], config["dim"], config["max_steps"]) == ("resnet18-w16", 22, 6)
    # --no-resume starts a new W&B run: the old id moves aside with the old run's files
    assert main([*args[:-1], "1", "--no-resume"]) == 0
    assert (out / "wandb-run-id").read_text().strip() != run_id
    assert [p.read_text().strip() for p in out.glob("previous-*/wandb-run-id")] == [run_id]
