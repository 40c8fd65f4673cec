"""One-shot saliency scores, as in ToST's ``pruning_techniques/pruning_utils.py``.

Higher score = more important = kept. With ``L_b`` the loss of batch ``b`` (the loss function's own
reduction, cross-entropy mean by default) and ``w`` a weight:

* ``random``    uniform random numbers (seeded); ToST draws ``randn``: same ranking distribution.
* ``magnitude`` ``|w|`` (ToST's ``Mag``).
* ``taylor``    ``|(sum_b dL_b/dw) * w|`` (ToST's ``Taylor1ScorerAbs``: gradients accumulate over
                every batch before the product).
* ``snip``      ``|sum_b dL_b/dm|`` at ``m = 1`` for ``w * m``, i.e. ``|(sum_b dL_b/dw) * w|``, divided
                by its sum over all masked weights (ToST's ``SNIP``, after Lee et al. 2019).
* ``grasp``     ``(H g) * w`` with ``g = sum_b dL_b/dw`` and ``H g = sum_b d(g_stop . dL_b/dw)/dw``,
                logits divided by the temperature 200, divided by ``|sum of all scores| + 1e-10``
                (ToST's ``GraSP``, after Wang et al. 2020). The sign is kept: the *lowest* ``(H g) * w``
                are pruned, which is GraSP's "remove the top of ``-w * (H g)``".
* ``synflow``   one round of SynFlow (see ``synflow.py``).

Data-based scores run the model in train mode (ToST's ``prune_loop(..., train_mode=True)``) on a
deep copy; ``train_mode=False`` scores in eval mode.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..autograd import twice_differentiable
from ..errors import MaskError
from . import _model

__all__ = ["random_scores", "magnitude_scores", "taylor_scores", "snip_scores", "grasp_scores"]

LossFn = Callable[[Any, Any], torch.Tensor]


def random_scores(model: nn.Module, names: Sequence[str], *, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        w = model.get_parameter(n)
        out[n] = torch.rand(w.shape, generator=gen).to(w.device)
    return out


def magnitude_scores(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {n: model.get_parameter(n).detach().abs() for n in names}


def summed_gradients(
    model: nn.Module, names: Sequence[str], data: Iterable, loss_fn: LossFn | None, *, seed: int = 0,
    train_mode: bool = True, method: str = "taylor",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(sum over batches of dL_b/dw, w) for each named weight, on a scoring copy of ``model``."""
    batches = _model.as_batches(data, method)
    # the first batch's gradients become the sum's storage, and the scores are made in place in it:
    # on a large model each copy of the weights' size counts (ViT-H/14: 2.5 GB)
    total: dict[str, torch.Tensor] = {}
    owned: set[int] = set()
    with _model.scoring_copy(model, names, train=train_mode) as (work, params), _model.seeded(seed, _model.device_of(work)):
        for inputs, targets in _model.pairs(batches, method):
            loss = _model.loss(loss_fn, _model.forward(work, inputs), _model.targets_on(targets, work))
            _accumulate(total, _model.grads(loss, params), owned)
        return total, {n: p.detach() for n, p in params.items()}


def _accumulate(total: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], owned: set[int]) -> None:
    """``total[n] += grads[n]``, the first gradients becoming the storage of the sum."""
    for n, g in grads.items():
        if n in total:
            total[n] += g
        else:
            total[n] = _model.writable(g, owned)


def taylor_scores(model, names, data, loss_fn=None, *, seed=0, train_mode=True, method="taylor") -> dict[str, torch.Tensor]:
    g, w = summed_gradients(model, names, data, loss_fn, seed=seed, train_mode=train_mode, method=method)
    return {n: g[n].mul_(w[n]).abs_() for n in names}  # in the gradients' storage


def snip_scores(model, names, data, loss_fn=None, *, seed=0, train_mode=True) -> dict[str, torch.Tensor]:
    scores = taylor_scores(model, names, data, loss_fn, seed=seed, train_mode=train_mode, method="snip")
    norm = sum(s.sum() for s in scores.values())
    return {n: s.div_(norm) for n, s in scores.items()}


def grasp_scores(
    model: nn.Module,
    names: Sequence[str],
    data: Iterable,
    loss_fn: LossFn | None = None,
    *,
    seed: int = 0,
    train_mode: bool = True,
    temperature: float = 200.0,
    eps: float = 1e-10,
) -> dict[str, torch.Tensor]:
    batches = _model.as_batches(data, "grasp")
    if temperature <= 0:
        raise MaskError(f"grasp temperature must be positive, got {temperature}.")
    with _model.scoring_copy(model, names, train=train_mode) as (work, params):
        return _grasp(work, params, batches, loss_fn, seed=seed, temperature=temperature, eps=eps)


def _grasp(work, params, batches, loss_fn, *, seed, temperature, eps) -> dict[str, torch.Tensor]:
    # sums held in the first batch's gradients, scores made in place, as in summed_gradients
    stopped: dict[str, torch.Tensor] = {}
    hg: dict[str, torch.Tensor] = {}
    owned: set[int] = set()
    # the Hessian-vector product differentiates twice, which fused attention kernels and
    # hardsigmoid's backward do not support: run them as equivalents that can (same values)
    with _model.seeded(seed, _model.device_of(work)), twice_differentiable():
        for inputs, targets in _model.pairs(batches, "grasp"):  # first pass: g, no graph kept
            loss = _model.loss(loss_fn, _model.forward(work, inputs), _model.targets_on(targets, work),
                               temperature=temperature)
            _accumulate(stopped, _model.grads(loss, params), owned)
        for inputs, targets in _model.pairs(batches, "grasp"):  # second pass: H g = d(g_stop . g_b)/dw
            loss = _model.loss(loss_fn, _model.forward(work, inputs), _model.targets_on(targets, work),
                               temperature=temperature)
            g_b = _model.grads(loss, params, create_graph=True)
            dot = sum((stopped[n] * g_b[n]).sum() for n in params)
            if not dot.requires_grad:  # every weight's gradient is constant: H = 0
                continue
            _accumulate(hg, _model.grads(dot, params), owned)
    scores = {n: hg[n].mul_(params[n].detach()) if n in hg else torch.zeros_like(params[n]) for n in params}
    norm = torch.stack([s.sum() for s in scores.values()]).sum().abs() + eps
    return {n: s.div_(norm) for n, s in scores.items()}
