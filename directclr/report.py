"""The spectrum of a trained backbone's embeddings over a dataset: JSON and a log-spectrum plot."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .probe import _split, _transforms, load_backbone
from .spectrum import Spectrum, SpectrumAccumulator


@torch.no_grad()
def dataset_spectrum(checkpoint, data, *, arch: str, image_size: int = 224,
                     subvector: int | None = None, normalize: bool = True,
                     batch_size: int = 256, limit: int | None = None, device: str = "cpu",
                     progress: bool = True) -> Spectrum:
    """Embeds every image of the ImageFolder `data` (validation transform) with the frozen
    backbone and returns the spectrum of r (or r[:, :subvector]); rows L2-normalized by default,
    as the official spectrum script does."""
    backbone, width = load_backbone(checkpoint, arch, image_size <= 64)
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
    """spectrum.json (summary + eigenvalues) and spectrum.png (log eigenvalues by rank)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "spectrum.json", out / "spectrum.png"
    payload = {"label": label, **spectrum.summary(),
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
    ax.set_title(f"{label}: effective rank {spectrum.effective_rank:.1f}, "
                 f"{spectrum.collapsed()} collapsed", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return json_path, png_path
