"""N:M masks: N weights kept in every group of M consecutive weights along a layer's input dimension.

This is the structure of NVIDIA's sparse tensor cores (2:4: two nonzeros in every four, what
``torch.sparse.to_sparse_semi_structured`` and cuSPARSELt accept) and of Apex ASP.

Which weights form a group. A GEMM multiplies along its reduction dimension, so that is the one the
groups must run along:

* linear ``(out, in)``: M consecutive input features of one output row.
* conv ``(out, in/groups, *kernel)``: M consecutive **input channels at one kernel position** of one
  output channel. cuDNN and cuSPARSELt run a conv as an implicit GEMM over its reduction dimension
  ``kh*kw*in`` laid out KRSC (channels innermost, as in NHWC), and NVIDIA ASP (``create_mask``
  permutes a conv weight to ``(kh, kw, out, in)`` before cutting rows of M) groups exactly this way.
  Grouping along the flattened ``in*kh*kw`` of PyTorch's KCRS layout instead would mix kernel
  positions and not be a 2:4 pattern for the hardware. So ``in/groups`` must be a multiple of M: a
  3-channel stem conv and a depthwise conv (one input channel per group) do not fit.
* transposed conv ``(in, out/groups, *kernel)``: its reduction runs over ``in`` (dim 0), within a group.
* timm's CondConv2d (experts stored flattened): grouped as the conv ``(experts*out, in, *kernel)``.

Which N of a group are kept: the N highest scores (magnitude by default, like ASP), ties to the
lower input index, so the same scores always give the same mask.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import MaskError, MaskOptionError
from .distribution import logical_shape
from .ranking import rankable, top_k_rows

__all__ = ["parse_pattern", "is_nm", "check_fit", "nm_masks", "violations", "layout_of", "PATTERN_FORM", "INCOMPATIBLE"]

PATTERN_FORM = "'N:M' with integers 0 < N < M (N weights kept in every M consecutive input weights), e.g. '2:4'"
INCOMPATIBLE = ("error", "dense")  # what to do with a layer whose input dimension is not a multiple of M
_PATTERN = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_pattern(pattern: str | Sequence[int]) -> tuple[int, int]:
    """``"2:4"`` (or ``(2, 4)``) as ``(n, m)``; ``MaskOptionError`` for anything else."""
    if isinstance(pattern, str):
        match = _PATTERN.fullmatch(pattern)
        n, m = (int(match[1]), int(match[2])) if match else (0, 0)
    elif isinstance(pattern, (tuple, list)) and len(pattern) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in pattern):
        n, m = pattern
    else:
        n, m = 0, 0
    if not 0 < n < m:
        raise MaskOptionError("pattern", pattern, PATTERN_FORM)
    return n, m


@dataclass(frozen=True)
class Layout:
    """A weight seen as ``view`` (out, in, *kernel, or in, out for a transposed conv) whose input
    channels run along ``dim``, ``per_group`` of them per conv group."""

    view: tuple[int, ...]
    dim: int
    per_group: int


def layout_of(module: nn.Module, weight_shape: tuple[int, ...]) -> Layout:
    view = logical_shape(module, tuple(weight_shape))  # CondConv2d: (experts*out, in, kh, kw)
    if getattr(module, "transposed", False):
        return Layout(view, 0, view[0] // module.groups)
    return Layout(view, 1, view[1])


def _groups(t: torch.Tensor, layout: Layout, m: int) -> torch.Tensor:
    """``t`` as rows of M consecutive input channels (at one output channel and kernel position)."""
    return t.reshape(layout.view).movedim(layout.dim, -1).reshape(-1, m)


def _ungroup(rows: torch.Tensor, layout: Layout, shape: torch.Size) -> torch.Tensor:
    moved = list(layout.view)
    moved.append(moved.pop(layout.dim))
    return rows.reshape(moved).movedim(-1, layout.dim).reshape(shape)


def is_nm(mask: torch.Tensor, n: int, m: int, *, dim: int = 1, exact: bool = True) -> bool:
    """Whether every group of ``m`` consecutive entries along ``dim`` (the input dimension: 1 for a
    linear or conv weight) holds exactly ``n`` True (at most ``n`` with ``exact=False``: e.g.
    ``is_nm(weight != 0, 2, 4, exact=False)`` for the weights a 2:4 sparse kernel accepts)."""
    if mask.dim() < 2 or mask.shape[dim] % m:
        return False
    rows = mask.bool().movedim(dim, -1).reshape(-1, m).sum(1)
    return bool((rows == n).all() if exact else (rows <= n).all())


def check_fit(gm: nn.Module, names: Sequence[str], n: int, m: int, incompatible: str) -> list[str]:
    """The layers among ``names`` whose input dimension is not a multiple of ``m``: a ``MaskError``
    naming each with its shape (``incompatible="error"``), else the list of layers to leave dense."""
    misfits = [name for name in names if _layout(gm, name).per_group % m]
    if misfits and incompatible == "error":
        listed = "; ".join(_describe(gm, name) for name in misfits[:8])
        more = f"; and {len(misfits) - 8} more" if len(misfits) > 8 else ""
        raise MaskError(
            f"{n}:{m} masks group {m} consecutive weights along each layer's input channels, and "
            f"{len(misfits)} layer(s) have an input dimension that is not a multiple of {m}: {listed}{more}. "
            f"Pass incompatible='dense' to leave such layers dense, or leave them out with "
            f"layers=select_layers(model, exclude=...)."
        )
    return misfits


def nm_masks(
    gm: nn.Module, scores: Mapping[str, torch.Tensor], n: int, m: int, dense: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """N:M masks keeping the ``n`` highest ``scores`` of every group; the layers in ``dense`` (left
    dense by ``check_fit``) get all-True masks, so the report and the sparsity count them."""
    masks = {}
    for name, score in scores.items():
        if name in dense:
            masks[name] = torch.ones(score.shape, dtype=torch.bool, device=score.device)
            continue
        layout = _layout(gm, name)
        rows = _groups(rankable(score, None), layout, m)
        masks[name] = _ungroup(top_k_rows(rows, n), layout, score.shape)
    return masks


def violations(masks: Mapping[str, torch.Tensor], gm: nn.Module, n: int, m: int) -> list[str]:
    """One line per mask that neither follows N:M along its layer's input dimension nor is dense
    (a layer left dense)."""
    out = []
    for name, mask in masks.items():
        if bool(mask.all()):
            continue
        layout = _layout(gm, name)
        if layout.per_group % m or not bool((_groups(mask.bool(), layout, m).sum(1) == n).all()):
            out.append(f"not {n}:{m}: {name!r} {tuple(mask.shape)} is neither {n}:{m} along its input "
                       f"channels nor dense")
    return out


def _owner(gm: nn.Module, name: str) -> nn.Module:
    owner = name.rpartition(".")[0]
    return gm.get_submodule(owner) if owner else gm


def _layout(gm: nn.Module, name: str) -> Layout:
    return layout_of(_owner(gm, name), tuple(gm.get_parameter(name).shape))


def _describe(gm: nn.Module, name: str) -> str:
    groups = getattr(_owner(gm, name), "groups", 1)
    per_group = _layout(gm, name).per_group
    why = f"{per_group} input channel(s)" + (f" per group (groups={groups})" if groups > 1 else "")
    return f"{name} {tuple(gm.get_parameter(name).shape)}: {why}"
