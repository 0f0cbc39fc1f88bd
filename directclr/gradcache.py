"""Gradient caching (Gao et al., 2021): the exact gradient of a contrastive loss over a large
batch with the activation memory of one micro-batch.

1. Embed every micro-batch without a graph (BatchNorm running statistics left untouched).
2. The loss over the whole batch, and its gradient with respect to the embeddings only: the fused
   InfoNCE needs O(N * dim) memory for that, whatever N.
3. Embed each micro-batch again, with a graph, and back-propagate its slice of the cached
   embedding gradient (plus any per-sample auxiliary loss, weighted by its share of the batch).

The parameter gradient is that of the full-batch loss, provided the network treats each
micro-batch as the full batch would treat its rows: true without BatchNorm or in eval mode; in
training mode BatchNorm normalizes each micro-batch by its own statistics (as DDP without
SyncBatchNorm normalizes each device's share), in both passes alike, and its running statistics
move once per micro-batch of the graph pass. The cost is one more forward of the embedding
network. Under DDP, gradients are all-reduced once, after the last micro-batch.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """BatchNorm layers still normalize by batch statistics, but their running statistics come
    back unchanged: the no-graph pass must not count as a step of them."""
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, (mean, var, count) in zip(layers, saved):
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                layer.num_batches_tracked.copy_(count)


def _ddp_of(model: nn.Module):
    return model if isinstance(model, nn.parallel.DistributedDataParallel) else None


def cached_backward(forward: Callable, inputs: Sequence[Tensor], micro_batch: int,
                    loss_fn: Callable[..., Tensor], model: nn.Module):
    """Back-propagates loss_fn(*embeddings of the whole batch) + the batch mean of an auxiliary
    loss into `model`'s parameters, one micro-batch of activations at a time.

    forward(*chunk) -> (embeddings, aux_loss, extras): `chunk` is each of `inputs` cut to the same
    rows; `embeddings` a tuple of (rows, width) tensors the loss takes, concatenated over chunks;
    `aux_loss` a mean over the chunk's rows (or None); `extras` anything else, kept from the
    no-graph pass (e.g. detached features). `model` is the module whose BatchNorm statistics are
    frozen in the no-graph pass; a DistributedDataParallel model skips its all-reduce until the
    last micro-batch. Returns (loss, aux_loss, [extras per chunk]), the losses detached.
    """
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive int, got {micro_batch!r}")
    rows = inputs[0].shape[0]
    if any(x.shape[0] != rows for x in inputs):
        raise ValueError(f"inputs must share their first dimension, got "
                         f"{[tuple(x.shape) for x in inputs]}")
    chunks = list(zip(*(x.split(micro_batch) for x in inputs)))
    with torch.no_grad(), frozen_batchnorm_stats(model):
        cached = [forward(*chunk) for chunk in chunks]
    embeddings = [torch.cat([c[0][k] for c in cached]).detach().requires_grad_()
                  for k in range(len(cached[0][0]))]
    loss = loss_fn(*embeddings)
    loss.backward()  # only the cached embeddings have grad: no parameter is touched
    grads = [e.grad.split(micro_batch) for e in embeddings]
    ddp = _ddp_of(model)
    aux_total = None
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        with contextlib.nullcontext() if last or ddp is None else ddp.no_sync():
            outputs, aux, _ = forward(*chunk)
            tensors = [out.to(g[index].dtype) for out, g in zip(outputs, grads)]
            seeds = [g[index] for g in grads]
            if aux is not None:
                share = chunk[0].shape[0] / rows
                tensors.append(aux)
                seeds.append(torch.tensor(share, dtype=aux.dtype, device=aux.device))
                aux_total = aux.detach() * share + (0 if aux_total is None else aux_total)
            torch.autograd.backward(tensors, seeds)
    return loss.detach(), aux_total, [c[2] for c in cached]


def cached_step(model: nn.Module, view1: Tensor, view2: Tensor,
                loss_fn: Callable[[Tensor, Tensor], Tensor], micro_batch: int) -> Tensor:
    """Fills the .grad of `model`'s parameters with the gradient of loss_fn(model(view1),
    model(view2)) over the whole batch, holding one micro-batch's activations at a time; returns
    the loss (detached). Call optimizer.zero_grad() before and optimizer.step() after, as usual.

        loss = cached_step(encoder, view1, view2, DirectCLRLoss(dim=360), micro_batch=256)
    """
    def forward(first, second):
        return (model(first), model(second)), None, None
    return cached_backward(forward, (view1, view2), micro_batch, loss_fn, model)[0]
