"""LRsI: layer-wise re-scaled initialization (GradInit on the masked network).

ToST rescales the *masked* network's initialization with GradInit (Zhu et al. 2021): one
learnable scalar per parameter tensor, optimized so that one SGD step of size ``eta`` lowers the
loss most, subject to a gradient-norm bound ``gamma``:

    if ||g(a*w)||_2 > gamma:  minimize ||g||                       (constraint step)
    else:                     minimize L(a*w - eta * g/||g||) / eta (look-ahead step, g detached)

with Adam on the scales (lr 1e-2), the scale gradient clipped per dimension at 1, weight scales
kept >= ``min_scale`` (0.01) and bias scales >= 0. BatchNorm uses batch statistics and dropout
is off during the search, as in GradInit's reference code. The search differentiates through a
gradient; fused attention and hardsigmoid, whose backward PyTorch cannot differentiate, run as
equivalents that can during it (``fxsparse.autograd.twice_differentiable``: same values, no graph
edit).

The scales are applied through ``torch.func.functional_call``, so every parameter tensor of any
model is covered (also those inside leaf modules) without touching the graph, and the masked
graph keeps pruned weights at zero: a rescale multiplies, so zeros stay zeros. At the end the
scales are folded into the parameters in place; no scale node or module remains, so there is
nothing to remove afterwards. Running statistics and every other buffer are restored to their
values before the search, so the pass changes parameter values only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from fxsparse import outputs
from fxsparse.autograd import twice_differentiable
from fxsparse.dropout import dropout_off, is_dropout_module
from fxsparse.errors import PassError
from fxsparse.pass_infra import CONTAINER, FxSparsePass

__all__ = ["RescaleInitPass", "rescale_init", "RescaleReport"]


@dataclass
class RescaleReport:
    """What the search did: final scale per parameter and how the objective moved."""

    scales: dict[str, float] = field(default_factory=dict)
    constraint_steps: int = 0
    lookahead_steps: int = 0
    losses: list[float] = field(default_factory=list)  # the loss at the current scales, per iteration
    first_loss: float = float("nan")
    last_loss: float = float("nan")


class RescaleInitPass(FxSparsePass):
    """GradInit per-tensor scales on the (masked) graph, folded into the parameters.

    Args:
        data: an iterable of ``(inputs, targets)`` batches (required to run); it is cycled if
            shorter than needed.
        loss_fn: ``loss_fn(output, targets)``; by default cross-entropy of the output's logits
            (``fxsparse.outputs``: a namedtuple's ``.logits`` or the first tensor, as GoogLeNet's).
        iters: search iterations (ToST: 180).
        eta: the look-ahead SGD step size (0.1).
        gamma: the gradient-norm bound (1.0).
        lr: Adam's learning rate on the scales (1e-2).
        min_scale: lower bound of weight scales (0.01); bias scales are bounded by 0.
        grad_clip: per-dimension clip of the scale gradient (1.0).
        normalize_grad: take the look-ahead step along g/||g|| (ToST: yes).
    """

    group = "rescale"

    def __init__(
        self,
        data: Iterable | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        iters: int = 180,
        eta: float = 0.1,
        gamma: float = 1.0,
        lr: float = 1e-2,
        min_scale: float = 0.01,
        grad_clip: float = 1.0,
        normalize_grad: bool = True,
    ) -> None:
        super().__init__()
        if iters < 1 or eta <= 0 or gamma <= 0 or lr <= 0 or min_scale < 0 or grad_clip <= 0:
            raise PassError(
                f"RescaleInitPass options out of range: iters={iters} (>= 1), eta={eta} (> 0), "
                f"gamma={gamma} (> 0), lr={lr} (> 0), min_scale={min_scale} (>= 0), grad_clip={grad_clip} (> 0)."
            )
        self.data = data
        self.loss_fn = loss_fn or outputs.cross_entropy
        self.iters, self.eta, self.gamma, self.lr = iters, eta, gamma, lr
        self.min_scale, self.grad_clip, self.normalize_grad = min_scale, grad_clip, normalize_grad
        self.report = RescaleReport()

    def requires(self, graph_module: GraphModule) -> None:
        super().requires(graph_module)
        # checked here, not in __init__: recipes validate options by constructing the pass without data
        if self.data is None:
            raise PassError("RescaleInitPass (LRsI) needs data: an iterable of (inputs, targets) batches.")

    def call(self, gm: GraphModule) -> PassResult:
        names = [n for n, p in gm.named_parameters() if p.requires_grad and not n.startswith(CONTAINER + ".")]
        if not names:
            return PassResult(gm, False)
        params = dict(gm.named_parameters())
        base = {n: params[n].detach() for n in names}
        is_bias = torch.tensor([_is_bias(n, base[n]) for n in names])
        lower = torch.where(is_bias, 0.0, self.min_scale)
        device = base[names[0]].device
        scales = torch.ones(len(names), device=device, requires_grad=True)
        lower = lower.to(device)
        opt = torch.optim.Adam([scales], lr=self.lr)
        batches = _cycle(self.data)

        # the constraint step differentiates the gradient norm, which fused attention and
        # hardsigmoid cannot: the search runs them as equivalents that can (same values)
        with _search_mode(gm), dropout_off(), twice_differentiable():
            for _ in range(self.iters):
                x0, y0 = next(batches)
                x1, y1 = next(batches)
                loss, gnorm, grads = self._gradient(gm, names, base, scales, torch.cat([x0, x1]), torch.cat([y0, y1]))
                self.report.losses.append(loss.item())
                if gnorm.item() > self.gamma:
                    objective = gnorm  # project back into the gradient-norm constraint
                    self.report.constraint_steps += 1
                else:
                    x2, y2 = next(batches)
                    step = [g.detach() / (gnorm.detach() if self.normalize_grad else 1.0) for g in grads]
                    # the lookahead needs only the detached step: free the gradient's double-backward
                    # graph before the second forward, not when the next iteration overwrites it
                    del loss, gnorm, grads
                    moved = {n: scales[i] * base[n] - self.eta * step[i] for i, n in enumerate(names)}
                    out = functional_call(gm, moved, (torch.cat([x0, x2]),))
                    objective = self.loss_fn(out, torch.cat([y0, y2])) / self.eta
                    self.report.lookahead_steps += 1
                    self.report.last_loss = objective.item() * self.eta
                opt.zero_grad(set_to_none=True)
                objective.backward()
                loss = gnorm = grads = objective = None  # one iteration's graph alive at a time, not two
                with torch.no_grad():
                    scales.grad.clamp_(-self.grad_clip, self.grad_clip)
                    opt.step()
                    scales.clamp_(min=lower)

        with torch.no_grad():  # fold: zeros stay zeros, every tensor keeps its dtype and storage
            for i, n in enumerate(names):
                params[n].mul_(scales[i].to(params[n].dtype))
        self.report.first_loss = self.report.losses[0]
        self.report.scales = {n: scales[i].item() for i, n in enumerate(names)}
        self.stats["tensors_rescaled"] = len(names)
        self.stats["constraint_steps"] = self.report.constraint_steps
        self.stats["lookahead_steps"] = self.report.lookahead_steps
        return PassResult(gm, True)

    def hint(self, error: Exception) -> str:
        if "derivative for" in str(error) and "is not implemented" in str(error):
            return (
                "GradInit differentiates through a gradient, and PyTorch cannot differentiate the backward "
                "of the operation named above. fxsparse.autograd.twice_differentiable gives the search "
                "equivalents of the same value for fused attention and hardsigmoid: add one for this "
                "operation there (and report it), or go on without LRsI: `rescale.enabled = false` in the "
                "recipe, or fxsparse.transform(..., skip=['rescale'])."
            )
        if isinstance(error, torch.OutOfMemoryError):
            return ("The search keeps the graph of a gradient for two batches at once: give LRsI smaller "
                    "batches (data=...), or disable it (`rescale.enabled = false`).")
        return super().hint(error)

    def _gradient(self, gm, names, base, scales, x, y):
        eff = {n: scales[i] * base[n] for i, n in enumerate(names)}
        out = functional_call(gm, eff, (x,))
        loss = self.loss_fn(out, y)
        grads = torch.autograd.grad(loss, [eff[n] for n in names], create_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(base[n]) for g, n in zip(grads, names)]
        gnorm = torch.sqrt(sum(g.square().sum() for g in grads))
        return loss, gnorm, grads

    def summary(self) -> str:
        s = self.report.scales
        if not s:
            return "no parameters"
        return (
            f"tensors_rescaled={len(s)}, scale range [{min(s.values()):.3g}, {max(s.values()):.3g}], "
            f"constraint_steps={self.report.constraint_steps}, lookahead_steps={self.report.lookahead_steps}"
        )


def rescale_init(gm: GraphModule, data: Iterable, loss_fn=None, **options) -> RescaleReport:
    """Run LRsI on ``gm`` in place and return the report (final scales, steps taken)."""
    p = RescaleInitPass(data, loss_fn, **options)
    p(gm)
    return p.report


def _is_bias(name: str, tensor: torch.Tensor) -> bool:
    # GradInit bounds biases by 0 and everything it calls a weight by min_scale
    return tensor.dim() <= 1 and name.rpartition(".")[2].endswith("bias")


def _cycle(data: Iterable):
    """Endless (inputs, targets) pairs: re-iterate a re-iterable (a DataLoader reshuffles),
    cache a one-shot iterator."""
    one_shot = iter(data) is data
    cache = []
    while True:
        empty = True
        for batch in (data if not one_shot or not cache else cache):
            empty = False
            if one_shot:
                cache.append(batch)
            yield batch[0], batch[1]
        if empty:
            raise PassError("RescaleInitPass got an empty data iterable.")
        if one_shot:
            one_shot = False
            data = cache


@contextlib.contextmanager
def _search_mode(gm: nn.Module) -> Iterator[None]:
    """The network as training runs it, BatchNorm on batch statistics, every other module in its
    own mode, but the dropout modules in eval mode (the caller turns functional dropout off too:
    ``dropout_off()``). Afterwards every buffer (running statistics) and every module's mode are
    what they were.

    Not every module in eval mode: a module's eval path may differ from the one training takes
    (timm's EfficientViT and LeViT attention cache their bias in eval mode, and the search would
    differentiate through the first iteration's stale copy)."""
    saved_buffers = {n: b.detach().clone() for n, b in gm.named_buffers()}
    saved_modes = {m: m.training for m in gm.modules()}
    for m in gm.modules():
        if m is gm:  # the root keeps its mode: a mode-dependent trace refuses to run in the other one
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.training = True
        elif is_dropout_module(m):
            m.training = False
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in gm.named_buffers():
                if n in saved_buffers:
                    b.copy_(saved_buffers[n])
        for m, mode in saved_modes.items():
            m.training = mode
