"""Drop-in equivalence with the losses users swap from, run against the real packages (the dev
extras: lightly, open_clip_torch) and a transcription of solo-learn's `simclr_loss_func`:
values and gradients equal within float rounding (docs/dropin.md gives each swap).

    lightly NTXentLoss(temperature=t)           = infonce(dim=None, temperature=t, variant="ntxent")
    lightly DirectCLRLoss(loss_dim=d, temperature=t)
                                                = infonce(dim=d, temperature=t, variant="ntxent")
    open_clip ClipLoss()(u1, u2, logit_scale)   = infonce(u1, u2, dim=None,
                                                          temperature=1 / logit_scale)
    solo-learn simclr_loss_func(cat([z1, z2]), indexes.repeat(2), t)
                                                = infonce(z1, z2, dim=None, temperature=t,
                                                          variant="ntxent")

and, on 2 gloo ranks (tests/workers/lightly_gather.py), lightly's gather_distributed=True and
open_clip's ClipLoss(local_loss=True, gather_with_grad=True) equal ours with gather=True, rank by
rank, values and gradients.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from directclr import DirectCLRLoss, infonce
from tests.helpers import assert_rel_close, run_worker
from tests.workers import lightly_gather

DTYPES = [torch.float64, torch.float32]
# max |ours - theirs| <= REL * max |theirs| + rounding_atol: both sides round differently
# (fused log-sum-exp against materialized logits), nothing else.
REL = {torch.float64: 1e-12, torch.float32: 2e-6}
TEMPERATURES = [0.07, 0.1, 0.5]
SHAPES = [(n, width) for n in (2, 7, 64) for width in (16, 128)]


def rounding_atol(dtype, temperature):
    """A loss is a difference of logits of size 1/temperature, and its gradient one of
    probabilities times 1/temperature: a few of their ulps, absolute. It matters where the
    positives dominate (the loss and its gradient near 0, their relative error amplified)."""
    return 2 * torch.finfo(dtype).eps / temperature


def _accepts(z, **kwargs) -> bool:
    """Whether infonce takes these arguments (a feature probe: any error means no)."""
    try:
        infonce(z, z, **kwargs)
    except Exception:  # noqa: BLE001
        return False
    return True


TENSOR_TEMPERATURE = _accepts(torch.randn(3, 4), dim=4, temperature=torch.tensor(0.1))
FLATTENS = _accepts(torch.randn(3, 2, 2), dim=4)
needs_tensor_temperature = pytest.mark.skipif(
    not TENSOR_TEMPERATURE, reason="needs a tensor temperature (issue 25)")
needs_flattening = pytest.mark.skipif(
    not FLATTENS, reason="needs flattening of >2-D inputs (issue 25)")


@pytest.fixture(scope="module")
def lightly_loss():
    return pytest.importorskip("lightly.loss")


@pytest.fixture(scope="module")
def open_clip_loss():
    return pytest.importorskip("open_clip.loss")


def views(n, width, dtype, seed=0, shape=None):
    """Two correlated views (z2 = z1 + noise, so the positives matter), drawn in float64."""
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, width, generator=gen, dtype=torch.float64)
    z2 = z1 + 1.5 * torch.randn(n, width, generator=gen, dtype=torch.float64)
    return [z.reshape(shape or z.shape).to(dtype) for z in (z1, z2)]


def loss_and_grads(fn, *inputs):
    """fn(*inputs) and its gradients w.r.t. every input (leaves made here)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach(), *(x.grad for x in leaves)]


def assert_same(ours, theirs, dtype, temperature, what):
    """(loss, *grads) of ours against theirs."""
    assert ours[0].dtype == theirs[0].dtype == dtype, what
    atol = rounding_atol(dtype, temperature)  # the gradients' too: rows of norm ~1 or more here
    assert_rel_close(ours[0], theirs[0], REL[dtype], f"{what}: loss", atol)
    for i, (got, ref) in enumerate(zip(ours[1:], theirs[1:])):
        assert got.shape == ref.shape, what
        assert_rel_close(got, ref, REL[dtype], f"{what}: grad {i}", atol)


