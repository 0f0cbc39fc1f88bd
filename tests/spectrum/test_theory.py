"""The paper's mathematics (Sections 3-4), checked on the linear-network simulations."""
import json
import subprocess
import sys

import pytest
import torch

from directclr.theory import (
    AUG_DIMS,
    INPUT_DIM,
    StrongAug,
    TwoLayer,
    diagonal_mass,
    kernel_infonce,
    sample,
    softmax_weights,
    summarize_strong_aug,
    summarize_two_layer,
    train_strong_aug,
    train_two_layer,
    x_matrix,
)


@pytest.mark.parametrize("seed,scale,amplitude", [(0, 0.1, 0.5), (1, 0.5, 2.0), (2, 1.0, 1.0)])
def test_lemma2_gradient_is_minus_w_times_x(seed, scale, amplitude):
    """dL/dW from autograd equals -W X with X of Eqn 6, so gradient flow is dW/dt = W X."""
    gen = torch.Generator().manual_seed(seed)
    x, x_aug = sample(48, amplitude, gen)
    w = (scale * torch.randn(INPUT_DIM, INPUT_DIM, generator=gen, dtype=torch.float64))
    w.requires_grad_()
    (grad,) = torch.autograd.grad(kernel_infonce(x @ w.T, x_aug @ w.T), w)
    w = w.detach()
    closed_form = -w @ x_matrix(x, x_aug, x @ w.T, x_aug @ w.T)
    assert (grad - closed_form).norm() <= 1e-6 * grad.norm(), (grad - closed_form).norm()


def test_x_matrix_equals_the_explicit_double_sum():
    gen = torch.Generator().manual_seed(3)
    x, x_aug = sample(12, 1.5, gen)
    w = 0.4 * torch.randn(INPUT_DIM, INPUT_DIM, generator=gen, dtype=torch.float64)
    z, z_aug = x @ w.T, x_aug @ w.T
    a, a_pos = softmax_weights(z, z_aug)
    assert torch.allclose(a.sum(1) + a_pos, torch.ones(12, dtype=torch.float64))
    expected = torch.zeros(INPUT_DIM, INPUT_DIM, dtype=torch.float64)
    for i in range(12):
        for j in range(12):
            if j != i:
                expected += a[i, j] * torch.outer(x[i] - x[j], x[i] - x[j])
        expected -= (1 - a_pos[i]) * torch.outer(x_aug[i] - x[i], x_aug[i] - x[i])
    assert torch.allclose(x_matrix(x, x_aug, z, z_aug), expected, rtol=1e-12, atol=1e-12)


def test_theorem1_strong_augmentation_collapses_w_exactly_where_x_is_negative():
    cfg = StrongAug(amplitudes=[0.5, 2.0], steps=600)
    weak, strong = (summarize_strong_aug(train_strong_aug(cfg, k)) for k in cfg.amplitudes)
    assert weak["vanished"] == 0, weak
    # the augmented coordinates, and only they, vanish: count and subspace
    assert strong["vanished"] == strong["x_negative"] == AUG_DIMS, strong
    assert strong["subspace_distance_null_w_vs_negative_x"] < 0.2, strong
    assert strong["subspace_distance_null_w_vs_augmented"] < 0.05, strong


@pytest.fixture(scope="module")
def two_layer():
    cfg = TwoLayer(steps=600)
    return train_two_layer(cfg), train_two_layer(TwoLayer(steps=0))


def test_theorem2_the_layers_align(two_layer):
    """Measure: the fraction of |V2^T U1|'s squared mass on the diagonal, over the directions
    the embedding learned (eigenvalue >= 1e-2 x the largest); random at initialization."""
    trained, init = two_layer
    summary = summarize_two_layer(trained)
    active = summary["active_directions"]
    assert active >= 4, summary
    assert summary["alignment_diagonal_mass_active"] > 0.98, summary
    init_mass = diagonal_mass(torch.tensor(init["alignment"]), active)
    assert init_mass < 0.5, init_mass


def test_theorem3_small_singular_values_grow_slower_and_the_tail_collapses(two_layer):
    summary = summarize_two_layer(two_layer[0])
    largest, smallest = (summary["w1_log_growth_largest_half"],
                         summary["w1_log_growth_smallest_half"])
    assert largest > 2 * max(smallest, 0.05), (largest, smallest)
    assert summary["embedding_collapsed_init"] == 0
    assert summary["embedding_collapsed_final"] >= 1, summary
    assert summary["embedding_log10_range_final"] > summary["embedding_log10_range_init"] + 2


def test_propositions_a_trained_linear_projector_is_diagonal_and_low_rank(two_layer):
    summary = summarize_two_layer(two_layer[0])
    assert summary["projector_diagonal_mass_active"] > 0.98, summary
    assert summary["projector_rank"] <= INPUT_DIM // 2, summary


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="z and z_aug"):
        kernel_infonce(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="init"):
        train_two_layer(TwoLayer(init="orthogonal", steps=1))


def test_cli_writes_json_and_png(tmp_path):
    printed = {}
    for experiment, extra in (("strong-aug", ["--amplitudes", "0.5", "2"]),
                              ("projector", ["--init", "gaussian"])):
        proc = subprocess.run([sys.executable, "-m", "directclr", "theory", experiment,
                               "--out", str(tmp_path), "--steps", "20", *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        payload = json.loads((tmp_path / f"{experiment}.json").read_text())
        assert payload["config"]["steps"] == 20
        # a summary a reader can take in: a line per record, the long lists left to the JSON
        printed[experiment] = proc.stdout.strip().splitlines()
        assert len(printed[experiment]) <= 8 and f"{experiment}.json" in printed[experiment][-1]
        assert (tmp_path / f"{experiment}.png").stat().st_size > 10_000
    proc = subprocess.run([sys.executable, "-m", "directclr", "theory", "strong-aug", "--out",
                           str(tmp_path), "--init", "gaussian"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--init does not apply to strong-aug" in proc.stderr
    rows = json.loads((tmp_path / "strong-aug.json").read_text())["summary"]
    assert [row["amplitude"] for row in rows] == [0.5, 2.0]
    assert [line.split(", x_negative")[0] for line in printed["strong-aug"][:-1]] == [
        f"amplitude {row['amplitude']:.4g}, vanished {row['vanished']}" for row in rows]
