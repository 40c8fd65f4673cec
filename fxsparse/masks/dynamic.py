"""Masks that move: RigL, SET and gradual magnitude pruning as in-place updates of the mask buffers.

A recipe's ``[dynamic]`` table turns this on (docs/dynamic-masks.md). ``RecipeScheduler.step()``
calls :meth:`DynamicMasks.step` after every optimizer step; on an update step it rewrites, in
place and without touching the graph, the mask buffers ``fxsparse.masks.<P>``, the parameters
``P`` at the positions whose mask changed (set to zero) and the optimizer state there (zeroed:
momentum buffers, Adam's ``exp_avg`` / ``exp_avg_sq``). A compiled module does not recompile for
it: the graph reads the buffers at every forward.

The methods, per masked layer (the ``[masks]`` table made the starting mask):

* ``rigl`` (Evci et al. 2020): drop ``floor(f * n_active)`` active weights of smallest magnitude,
  then grow as many where the magnitude of the *dense* gradient of the effective weight
  ``w * mask`` is largest, among the positions not kept by the drop (a just-dropped position may
  come back, as in RigL's code, and is then left as it was). ``f`` decays from ``drop_fraction``
  (cosine by default). The dense gradient comes from the training step's own backward pass: the
  ``DynamicMaskPass`` adds a zero "probe" tensor to each masked weight (``w * mask + probe``),
  whose ``.grad`` autograd fills with d loss / d(w * mask). No second backward.
* ``set`` (Mocanu et al. 2018): the same drop, regrowth at uniformly random inactive positions
  (seeded by the recipe's seed and the step, so resuming and every DDP rank agree).
* ``gmp`` (Zhu & Gupta 2017): prune by magnitude, never regrow, from ``initial_sparsity`` to the
  final sparsity on the cubic schedule ``s_t = s_f + (s_i - s_f) * (1 - p)^3``, ``p`` the progress
  from ``start`` to ``end``. Per layer: the layer ends with exactly the count the ``[masks]`` mask
  gave it (so ``[masks]`` chooses the layer-wise distribution: uniform as in Zhu & Gupta, ERK, ...).

A weight two layers share (tied) is decided once, under its first name, and every name gets that
mask (RigL's score is the sum of both layers' dense gradients): the export holds one tensor.

RigL and SET keep every layer's count of active weights exactly (the layer-wise distribution, e.g.
ERK, is preserved); ties are broken towards the lower flat index, as everywhere in fxsparse.masks.
Under DDP, the probe gradients are averaged over the ranks, rank 0 decides the new masks and
broadcasts them, and every rank applies them to its (identical) weights and optimizer state.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import MaskError
from .ranking import rankable, top_k
from .selection import tied_weights

log = logging.getLogger(__name__)

__all__ = ["METHODS", "DECAYS", "DynamicSchedule", "DynamicMasks", "GROUP", "probe_name", "target_name",
           "probes", "finish", "describe"]

METHODS = ("rigl", "set", "gmp")
DECAYS = ("cosine", "linear", "constant")
GROUP = "dynamic"  # gm.fxsparse.dynamic holds the gradient probes (rigl) and gmp's per-layer targets
_PROBE = "grad"
_TARGET = "target"
_DEFAULTS = {"drop_fraction": 0.3, "drop_fraction_decay": "cosine", "initial_sparsity": 0.0}
_ONLY = {"drop_fraction": ("rigl", "set"), "drop_fraction_decay": ("rigl", "set"),
         "initial_sparsity": ("gmp",), "final_sparsity": ("gmp",)}


def probe_name(param: str) -> str:
    """Qualified buffer name of the gradient probe of parameter ``param`` (RigL)."""
    return f"fxsparse.{GROUP}.{_PROBE}.{param}"


def target_name(param: str) -> str:
    """Qualified buffer name of gmp's final kept count of parameter ``param``."""
    return f"fxsparse.{GROUP}.{_TARGET}.{param}"


def _step_at(fraction: float, total_steps: int) -> int:
    """The first step ``s`` with ``s / T >= fraction`` (float-safe, as ghost removals)."""
    return math.ceil(fraction * total_steps - 1e-6)


