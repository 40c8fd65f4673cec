"""``fxsparse.transform``: trace a model and run a recipe's passes on it.

Passes are looked up by name in the registry (``fxsparse.registry``, re-exported here), so a new
pass plugs in with one ``register_pass`` call and a ``[name]`` table in the recipe. The registry
also tells ``load_recipe`` which options each pass accepts and checks their values (from its
constructor), so a misspelled option or a bad value fails when the recipe is loaded, not halfway
through a run.
"""
from __future__ import annotations

import copy as _copy
import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.fx import GraphModule

from .errors import MaskError, RecipeError
from .graph import parameterized_layers
from .pass_infra import run_passes
from .recipe import Recipe, load_recipe
from .registry import Context, build_pass, pass_names, pass_option_names, register_pass, unregister_pass

log = logging.getLogger(__name__)

__all__ = ["transform", "register_pass", "unregister_pass", "pass_names", "pass_option_names", "Context",
           "RECIPE_KEY"]

RECIPE_KEY = "fxsparse.recipe"  # gm.meta[RECIPE_KEY] is the Recipe the module was built with
# gm.meta[PLAIN_KEY]: whether the traced graph, before any ghost, is a plain network (no path around
# any layer: fxsparse.graph.is_plain); set when a ghost of the recipe has a schedule_plain or
# plain_mask_methods
PLAIN_KEY = "fxsparse.plain"
# gm.meta[GHOSTS_OFF_KEY]: {ghost group: why it was not added here} for enabled ghosts the recipe
# rules out on this network (plain_mask_methods), so inspection can say so
GHOSTS_OFF_KEY = "fxsparse.ghosts_off"


# --------------------------------------------------------------------------- transform
def transform(
    model: nn.Module,
    recipe: Any = "tost",
    *,
    masks: dict[str, torch.Tensor] | None = None,
    data: Iterable | None = None,
    example_inputs: Any = None,
    loss_fn: Callable | None = None,
    copy: bool = True,
    skip: Iterable[str] = (),
) -> GraphModule:
    """Trace ``model`` and run the recipe's enabled passes on it, in ``PASS_ORDER``.

    Args:
        model: any ``nn.Module`` (or a ``GraphModule`` from ``fxsparse.trace``).
        recipe: a ``Recipe``, a shipped recipe name or a path to a TOML file.
        masks: ``{parameter name: bool tensor}``; computed with ``fxsparse.masks.compute`` from the
            recipe's ``[masks]`` table (or loaded from its ``path``) when ``None``.
        data: an iterable of ``(inputs, targets)`` batches, for data-driven masks and for LRsI.
        example_inputs: inputs for tracing (shapes only); when ``None``, the first batch's inputs
            if ``data`` is a list, else ``fxsparse.trace``'s default for the model.
        loss_fn: ``loss_fn(logits, targets)`` for mask scoring and LRsI (cross-entropy by default).
        copy: transform a deep copy, leaving ``model`` untouched (LRsI rescales weights in place).
        skip: pass names not to run, e.g. ``("rescale",)`` when resuming from a checkpoint whose
            weights are loaded afterwards anyway (see ``fxsparse.scheduler.restore``).

    Returns the rewritten ``GraphModule``; ``gm.meta["fxsparse.recipe"]`` is the ``Recipe``.
    """
    from .trace import trace as _trace

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    skip = set(skip)
    unknown = skip - set(pass_names())
    if unknown:
        raise RecipeError(f"skip={sorted(unknown)} names no pass; passes: {', '.join(pass_names())}")
    if copy:
        model = _copy.deepcopy(model)
    if example_inputs is None and isinstance(data, (list, tuple)) and data:
        first = data[0]  # only from a list: peeking into a loader would start an epoch or workers
        if isinstance(first, (tuple, list)) and first:
            example_inputs = first[0]
    gm = model if isinstance(model, GraphModule) else _trace(model, example_inputs)

    if recipe.masks.enabled and "masks" not in skip and masks is None:
        masks = _compute_masks(gm, recipe, data, loss_fn)
    plain = None
    if recipe.reads_plain:
        from .graph import is_plain

        plain = is_plain(gm)  # before the ghosts: their branches are paths around layers
    ctx = Context(gm=gm, recipe=recipe, data=data, loss_fn=loss_fn, masks=masks)

    passes, off = [], {}
    for name in pass_names():
        if name in skip:
            continue
        if name == "masks":
            if masks is not None:  # explicit masks are applied even if the recipe disables [masks]
                passes.append(build_pass("masks", {}, ctx))
            continue
        spec = recipe.passes.get(name)
        if spec is None or not spec.enabled:
            continue
        why = spec.off_because(bool(plain), recipe.mask_method)
        if why is not None:
            log.info("recipe %r: no %s on %s", recipe.name, name, why)
            off[name] = why
            continue
        try:
            passes.append(build_pass(name, dict(spec.options), ctx))
        except TypeError as e:  # an option the constructor does not take (not checkable at load time)
            raise RecipeError(f"recipe {recipe.name!r}: the options of [{name}] do not fit its pass: {e}") from None

    log.info("recipe %r: running %s", recipe.name, ", ".join(p.name for p in passes) or "no pass")
    if passes:
        gm = run_passes(gm, passes).graph_module
    gm.meta[RECIPE_KEY] = recipe
    if plain is not None:
        gm.meta[PLAIN_KEY] = plain
    if off:
        gm.meta[GHOSTS_OFF_KEY] = off
    return gm


def _compute_masks(gm: GraphModule, recipe, data, loss_fn) -> dict[str, torch.Tensor]:
    import fxsparse.masks as masks_mod

    options = dict(recipe.masks.options)  # method, sparsity, distribution, path (file), method options
    if not parameterized_layers(gm):  # said in the recipe's terms, not as a mask method's complaint
        dynamic = recipe.passes.get("dynamic")
        moving = dynamic is not None and dynamic.enabled
        needs = "[masks]" + (f" and [dynamic] (method = {dynamic.options.get('method')!r})" if moving else "")
        off = "masks.enabled = false" + (" and dynamic.enabled = false" if moving else "")
        raise MaskError(f"recipe {recipe.name!r}: {needs} need a conv or linear layer to mask, and the model has "
                        f"none; use a model with one, or set {off} to train it dense.")
    if loss_fn is not None:
        options["loss_fn"] = loss_fn
    return masks_mod.compute(gm, data=data, **options)
