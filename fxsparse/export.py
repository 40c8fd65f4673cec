"""Leaving fxsparse: fold the masks into the weights and hand back the original architecture.

* ``strip_masks(gm)``: a plain GraphModule with the traced original structure (the mask nodes
  and buffers gone, each functional layer back to its ``call_module``), weights times masks.
* ``export(gm)``: a ``state_dict`` with the masks folded in and every ``fxsparse.*`` key dropped;
  it loads into the original model class with ``load_state_dict(strict=True)``.
* ``zero_masked_weights(gm)``: write ``weight * mask`` into the stored weights in place.

Why folding matters: the masked graph computes with the *effective* weight ``w * mask``; the
stored ``w`` may hold non-zero values at pruned positions (its initial values, or values weight
decay is slowly shrinking), which never reach an output or a gradient. Folding makes the stored
weights equal to the effective ones.
"""
from __future__ import annotations

import copy
import importlib
from collections import OrderedDict

import torch
from torch import nn
from torch.fx import GraphModule

from .errors import FxSparseError
from .pass_infra import CONTAINER, container, tagged_nodes

__all__ = ["export", "strip_masks", "zero_masked_weights", "ExportError"]


class ExportError(FxSparseError):
    """The graph still holds something that has no place in the original architecture."""


def _masks(gm: nn.Module) -> dict[str, torch.Tensor]:
    from .passes.mask import masked_parameters

    return masked_parameters(gm)


def zero_masked_weights(gm: nn.Module) -> int:
    """Multiply every masked weight by its mask in place; returns the number of weights changed.

    The graph's outputs and gradients do not change (they always used ``w * mask``); afterwards
    the stored pruned weights are exactly zero too, e.g. before saving a plain checkpoint.
    """
    params = dict(gm.named_parameters(remove_duplicate=False))
    masks = _masks(gm)
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return len(masks)


def strip_masks(gm: GraphModule, *, fold: bool = True, inplace: bool = False) -> GraphModule:
    """A GraphModule of the original structure: mask nodes and buffers removed.

    Args:
        fold: multiply each masked weight by its mask first, so that the result computes what the
            masked graph computed (``False`` restores the stored weights as they are).
        inplace: rewrite ``gm`` itself; by default ``gm`` (and the weights it shares with the
            model it was traced from) is left untouched and a deep copy is stripped.
    """
    from .passes.mask import StripMasksPass

    if not isinstance(gm, GraphModule):
        raise ExportError(f"strip_masks takes a torch.fx.GraphModule; got {type(gm).__name__}")
    out = gm if inplace else copy.deepcopy(gm)
    from .masks.dynamic import finish, present

    if present(out):  # RigL's gradient probes sit on the masked weights: the phase ends first
        finish(out)
    return StripMasksPass(fold=fold)(out).graph_module


def _leftovers(gm: nn.Module) -> list[str]:
    groups = {n.meta["fxsparse"]["group"] for n in tagged_nodes(gm)} if isinstance(gm, GraphModule) else set()
    root = container(gm, create=False)
    if root is not None:
        groups |= set(root._modules) | set(root._buffers) | set(root._parameters)
    return sorted(groups - {"masks"})


def export(gm: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The ``state_dict`` of the original model: masks folded into the weights, ``fxsparse.*`` dropped.

    Refuses (``ExportError``) while ghosts or other fxsparse additions are still in the graph:
    their effect is not part of the original architecture, so the weights alone would compute
    something else. Remove them first with ``fxsparse.remove_ghosts(gm)``.

    The tensors are copies on the weights' devices; ``gm`` is not modified.
    """
    left = _leftovers(gm)
    if left:
        raise ExportError(
            f"cannot export while fxsparse groups other than masks are in the graph: {', '.join(left)}. "
            f"Their branches and gates are not part of the original architecture. Remove ghosts with "
            f"fxsparse.remove_ghosts(gm) (and fold any rescale pass) before exporting"
            + ("; end the dynamic-mask phase (RigL's gradient probes, gmp's targets) with "
               "fxsparse.masks.dynamic.finish(gm)." if "dynamic" in left else ".")
        )
    masks = _masks(gm)
    params = dict(gm.named_parameters(remove_duplicate=False))
    # by identity, so that a weight shared under two names is folded under both
    mask_of = {id(params[name]): mask for name, mask in masks.items()}
    prefix = CONTAINER + "."
    full = gm.state_dict()
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in full.items():
        if key.startswith(prefix):
            continue
        mask = mask_of.get(id(params[key])) if key in params else None
        value = value.detach().clone()  # in place below: keeps the parameter's own layout
        state[key] = value.mul_(mask) if mask is not None else value
    # a module the original registers under two names (shared) is one module of the graph: its
    # tensors (folded, if masked) go under each of the original's names (fxsparse.trace recorded them)
    info = getattr(gm, "meta", {}).get("fxsparse")
    for alias, key in (getattr(info, "state_aliases", None) or {}).items():
        if key in state and alias not in state:
            state[alias] = state[key]
    # keep the per-module versions state_dict() records: some modules' _load_from_state_dict
    # need them (torchvision's MNASNet refuses a state_dict without)
    metadata = OrderedDict(
        (k, v) for k, v in getattr(full, "_metadata", {}).items() if k != CONTAINER and not k.startswith(prefix)
    )
    version = _original_class_version(gm)
    if version is not None:  # the root entry is GraphModule's, not the original class's
        metadata[""] = {**metadata.get("", {}), "version": version}
    state._metadata = metadata  # type: ignore[attr-defined]
    return state


def _original_class_version(gm: nn.Module) -> int | None:
    """``_version`` of the class ``gm`` was traced from (recorded by fxsparse.trace), if importable."""
    info = getattr(gm, "meta", {}).get("fxsparse")
    qualified = getattr(info, "model_class", None)
    if not qualified:
        return None
    mod_name, _, qualname = qualified.rpartition(".")
    # nested classes: walk the qualname from the deepest importable module
    while mod_name:
        try:
            obj = importlib.import_module(mod_name)
            for atom in qualname.split("."):
                obj = getattr(obj, atom)
            return getattr(obj, "_version", None)
        except (ImportError, AttributeError):
            mod_name, _, head = mod_name.rpartition(".")
            qualname = f"{head}.{qualname}"
    return None
