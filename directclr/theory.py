"""The paper's two mechanisms of dimensional collapse, simulated with linear networks (Sections 3
and 4, Figures 3-6), and what they say about a linear projector (Propositions 1 and 2).

The model is the paper's: N clean samples x_i in R^16 (isotropic Gaussian), an augmented view
x_i' = x_i + k * noise on the last 8 coordinates, embeddings z = f(x), and InfoNCE in its kernel
form (Eqn 2), negatives being the other samples:

    L = sum_i  |z_i - z_i'|^2 / 2 + log( sum_{j != i} exp(-|z_i - z_j|^2 / 2)
                                          + exp(-|z_i - z_i'|^2 / 2) )

For one linear layer z = W x, gradient descent is  dW/dt = -dL/dW = W X  (Lemma 2) with

    X = sum_i sum_{j != i} a_ij (x_i - x_j)(x_i - x_j)^T
        - sum_i (1 - a_ii)(x_i' - x_i)(x_i' - x_i)^T

(Eqn 6), a_ij and a_ii being the softmax weights of negative j and of the positive in row i.
Strong augmentation makes X negative on the augmented coordinates, and W's singular values there
vanish (Theorem 1). With two layers z = W2 W1 x even weak augmentation collapses the embedding:
the layers align (V2^T U1 -> I, Theorem 2) and small singular values grow slower (Theorem 3).

Everything runs in float64 on the CPU; training uses the loss averaged over the batch (the sum
divided by N) with plain SGD on a fresh batch per step.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .plot import pyplot

INPUT_DIM = 16
AUG_DIMS = 8  # augmentation acts on the last AUG_DIMS input coordinates


# --------------------------------------------------------------------------- the mathematics
def _logits(z: Tensor, z_aug: Tensor) -> tuple[Tensor, Tensor]:
    """Row i: -|z_i - z_j|^2/2 for the negatives j (-inf at j = i), then -|z_i - z_i'|^2/2;
    and |z_i - z_i'|^2/2."""
    n = len(z)
    if z.shape != z_aug.shape or z.dim() != 2 or n < 2:
        raise ValueError(f"z and z_aug must both be (N >= 2, d), got {tuple(z.shape)} and "
                         f"{tuple(z_aug.shape)}")
    neg_half_sq = torch.cdist(z, z).square() / 2
    pos_half_sq = (z - z_aug).square().sum(1) / 2
    self_pair = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = torch.cat([-neg_half_sq.masked_fill(self_pair, math.inf), -pos_half_sq[:, None]], 1)
    return logits, pos_half_sq


def kernel_infonce(z: Tensor, z_aug: Tensor) -> Tensor:
    """Eqn 2 (summed over the N rows): z (N, d) the samples' embeddings, z_aug their views'."""
    logits, pos_half_sq = _logits(z, z_aug)
    return (pos_half_sq + torch.logsumexp(logits, 1)).sum()


def softmax_weights(z: Tensor, z_aug: Tensor) -> tuple[Tensor, Tensor]:
    """(a, a_pos): a[i, j] the weight of negative j in row i (0 on the diagonal), a_pos[i] that
    of the positive; each row of [a, a_pos] sums to 1."""
    weights = torch.softmax(_logits(z, z_aug)[0], 1)
    return weights[:, :-1], weights[:, -1]


def x_matrix(x: Tensor, x_aug: Tensor, z: Tensor, z_aug: Tensor) -> Tensor:
    """X of Eqn 6 for inputs (x, x_aug) whose embeddings are (z, z_aug)."""
    a, a_pos = softmax_weights(z, z_aug)
    # sum_ij a_ij (x_i - x_j)(x_i - x_j)^T expanded, so no (N, N, D) tensor is formed
    row_mass = a.sum(1)
    col_mass = a.sum(0)
    sigma0 = (x.T * (row_mass + col_mass)) @ x - x.T @ (a + a.T) @ x
    aug = x_aug - x
    sigma1 = (aug.T * (1 - a_pos)) @ aug
    return sigma0 - sigma1