# --------------------------------------------------------------------------- lightly
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n,width", SHAPES)
def test_lightly_ntxent(lightly_loss, n, width, temperature, dtype):
    z1, z2 = views(n, width, dtype)
    theirs = loss_and_grads(lightly_loss.NTXentLoss(temperature=temperature), z1, z2)
    ours = loss_and_grads(DirectCLRLoss(dim=None, temperature=temperature, variant="ntxent"),
                          z1, z2)
    assert_same(ours, theirs, dtype, temperature, f"NTXentLoss n={n} width={width}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("loss_dim", [5, 64])  # 64: lightly's default (all of width 16)
@pytest.mark.parametrize("n,width", SHAPES)
def test_lightly_directclr(lightly_loss, n, width, loss_dim, temperature, dtype):
    """lightly slices [:, :loss_dim] (the whole row if loss_dim >= width); ours needs a dim <=
    width, so dim = min(loss_dim, width)."""
    z1, z2 = views(n, width, dtype)
    theirs = loss_and_grads(
        lightly_loss.DirectCLRLoss(loss_dim=loss_dim, temperature=temperature), z1, z2)
    ours = loss_and_grads(DirectCLRLoss(dim=min(loss_dim, width), temperature=temperature,
                                        variant="ntxent"), z1, z2)
    assert_same(ours, theirs, dtype, temperature, f"DirectCLRLoss n={n} width={width}")
    assert torch.equal(ours[1][:, loss_dim:], theirs[1][:, loss_dim:])  # zeros past loss_dim


def test_lightly_directclr_defaults_against_ours(lightly_loss):
    """lightly's DirectCLRLoss() is NT-Xent (2N x 2N, self excluded: the same view's other rows
    are negatives too) on 64 coordinates at temperature 0.5; our DirectCLRLoss() is the official
    DirectCLR loss: cross-view (N x N, both directions averaged) on 360 coordinates at 0.1. With
    variant="ntxent", dim=64, temperature=0.5 ours is lightly's. variant="cross" at the same dim
    and temperature differs from it by exactly the mean over the 2N rows of
    log(1 + S_same / S_cross), S_same (S_cross) being the row's sum of exp(logit) over the other
    rows of its own view (over the other view's rows, its positive included)."""
    n, width, dim, temperature = 256, 512, 64, 0.5
    z1, z2 = views(n, width, torch.float64)
    theirs = lightly_loss.DirectCLRLoss()(z1, z2)
    assert math.isclose(theirs.item(), infonce(z1, z2, dim=dim, temperature=temperature,
                                               variant="ntxent").item(), rel_tol=1e-12)
    assert not math.isclose(theirs.item(), DirectCLRLoss()(z1, z2).item(), rel_tol=1e-2)
    cross = infonce(z1, z2, dim=dim, temperature=temperature, variant="cross")
    a, b = (F.normalize(z[:, :dim], dim=1) for z in (z1, z2))
    same = torch.cat([a @ a.T, b @ b.T]) / temperature
    same = same.masked_fill(torch.eye(n, dtype=torch.bool).repeat(2, 1), -math.inf)
    other = torch.cat([a @ b.T, b @ a.T]) / temperature
    gap = (torch.logsumexp(same, 1) - torch.logsumexp(other, 1)).exp().log1p().mean()
    assert math.isclose(theirs.item(), (cross + gap).item(), rel_tol=1e-12)
    assert gap > 0


@needs_flattening
def test_lightly_directclr_flattens_encodings(lightly_loss):
    """lightly flattens (N, C, H, W) encodings before slicing; so does ours."""
    z1, z2 = views(7, 48, torch.float64, shape=(7, 3, 4, 4))
    theirs = loss_and_grads(lightly_loss.DirectCLRLoss(loss_dim=20, temperature=0.1), z1, z2)
    ours = loss_and_grads(DirectCLRLoss(dim=20, temperature=0.1, variant="ntxent"), z1, z2)
    assert_same(ours, theirs, torch.float64, 0.1, "DirectCLRLoss on 4-D encodings")


# --------------------------------------------------------------------------- open_clip
def _unit(x):  # what open_clip's encode_image/encode_text(normalize=True) hand ClipLoss
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n,width", SHAPES)
def test_open_clip_fixed_logit_scale(open_clip_loss, n, width, temperature, dtype):
    """Gradients w.r.t. the features before the caller's normalization (the model's outputs)."""
    x1, x2 = views(n, width, dtype)
    logit_scale = torch.tensor(1.0 / temperature, dtype=dtype)
    loss_fn = open_clip_loss.ClipLoss()
    theirs = loss_and_grads(lambda a, b: loss_fn(_unit(a), _unit(b), logit_scale), x1, x2)
    ours = loss_and_grads(lambda a, b: infonce(_unit(a), _unit(b), dim=None,
                                               temperature=1.0 / logit_scale.item()), x1, x2)
    assert_same(ours, theirs, dtype, temperature, f"ClipLoss n={n} width={width}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_open_clip_gradient_on_unit_features_is_tangential(open_clip_loss, dtype):
    """On the unit features themselves, ours (which normalizes them again) gives the tangential
    part g - u (u . g) of ClipLoss's gradient g: the radial part, which the caller's
    normalization removes anyway, is never propagated. Either way the model's gradient is the
    same (test_open_clip_fixed_logit_scale)."""
    u1, u2 = (_unit(x) for x in views(64, 128, dtype))
    logit_scale = torch.tensor(1 / 0.07, dtype=dtype)
    theirs = loss_and_grads(lambda a, b: open_clip_loss.ClipLoss()(a, b, logit_scale), u1, u2)
    ours = loss_and_grads(lambda a, b: infonce(a, b, dim=None,
                                               temperature=1.0 / logit_scale.item()), u1, u2)
    tangential = [g - u * (u * g).sum(1, keepdim=True) for g, u in zip(theirs[1:], (u1, u2))]
    assert_same(ours, [theirs[0], *tangential], dtype, 0.07, "ClipLoss on unit features")
    assert (theirs[1] - tangential[0]).abs().max() > 10 * (ours[1] - tangential[0]).abs().max()


@needs_tensor_temperature
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n,width", [(2, 16), (7, 128), (64, 128)])
def test_open_clip_learnable_logit_scale(open_clip_loss, n, width, temperature, dtype):
    """open_clip learns log(logit_scale) (model.logit_scale, init log(1/0.07)) and hands ClipLoss
    its exp(); ours takes temperature = 1 / logit_scale, the gradient reaching the parameter
    through it."""
    x1, x2 = views(n, width, dtype)
    log_scale = torch.tensor(math.log(1.0 / temperature), dtype=dtype)
    loss_fn = open_clip_loss.ClipLoss()
    theirs = loss_and_grads(lambda a, b, s: loss_fn(_unit(a), _unit(b), s.exp()),
                            x1, x2, log_scale)
    ours = loss_and_grads(lambda a, b, s: infonce(_unit(a), _unit(b), dim=None,
                                                  temperature=1 / s.exp()),
                          x1, x2, log_scale)
    assert_same(ours, theirs, dtype, temperature, f"ClipLoss learnable scale n={n}")
    assert ours[3].shape == () and ours[3] != 0


# --------------------------------------------------------------------------- solo-learn
def simclr_loss_func(z, indexes, temperature=0.1):
    """solo-learn's `simclr_loss_func` (solo/losses/simclr.py) on one process, transcribed from
    its definition: z holds every view's rows, rows sharing an index are positives of each
    other, all other rows negatives; per row -log(sum_pos / (sum_pos + sum_neg)) of exp(cosine /
    temperature), averaged over the rows. (On several ranks solo-learn first gathers z and
    indexes from every rank and returns this global loss on each.)"""
    z = F.normalize(z, dim=-1)
    similarity = torch.exp(z @ z.T / temperature)
    same = indexes[:, None] == indexes[None, :]
    positive = same & ~torch.eye(len(z), dtype=torch.bool)
    pos = (similarity * positive).sum(1)
    neg = (similarity * ~same).sum(1)
    return -torch.log(pos / (pos + neg)).mean()


def pairs_by_index(z, indexes):
    """solo-learn's rows (any order, every index exactly twice) as ours' z1, z2: the first and
    second row of each index."""
    order = torch.argsort(indexes, stable=True)
    return z[order[0::2]], z[order[1::2]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dim", [None, 9])
@pytest.mark.parametrize("n,width", SHAPES)
def test_solo_learn_simclr(n, width, dim, temperature, dtype):
    """solo-learn's SimCLR: z = torch.cat(out["z"]) (view 1's rows, then view 2's) and
    indexes = indexes.repeat(2), the dataset indexes of the batch's images."""
    z1, z2 = views(n, width, dtype)
    indexes = torch.randperm(1000, generator=torch.Generator().manual_seed(n))[:n].repeat(2)
    theirs = loss_and_grads(
        lambda a, b: simclr_loss_func(torch.cat([a, b])[:, :dim], indexes, temperature), z1, z2)
    ours = loss_and_grads(lambda a, b: infonce(a, b, dim=dim, temperature=temperature,
                                               variant="ntxent"), z1, z2)
    assert_same(ours, theirs, dtype, temperature, f"simclr_loss_func n={n} dim={dim}")


def test_solo_learn_rows_in_any_order():
    """Its positives come from the indexes, not the row order: pairs_by_index recovers ours'."""
    n, temperature = 7, 0.1
    z1, z2 = views(n, 16, torch.float64)
    ids = torch.tensor([40, 3, 17, 8, 91, 5, 66])
    shuffle = torch.randperm(2 * n, generator=torch.Generator().manual_seed(1))
    z, indexes = torch.cat([z1, z2])[shuffle], ids.repeat(2)[shuffle]
    a, b = pairs_by_index(z, indexes)
    theirs = simclr_loss_func(z, indexes, temperature)
    ours = infonce(a, b, dim=None, temperature=temperature, variant="ntxent")
    assert math.isclose(ours.item(), theirs.item(), rel_tol=1e-12)
    assert math.isclose(ours.item(), infonce(z1, z2, dim=None, temperature=temperature,
                                             variant="ntxent").item(), rel_tol=1e-12)


# --------------------------------------------------------------------------- 2 gloo ranks
WORLD = 2


@pytest.fixture(scope="module")
def ranks(lightly_loss, open_clip_loss, tmp_path_factory):
    """Both ranks' results of one 2-rank run of every case (tests/workers/lightly_gather.py)."""
    out = tmp_path_factory.mktemp("lightly_gather")
    run_worker("lightly_gather", out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _cases(ranks, prefix, count):
    """(name, rank, dtype, temperature, ours, theirs) of the `count` cases named prefix/..."""
    names = [name for name in ranks[0] if name.startswith(prefix + "/")]
    assert len(names) == count, names
    for name in names:
        _, dtype_name, temperature = name.split("/")
        dtype = lightly_gather.DTYPES[dtype_name]
        for rank, results in enumerate(ranks):
            ours, theirs = results[name]["ours"], results[name]["theirs"]
            assert "error" not in theirs, theirs["error"]
            yield name, rank, dtype, float(temperature), ours, theirs


def _triple(result):
    return [result["loss"], result["g1"], result["g2"]]


# (case, how many: 2 dtypes x its temperatures)
@pytest.mark.parametrize("case,count", [("lightly-ntxent", 6), ("lightly-directclr", 2),
                                        ("clip-local", 6)])
def test_gathered_losses_match_ours_rank_by_rank(ranks, case, count):
    """lightly's gather_distributed=True and ClipLoss(local_loss=True, gather_with_grad=True) are
    ours with gather=True: each rank's value is the mean over its own pairs in the global batch
    (the mean over ranks is the global loss) and its gradient that of the sum of all ranks'
    values, so DDP's average is the global gradient."""
    for name, rank, dtype, temperature, ours, theirs in _cases(ranks, case, count):
        assert_same(_triple(ours), _triple(theirs), dtype, temperature, f"{name} rank {rank}")


def test_lightly_gathered_loss_is_the_global_batch(ranks, lightly_loss):
    """lightly's semantics pinned on its own: the mean over ranks of its values is NTXentLoss of
    the global batch in one process, each rank's gradient WORLD x that loss's on its rows."""
    for temperature in lightly_gather.TEMPERATURES:
        name = f"lightly-ntxent/fp64/{temperature}"
        z1, z2 = lightly_gather.global_views(WORLD)
        loss, g1, g2 = loss_and_grads(lightly_loss.NTXentLoss(temperature=temperature), z1, z2)
        got = [results[name]["theirs"] for results in ranks]
        assert_rel_close(torch.stack([r["loss"] for r in got]).mean(), loss, 1e-12, name)
        rows = lightly_gather.ROWS
        for rank, r in enumerate(got):
            own = slice(rank * rows, (rank + 1) * rows)
            assert_rel_close(r["g1"], WORLD * g1[own], 1e-12, f"{name} rank {rank} grad z1")
            assert_rel_close(r["g2"], WORLD * g2[own], 1e-12, f"{name} rank {rank} grad z2")


def test_open_clip_default_gather_is_global_loss_on_local_rows(ranks):
    """ClipLoss(rank, world_size) with its defaults (local_loss=False, gather_with_grad=False):
    every rank returns the global loss (= the mean over ranks of ours) and gradients that reach
    only its own rows' direct terms: ours / WORLD, so DDP's average is 1/WORLD of the global
    gradient (open_clip recommends --gather-with-grad --local-loss, i.e. ours)."""
    for temperature in lightly_gather.TEMPERATURES:
        for dtype_name, dtype in lightly_gather.DTYPES.items():
            name = f"clip-default/{dtype_name}/{temperature}"
            ours = [results[name]["ours"] for results in ranks]
            global_loss = torch.stack([r["loss"] for r in ours]).mean()
            for rank, results in enumerate(ranks):
                theirs = results[name]["theirs"]
                assert "error" not in theirs, theirs["error"]
                assert_same([global_loss, ours[rank]["g1"] / WORLD, ours[rank]["g2"] / WORLD],
                            _triple(theirs), dtype, temperature, f"{name} rank {rank}")
