"""The equivalence harness: does a rewritten GraphModule compute what the original module did?

``assert_equivalent`` compares outputs in train and eval mode and the gradient of every original
parameter; ``assert_same_structure`` compares two graphs modulo node names. Both raise an
``AssertionError`` whose message is a readable table of what differs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .graph import same_structure, structure_diff

__all__ = ["assert_equivalent", "assert_same_structure", "compare", "Mismatch"]


@dataclass
class Mismatch:
    what: str
    detail: str

    def __str__(self) -> str:
        return f"  {self.what}: {self.detail}"


def _tensors(x: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(x)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _diff(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float, exact: bool, scale: str) -> str | None:
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    if exact:
        same = torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(), b.nan_to_num()))
        if same:
            return None
    d = (a.double() - b.double()).abs()
    magnitude = b.double().abs()
    if scale == "tensor" and magnitude.numel():
        # one bound for the whole tensor: the rounding of a sum is relative to its terms, so an
        # element that cancels to ~0 carries the error of the tensor's scale, not of its own value
        magnitude = magnitude.nan_to_num(0.0, 0.0, 0.0).max().expand_as(d)
    tol = atol + rtol * magnitude
    off = ~((a == b) | (d <= tol) | (a.isnan() & b.isnan()))
    if not exact and not off.any():
        return None
    # name the element furthest beyond its tolerance (the largest |diff| may be well within it)
    excess = (d - tol).nan_to_num(float("inf")).masked_fill(~off, -float("inf"))
    worst = int(excess.argmax() if off.any() else d.argmax())
    return (
        f"max |diff| {d.max().item():.3e}, worst at flat index {worst} "
        f"({a.flatten()[worst].item():.6g} vs {b.flatten()[worst].item():.6g}), "
        f"{int(off.sum())} of {d.numel()} elements off"
        + (" (exact comparison)" if exact else f" (rtol={rtol:g}, atol={atol:g}" + (", scaled to the tensor's max |value|)" if scale == "tensor" else ")"))
    )


def compare(
    original: nn.Module,
    graph_module: nn.Module,
    inputs: Any,
    *,
    modes: Sequence[str] = ("train", "eval"),
    grads: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    exact: bool = False,
    scale: str = "element",
    seed: int = 0,
    copy_modules: bool = True,
) -> list[Mismatch]:
    """Run both modules on ``inputs`` and list every mismatch (empty list: equivalent).

    Two tensors match when ``|a - b| <= atol + rtol * |b|`` elementwise (``scale="element"``, as
    ``torch.allclose``), or ``<= atol + rtol * max|b|`` (``scale="tensor"``: for computations
    reordered on purpose, where an element that cancels to near zero keeps the rounding error of
    the terms it summed); ``exact=True`` asks for bit-identical tensors.

    Each mode runs both modules from the same RNG state (so dropout draws match); gradients are
    those of a fixed random projection of all outputs, compared for every parameter of
    ``original`` by name (the graph module may hold more, e.g. ghost parameters).
    """
    if scale not in ("element", "tensor"):
        raise ValueError(f"scale must be 'element' or 'tensor'; got {scale!r}")
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    a = copy.deepcopy(original) if copy_modules else original
    b = copy.deepcopy(graph_module) if copy_modules else graph_module
    params_a = dict(a.named_parameters())
    params_b = dict(b.named_parameters())
    out: list[Mismatch] = []
    missing = sorted(set(params_a) - set(params_b))
    if missing:
        out.append(Mismatch("parameters missing in the graph module", ", ".join(missing[:10])))
    for mode in modes:
        if mode not in ("train", "eval"):
            raise ValueError(f"modes must be 'train' or 'eval'; got {mode!r}")
        a.train(mode == "train")
        b.train(mode == "train")
        a.zero_grad(set_to_none=True)
        b.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out_a = a(*inputs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out_b = b(*inputs)
        ta, tb = _tensors(out_a), _tensors(out_b)
        if len(ta) != len(tb):
            out.append(Mismatch(f"{mode} outputs", f"{len(ta)} tensors vs {len(tb)}"))
            continue
        for i, (x, y) in enumerate(zip(ta, tb)):
            d = _diff(x.detach(), y.detach(), rtol, atol, exact, scale)
            if d:
                out.append(Mismatch(f"{mode} output[{i}]", d))
        if not grads:
            continue
        gen = torch.Generator().manual_seed(seed + 1)
        proj = [torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x) for x in ta if x.is_floating_point()]
        if not any(x.requires_grad for x in ta):
            continue
        loss_a = sum((x * p).sum() for x, p in zip([x for x in ta if x.is_floating_point()], proj))
        loss_b = sum((y * p).sum() for y, p in zip([y for y in tb if y.is_floating_point()], proj))
        loss_a.backward()
        loss_b.backward()
        for name, pa in params_a.items():
            pb = params_b.get(name)
            if pb is None or (pa.grad is None and pb.grad is None):
                continue
            if (pa.grad is None) != (pb.grad is None):
                out.append(Mismatch(f"{mode} grad {name}", "gradient present in only one module"))
                continue
            d = _diff(pa.grad, pb.grad, rtol, atol, exact, scale)
            if d:
                out.append(Mismatch(f"{mode} grad {name}", d))
    return out


def assert_equivalent(original: nn.Module, graph_module: nn.Module, inputs: Any, **kwargs: Any) -> None:
    """Raise ``AssertionError`` listing every output/gradient that differs (see ``compare``)."""
    mismatches = compare(original, graph_module, inputs, **kwargs)
    if mismatches:
        shown = "\n".join(str(m) for m in mismatches[:25])
        more = f"\n  ... and {len(mismatches) - 25} more" if len(mismatches) > 25 else ""
        raise AssertionError(
            f"{type(graph_module).__name__} is not equivalent to {type(original).__name__} "
            f"({len(mismatches)} mismatches):\n{shown}{more}"
        )


def assert_same_structure(gm_a: torch.fx.GraphModule, gm_b: torch.fx.GraphModule) -> None:
    """Raise ``AssertionError`` showing where two graphs' structures differ (modulo node names)."""
    if not same_structure(gm_a, gm_b):
        diff = structure_diff(gm_a, gm_b, limit=30)
        raise AssertionError(
            "graphs differ in structure ('-' only in the first, '+' only in the second):\n  "
            + "\n  ".join(diff)
        )
