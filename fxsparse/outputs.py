"""Model outputs that are not a plain logits tensor, handled in one place.

Some classifiers return more than their logits: torchvision's GoogLeNet and Inception v3 return a
namedtuple with auxiliary logits in train mode (``GoogLeNetOutputs(logits, aux_logits2,
aux_logits1)``, ``InceptionOutputs(logits, aux_logits)``), Hugging Face models a ``ModelOutput``
with ``.logits``, others a tuple or a dict. Whatever takes "the model's output" as logits (the
default loss of mask scoring, the zoo pipeline's loss) reads it through ``logits``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import FxSparseError

__all__ = ["logits", "cross_entropy", "map_tensors"]


def logits(out: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself; else its ``logits`` attribute or key
    (namedtuples such as GoogLeNet's, ``ModelOutput``, dicts); else its first tensor (a tuple,
    list, dict or dataclass, searched depth first). Raises ``FxSparseError`` if it holds no tensor."""
    if isinstance(out, torch.Tensor):
        return out
    named = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(named, torch.Tensor):
        return named
    found = _first_tensor(out)
    if found is None:
        raise FxSparseError(
            f"the model returned a {type(out).__name__} with no tensor in it; pass a loss_fn(outputs, "
            f"targets) that knows how to read it."
        )
    return found


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        items = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = (getattr(out, f.name) for f in dataclasses.fields(out))
    else:
        return None
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def cross_entropy(out: Any, targets: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``F.cross_entropy`` of the output's ``logits`` (the default loss wherever one is needed)."""
    return F.cross_entropy(logits(out), targets, **kwargs)


def map_tensors(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``out`` with ``fn`` applied to every tensor in it, its structure kept (tuples, namedtuples,
    lists, dicts, dataclasses); anything else is left as is."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a namedtuple
        return type(out)(*(map_tensors(o, fn) for o in out))
    if isinstance(out, (tuple, list)):
        return type(out)(map_tensors(o, fn) for o in out)
    if isinstance(out, Mapping):
        try:
            return type(out)({k: map_tensors(v, fn) for k, v in out.items()})
        except TypeError:
            return {k: map_tensors(v, fn) for k, v in out.items()}
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return dataclasses.replace(out, **{f.name: map_tensors(getattr(out, f.name), fn)
                                           for f in dataclasses.fields(out) if f.init})
    return out
