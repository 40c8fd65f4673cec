"""``RecipeScheduler``: moves ghost gates over training, removes finished ghosts, smooths labels.

A training loop calls ``sched.step()`` once per optimizer step. The scheduler sets every ghost
gate from its recipe schedule (a pure function of the step, so resuming is exact), and at a
ghost's ``remove_at`` runs its removal pass on the module in place and drops the removed
parameters and their optimizer state from the optimizer. ``sched.loss`` is cross-entropy with
the recipe's (scheduled) label smoothing in ToST's eps/(C-1) form.

With ``[distill]`` the scheduler also takes a frozen copy of the module at ``distill.at`` (the
network with its ghosts, before they leave) and ``sched.loss(logits, y, teacher_logits=...)``
adds the distillation term; ``sched.teacher_logits(x)`` runs the teacher (``None`` before the
snapshot, so the loop below needs one more line: ``t = sched.teacher_logits(x)``).

The loop, in full::

    gm = fxsparse.transform(model, "tost", data=calibration_batches)
    sched = fxsparse.RecipeScheduler(gm, total_steps=epochs * len(loader))
    opt, lr_sched = sched.build_optimizer(), sched.build_lr_scheduler()
    for x, y in batches:  # every epoch's batches
        loss = sched.loss(gm(x), y); opt.zero_grad(); loss.backward(); opt.step(); lr_sched.step(); sched.step()

Checkpoints: ``sched.checkpoint()`` holds the module, optimizer, lr and scheduler state;
``restore(model, checkpoint)`` rebuilds a fresh transformed module, replays the removals that had
happened (they change the graph, so they must come before loading the weights), then loads the
weights and the optimizer state. See docs/recipes.md.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule

from . import gates as _gates
from . import ghosts as _ghosts
from .errors import RecipeError
from .recipe import Recipe, from_dict, load_recipe
from .transform import PLAIN_KEY, RECIPE_KEY, transform

log = logging.getLogger(__name__)

__all__ = ["RecipeScheduler", "LearningOnset", "smoothed_cross_entropy", "distillation_loss", "restore",
           "drop_parameters", "lr_factor", "LEARNING_WINDOW", "LEARNING_DROP", "loss_window_means",
           "loss_has_fallen"]

MAIN_GROUP = "main"  # the optimizer param group of every parameter that is not a ghost's
GROUP_KEY = "fxsparse_group"  # param-group key naming whose parameters a group holds
_TOL = 1e-9  # an lr milestone at fraction f applies from the first step s with s/T >= f (float-safe)
# the training loss "has begun to fall" once the mean of its last LEARNING_WINDOW steps is
# LEARNING_DROP below the mean of its first LEARNING_WINDOW (a ghost schedule's start = "learning")
LEARNING_WINDOW, LEARNING_DROP = 5, 0.02


def loss_window_means(losses) -> tuple[float, float] | None:
    """The means of the first and of the last ``LEARNING_WINDOW`` of ``losses`` (None when there
    are fewer than two windows of them)."""
    if len(losses) < 2 * LEARNING_WINDOW:
        return None
    return (sum(losses[:LEARNING_WINDOW]) / LEARNING_WINDOW, sum(losses[-LEARNING_WINDOW:]) / LEARNING_WINDOW)


def loss_has_fallen(start: float, now: float) -> bool:
    """Whether a loss whose first window averaged ``start`` has begun to fall at ``now``."""
    return now <= (1.0 - LEARNING_DROP) * start


def smoothed_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, eps: float, form: str = "tost", reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy against smoothed one-hot targets.

    ``form="tost"`` (ToST): 1-eps on the true class and eps/(C-1) on each other class.
    ``form="torch"``: torch's ``label_smoothing``, 1-eps+eps/C on the true class and eps/C elsewhere.
    Computed without building the C-wide target tensor: the loss is
    ``(on - off) * nll + off * sum_c(-log p_c)``.
    """
    num_classes = logits.shape[-1]
    if form == "tost":
        off = eps / (num_classes - 1) if num_classes > 1 else 0.0
        on = 1.0 - eps
    elif form == "torch":
        off = eps / num_classes
        on = 1.0 - eps + off
    else:
        raise ValueError(f"label smoothing form must be 'tost' or 'torch'; got {form!r}")
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    loss = (on - off) * nll - off * logp.sum(-1) if eps else nll
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                      reduction: str = "mean") -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per sample, reduced over the batch
    (Hinton et al. 2015; the T^2 keeps its gradient's scale independent of T)."""
    t = float(temperature)
    log_p = F.log_softmax(logits / t, dim=1)
    log_q = F.log_softmax(teacher_logits.detach() / t, dim=1)
    per_sample = (log_q.exp() * (log_q - log_p)).sum(dim=1) * (t * t)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def drop_parameters(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Remove ``params`` from every param group of ``optimizer`` and delete their state.

    Param groups are kept even when they become empty, so that lr schedulers (which index
    groups by position) and ``optimizer.load_state_dict`` keep lining up. Returns how many
    parameters were dropped.
    """
    ids = {id(p) for p in params}
    dropped = 0
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in ids]
        dropped += len(group["params"]) - len(kept)
        group["params"] = kept
    for p in [p for p in optimizer.state if id(p) in ids]:
        del optimizer.state[p]
    return dropped


def lr_factor(step: int, total_steps: int, training) -> float:
    """The lr multiplier of the recipe's ``[training]`` schedule after ``step`` steps."""
    t = step / total_steps
    if training.warmup and t < training.warmup:
        return (step + 1) / max(1.0, training.warmup * total_steps)
    if training.lr_schedule == "step":
        return training.lr_gamma ** sum(t >= m - _TOL for m in training.lr_milestones)
    if training.lr_schedule == "cosine":
        p = (t - training.warmup) / (1.0 - training.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, p))))
    return 1.0


