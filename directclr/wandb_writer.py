"""`--wandb`: the rows of metrics.jsonl to a Weights & Biases run (rank 0 only).

Step rows become train/<key>, epoch rows epoch/<key> (the spectra's effective ranks, collapsed
dimensions, probe accuracy: the tags TensorBoard gets), and at each epoch end the run's rank and
spectra figures (those of `directclr plot`) as images. The resolved settings are the W&B run's
config. The W&B run id is kept in <out>/wandb-run-id, so a resumed run continues the same W&B
run; its steps after the checkpoint, logged again, are dropped by W&B, which keeps the first
ones (the same values: a resume is exact). Project, entity and offline mode are W&B's own
environment variables (WANDB_PROJECT, default "directclr"; WANDB_ENTITY; WANDB_MODE=offline).
"""
from __future__ import annotations

import os
import uuid
from dataclasses import asdict
from pathlib import Path

from .config import Config
from .files import atomic_write, write_bytes_durably
from .plot import TensorBoardWriter, build_figures, load_metrics, pyplot

RUN_ID_FILE = "wandb-run-id"
DEFAULT_PROJECT = "directclr"
FIGURES = ("rank.png", "spectra.png")  # of build_figures: the ones an epoch end changes


class WandbWriter:
    def __init__(self, out: Path, cfg: Config):
        import wandb  # train.check_config has checked that it imports
        self.out, self.wandb = out, wandb
        id_file = out / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B's ids: letters and digits
            atomic_write(id_file, lambda tmp: write_bytes_durably(tmp, run_id.encode()))
        try:  # W&B's own errors (login, network) are of its own types
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
                                  name=out.resolve().name, id=run_id, resume="allow", dir=out,
                                  config=asdict(cfg))
        except Exception as err:
            raise ValueError(f"--wandb: W&B could not start its run ({err})") from err

    def write(self, row: dict) -> None:
        """One metrics row; an epoch row once metrics.jsonl holds it (its figures read it)."""
        step, tags = TensorBoardWriter.scalars(row)
        if "epoch_end" in row:
            figures = build_figures(load_metrics(self.out), self.out.resolve().name)
            tags.update({f"plots/{name.removesuffix('.png')}": self.wandb.Image(figure)
                         for name, figure in figures.items() if name in FIGURES})
            for figure in figures.values():
                pyplot().close(figure)
        self.run.log(tags, step=step)

    def close(self) -> None:
        self.run.finish()