def sample(n: int, amplitude: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """N isotropic Gaussian samples and their views, noise of std `amplitude` on the last
    AUG_DIMS coordinates."""
    x = torch.randn(n, INPUT_DIM, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, AUG_DIMS, generator=gen, dtype=torch.float64) * amplitude
    return x, torch.cat([x[:, :INPUT_DIM - AUG_DIMS], x[:, INPUT_DIM - AUG_DIMS:] + noise], 1)


def alignment_matrix(w1: Tensor, w2: Tensor) -> Tensor:
    """|V2^T U1| for W1 = U1 S1 V1^T, W2 = U2 S2 V2^T, singular values descending: the identity
    when the layers are aligned (Theorem 2)."""
    u1 = torch.linalg.svd(w1)[0]
    v2_t = torch.linalg.svd(w2)[2]  # rows: right singular vectors of W2
    return (v2_t @ u1).abs()


def diagonal_mass(matrix: Tensor, k: int | None = None) -> float:
    """Fraction of the squared Frobenius mass of matrix[:k, :k] on its diagonal (1 = diagonal)."""
    block = matrix[:k, :k] if k is not None else matrix
    return float(block.diagonal().square().sum() / block.square().sum())


def init_with_spectrum(singular_values: Tensor, gen: torch.Generator) -> Tensor:
    """A square matrix with the given singular values and random orthogonal singular vectors."""
    d = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return u @ torch.diag(singular_values) @ v.T


# --------------------------------------------------------------------------- the simulations
@dataclass
class StrongAug:
    """Section 3 / Figures 3-4: one linear layer z = W x, a sweep of augmentation amplitudes."""
    amplitudes: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    steps: int = 1500
    batch: int = 128
    lr: float = 0.1
    init_scale: float = 0.025  # W0 ~ init_scale * N(0, 1): small, as at the start of training
    record_every: int = 10
    eval_batches: int = 32  # X at the end: the mean over this many training-sized batches
    seed: int = 0


def train_strong_aug(cfg: StrongAug, amplitude: float) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    w = (cfg.init_scale * torch.randn(INPUT_DIM, INPUT_DIM, generator=gen,
                                      dtype=torch.float64)).requires_grad_()
    steps, history = [], []
    for step in range(cfg.steps + 1):
        if step % cfg.record_every == 0 or step == cfg.steps:
            steps.append(step)
            history.append(torch.linalg.svdvals(w.detach()).tolist())
        if step == cfg.steps:
            break
        x, x_aug = sample(cfg.batch, amplitude, gen)
        loss = kernel_infonce(x @ w.T, x_aug @ w.T) / cfg.batch
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= cfg.lr * grad
    w = w.detach()
    x_mat = torch.zeros(INPUT_DIM, INPUT_DIM, dtype=torch.float64)
    for _ in range(cfg.eval_batches):
        x, x_aug = sample(cfg.batch, amplitude, gen)
        x_mat += x_matrix(x, x_aug, x @ w.T, x_aug @ w.T) / cfg.eval_batches
    eigenvalues, eigenvectors = torch.linalg.eigh(x_mat)
    return {"amplitude": amplitude, "steps": steps, "singular_values": history,
            "weight": w.tolist(), "x_eigenvalues": eigenvalues.tolist(),
            "x_eigenvectors": eigenvectors.tolist()}


@dataclass
class TwoLayer:
    """Section 4 / Figures 5-6: z = W2 W1 x with weak augmentation. init "spectrum": both layers
    start with singular values init_top * init_ratio**k (distinct, exponentially spaced) and
    random singular vectors; init "gaussian": init_top * N(0, 1/16) entries."""
    amplitude: float = 0.5
    steps: int = 1500
    batch: int = 128
    lr: float = 0.1
    init: str = "spectrum"
    init_top: float = 0.5
    init_ratio: float = 0.85
    record_every: int = 10
    eval_batch: int = 1024
    seed: int = 0


def train_two_layer(cfg: TwoLayer) -> dict:
    if cfg.init not in ("spectrum", "gaussian"):
        raise ValueError(f"init must be 'spectrum' or 'gaussian', got {cfg.init!r}")
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.init == "spectrum":
        spectrum = cfg.init_top * cfg.init_ratio ** torch.arange(INPUT_DIM, dtype=torch.float64)
        w1, w2 = (init_with_spectrum(spectrum, gen) for _ in range(2))
    else:
        w1, w2 = (cfg.init_top / math.sqrt(INPUT_DIM) *
                  torch.randn(INPUT_DIM, INPUT_DIM, generator=gen, dtype=torch.float64)
                  for _ in range(2))
    w1.requires_grad_()
    w2.requires_grad_()
    probe, _ = sample(cfg.eval_batch, cfg.amplitude, gen)
    record = {"steps": [], "w1": [], "w2": [], "embedding": []}
    for step in range(cfg.steps + 1):
        if step % cfg.record_every == 0 or step == cfg.steps:
            with torch.no_grad():
                z = probe @ (w2 @ w1).T
                record["steps"].append(step)
                record["w1"].append(torch.linalg.svdvals(w1).tolist())
                record["w2"].append(torch.linalg.svdvals(w2).tolist())
                record["embedding"].append(
                    torch.linalg.eigvalsh(torch.cov(z.T, correction=0)).flip(0).clamp_min(0)
                    .tolist())
        if step == cfg.steps:
            break
        x, x_aug = sample(cfg.batch, cfg.amplitude, gen)
        loss = kernel_infonce(x @ w1.T @ w2.T, x_aug @ w1.T @ w2.T) / cfg.batch
        grad1, grad2 = torch.autograd.grad(loss, (w1, w2))
        with torch.no_grad():
            w1 -= cfg.lr * grad1
            w2 -= cfg.lr * grad2
    w1, w2 = w1.detach(), w2.detach()
    u1 = torch.linalg.svd(w1)[0]
    u2 = torch.linalg.svd(w2)[0]
    return {**record, "w1_final": w1.tolist(), "w2_final": w2.tolist(),
            "alignment": alignment_matrix(w1, w2).tolist(),
            # the projector W2 in the bases of the backbone's output (U1) and its own (U2)
            "projector_rotated": (u2.T @ w2 @ u1).abs().tolist()}


# --------------------------------------------------------------------------- what they show
VANISHED = 1e-3  # a singular value below this x the largest has vanished
COLLAPSED = 1e-6  # an embedding eigenvalue below this x the largest is collapsed (as Spectrum)
ACTIVE = 1e-2  # embedding directions above this x the largest eigenvalue are the learned ones


def subspace_distance(a: Tensor, b: Tensor) -> float:
    """Spectral norm of the difference of the orthogonal projectors onto span(a) and span(b)
    (columns): 0 for the same subspace, 1 when some direction of one is orthogonal to the
    other."""
    if a.shape[1] != b.shape[1]:
        return 1.0
    return float(torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2))


