"""Iterative magnitude pruning with weight rewinding (lottery tickets: Frankle & Carbin 2019,
Frankle et al. 2020), the way ToST finds its IMP masks.

Each round trains the network with the current masks, prunes the lowest-magnitude live weights,
then rewinds every weight (and buffer) to the rewind state: the model's state when ``compute`` is
called (its initialization), or ``rewind_state`` (e.g. a state_dict saved after k epochs, for
rewinding to iteration k). Pruned weights are zeroed before each round's training, so even a
trainer that ignores the masks starts from the pruned network.

Schedule: with ``rate`` p (fraction of the *remaining* weights pruned per round, 0.2 by default
as in the lottery-ticket papers) round ``r`` keeps density ``(1 - p) ** r``, clipped at the target;
the number of rounds is whatever reaching the target takes. With ``rounds`` R instead, the per-
round rate is chosen so that the R-th round lands on the target (``d ** (r / R)``).

Training happens on a deep copy; the user's model is never changed. The caller trains that copy:
``train_fn(model, masks)`` must train ``model`` in place with ``masks`` applied (the dict maps
parameter names to bool tensors; fxsparse's trainer applies them with MaskPass).
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import MaskError
from .ranking import Budget

__all__ = ["imp_masks", "imp_schedule"]

TrainFn = Callable[[nn.Module, dict[str, torch.Tensor]], None]


def imp_schedule(density: float, *, rounds: int | None, rate: float | None) -> list[float]:
    """The fractions ``t`` of the final budget's log-density each round prunes to (last is 1)."""
    if rounds is not None and rate is not None:
        raise MaskError("imp takes rounds or rate, not both: the target sparsity fixes the other.")
    if density >= 1:
        return []
    if rounds is not None:
        if rounds < 1:
            raise MaskError(f"imp needs rounds >= 1, got {rounds}.")
        return [(r + 1) / rounds for r in range(rounds)]
    rate = 0.2 if rate is None else rate
    if not 0 < rate < 1:
        raise MaskError(f"imp's per-round rate must be in (0, 1), got {rate}.")
    if density <= 0:
        raise MaskError("imp cannot reach density 0 by pruning a fraction of what remains; lower the sparsity.")
    per_round = math.log(1 - rate) / math.log(density)
    n = math.ceil(1 / per_round - 1e-9)
    return [min(1.0, (r + 1) * per_round) for r in range(n)]


def imp_masks(
    model: nn.Module,
    names: Sequence[str],
    budget: Budget,
    *,
    train_fn: TrainFn | None = None,
    rounds: int | None = None,
    rate: float | None = None,
    rewind_state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    if not callable(train_fn):
        raise MaskError(
            "imp needs train_fn=callable(model, masks) that trains the model in place with the masks "
            "applied; compute() calls it once per pruning round."
        )
    work = copy.deepcopy(model)
    rewind = _snapshot(rewind_state if rewind_state is not None else work.state_dict(), work)
    _check_rewind_keys(work, rewind)  # before any training: a late failure would waste it all
    params = {n: work.get_parameter(n) for n in names}
    alive = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    for t in imp_schedule(budget.keep / budget.total, rounds=rounds, rate=rate):
        _zero_pruned(params, alive)
        train_fn(work, {n: m.clone() for n, m in alive.items()})
        scores = {n: p.detach().abs() for n, p in params.items()}
        alive = budget.at_fraction(t).select(scores, alive)
        _load_rewind(work, rewind)
    return alive


def _zero_pruned(params: dict[str, nn.Parameter], alive: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(alive[n])


def _snapshot(state: Mapping[str, torch.Tensor], work: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A copy of a state dict, with the per-module version metadata some modules' loading needs
    (torchvision's MNASNet refuses a state dict without it)."""
    snap = OrderedDict((k, v.detach().clone()) for k, v in state.items())
    snap._metadata = getattr(state, "_metadata", None) or work.state_dict()._metadata
    return snap


def _check_rewind_keys(work: nn.Module, rewind: Mapping[str, torch.Tensor]) -> None:
    expected = set(work.state_dict())
    missing, unexpected = sorted(expected - set(rewind)), sorted(set(rewind) - expected)
    if missing or unexpected:
        raise MaskError(
            f"imp's rewind_state does not fit the model: missing keys {missing[:10]}, unexpected "
            f"keys {unexpected[:10]}. Pass a state_dict of this model (e.g. saved after k epochs)."
        )


def _load_rewind(work: nn.Module, rewind: dict[str, torch.Tensor]) -> None:
    try:
        work.load_state_dict(rewind, strict=True)
    except RuntimeError as e:
        raise MaskError(f"imp's rewind_state does not fit the model: {str(e).splitlines()[0]}", cause=e) from None