# --------------------------------------------------------------------------- the schedule
@dataclass(frozen=True)
class DynamicSchedule:
    """When masks move and by how much; every value a pure function of the step.

    ``start`` / ``end`` are fractions of the ``T`` optimizer steps. RigL/SET update after step
    ``s`` when ``start*T <= s < end*T`` and ``s - start*T`` is a multiple of ``update_every``; gmp
    updates on the same grid over ``(start*T, end*T]`` and always at ``end*T``, where it reaches
    its final sparsity exactly.
    """

    method: str = "rigl"
    update_every: int = 100
    start: float = 0.0
    end: float = 0.75
    drop_fraction: float = 0.3
    drop_fraction_decay: str = "cosine"
    initial_sparsity: float = 0.0
    final_sparsity: float | None = None  # gmp: None = the [masks] table's sparsity
    seed: int = 0

    @classmethod
    def create(cls, **options: Any) -> "DynamicSchedule":
        """Validate ``[dynamic]`` options (``None`` = the method's default); raise ``MaskError``
        naming the key and what is allowed."""
        method = options.get("method")
        if method is not None and method not in METHODS:
            raise MaskError(f"method must be one of {' | '.join(repr(m) for m in METHODS)}; got {method!r}")
        for key, methods in _ONLY.items():  # only with the method named: a key alone is checked without it
            if method is not None and options.get(key) is not None and method not in methods:
                raise MaskError(f"{key} is a setting of method = {' | '.join(repr(m) for m in methods)}, not of "
                                f"{method!r}: remove it")
        values = {k: v for k, v in options.items() if v is not None}
        for key, default in _DEFAULTS.items():
            values.setdefault(key, default)
        return cls(**values)

    def __post_init__(self) -> None:
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(self.update_every, int) or isinstance(self.update_every, bool) or self.update_every < 1:
            raise MaskError(f"update_every must be an integer >= 1 (optimizer steps between two mask updates); "
                            f"got {self.update_every!r}")
        for key in ("start", "end"):
            v = getattr(self, key)
            if not number(v) or not 0.0 <= v <= 1.0:
                raise MaskError(f"{key} must be a fraction of training in [0, 1]; got {v!r}")
        if self.end <= self.start:
            raise MaskError(f"end = {self.end!r} is not after start = {self.start!r}; allowed: start < end "
                            f"(fractions of training: masks move from start to end)")
        if not number(self.drop_fraction) or not 0.0 < self.drop_fraction < 1.0:
            raise MaskError(f"drop_fraction must be in (0, 1) (the fraction of a layer's active weights "
                            f"replaced at the first update); got {self.drop_fraction!r}")
        if self.drop_fraction_decay not in DECAYS:
            raise MaskError(f"drop_fraction_decay must be one of {' | '.join(repr(d) for d in DECAYS)}; "
                            f"got {self.drop_fraction_decay!r}")
        if not number(self.initial_sparsity) or not 0.0 <= self.initial_sparsity < 1.0:
            raise MaskError(f"initial_sparsity must be in [0, 1); got {self.initial_sparsity!r}")
        if self.final_sparsity is not None:
            if not number(self.final_sparsity) or not 0.0 <= self.final_sparsity < 1.0:
                raise MaskError(f"final_sparsity must be in [0, 1); got {self.final_sparsity!r}")
            self.check_final(self.final_sparsity)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise MaskError(f"seed must be an integer; got {self.seed!r}")

    def check_final(self, final: float) -> None:
        if self.method == "gmp" and final < self.initial_sparsity:
            raise MaskError(f"final_sparsity = {final!r} is below initial_sparsity = {self.initial_sparsity!r}; "
                            f"allowed: final_sparsity >= initial_sparsity (gmp prunes, it never regrows; "
                            f"final_sparsity defaults to masks.sparsity)")

    # ---------------------------------------------------------------- steps
    def start_step(self, total_steps: int) -> int:
        return _step_at(self.start, total_steps)

    def end_step(self, total_steps: int) -> int:
        return _step_at(self.end, total_steps)

    def is_update(self, step: int, total_steps: int) -> bool:
        """Whether the masks move right after optimizer step ``step`` (1-based)."""
        a, b = self.start_step(total_steps), self.end_step(total_steps)
        if step < 1:
            return False
        if self.method == "gmp":
            return step == b or (a < step < b and (step - a) % self.update_every == 0)
        return a <= step < b and (step - a) % self.update_every == 0

    def update_steps(self, total_steps: int) -> list[int]:
        return [s for s in range(1, total_steps + 1) if self.is_update(s, total_steps)]

    def progress(self, step: int, total_steps: int) -> float:
        """Where ``step`` lies between start (0) and end (1), clipped."""
        a, b = self.start_step(total_steps), self.end_step(total_steps)
        return min(1.0, max(0.0, (step - a) / max(1, b - a)))

    def decay(self, p: float) -> float:
        """The drop fraction's factor at progress ``p`` (1 at start, 0 at end unless constant)."""
        if self.drop_fraction_decay == "constant":
            return 1.0
        if self.drop_fraction_decay == "linear":
            return 1.0 - p
        return 0.5 * (1.0 + math.cos(math.pi * p))

    def drop_fraction_at(self, step: int, total_steps: int) -> float:
        """RigL/SET: the fraction of each layer's active weights dropped (and regrown) at ``step``."""
        return self.drop_fraction * self.decay(self.progress(step, total_steps))

    def sparsity_at(self, p: float, initial: float, final: float) -> float:
        """gmp's cubic schedule (Zhu & Gupta): ``final + (initial - final) * (1 - p)^3``."""
        return final + (initial - final) * (1.0 - p) ** 3


