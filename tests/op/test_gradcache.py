"""Gradient caching: the full-batch gradient with one micro-batch's activations at a time."""
import copy

import pytest
import torch

from directclr import DirectCLRLoss, cached_step, infonce
from directclr.gradcache import cached_backward
from tests.helpers import assert_rel_close, run_worker
from tests.workers.gradcache_models import N, build_net, make_batch


def _grads(net):
    return [p.grad.clone() for p in net.parameters()]


def _full_batch(net, view1, view2, loss_fn):
    net.zero_grad()
    loss = loss_fn(net(view1), net(view2))
    loss.backward()
    return loss.detach(), _grads(net)


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
@pytest.mark.parametrize("micro_batch", [1, 5, 12])
def test_cached_gradient_equals_the_full_batch_gradient(variant, micro_batch):
    view1, view2 = make_batch()
    loss_fn = DirectCLRLoss(dim=12, variant=variant)
    net = build_net(batchnorm=False)
    full_loss, full = _full_batch(net, view1, view2, loss_fn)
    net.zero_grad()
    loss = cached_step(net, view1, view2, loss_fn, micro_batch)
    assert loss == pytest.approx(full_loss.item(), rel=1e-6)
    for got, want in zip(_grads(net), full):
        assert_rel_close(got, want, 1e-5, f"{variant} micro-batch {micro_batch}")


def test_with_batchnorm_each_micro_batch_is_normalized_alone_and_stats_move_once_per_chunk():
    """The reference: every micro-batch through the network (with a graph) on its own, the loss
    on the concatenated embeddings; its BatchNorm running statistics moved once per chunk and
    view, in the same order."""
    view1, view2 = make_batch()
    loss_fn = DirectCLRLoss(dim=12)
    net = build_net(batchnorm=True)
    reference = copy.deepcopy(net)
    reference.zero_grad()
    pairs = [(reference(first), reference(second))  # in cached_step's order, for the stats
             for first, second in zip(view1.split(4), view2.split(4))]
    loss_fn(*(torch.cat(views) for views in zip(*pairs))).backward()
    net.zero_grad()
    cached_step(net, view1, view2, loss_fn, micro_batch=4)
    for got, want in zip(_grads(net), _grads(reference)):
        assert_rel_close(got, want, 1e-5, "batchnorm")
    bn, bn_ref = net[1], reference[1]
    assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == 6
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    whole = build_net(batchnorm=True)  # the full batch at once normalizes differently
    _, whole_grads = _full_batch(whole, view1, view2, loss_fn)
    assert max((a - b).abs().max() for a, b in zip(_grads(net), whole_grads)) > 1e-4


def test_auxiliary_loss_and_extras():
    """A per-sample auxiliary loss (the online probe's) adds its batch mean; extras come from the
    no-graph pass."""
    view1, view2 = make_batch()
    net = build_net(batchnorm=False)
    head = torch.nn.Linear(16, 3)
    labels = torch.arange(N) % 3

    def forward(first, second, targets):
        z1, z2 = net(first), net(second)
        aux = torch.nn.functional.cross_entropy(head(z1.detach()), targets)
        return (z1, z2), aux, z1.detach()

    def loss_fn(z1, z2):
        return infonce(z1, z2, dim=12)

    everything = torch.nn.ModuleList([net, head])
    everything.zero_grad()
    z1, z2 = net(view1), net(view2)
    aux = torch.nn.functional.cross_entropy(head(z1.detach()), labels)
    (loss_fn(z1, z2) + aux).backward()
    want = _grads(everything)
    everything.zero_grad()
    loss, aux_total, extras = cached_backward(forward, (view1, view2, labels), 5, loss_fn,
                                              everything)
    assert aux_total.item() == pytest.approx(aux.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat(extras), z1.detach())
    for got, ref in zip(_grads(everything), want):
        assert_rel_close(got, ref, 1e-5, "with the probe")


def test_bad_arguments():
    net = build_net(batchnorm=False)
    view1, view2 = make_batch()
    with pytest.raises(ValueError, match="micro_batch must be a positive int"):
        cached_step(net, view1, view2, DirectCLRLoss(dim=12), 0)
    with pytest.raises(ValueError, match="inputs must share their first dimension"):
        cached_step(net, view1, view2[:5], DirectCLRLoss(dim=12), 4)


def test_two_ranks_equal_one_process_and_all_reduce_once(tmp_path):
    """2 gloo ranks x 6 rows, micro-batches of 3: the full 12-row gradient, with one all-reduce
    per gradient bucket per step (not one per micro-batch)."""
    out = tmp_path / "ranks.pt"
    run_worker("gradcache", "--out", out)
    results = torch.load(out, weights_only=True)
    view1, view2 = make_batch()
    for variant in ("cross", "ntxent"):
        net = build_net(batchnorm=False)
        _, full = _full_batch(net, view1, view2, DirectCLRLoss(dim=12, variant=variant))
        for got, want in zip(results[variant]["grads"], full):
            assert_rel_close(got, want, 1e-5, f"2 ranks {variant}")
        assert results[variant]["allreduce_calls"] == 1  # one bucket: the whole small net