class LearningOnset:
    """The step at which the training loss has begun to fall: the first step ``s >= 2 *
    LEARNING_WINDOW`` at which the mean of the last ``LEARNING_WINDOW`` losses is at least
    ``LEARNING_DROP`` (a fraction) below the mean of the first ``LEARNING_WINDOW``. Two means of
    five steps, so that one lucky batch does not count; ``step`` is None until then."""

    def __init__(self):
        self.first: list[float] = []
        self.recent: list[float] = []
        self.step: int | None = None
        self.forced = False  # the deadline came first (the loss never fell)

    def observe(self, step: int, loss: float) -> bool:
        """Record the loss of ``step``; True when this is the step the loss has begun to fall."""
        if self.step is not None:
            return False
        if not math.isfinite(loss):
            raise ValueError(f"step {step}: the training loss is {loss}; a schedule that starts when the loss "
                             f"falls cannot read it")
        if len(self.first) < LEARNING_WINDOW:
            self.first.append(loss)
        self.recent = (self.recent + [loss])[-LEARNING_WINDOW:]
        means = loss_window_means(self.first + self.recent) if step >= 2 * LEARNING_WINDOW else None
        if means is not None and loss_has_fallen(*means):
            self.step = step
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"first": list(self.first), "recent": list(self.recent), "step": self.step, "forced": self.forced}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.first, self.recent = [float(v) for v in state["first"]], [float(v) for v in state["recent"]]
        self.step, self.forced = state["step"], bool(state.get("forced", False))