def summarize_strong_aug(run: dict) -> dict:
    """Theorem 1 at the end of training: W's vanished singular directions against X's negative
    eigenspace (count and subspace)."""
    w = torch.tensor(run["weight"], dtype=torch.float64)
    _, sv, vh = torch.linalg.svd(w)
    vanished = sv < VANISHED * sv[0]
    eigenvalues = torch.tensor(run["x_eigenvalues"], dtype=torch.float64)
    eigenvectors = torch.tensor(run["x_eigenvectors"], dtype=torch.float64)
    negative = eigenvalues < 0
    augmented = torch.eye(INPUT_DIM, dtype=torch.float64)[:, INPUT_DIM - AUG_DIMS:]
    null_space = vh[vanished].T
    return {"amplitude": run["amplitude"], "vanished": int(vanished.sum()),
            "x_negative": int(negative.sum()),
            "subspace_distance_null_w_vs_negative_x": subspace_distance(
                null_space, eigenvectors[:, negative]),
            "subspace_distance_null_w_vs_augmented": subspace_distance(null_space, augmented),
            "final_singular_values": sv.tolist()}


def summarize_two_layer(run: dict) -> dict:
    """Theorems 2 and 3 at the end of training, beside the same measures at initialization."""
    w1 = torch.tensor(run["w1"], dtype=torch.float64)
    embedding = torch.tensor(run["embedding"], dtype=torch.float64)
    final = embedding[-1]
    active = int((final >= ACTIVE * final[0]).sum())
    alignment = torch.tensor(run["alignment"], dtype=torch.float64)
    # log-growth of W1's singular values (sorted, so index k is the k-th largest at both
    # times; they did not cross in these runs) over the first tenth of training
    early = max(1, len(w1) // 10)
    growth = (w1[early] / w1[0]).log()
    half = INPUT_DIM // 2
    rotated = torch.tensor(run["projector_rotated"], dtype=torch.float64)
    w2_sv = torch.linalg.svdvals(torch.tensor(run["w2_final"], dtype=torch.float64))
    return {
        "active_directions": active,
        "alignment_diagonal_active": alignment.diagonal()[:active].tolist(),
        "alignment_diagonal_mass_active": diagonal_mass(alignment, active),
        "w1_log_growth_early": growth.tolist(),
        "w1_log_growth_largest_half": float(growth[:half].mean()),
        "w1_log_growth_smallest_half": float(growth[half:].mean()),
        "embedding_collapsed_init": int((embedding[0] < COLLAPSED * embedding[0][0]).sum()),
        "embedding_collapsed_final": int((final < COLLAPSED * final[0]).sum()),
        "embedding_log10_range_init": float((embedding[0][0] / embedding[0][-1]).log10()),
        "embedding_log10_range_final": float((final[0] / final[-1]).log10()),
        "projector_diagonal_mass_active": diagonal_mass(rotated, active),
        "projector_singular_values": w2_sv.tolist(),
        "projector_rank": int((w2_sv >= ACTIVE ** 0.5 * w2_sv[0]).sum()),
    }


# --------------------------------------------------------------------------- figures and files
def _save(fig, title: str, path: Path) -> None:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)