def describe(schedule: DynamicSchedule, total_steps: int | None = None, final_sparsity: float | None = None) -> list[str]:
    """The schedule in a few lines (``fxsparse inspect``); in steps when ``total_steps`` is known."""
    s = schedule
    where = f"from {s.start:.0%} to {s.end:.0%} of training"
    if total_steps is not None:
        steps = s.update_steps(total_steps)
        where += f" (steps {s.start_step(total_steps)}..{s.end_step(total_steps)} of {total_steps}: {len(steps)} updates)"
    lines = [f"dynamic masks: {s.method}, every {s.update_every} steps {where}"]
    probes = (0.0, 0.25, 0.5, 0.75)
    if s.method == "gmp":
        final = s.final_sparsity if s.final_sparsity is not None else final_sparsity
        if final is None:
            lines.append(f"  sparsity {s.initial_sparsity:g} -> masks.sparsity, cubic (Zhu & Gupta)")
        else:
            at = ", ".join(f"{p:.0%}: {s.sparsity_at(p, s.initial_sparsity, final):.3f}" for p in (*probes, 1.0))
            lines.append(f"  sparsity {s.initial_sparsity:g} -> {final:g}, cubic (Zhu & Gupta); along the way {at}; "
                         f"prune by magnitude, never regrow")
    else:
        at = ", ".join(f"{p:.0%}: {s.drop_fraction * s.decay(p):.3f}" for p in probes)
        grow = "largest dense gradient |d loss / d(w*mask)|" if s.method == "rigl" else "random"
        lines.append(f"  drop fraction {s.drop_fraction:g}, {s.drop_fraction_decay} decay (at {at} of the phase); "
                     f"drop smallest |w|, grow {grow}; per-layer counts kept")
    return lines


