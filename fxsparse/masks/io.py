"""Saving, loading and validating masks.

File format: safetensors, one ``bool`` tensor per masked parameter, keyed by the parameter's
qualified name (``layer1.0.conv1.weight``). The header's string metadata holds JSON values:
``format`` (``"fxsparse-masks"``), ``fxsparse_version``, ``achieved_sparsity``, ``layer_density``
({name: density}), ``kept``, ``total`` (a weight two layers share counted once: ``tied`` maps
each such alias to its first name), and whatever the caller passes (``method``,
``requested_sparsity``, ``model`` ...).

``load`` also reads a ``torch.save``d dict (with ``weights_only=True``: no code runs), including
ToST / ``torch.nn.utils.prune`` checkpoints whose keys end in ``weight_mask`` and hold 0/1 floats.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..errors import MaskError
from ..graph import Layer
from . import nm
from .report import MaskReport
from .selection import select_layers, tied_weights, traced

__all__ = ["save", "load", "read_metadata", "validate"]

FORMAT = "fxsparse-masks"
_RESERVED = ("format", "fxsparse_version", "achieved_sparsity", "layer_density", "kept", "total", "tied")


def save(masks: Mapping[str, torch.Tensor], path: str | os.PathLike, *, tied: Mapping[str, str] | None = None,
         **metadata: Any) -> None:
    """Write ``masks`` to a safetensors file, with ``metadata`` (JSON-serializable values) and
    the figures of :class:`MaskReport` in its header. ``tied`` (``{alias: first name}``,
    ``fxsparse.masks.tied_weights(model, masks)``) counts a weight two layers share once in
    ``kept`` and ``total``."""
    from safetensors.torch import save_file

    from .. import __version__

    _check_tensors(masks)
    clash = sorted(set(metadata) & set(_RESERVED))
    if clash:
        raise MaskError(f"metadata keys {clash} are written by fxsparse itself; rename them.")
    report = MaskReport.from_masks(masks, tied=tied)
    header = {
        **metadata,
        "format": FORMAT,
        "fxsparse_version": __version__,
        "achieved_sparsity": report.achieved_sparsity,
        "kept": report.kept,
        "total": report.total,
        "layer_density": report.density,
        **({"tied": dict(tied)} if tied else {}),
    }
    try:
        encoded = {k: json.dumps(v) for k, v in header.items()}
    except TypeError as e:
        raise MaskError(f"mask metadata must be JSON-serializable: {e}.") from None
    tensors = {n: m.detach().to("cpu", torch.bool).contiguous() for n, m in masks.items()}
    save_file(tensors, os.fspath(path), metadata=encoded)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a mask file written by :func:`save` (decoded from JSON); {} for other files."""
    if not _is_safetensors(path):
        return {}
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        raw = f.metadata() or {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v  # a plain string written by another tool
    return out


def load(
    path: str | os.PathLike, model: nn.Module | None = None, *, required: Iterable[str | Layer] | None = None
) -> dict[str, torch.Tensor]:
    """Read masks from a safetensors file or a ``torch.save``d dict.

    With ``model``, the masks are checked against it (see :func:`validate`) before they are
    returned: a file that does not fit raises ``MaskError`` listing every mismatch. A file saved
    with a ``pattern`` (``save(masks, path, method="nm", pattern="2:4")``) is checked to follow it.
    """
    if not os.path.exists(path):
        raise MaskError(f"mask file {os.fspath(path)!r} does not exist.")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        masks = load_file(os.fspath(path))
        metadata = read_metadata(path)
        order = metadata.get("layer_density")  # safetensors sorts keys; restore save order
        if isinstance(order, dict) and set(order) == set(masks):
            masks = {n: masks[n] for n in order}
    else:
        masks, metadata = _load_torch(path), {}
    if model is not None:
        validate(masks, model, required=required, pattern=metadata.get("pattern"))
    else:
        _check_tensors(masks)
    return masks


def validate(
    masks: Mapping[str, torch.Tensor],
    model_or_gm: nn.Module,
    *,
    required: Iterable[str | Layer] | None = None,
    pattern: str | None = None,
) -> None:
    """Raise ``MaskError`` listing every way ``masks`` does not fit the model.

    Every key must name the weight of a conv/linear layer of the model (``select_layers`` with
    every layer included) and hold a bool tensor of that weight's shape. ``required`` lists
    weights (names or Layers) that must have a mask; by default a mask may leave layers out,
    which then stay dense. With ``pattern`` (``"2:4"``), every mask must be N:M along its layer's
    input channels (``fxsparse.masks.nm``) or keep all of its layer (a layer left dense).
    """
    gm = traced(model_or_gm)
    maskable = {l.weight for l in select_layers(gm)}
    params = dict(gm.named_parameters(remove_duplicate=False))
    problems = []
    for name, m in masks.items():
        if name not in params:
            problems.append(f"unexpected: {name!r} is not a parameter of the model")
            continue
        if name not in maskable:
            problems.append(f"unexpected: {name!r} is a parameter but not the weight of a conv/linear layer")
            continue
        if not isinstance(m, torch.Tensor):
            problems.append(f"not a tensor: {name!r} is a {type(m).__name__}")
            continue
        if tuple(m.shape) != tuple(params[name].shape):
            problems.append(f"wrong shape: {name!r} mask {tuple(m.shape)} vs weight {tuple(params[name].shape)}")
        if m.dtype != torch.bool:
            problems.append(f"non-boolean: {name!r} has dtype {m.dtype} (masks are torch.bool)")
    for name in _names(required):
        if name not in masks:
            problems.append(f"missing: no mask for {name!r}")
    for alias, first in tied_weights(gm, [n for n in masks if n in params]).items():
        a, b = masks[alias], masks[first]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and not torch.equal(a, b):
            problems.append(f"tied: {first!r} and {alias!r} are one weight (shared by two layers) with two different "
                            f"masks; the model holds one tensor for both, so give them the same mask")
    if pattern is not None and not problems:  # the pattern is read off shapes that fit
        n, m = nm.parse_pattern(pattern)
        problems += nm.violations(masks, gm, n, m)
    if problems:
        raise MaskError(
            f"the masks do not fit {type(model_or_gm).__name__} ({len(problems)} problem(s)); nothing "
            f"was applied:\n  " + "\n  ".join(problems)
        )


def _names(required: Iterable[str | Layer] | None) -> list[str]:
    return [r.weight if isinstance(r, Layer) else r for r in (required or [])]


def _check_tensors(masks: Mapping[str, Any]) -> None:
    if not isinstance(masks, Mapping):
        raise MaskError(f"masks must be a dict of parameter name -> bool tensor, got {type(masks).__name__}.")
    bad = [
        f"{n!r} ({type(m).__name__ if not isinstance(m, torch.Tensor) else m.dtype})"
        for n, m in masks.items()
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool
    ]
    if bad:
        raise MaskError(f"masks must be torch.bool tensors; these are not: {', '.join(bad)}.")


def _is_safetensors(path: str | os.PathLike) -> bool:
    """A safetensors file starts with its header's length (u64, little-endian) and then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= os.path.getsize(path) - 8


def _load_torch(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors of all kinds
        raise MaskError(
            f"could not read {os.fspath(path)!r} as safetensors or as a torch.save'd dict of tensors "
            f"(weights_only=True): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", cause=e
        ) from None
    if not isinstance(obj, Mapping):
        raise MaskError(f"{os.fspath(path)!r} holds a {type(obj).__name__}, not a dict of masks.")
    return {_strip_prune_suffix(k): _prune_mask_to_bool(k, v) for k, v in obj.items()}


def _strip_prune_suffix(key: str) -> str:
    # torch.nn.utils.prune (and ToST's extract_mask) store the mask of `weight` as `weight_mask`
    return key[: -len("_mask")] if key.endswith("_mask") else key


def _prune_mask_to_bool(key: str, value: Any) -> Any:
    if not (key.endswith("_mask") and isinstance(value, torch.Tensor) and value.dtype != torch.bool):
        return value
    if not bool(((value == 0) | (value == 1)).all()):
        raise MaskError(f"{key!r} looks like a torch.nn.utils.prune mask but holds values other than 0 and 1.")
    return value.bool()
