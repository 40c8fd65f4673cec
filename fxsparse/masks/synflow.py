"""SynFlow (Tanaka et al. 2020, "Pruning neural networks without any data by iteratively
conserving synaptic flow"), as ToST's ``SynFlow`` pruner runs it.

Each round scores ``|w * dR/dw|`` where ``R = sum(f(1; |theta|))``: the model output on a single
all-ones input with every parameter and buffer replaced by its absolute value, and the weights
pruned so far set to zero. The round then keeps the top weights at density ``d ** ((e + 1) / rounds)``
(``e = 0 .. rounds - 1``), so the last round lands exactly on the requested density. No data is
needed; the input shape comes from ``input_shape``, the first data batch, or the trace.

Scores are products of |weights| along every path, which overflow float32 in deep networks (an
EfficientNet-B0 at init already does): when they do, scoring starts over in float64 (Tanaka's code
has ``model.double()`` commented out for the same reason). ``dtype=`` fixes the precision. In
float64 the whole forward stays in float64: a model that casts inside (timm's EfficientViT computes
its linear attention in ``.float()``) would otherwise overflow there, whatever the dtype outside.

The model runs in eval mode (BatchNorm uses its running statistics, made absolute like every other
state entry): in train mode a single constant input has zero batch variance. Tanaka's code also
prunes in eval mode by default; ToST's example calls the same loop with ``train_mode=True``.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import MaskError
from . import _model
from .ranking import Budget

__all__ = ["synflow_scores", "synflow_masks", "SynFlowOverflow"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class SynFlowOverflow(MaskError):
    """SynFlow's scores are not finite in the dtype they were computed in."""


_NARROWER = (torch.float32, torch.float16, torch.bfloat16)


class _stay_float64(TorchFunctionMode):
    """Within the block, a float64 tensor cast to a narrower float dtype stays float64
    (``.float()``, ``.half()``, ``.bfloat16()``, ``.to(dtype)``, ``.type(dtype)``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args else None
        if isinstance(src, torch.Tensor) and src.dtype == torch.float64:
            if func in (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16):
                return src
            if func in (torch.Tensor.to, torch.Tensor.type):
                args = tuple(torch.float64 if a in _NARROWER else a for a in args)
                if kwargs.get("dtype") in _NARROWER:
                    kwargs = {**kwargs, "dtype": torch.float64}
        return func(*args, **kwargs)


class _LinearizedCopy:
    """An eval-mode copy of the model with |theta| everywhere, ready to score rounds on.

    Each round's weights are made from the original model's, |w| * alive, in place: no copy of the
    magnitudes is kept, and the scores are made in the gradients' storage. In float64 every such
    copy is twice the model's float32 weights (RegNetY-128GF: 5.2 GB each).
    """

    def __init__(self, original: nn.Module, work: nn.Module, params: dict[str, nn.Parameter],
                 input_shape: Sequence[int], dtype: torch.dtype | None):
        self.work, self.params = work, params
        self.originals = {n: original.get_parameter(n) for n in params}
        if dtype is not None:
            self.work.to(dtype)
        with torch.no_grad():
            for t in self.work.state_dict().values():  # parameters and buffers, as the original
                if t.is_floating_point():
                    t.abs_()
        p0 = next(iter(self.params.values()))
        self.input = torch.ones((1, *input_shape), dtype=p0.dtype, device=p0.device)

    def scores(self, alive: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            if alive is not None:
                for n, p in self.params.items():  # widening to float64 is exact, so |w| is the same either way
                    p.copy_(self.originals[n]).abs_().mul_(alive[n])
        with _stay_float64() if self.input.dtype == torch.float64 else contextlib.nullcontext():
            r = _model.output_sum(self.work(self.input))
            grads = _model.grads(r, self.params)
        owned: set[int] = set()
        out = {n: _model.writable(grads.pop(n), owned).mul_(p.detach()).abs_() for n, p in self.params.items()}
        if not all(torch.isfinite(s).all() for s in out.values()):
            raise SynFlowOverflow(
                f"SynFlow scores overflowed in {self.input.dtype}: the linearized model (|weights|, an all-ones input) "
                "is not representable in its forward or backward. Deep products of |weights| do this, and so do "
                "operations that multiply activations together (attention's q.k, gates), whose values grow with "
                "a power of the input. Score this model with another method (magnitude, snip, grasp, random), "
                "or leave more of its layers dense."
            )
        return out


@contextlib.contextmanager
def _linearized(model: nn.Module, names: Sequence[str], input_shape: Sequence[int], dtype: torch.dtype | None) -> Iterator[_LinearizedCopy]:
    with _model.scoring_copy(model, names, train=False) as (work, params):
        yield _LinearizedCopy(model, work, params, input_shape, dtype)


def _in_float64_if_needed(run: Callable[[torch.dtype | None], T], dtype: torch.dtype | None) -> T:
    if dtype is not None:
        return run(dtype)
    try:
        return run(None)
    except SynFlowOverflow:
        log.info("SynFlow scores overflowed in the model's dtype; scoring again in float64")
        return run(torch.float64)


def synflow_scores(model, names, *, input_shape, dtype=None) -> dict[str, torch.Tensor]:
    """The scores of SynFlow's first round (nothing pruned yet)."""
    def run(dt: torch.dtype | None) -> dict[str, torch.Tensor]:
        with _linearized(model, names, input_shape, dt) as linearized:
            return linearized.scores(None)

    return _in_float64_if_needed(run, dtype)


def synflow_masks(model, names, budget: Budget, *, input_shape, rounds: int = 100, dtype=None) -> dict[str, torch.Tensor]:
    if rounds < 1:
        raise MaskError(f"synflow needs rounds >= 1, got {rounds}.")

    def run(dt: torch.dtype | None) -> dict[str, torch.Tensor]:
        alive = None
        with _linearized(model, names, input_shape, dt) as linearized:
            for e in range(rounds):
                alive = budget.at_fraction((e + 1) / rounds).select(linearized.scores(alive), alive, consume=True)
        return alive

    return _in_float64_if_needed(run, dtype)