# --------------------------------------------------------------------------- graph state
def probes(gm: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: gradient probe} of the masked weights (RigL's; empty otherwise)."""
    from ..pass_infra import container

    sub = container(gm, GROUP, create=False)
    grads = None if sub is None else sub._modules.get(_PROBE)
    return dict(grads.named_buffers()) if grads is not None else {}


def targets(gm: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: final kept count} of gmp (empty otherwise)."""
    from ..pass_infra import container

    sub = container(gm, GROUP, create=False)
    t = None if sub is None else sub._modules.get(_TARGET)
    return dict(t.named_buffers()) if t is not None else {}


def present(gm: nn.Module) -> bool:
    """Whether the dynamic phase's graph state (probes, gmp targets) is in ``gm``."""
    from ..pass_infra import container, tagged_nodes

    return container(gm, GROUP, create=False) is not None or bool(tagged_nodes(gm, group=GROUP))


def finish(gm: nn.Module) -> nn.Module:
    """End the dynamic phase: remove the gradient probes and gmp's targets from the graph (in place).

    ``RecipeScheduler`` does this at the end of the phase; the masks stay as they are. Needed before
    ``fxsparse.export`` when a run stops early. Changes the graph (a compiled module recompiles once).
    """
    from ..passes.dynamic_masks import RemoveDynamicMasksPass

    if present(gm):
        RemoveDynamicMasksPass()(gm)
    return gm


# --------------------------------------------------------------------------- the updates
def _rank(score: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Flat scores, ``-inf`` where ``alive`` is False (never chosen while others remain)."""
    return rankable(score, alive.reshape(-1))


def drop_and_grow(weight: torch.Tensor, mask: torch.Tensor, grow_score: torch.Tensor, fraction: float) -> torch.Tensor:
    """RigL/SET on one layer: the new mask (same count of active weights as ``mask``).

    Drops ``floor(fraction * active)`` active weights of smallest ``|weight|``, then grows as many at
    the highest ``grow_score`` among the positions the drop did not keep.
    """
    flat = mask.reshape(-1)
    active = int(flat.sum())
    n_drop = int(active * fraction)  # floor, as RigL's cast to int
    if n_drop == 0:
        return mask.clone()
    kept = top_k(_rank(weight.detach().abs(), flat), active - n_drop)
    grown = top_k(_rank(grow_score, ~kept), n_drop)
    return (kept | grown).view(mask.shape)


def prune_to(weight: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """gmp on one layer: keep the ``keep`` active weights of largest ``|weight|`` (never regrow)."""
    flat = mask.reshape(-1)
    keep = min(keep, int(flat.sum()))
    return top_k(_rank(weight.detach().abs(), flat), keep).view(mask.shape)


def gmp_kept(numel: int, final_kept: int, initial_sparsity: float, p: float, schedule: DynamicSchedule) -> int:
    """A layer's kept count at progress ``p``: pruned count on the cubic schedule from
    ``min(round(initial_sparsity * numel), numel - final_kept)`` to ``numel - final_kept``."""
    final_pruned = numel - final_kept
    initial_pruned = min(round(initial_sparsity * numel), final_pruned)
    pruned = schedule.sparsity_at(p, initial_pruned, final_pruned)
    return numel - (final_pruned if p >= 1.0 else round(pruned))


class DynamicMasks:
    """The mask updates of one run (``RecipeScheduler`` owns one; ``sched.dynamic``).

    ``history`` lists one record per update: ``step``, ``fraction``, ``method``, ``drop_fraction``
    (rigl/set) or ``sparsity`` (gmp, of the masked weights), ``dropped`` / ``grown`` in all, and
    ``layers`` ``{parameter: {"kept", "dropped", "grown"}}``.
    """

    def __init__(self, gm: nn.Module, schedule: DynamicSchedule, total_steps: int, final_sparsity: float | None = None):
        from ..passes.mask import masked_parameters

        self.gm, self.schedule, self.total_steps = gm, schedule, total_steps
        self.final_sparsity = schedule.final_sparsity if schedule.final_sparsity is not None else final_sparsity
        self.history: list[dict[str, Any]] = []
        self.finished = False
        if not masked_parameters(gm):
            raise MaskError(f"[dynamic] method = {schedule.method!r} moves masks, but this module has none: no "
                            f"conv/linear weight is masked (masks.enabled = false, or the model has no maskable "
                            f"layer). Enable [masks] or set dynamic.enabled = false.")
        if schedule.method == "rigl" and not probes(gm) and not self._past_end(0):
            raise MaskError("[dynamic] method = 'rigl' needs the gradient probes DynamicMaskPass adds to the graph; "
                            "this module was transformed without them (skip=['dynamic']?): transform it with the "
                            "recipe, [dynamic] enabled.")
        if schedule.method == "gmp" and not targets(gm):
            raise MaskError("[dynamic] method = 'gmp' needs the per-layer targets DynamicMaskPass records; this "
                            "module was transformed without them: transform it with the recipe, [dynamic] enabled.")

    def _past_end(self, step: int) -> bool:
        return step >= self.schedule.end_step(self.total_steps)

    # ---------------------------------------------------------------- driving
    def step(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
        """Called by the scheduler after optimizer step ``step``: update if due, end the phase at its
        end, and get the probes ready for the next update. Returns the update's record or None."""
        if self.finished:
            return None
        if self.schedule.method == "rigl":
            self._leaf_probes()  # cheap: a device move after the transform leaves copies that are no leaves
        record = None
        if self.schedule.is_update(step, self.total_steps):
            record = self.update(step, optimizer)
        if self._past_end(step):
            self.finish()
        elif self.schedule.is_update(step + 1, self.total_steps):
            for p in self._leaf_probes().values():  # the next backward writes the update step's gradient alone
                p.grad = None
        return record

    def _leaf_probes(self) -> dict[str, torch.Tensor]:
        """The probes, each a leaf that requires grad. ``gm.to(device)`` after the transform makes
        a buffer that requires grad a non-leaf copy (whose ``.grad`` autograd never fills): put a
        leaf back in its place then."""
        from ..pass_infra import register_nested_buffer

        found = probes(self.gm)
        for name, p in found.items():
            if not (p.is_leaf and p.requires_grad):
                fresh = torch.zeros_like(p.detach()).requires_grad_(True)
                register_nested_buffer(self.gm, probe_name(name), fresh, persistent=False)
                found[name] = fresh
        return found

    def finish(self) -> None:
        finish(self.gm)
        self.finished = True

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "finished": self.finished}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [dict(r) for r in state.get("history", [])]
        if state.get("finished") and not self.finished:
            self.finish()

    # ---------------------------------------------------------------- one update
    @torch.no_grad()
    def update(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Move the masks now (as after optimizer step ``step``), in place; returns the record."""
        from .. import distributed as fxdist
        from ..passes.mask import masked_parameters

        if optimizer is None:  # momentum or Adam moments left at a regrown weight would move it off zero
            raise MaskError(f"[dynamic] method = {self.schedule.method!r} updates the masks at step {step}, and the "
                            f"scheduler has no optimizer whose state it must zero where weights change: pass "
                            f"RecipeScheduler(..., optimizer=opt) or call sched.build_optimizer()")
        masks = masked_parameters(self.gm)
        params = dict(self.gm.named_parameters(remove_duplicate=False))
        if any(type(params[n]).__name__ == "DTensor" for n in masks):
            raise MaskError("[dynamic] mask updates under FSDP (sharded DTensor weights) are not supported: train "
                            "with DDP (fxsparse.distributed.wrap / fxsparse train without --fsdp)")
        if self.schedule.method == "rigl":
            found = probes(self.gm)
            if all(p.grad is None for p in found.values()):
                log.warning("step %d: RigL update without gradients (no backward reached the probes since the "
                            "last update): regrowth falls back to the lowest indices", step)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in found.values()]
            fxdist.all_reduce_tensors(grads, op="mean")  # the global batch's gradient on every rank
            scores = dict(zip(probes(self.gm), grads))
        # a weight two layers share (tied) is decided once, under its first name, and its aliases get
        # that mask: the model holds one tensor for both (two masks would be two networks)
        tied = tied_weights(self.gm, masks)
        new = self._decide(step, masks, params, scores if self.schedule.method == "rigl" else None, tied) \
            if fxdist.is_main() else None
        new = fxdist.broadcast_masks(new) if fxdist.is_distributed() else new  # rank 0 decides for all
        state = optimizer.state
        layers = {}
        for name, mask in masks.items():
            fresh = new[name].to(mask.device)
            dropped, grown = mask & ~fresh, fresh & ~mask
            changed = dropped | grown
            p = params[name]
            p.masked_fill_(changed, 0)  # dropped weights leave, grown ones start, at zero
            for value in state.get(p, {}).values():  # momentum, exp_avg, exp_avg_sq, ...: zero there too
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.masked_fill_(changed, 0)
            mask.copy_(fresh)
            layers[name] = {"kept": int(fresh.sum()), "dropped": int(dropped.sum()), "grown": int(grown.sum())}
            if name in tied:
                layers[name]["tied_to"] = tied[name]
        counted = [n for n in masks if n not in tied]  # an alias moved with its weight: counted there
        kept, total = sum(layers[n]["kept"] for n in counted), sum(masks[n].numel() for n in counted)
        dropped_all, grown_all = (sum(layers[n][k] for n in counted) for k in ("dropped", "grown"))
        record: dict[str, Any] = {"step": step, "fraction": step / self.total_steps, "method": self.schedule.method}
        if self.schedule.method == "gmp":
            record["sparsity"] = 1.0 - kept / total
        else:
            record["drop_fraction"] = self.schedule.drop_fraction_at(step, self.total_steps)
        record.update(dropped=dropped_all, grown=grown_all, kept=kept, total=total, layers=layers)
        self.history.append(record)
        log.info("step %d: %s mask update, %d dropped, %d grown (%d of %d weights kept)", step,
                 self.schedule.method, dropped_all, grown_all, kept, total)
        return record

    def _decide(self, step: int, masks: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                grads: dict[str, torch.Tensor] | None, tied: dict[str, str]) -> dict[str, torch.Tensor]:
        """The new masks: one decision per weight, copied to the aliases ``tied`` names."""
        s, T = self.schedule, self.total_steps
        out = {}
        if s.method == "gmp":
            p = s.progress(step, T)
            final = {n: int(t) for n, t in targets(self.gm).items()}
            for n, m in masks.items():
                if n not in tied:
                    out[n] = prune_to(params[n], m, gmp_kept(m.numel(), final[n], s.initial_sparsity, p, s))
        else:
            fraction = s.drop_fraction_at(step, T)
            gen = torch.Generator().manual_seed(s.seed * 1_000_003 + step)  # SET: the same draw on resume, any rank
            if s.method == "rigl":  # a tied weight's dense gradient: the sum over the layers that use it
                grads = dict(grads)
                for alias, first in tied.items():
                    grads[first] = grads[first] + grads[alias]
            for n, m in masks.items():
                if n in tied:
                    continue
                if s.method == "rigl":
                    score = grads[n].abs()
                else:
                    score = torch.rand(m.numel(), generator=gen).to(m.device)
                out[n] = drop_and_grow(params[n], m, score, fraction)
        for alias, first in tied.items():
            out[alias] = out[first].clone()
        return {n: out[n] for n in masks}
