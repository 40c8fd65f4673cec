"""Which weights get masks.

The weight (never the bias) of every convolution and linear layer that
``fxsparse.graph.parameterized_layers`` finds in the traced graph, including layers held inside
modules the tracer keeps as leaves (timm's CondConv2d and NormFreeBlock, the ``in_proj_weight`` of
``nn.MultiheadAttention``).

First and last layer are masked by default. That is what ToST's pruning code does
(``pruning_techniques/pruning_utils.py``: ``masked_parameters`` yields the weight of *every*
``nn.Conv2d`` and ``nn.Linear``) and what the SynFlow/SNIP/GraSP reference implementations it is
based on do; ER/ERK already keep small first layers dense on their own. Pass
``include_first=False`` / ``include_last=False`` for the common dense-stem / dense-classifier
variant.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import MaskError
from ..graph import Layer, parameterized_layers

__all__ = ["select_layers", "traced", "tied_weights", "KINDS"]

KINDS = ("conv", "linear")


def traced(model_or_gm: nn.Module) -> GraphModule:
    """The GraphModule itself, or a trace of a plain module (which shares its parameters)."""
    if isinstance(model_or_gm, GraphModule):
        return model_or_gm
    if not isinstance(model_or_gm, nn.Module):
        raise MaskError(f"expected an nn.Module or a GraphModule, got {type(model_or_gm).__name__}.")
    from ..trace import trace

    # trace draws a default example input from the global RNG; the caller's RNG stream stays as is
    with torch.random.fork_rng(devices=[]):
        return trace(model_or_gm, propagate=False)  # layer queries need no shapes


def select_layers(
    model_or_gm: nn.Module,
    *,
    include_first: bool = True,
    include_last: bool = True,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    types: Sequence[str] = KINDS,
) -> list[Layer]:
    """The layers whose weights get masks, in graph order.

    Args:
        model_or_gm: a module (traced here with ``fxsparse.trace``) or a GraphModule.
        include_first, include_last: keep the first / last layer of the selected ``types`` (in
            graph order) in the selection. Both default to True, as in ToST's pruning code.
        include: regular expression(s); when given, only weights whose qualified name matches one
            of them (``re.search``, e.g. ``r"^layer[34]\\."``) are selected.
        exclude: regular expression(s); weights whose name matches one of them are left out.
        types: layer kinds to select: ``"conv"``, ``"linear"`` or both.
    """
    unknown = [t for t in types if t not in KINDS]
    if unknown or not types:
        raise MaskError(f"types must be a non-empty subset of {KINDS}; got {tuple(types)!r}.")
    layers = parameterized_layers(traced(model_or_gm), kinds=tuple(types))
    if not layers:
        return []
    first, last = layers[0], layers[-1]
    keep_patterns, drop_patterns = _patterns(include, "include"), _patterns(exclude, "exclude")
    out = []
    for layer in layers:
        if (layer is first and not include_first) or (layer is last and not include_last):
            continue
        if keep_patterns and not any(p.search(layer.weight) for p in keep_patterns):
            continue
        if any(p.search(layer.weight) for p in drop_patterns):
            continue
        out.append(layer)
    return out


def _patterns(spec: str | Iterable[str] | None, what: str) -> list[re.Pattern]:
    if spec is None:
        return []
    items = [spec] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        try:
            out.append(re.compile(item))
        except re.error as e:
            raise MaskError(f"{what} pattern {item!r} is not a valid regular expression: {e}.") from None
    return out


def tied_weights(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{alias: first name}`` for each of ``names`` that holds the same parameter as an earlier one.

    A weight two layers share (tied) is one tensor in the model, so it can have one mask only: the
    exported model could not hold two. Masks are scored, counted and moved once per weight, under
    its first name; every alias carries a copy of that mask.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for n in names:
        owner = first.setdefault(id(params[n]), n) if n in params else n
        if owner != n:
            tied[n] = owner
    return tied