class RecipeScheduler:
    """Drive a transformed module through its recipe's ghost phases and label smoothing.

    Args:
        graph_module: the module ``fxsparse.transform`` returned; modified in place by removals.
        recipe: the recipe (default: the one ``transform`` attached to ``graph_module.meta``).
        total_steps: the number of ``step()`` calls in the whole run (T); schedules are
            fractions of it.
        optimizer: the optimizer training ``graph_module``; a removal drops the removed
            parameters and their state from it. ``build_optimizer()`` makes one and attaches it.
        before_removal: called as ``before_removal(group)`` inside ``step()`` right before a
            ghost group's removal pass runs (e.g. to evaluate the network as it still is).
        on_removal: called as ``on_removal(event)`` inside ``step()`` right after a removal (the
            event ``self.events`` records: group, step, ...), e.g. to re-estimate BatchNorm
            statistics or evaluate. Neither is called for the removals ``load_state_dict``
            replays on resume. Both are plain attributes: set them any time.
    """

    def __init__(
        self,
        graph_module: GraphModule,
        recipe: Recipe | str | None = None,
        total_steps: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        before_removal: Callable[[str], Any] | None = None,
        on_removal: Callable[[dict[str, Any]], Any] | None = None,
    ):
        if recipe is None:
            recipe = graph_module.meta.get(RECIPE_KEY)
            if recipe is None:
                raise RecipeError("RecipeScheduler needs the recipe: this module was not made by "
                                  "fxsparse.transform, so pass recipe=...")
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int (optimizer steps in the whole run); got {total_steps!r}")
        self.gm = graph_module
        self.total_steps = total_steps
        self.optimizer = optimizer
        self.lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.events: list[dict[str, Any]] = []
        self.removed: list[str] = []
        self.before_removal = before_removal
        self.on_removal = on_removal
        self._step = 0
        present = set(_ghosts.present(graph_module))
        self.plain = ghost_schedules_plain(graph_module, self.recipe)
        self.schedules = {g: spec.schedule_for(self.plain) for g, spec in self.recipe.ghosts.items() if g in present}
        # the groups that follow their schedule_plain here (a plain network)
        self.following_plain = [g for g, spec in self.recipe.ghosts.items()
                                if self.plain and g in present and spec.schedule_plain is not None]
        for g in self.following_plain:
            log.info("%s follows its schedule_plain on this plain network: %s", g, self.schedules[g].describe())
        for g in set(self.recipe.ghosts) - present:
            log.info("recipe %r enables %s, but the module has none (the pass found no site)", self.recipe.name, g)
        # schedules with start = "learning" count from the step the training loss begins to fall;
        # at the latest from the step that still lets every such ghost leave by the end of training
        learning = [sc for sc in self.schedules.values() if sc is not None and sc.start == "learning"]
        self.onset = LearningOnset() if learning else None
        self._latest_onset = (min(total_steps - self._steps(sc.remove_at) for sc in learning)
                              if learning else None)
        self._step_losses: list[torch.Tensor] = []  # training losses sched.loss computed since the last step()
        self.dynamic = _dynamic_masks(graph_module, self.recipe, total_steps)  # [dynamic]: masks that move
        self.teacher: GraphModule | None = None  # [distill]: the frozen copy, from teacher_step on
        self.teacher_step = self._teacher_step()
        self._teacher_removed: list[str] = []  # the groups already removed when the teacher was copied
        self._apply()

    # ------------------------------------------------------------------ schedule
    @property
    def step_count(self) -> int:
        """Steps taken so far (``step()`` calls)."""
        return self._step

    @property
    def fraction(self) -> float:
        """The fraction of training done, ``step_count / total_steps``."""
        return self._step / self.total_steps

    @property
    def gates(self) -> dict[str, float]:
        """Current gate values, ``{group: value}`` (removed groups are gone)."""
        return _gates.get(self.gm)

    @property
    def label_smoothing(self) -> float:
        """The label smoothing eps in force now."""
        return self.recipe.label_smoothing.eps_at(self.fraction)

    @property
    def waits_for_learning(self) -> bool:
        """Whether a schedule with ``start = "learning"`` still waits for the training loss to fall:
        then ``step()`` needs each step's loss."""
        return self.onset is not None and self.onset.step is None

    @property
    def learning_step(self) -> int | None:
        """The step at which the training loss began to fall (``start = "learning"``), once found."""
        return None if self.onset is None else self.onset.step

    def _origin(self, group: str) -> int | None:
        """The step ``group``'s fractions count from (None: not known yet)."""
        return 0 if self.schedules[group].start == "step" else self.onset.step

    def gate_at(self, group: str, step: int) -> float:
        """The value the schedule gives ``group``'s gate after ``step`` steps (1 while its schedule
        waits for the training loss to fall)."""
        origin = self._origin(group)
        if origin is None:
            return 1.0
        return self.schedules[group].factor(max(0, step - origin) / self.total_steps)

    def removal_step(self, group: str) -> int | None:
        """The step at which ``group`` is removed: the first ``s`` with ``(s - origin)/T >=
        remove_at`` (origin 0, or the step the training loss began to fall); None while unknown."""
        origin = self._origin(group)
        if origin is None:
            return None
        return origin + self._steps(self.schedules[group].remove_at)

    def _steps(self, fraction: float) -> int:
        """The first step count ``s`` with ``s/T >= fraction`` (float-safe)."""
        return math.ceil(fraction * self.total_steps - 1e-6)

    def removal_due(self, group: str) -> bool:
        """Whether ``group`` is still present and its removal step has come."""
        at = self.removal_step(group)
        return group not in self.removed and at is not None and self._step >= at

    @property
    def step_loss(self) -> torch.Tensor | None:
        """The mean of the training losses ``loss()`` computed since the last ``step()`` (several
        under gradient accumulation), while a schedule waits for the loss to fall; else None."""
        if not self._step_losses:
            return None
        return torch.stack([v.float() for v in self._step_losses]).mean()

    def step(self, loss: float | torch.Tensor | None = None) -> None:
        """Call once after every optimizer step: move the gates, remove ghosts that are done, and
        (with ``[dynamic]``) move the masks when an update is due (in place, with the optimizer's
        state at the positions that changed). ``loss``: the step's training loss, read while a
        ghost schedule with ``start = "learning"`` waits for it to fall (``waits_for_learning``);
        by default ``step_loss``, the losses ``loss()`` computed with autograd on since the last
        step. Under data parallelism pass the mean over ranks (``fxdist.step`` does), so that every
        rank decides alike."""
        if loss is None:
            loss = self.step_loss
        if self.waits_for_learning and loss is None:  # before the step counts: the caller may retry
            raise ValueError("this recipe has a ghost schedule with start = \"learning\" (its fractions count "
                             "from the step the training loss begins to fall): compute the training loss with "
                             "sched.loss(...) or pass it, sched.step(loss), until sched.waits_for_learning is False")
        self._step_losses.clear()
        self._step += 1
        if self.waits_for_learning:
            self._observe(float(loss))
        self._apply(notify=True)
        if self.dynamic is not None:
            self.dynamic.step(self._step, self.optimizer)

    @property
    def mask_updates(self) -> list[dict[str, Any]]:
        """One record per ``[dynamic]`` mask update so far (``fxsparse.masks.dynamic.DynamicMasks``)."""
        return self.dynamic.history if self.dynamic is not None else []

    def _observe(self, loss: float) -> None:
        onset = self.onset
        if onset.observe(self._step, loss):
            log.info("step %d: the training loss has begun to fall (last %d steps %.4f, first %d %.4f): the ghost "
                     "schedules with start = \"learning\" count from here", self._step, LEARNING_WINDOW,
                     sum(onset.recent) / LEARNING_WINDOW, LEARNING_WINDOW, sum(onset.first) / LEARNING_WINDOW)
        elif self._step >= self._latest_onset:
            # from the latest origin that still removes every such ghost by step T (0 if remove_at = 1)
            onset.step, onset.forced = min(self._step, self._latest_onset), True
            log.warning("step %d: the training loss has not begun to fall, and the ghost schedules with start = "
                        "\"learning\" must start now to end by the last step", self._step)

    def due(self) -> list[str]:
        """The ghost groups the next ``step()`` may remove (while a schedule waits for the loss to
        fall, those that would leave at the step it is found)."""
        out = []
        for g in self.schedules:
            if g in self.removed:
                continue
            at = self.removal_step(g)
            if at is None:  # found at the next step at the earliest: removed then if remove_at is 0
                at = self._step + 1 + self._steps(self.schedules[g].remove_at)
            if self._step + 1 >= at:
                out.append(g)
        return out

    def _teacher_step(self) -> int | None:
        spec = self.recipe.distill
        if not spec.enabled:
            return None
        return max(1, self._steps(spec.fraction(self.recipe, self.plain)))

    def _snapshot_teacher(self, resumed_at: int | None = None) -> None:
        # the copy keeps its own gate buffers: the scheduler moves only self.gm's, so the teacher
        # stays the network as it is now (its ghosts on) while the student's ghosts leave
        teacher = copy.deepcopy(self.gm)
        teacher.requires_grad_(False)
        teacher.train()  # batch statistics: a sparse network's running ones lag (precise BN, docs/results.md)
        self.teacher, self._teacher_removed = teacher, list(self.removed)
        if resumed_at is None:
            log.info("step %d (%.1f%%): distilling from here on from a frozen copy of the network (gates %s)",
                     self._step, 100 * self.fraction, _gates.get(teacher) or "none")
        else:  # restore rebuilds the copy before it sets the step: say the checkpoint's step
            log.info("resumed at step %d: distilling from the checkpoint's frozen copy of the network", resumed_at)

    def teacher_logits(self, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The teacher's output for this batch, without gradient; ``None`` when there is no teacher
        (no ``[distill]``, or before ``distill.at``)."""
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(*args, **kwargs)

    def _apply(self, notify: bool = False) -> None:
        if self.teacher is None and self.teacher_step is not None and self._step == self.teacher_step:
            self._snapshot_teacher()  # before any removal due at the same step: the teacher has that ghost
        current = _gates.get(self.gm)
        for group in self.schedules:
            if group in self.removed:
                continue
            if self.removal_due(group):
                if notify and self.before_removal is not None:
                    self.before_removal(group)
                self._remove(group)
                if notify and self.on_removal is not None:
                    self.on_removal(dict(self.events[-1]))
            elif group in current:
                _gates.set(self.gm, group, self.gate_at(group, self._step))

    def _remove(self, group: str) -> None:
        params = _ghosts.parameters(self.gm, group)
        gm = _ghosts.remove_group(self.gm, group)
        if gm is not self.gm:  # removal passes work in place; the optimizer and the user hold self.gm
            raise RuntimeError(f"the removal pass of {group} returned a new module instead of editing it in place")
        dropped = drop_parameters(self.optimizer, params) if self.optimizer is not None else 0
        self.removed.append(group)
        event = {"event": "remove", "group": group, "step": self._step, "fraction": self.fraction,
                 "parameters": sum(p.numel() for p in params), "tensors": len(params),
                 "dropped_from_optimizer": dropped}
        self.events.append(event)
        log.info("step %d (%.1f%%): removed %s (%d tensors, %d parameters)", self._step, 100 * self.fraction,
                 group, len(params), event["parameters"])

    # ------------------------------------------------------------------ loss
    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
             teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy with the recipe's label smoothing at the current step (plain CE if off);
        with ``teacher_logits`` (``teacher_logits(x)``), mixed with the distillation term:
        ``(1 - alpha) * CE + alpha * distillation_loss``."""
        ls = self.recipe.label_smoothing
        out = smoothed_cross_entropy(logits, targets, self.label_smoothing, ls.form, reduction)
        if teacher_logits is not None:
            spec = self.recipe.distill
            kd = distillation_loss(logits, teacher_logits.to(logits.dtype), spec.temperature, reduction)
            out = (1.0 - spec.alpha) * out + spec.alpha * kd
        if self.waits_for_learning and out.requires_grad:  # a training loss (an evaluation's has no graph)
            value = out.detach()
            self._step_losses.append(value.mean() if reduction == "none" else value)
        return out

    # ------------------------------------------------------------------ optimizer
    def ghost_param_groups(self, **options: Any) -> list[dict[str, Any]]:
        """One optimizer param group per scheduled ghost group (empty once removed), tagged with
        ``fxsparse_group``; ``options`` (lr, weight_decay, ...) are copied into each."""
        return [{"params": _ghosts.parameters(self.gm, g) if g not in self.removed else [], GROUP_KEY: g, **options}
                for g in self.schedules]

    def param_groups(self, **ghost_options: Any) -> list[dict[str, Any]]:
        """Every parameter of the module: the original ones in group ``main``, then
        ``ghost_param_groups(**ghost_options)``. Hand it to any ``torch.optim`` optimizer."""
        ghost_groups = self.ghost_param_groups(**ghost_options)
        ghost_ids = {id(p) for g in ghost_groups for p in g["params"]}
        main = [p for p in self.gm.parameters() if id(p) not in ghost_ids and p.requires_grad]
        return [{"params": main, GROUP_KEY: MAIN_GROUP}, *ghost_groups]

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The recipe's optimizer (``[training]``) over ``param_groups()``, attached to this scheduler."""
        t = self.recipe.training
        if t.optimizer == "sgd":
            opt = torch.optim.SGD(self.param_groups(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                                  weight_decay=t.weight_decay)
        else:
            opt = torch.optim.AdamW(self.param_groups(), lr=t.lr, weight_decay=t.weight_decay)
        self.optimizer = opt
        return opt

    def build_lr_scheduler(self, optimizer: torch.optim.Optimizer | None = None) -> torch.optim.lr_scheduler.LambdaLR:
        """The recipe's lr schedule (step/cosine/constant, warm-up) per optimizer step."""
        optimizer = optimizer or self.optimizer
        if optimizer is None:
            raise ValueError("build_lr_scheduler needs an optimizer: call build_optimizer() first or pass one")
        training, total = self.recipe.training, self.total_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, training))
        return self.lr_scheduler

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "total_steps": self.total_steps,
            "removed": list(self.removed),
            "events": [dict(e) for e in self.events],
            "recipe": self.recipe.to_dict(),
            "recipe_name": self.recipe.name,
            **({"dynamic": self.dynamic.state_dict()} if self.dynamic is not None else {}),
            **({"learning": self.onset.state_dict()} if self.onset is not None else {}),
            **({"teacher": {"removed": list(self._teacher_removed), "weights": self.teacher.state_dict()}}
               if self.teacher is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: replay the removals ``state`` had done (on the module and the optimizer), then
        set the step. Load the module's weights *after* this (the removals change its keys)."""
        if state["total_steps"] != self.total_steps:
            raise ValueError(f"the checkpoint was made for total_steps={state['total_steps']}, this scheduler has "
                             f"{self.total_steps}: schedules are fractions of T, so they would move")
        unknown = set(state["removed"]) - set(self.schedules)
        if unknown:
            raise ValueError(f"the checkpoint removed {sorted(unknown)}, which this module's recipe does not schedule")
        teacher = state.get("teacher")
        if teacher is not None and self.teacher is None:
            if list(state["removed"][:len(teacher["removed"])]) != list(teacher["removed"]):
                raise ValueError(f"the checkpoint's teacher had {teacher['removed']} removed, which is not how its "
                                 f"removals {state['removed']} began")
            for group in teacher["removed"]:  # the teacher's graph: the removals before its copy
                if group not in self.removed:
                    self._remove(group)
            self._snapshot_teacher(resumed_at=int(state["step"]))
            self.teacher.load_state_dict(teacher["weights"])
        for group in state["removed"]:
            if group not in self.removed:
                self._remove(group)
        self._step = int(state["step"])
        self.events = [dict(e) for e in state["events"]]
        if self.onset is not None and "learning" in state:
            self.onset.load_state_dict(state["learning"])
        if self.dynamic is not None and "dynamic" in state:  # replays the end of the phase, if it had come
            self.dynamic.load_state_dict(state["dynamic"])
        self._apply()

    def checkpoint(self) -> dict[str, Any]:
        """Everything ``restore`` needs: module, scheduler, and (when attached) optimizer and lr state."""
        ckpt = {"model": self.gm.state_dict(), "scheduler": self.state_dict()}
        if self.optimizer is not None:
            ckpt["optimizer"] = self.optimizer.state_dict()
        if self.lr_scheduler is not None:
            ckpt["lr_scheduler"] = self.lr_scheduler.state_dict()
        return ckpt


def ghost_schedules_plain(gm: GraphModule, recipe: Recipe) -> bool:
    """Whether ``gm``'s ghosts follow their ``schedule_plain`` (the recipe has one and ``transform``
    found the traced graph plain: ``gm.meta[PLAIN_KEY]``)."""
    if not recipe.reads_plain:
        return False
    if PLAIN_KEY not in gm.meta:
        log.warning("recipe %r gives a schedule_plain, but this module does not say whether its traced graph was "
                    "plain (it was not built by fxsparse.transform with this recipe): every ghost follows its "
                    "schedule", recipe.name)
        return False
    return bool(gm.meta[PLAIN_KEY])


def _dynamic_masks(gm: GraphModule, recipe: Recipe, total_steps: int):
    """The ``[dynamic]`` mask updater of a run, or None when the recipe's masks stay fixed."""
    spec = recipe.passes.get("dynamic")
    if spec is None or not spec.enabled:
        return None
    from .masks.dynamic import DynamicMasks, DynamicSchedule

    options = {k: v for k, v in spec.options.items() if k != "final_sparsity"}  # gmp: the [masks] mask's
    options.setdefault("seed", int(recipe.masks.options.get("seed", 0)))
    return DynamicMasks(gm, DynamicSchedule.create(**options), total_steps,
                        final_sparsity=recipe.masks.options.get("sparsity"))


def restore(
    model: nn.Module,
    checkpoint: Mapping[str, Any],
    recipe: Recipe | str | None = None,
    *,
    example_inputs: Any = None,
    make_optimizer: Callable[[RecipeScheduler], torch.optim.Optimizer] | None = RecipeScheduler.build_optimizer,
) -> RecipeScheduler:
    """Resume a run from ``sched.checkpoint()`` on a fresh instance of the original model.

    In this order: transform ``model`` with the checkpoint's masks (no mask scoring, no LRsI: the
    weights are loaded anyway), replay the removals that had happened, load the module's weights,
    then build the optimizer with ``make_optimizer`` (default: the recipe's) and load its state,
    and the lr scheduler's if there was one. Returns the scheduler; ``sched.gm`` is the module and
    ``sched.optimizer`` / ``sched.lr_scheduler`` are ready to continue.
    """
    from .passes.mask import mask_buffer_name

    state = checkpoint["scheduler"]
    if recipe is None:
        recipe = from_dict(state["recipe"], name=state.get("recipe_name", "recipe"))
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    prefix = mask_buffer_name("")
    masks = {k[len(prefix):]: v for k, v in checkpoint["model"].items() if k.startswith(prefix)}
    skip = ["rescale"] + ([] if masks else ["masks"])
    gm = transform(model, recipe, masks=masks or None, example_inputs=example_inputs, skip=skip)
    sched = RecipeScheduler(gm, recipe, total_steps=state["total_steps"])
    sched.load_state_dict(state)
    gm.load_state_dict(checkpoint["model"])
    if make_optimizer is not None and "optimizer" in checkpoint:
        sched.optimizer = make_optimizer(sched)
        if "lr_scheduler" in checkpoint:
            # before the optimizer state: a new LambdaLR resets every group's lr to its step-0 value
            sched.build_lr_scheduler().load_state_dict(checkpoint["lr_scheduler"])
        sched.optimizer.load_state_dict(checkpoint["optimizer"])
    return sched
