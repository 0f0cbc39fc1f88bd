"""The spectrum of a trained backbone's embeddings over a dataset: JSON and a log-spectrum plot."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .files import atomic_write
from .probe import default_image_size, load_backbone, load_split, probe_transforms
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
    dataset, _ = load_split(Path(data), probe_transforms(image_size)[1], limit, seed=0)
    acc = SpectrumAccumulator(subvector or width, normalize=normalize)
    from tqdm import tqdm
    for images, _ in tqdm(DataLoader(dataset, batch_size=batch_size), desc="embed",
                          disable=not progress):
        rep = backbone(images.to(device)).float()
        acc.update(rep[:, :subvector] if subvector else rep)
    return acc.result()


def spectrum_figure(spectrum: Spectrum, label: str, rel: float = 1e-6):
    """The log-spectrum plot (a matplotlib Figure; the caller saves and closes it): the positive
    eigenvalues by rank on a log axis, how many are exactly zero (not drawable there) noted, the
    collapse threshold ``rel`` x the largest that ``Spectrum.collapsed`` counts against as a
    dashed line, and with no more rows than dimensions the sample-size bound N - 1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    eig = spectrum.eigenvalues.double().cpu()
    dim = eig.numel()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120, layout="constrained")
    ranks = torch.arange(1, dim + 1)
    positive = eig > 0
    top = eig[0].item() if dim else 0.0
    if top > 0:
        ax.plot(ranks[positive].numpy(), eig[positive].numpy(), lw=1.5, color="tab:blue",
                label="eigenvalues > 0")
    ax.set_yscale("log")
    ax.set_xlim(0, dim + 1)
    ax.set_xlabel("singular value rank")
    ax.set_ylabel("eigenvalue of covariance (log scale)")
    collapsed = spectrum.collapsed(rel)
    if top > 0:
        ax.axhline(rel * top, color="tab:gray", ls="--", lw=1,
                   label=f"collapse threshold: {rel:g} x the largest = {rel * top:.2g} "
                         f"({collapsed} below)")
    zeros = dim - int(positive.sum().item())
    if top <= 0:
        note = f"all {dim} eigenvalues are 0 (constant embeddings): nothing to draw on a log axis"
        from matplotlib.ticker import NullLocator
        ax.yaxis.set_major_locator(NullLocator())
        ax.yaxis.set_minor_locator(NullLocator())
        ax.text(0.5, 0.5, "no eigenvalue above 0", transform=ax.transAxes, ha="center",
                va="center", fontsize=9, color="gray")
    elif zeros:
        note = (f"{zeros} of {dim} eigenvalues are exactly 0 (round-off below 0 is clamped to "
                f"0): not drawn on the log axis, counted as collapsed")
    else:
        note = f"no eigenvalue is exactly 0: all {dim} drawn"
    ax.text(0.5, -0.2, note, transform=ax.transAxes, ha="center", va="top", fontsize=7,
            wrap=True)
    title = (f"{label}: effective rank {spectrum.effective_rank:.1f}, "
             f"{collapsed} of {dim} collapsed")
    if spectrum.sample_size_note:
        ax.axvline(spectrum.rank_bound + 0.5, color="tab:red", ls=":", lw=1,
                   label=f"N - 1 = {spectrum.rank_bound}: rank bound of {spectrum.n} rows")
        title += f"\n({dim - spectrum.rank_bound} of them by the sample size alone)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    return fig


def write_report(spectrum: Spectrum, out, label: str, rel: float = 1e-6) -> tuple[Path, Path]:
    """spectrum.json (summary + eigenvalues) and spectrum.png (``spectrum_figure``). With no
    more rows than dimensions the sample-size bound (rank <= N - 1) is logged as a warning,
    stored as "sample_size_warning" and marked on the plot. `rel`: the collapse threshold,
    relative to the largest eigenvalue."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "spectrum.json", out / "spectrum.png"
    note = spectrum.sample_size_note
    if note:
        log.warning("%s: %s", label, note)
    payload = {"label": label, **spectrum.summary(rel), "sample_size_warning": note,
               "eigenvalues": spectrum.eigenvalues.tolist()}
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(payload)))
    import matplotlib.pyplot as plt
    fig = spectrum_figure(spectrum, label, rel)
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return json_path, png_path
