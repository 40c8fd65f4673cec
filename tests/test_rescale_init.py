"""LRsI (RescaleInitPass) on real data: what it changes, what it keeps, what it measurably does.

Setting: fxsparse.nets:resnet8 on scikit-learn's digits, a 95% random ERK mask, the tost
recipe's LRsI options with 30 iterations (the trainer's CPU cap), three seeds. What is asserted
is what held in every measurement recorded in docs/recipes.md (LRsI section): the loss after one
plain SGD step of lr 0.01 on a held-out batch is lower with LRsI. At lr 0.1 it was *higher* in
every digits measurement, so that is documented, not asserted.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import fxsparse
import fxsparse.masks
from fxsparse import data, nets
from fxsparse.pass_infra import tagged_nodes
from fxsparse.passes.mask import masked_parameters

SEEDS = (0, 1, 2)
ITERS = 30


@pytest.fixture(scope="module")
def pairs():
    """Per seed: the masked network without and with LRsI (same init, same mask), and a batch
    LRsI never saw."""
    splits = data.load("digits")
    out = []
    for seed in SEEDS:
        train, _, _ = splits.loaders(64, crop_padding=1, seed=seed)
        train.set_epoch(0)
        batches = list(itertools.islice(train, 9))
        torch.manual_seed(seed)
        model = nets.resnet8(in_chans=1)
        masks = fxsparse.masks.compute(model, "random", 0.95, "erk", seed=seed)
        base = fxsparse.transform(model, "baseline", masks=masks)
        recipe = fxsparse.load_recipe("lrsi", overrides={"rescale.iters": ITERS})
        lrsi = fxsparse.transform(model, recipe, masks=masks, data=batches[:8])
        out.append((seed, base, lrsi, batches[8]))
    return out


def _loss_after_sgd_step(gm, x, y, lr: float) -> tuple[float, float]:
    """(loss before, loss after) one plain SGD step of size ``lr`` on the batch (x, y)."""
    gm = copy.deepcopy(gm).train()
    params = [p for p in gm.parameters() if p.requires_grad]
    before = F.cross_entropy(gm(x), y)
    grads = torch.autograd.grad(before, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
        return before.item(), F.cross_entropy(gm(x), y).item()


def test_lrsi_rescales_every_layer_and_keeps_every_zero(pairs):
    for seed, base, lrsi, _ in pairs:
        masks = masked_parameters(lrsi)
        assert masks.keys() == masked_parameters(base).keys() and len(masks) == 8
        pb, pl = dict(base.named_parameters()), dict(lrsi.named_parameters())
        for name, mask in masks.items():
            w0, w1 = pb[name].detach(), pl[name].detach()
            ratio = (w1.norm() / w0.norm()).item()
            assert abs(ratio - 1) > 1e-3, (seed, name, ratio)  # the layer's norm moved
            assert torch.allclose(w1, ratio * w0, rtol=1e-5, atol=1e-7), (seed, name)  # by one scalar
            # a rescale keeps zeros zero: the effective (masked) weights have the same zeros
            assert torch.equal((w0 * mask) == 0, (w1 * mask) == 0), (seed, name)
            assert int((w1 == 0).sum()) == int((w0 == 0).sum())
        for (n, b0), (_, b1) in zip(base.named_buffers(), lrsi.named_buffers()):
            assert torch.equal(b0, b1), n  # running statistics are put back after the search
        assert not tagged_nodes(lrsi, group="rescale")  # folded in: nothing left to remove
        assert fxsparse.graph.same_structure(base, lrsi)


def test_lrsi_lowers_the_loss_after_one_sgd_step(pairs):
    for seed, base, lrsi, (x, y) in pairs:
        before_base, after_base = _loss_after_sgd_step(base, x, y, lr=0.01)
        before_lrsi, after_lrsi = _loss_after_sgd_step(lrsi, x, y, lr=0.01)
        assert before_lrsi < before_base, seed
        assert after_lrsi < after_base, (seed, after_lrsi, after_base)
