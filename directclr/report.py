"""The spectrum of a trained backbone's embeddings over a dataset: JSON and a log-spectrum plot."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .probe import _split, _transforms, default_image_size, load_backbone
from .spectrum import Spectrum, SpectrumAccumulator

log = logging.getLogger("directclr.report")


@torch.no_grad()
def dataset_spectrum(checkpoint, data, *, arch: str | None = None, image_size: int | None = None,
                     subvector: int | None = None, normalize: bool = True,
                     batch_size: int = 256, limit: int | None = None, device: str = "cpu",
                     progress: bool = True) -> Spectrum:
    """Embeds every image of the ImageFolder `data` (validation transform, at the size the
    backbone was trained at unless `image_size` says otherwise) with the frozen backbone and
    returns the spectrum of r (or r[:, :subvector]); rows L2-normalized by default, as the
    official spectrum script does. `arch` only for a backbone.pt that does not describe itself."""
    backbone, description = load_backbone(checkpoint, arch)
    width = description["width"]
    image_size = image_size or default_image_size(description)
    if subvector is not None and not 1 <= subvector <= width:
        raise ValueError(f"--subvector {subvector} must be in [1, {width}]")
    backbone = backbone.to(device)
    dataset, _ = _split(Path(data), _transforms(image_size)[1], limit, seed=0)
    acc = SpectrumAccumulator(subvector or width, normalize=normalize)
    from tqdm import tqdm
    for images, _ in tqdm(DataLoader(dataset, batch_size=batch_size), desc="embed",
                          disable=not progress):
        rep = backbone(images.to(device)).float()
        acc.update(rep[:, :subvector] if subvector else rep)
    return acc.result()


def write_report(spectrum: Spectrum, out, label: str) -> tuple[Path, Path]:
    """spectrum.json (summary + eigenvalues) and spectrum.png (log eigenvalues by rank). With
    no more rows than dimensions the sample-size bound (rank <= N - 1) is logged as a warning,
    stored as "sample_size_warning" and marked on the plot."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "spectrum.json", out / "spectrum.png"
    note = spectrum.sample_size_note
    if note:
        log.warning("%s: %s", label, note)
    payload = {"label": label, **spectrum.summary(), "sample_size_warning": note,
               "eigenvalues": spectrum.eigenvalues.tolist()}
    json_path.write_text(json.dumps(payload))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    eig = spectrum.eigenvalues.clamp_min(1e-30)  # log of exact zeros: pinned at the floor
    ax.plot(range(1, len(eig) + 1), eig.log10().numpy(), lw=1.5)
    ax.set_xlabel("singular value rank")
    ax.set_ylabel("log10 eigenvalue of covariance")
    title = (f"{label}: effective rank {spectrum.effective_rank:.1f}, "
             f"{spectrum.collapsed()} collapsed")
    if note:
        ax.axvline(spectrum.rank_bound + 0.5, color="tab:red", ls="--", lw=1,
                   label=f"N - 1 = {spectrum.rank_bound}: rank bound of {spectrum.n} rows")
        ax.legend(fontsize=7, loc="lower left")
        title += f"\n({len(eig) - spectrum.rank_bound} of them by the sample size alone)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return json_path, png_path
