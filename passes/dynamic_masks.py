"""DynamicMaskPass: get a masked graph ready for masks that move (RigL, SET, gmp); its removal.

The recipe's ``[dynamic]`` table runs this pass last, after the mask pass and the ghosts. The
updates themselves are in-place writes that ``RecipeScheduler.step()`` makes through
``fxsparse.masks.dynamic``; the graph only needs:

* ``rigl``: the dense gradient of every effective weight ``w * mask``, from the training step's
  own backward. After each ``masked_weight`` node (``w * mask``) the pass adds a zero probe::

      mw    = apply_mask(w, mask)                           masks/masked_weight
      probe = get_attr fxsparse.dynamic.grad.<P>             dynamic/grad_probe  (zeros, requires_grad)
      tap   = operator.add(mw, probe)                        dynamic/grad_tap    (every user of mw reads it)

  ``tap`` equals ``mw`` exactly, and autograd leaves d loss / d(w * mask) in ``probe.grad``: the
  gradient that reaches the multiply, dense (the weight's own gradient is that times the mask).
  Probes are non-persistent buffers (not in the state_dict, not optimizer parameters); a compiled
  module reads them as inputs, so clearing ``probe.grad`` recompiles nothing.
* ``gmp``: the final kept count of each layer (the count of the ``[masks]`` mask), as persistent
  0-dim buffers ``fxsparse.dynamic.target.<P>``, and the masks set back to ``initial_sparsity``
  (all ones by default: gmp starts dense), keeping the largest weights.
* ``set``: nothing.

``RemoveDynamicMasksPass`` (``fxsparse.masks.dynamic.finish``) deletes the probes, the taps and
the targets at the end of the phase; the masks stay.
"""
from __future__ import annotations

import operator
from typing import Literal

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from fxsparse.errors import MaskError, PassError
from fxsparse.masks.dynamic import GROUP, DynamicSchedule, gmp_kept, probe_name, prune_to, target_name
from fxsparse.pass_infra import FxSparsePass, delete_container, register_nested_buffer, tagged_nodes

__all__ = ["DynamicMaskPass", "RemoveDynamicMasksPass"]


class DynamicMaskPass(FxSparsePass):
    """Prepare the graph for ``[dynamic]`` mask updates (options: docs/dynamic-masks.md).

    Args:
        method: ``"rigl"`` (default) | ``"set"`` | ``"gmp"``.
        update_every: optimizer steps between two mask updates.
        start, end: fractions of training between which masks move (``start < end``).
        drop_fraction: rigl/set, the fraction of each layer's active weights replaced at the first
            update (default 0.3); decays along ``drop_fraction_decay``.
        drop_fraction_decay: rigl/set, ``"cosine"`` (default, RigL) | ``"linear"`` | ``"constant"``.
        initial_sparsity: gmp, the sparsity it starts from (default 0: dense).
        final_sparsity: gmp, the sparsity it ends at (default: ``masks.sparsity``).
        seed: SET's random regrowth (default: the recipe's mask seed).

    Stats: ``probes`` (rigl), ``targets`` (gmp), ``weights`` (masked weights covered).
    """

    group = GROUP

    def __init__(
        self,
        *,
        method: Literal["rigl", "set", "gmp"] | None = None,
        update_every: int = 100,
        start: float = 0.0,
        end: float = 0.75,
        drop_fraction: float | None = None,
        drop_fraction_decay: Literal["cosine", "linear", "constant"] | None = None,
        initial_sparsity: float | None = None,
        final_sparsity: float | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.schedule = DynamicSchedule.create(
            method=method, update_every=update_every, start=start, end=end, drop_fraction=drop_fraction,
            drop_fraction_decay=drop_fraction_decay, initial_sparsity=initial_sparsity,
            final_sparsity=final_sparsity, seed=seed)

    def requires(self, gm: GraphModule) -> None:
        super().requires(gm)
        from fxsparse.passes.mask import masked_parameters

        if not masked_parameters(gm):
            raise MaskError(f"[dynamic] method = {self.schedule.method!r} moves masks, but the model has none: no "
                            f"conv/linear weight is masked (masks.enabled = false, or the model has no maskable "
                            f"layer). Enable [masks] or set dynamic.enabled = false.")
        if tagged_nodes(gm, group=GROUP):
            raise PassError("DynamicMaskPass already ran on this module")

    def call(self, gm: GraphModule) -> PassResult:
        from fxsparse.passes.mask import masked_parameters

        masks = masked_parameters(gm)
        self.stats["weights"] = sum(m.numel() for m in masks.values())
        if self.schedule.method == "rigl":
            for mul in tagged_nodes(gm, group="masks", role="masked_weight"):
                with self.at(mul):
                    self._tap(gm, mul)
            return PassResult(gm, True)
        if self.schedule.method == "gmp":
            params = dict(gm.named_parameters(remove_duplicate=False))
            with torch.no_grad():
                for name, mask in masks.items():
                    kept = int(mask.sum())
                    register_nested_buffer(gm, target_name(name), torch.tensor(kept, device=mask.device))
                    start = gmp_kept(mask.numel(), kept, self.schedule.initial_sparsity, 0.0, self.schedule)
                    mask.copy_(prune_to(params[name], torch.ones_like(mask), start))
                    self.stats["targets"] += 1
            return PassResult(gm, True)
        return PassResult(gm, False)

    def _tap(self, gm: GraphModule, mul) -> None:
        param = mul.meta["fxsparse"]["param"]
        w = gm.get_parameter(param)
        fmt = torch.channels_last if w.dim() == 4 else torch.preserve_format  # the layout masks are kept in
        probe = torch.zeros_like(w, memory_format=fmt).requires_grad_(True)
        name = probe_name(param)
        register_nested_buffer(gm, name, probe, persistent=False)
        graph = gm.graph
        users = list(mul.users)
        with graph.inserting_after(mul):
            get = self.tag(graph.get_attr(name), "grad_probe", param=param)
        with graph.inserting_after(get):
            tap = self.tag(graph.call_function(operator.add, (mul, get)), "grad_tap", param=param)
        if "tensor_meta" in mul.meta:
            tap.meta["tensor_meta"] = get.meta["tensor_meta"] = mul.meta["tensor_meta"]
        for user in users:
            user.replace_input_with(mul, tap)
        self.stats["probes"] += 1


class RemoveDynamicMasksPass(FxSparsePass):
    """Delete what ``DynamicMaskPass`` added (probes and taps, gmp's targets); masks stay as they are."""

    group = GROUP

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        for tap in tagged_nodes(gm, group=GROUP, role="grad_tap"):
            tap.replace_all_uses_with(tap.args[0])
            graph.erase_node(tap)
            self.stats["taps"] += 1
        for node in tagged_nodes(gm, group=GROUP):
            if node.users:
                raise PassError(f"RemoveDynamicMasksPass: {node.format_node()} is still used by {list(node.users)}")
            graph.erase_node(node)
        delete_container(gm, GROUP)
        return PassResult(gm, True)