def _log10(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float64).clamp_min(1e-30).log10()


def plot_strong_aug(runs: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(runs), figsize=(3.2 * len(runs), 5.6), dpi=100,
                             squeeze=False)
    for col, run in enumerate(runs):
        top, bottom = axes[0, col], axes[1, col]
        top.plot(run["steps"], _log10(run["singular_values"]).numpy(), lw=1)
        top.set_title(f"k = {run['amplitude']:g}", fontsize=10)
        top.set_xlabel("iteration")
        eig = torch.tensor(run["x_eigenvalues"])
        bottom.bar(range(1, len(eig) + 1), eig.numpy(),
                   color=["tab:red" if v < 0 else "tab:blue" for v in eig.tolist()])
        bottom.set_yscale("symlog", linthresh=1e-2)
        bottom.set_xlabel("eigenvalue index of X")
    axes[0, 0].set_ylabel("log10 singular values of W")
    axes[1, 0].set_ylabel("eigenvalues of X (end)")
    _save(fig, "one linear layer: strong augmentation (large k) collapses W where X < 0", path)


def plot_implicit_reg(run: dict, summary: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), dpi=100)
    for ax, key, label in zip(axes, ("w1", "w2", "embedding"),
                              ("singular values of W1", "singular values of W2",
                               "eigenvalues of the embedding covariance")):
        ax.plot(run["steps"], _log10(run[key]).numpy(), lw=1)
        ax.set_title(f"log10 {label}", fontsize=9)
        ax.set_xlabel("iteration")
    image = axes[3].imshow(torch.tensor(run["alignment"]).numpy(), vmin=0, vmax=1, cmap="viridis")
    axes[3].set_title(f"|V2ᵀ U1| at the end (diagonal mass of the {summary['active_directions']}"
                      f" learned: {summary['alignment_diagonal_mass_active']:.3f})", fontsize=8)
    fig.colorbar(image, ax=axes[3], fraction=0.046)
    _save(fig, "two linear layers, weak augmentation: layers align, small singular values grow "
          "slower, the embedding collapses", path)


def plot_projector(run: dict, summary: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    image = axes[0].imshow(torch.tensor(run["projector_rotated"]).numpy(), cmap="viridis")
    axes[0].set_title("|U2ᵀ W2 U1|: the projector in the backbone's basis", fontsize=9)
    fig.colorbar(image, ax=axes[0], fraction=0.046)
    index = range(1, INPUT_DIM + 1)
    axes[1].semilogy(index, summary["projector_singular_values"], "o-", label="projector W2")
    axes[1].semilogy(index, run["w1"][-1], "s--", label="backbone W1")
    axes[1].set_xlabel("singular value index")
    axes[1].set_title(f"projector rank {summary['projector_rank']} of {INPUT_DIM} "
                      f"(singular values >= 0.1 x the largest)", fontsize=9)
    axes[1].legend(fontsize=8)
    _save(fig, "a trained linear projector is diagonal (Prop. 1) and low-rank (Prop. 2)", path)


def run_experiment(which: str, out, config: StrongAug | TwoLayer | None = None) -> dict:
    """Runs `strong-aug`, `implicit-reg` or `projector`, writes <which>.json (config, summary,
    raw histories) and <which>.png to `out`, returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if which == "strong-aug":
        config = config or StrongAug()
        runs = [train_strong_aug(config, k) for k in config.amplitudes]
        summary = [summarize_strong_aug(run) for run in runs]
        plot_strong_aug(runs, out / f"{which}.png")
    elif which in ("implicit-reg", "projector"):
        config = config or TwoLayer()
        runs = train_two_layer(config)
        summary = summarize_two_layer(runs)
        plot = plot_implicit_reg if which == "implicit-reg" else plot_projector
        plot(runs, summary, out / f"{which}.png")
    else:
        raise ValueError(f"experiment must be strong-aug, implicit-reg or projector, got {which!r}")
    payload = {"experiment": which, "config": asdict(config), "summary": summary, "runs": runs}
    (out / f"{which}.json").write_text(json.dumps(payload))
    return summary
