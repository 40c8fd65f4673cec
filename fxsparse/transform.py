"""``fxsparse.transform``: trace a model and run a recipe's passes on it.

Passes are looked up by name in a small registry, so a new pass plugs in with one
``register_pass`` call and a ``[name]`` table in the recipe: the built-in entries are the mask
pass, LRsI (``rescale``) and every ghost group of ``fxsparse.passes.GHOST_GROUPS``. The registry
also tells ``load_recipe`` which options each pass accepts (from its constructor's signature),
so a misspelled option fails when the recipe is loaded, not halfway through a run.
"""
from __future__ import annotations

import copy as _copy
import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.fx import GraphModule

from .errors import RecipeError
from .pass_infra import FxSparsePass, run_passes

log = logging.getLogger(__name__)

__all__ = ["transform", "register_pass", "pass_names", "pass_option_names", "Context", "RECIPE_KEY"]

RECIPE_KEY = "fxsparse.recipe"  # gm.meta[RECIPE_KEY] is the Recipe the module was built with


@dataclass
class Context:
    """What a pass builder may need besides its recipe options."""

    gm: GraphModule
    recipe: Any
    data: Iterable | None
    loss_fn: Callable | None
    masks: dict[str, torch.Tensor] | None


@dataclass
class _Entry:
    name: str
    build: Callable[[dict, Context], FxSparsePass]
    pass_class: str | Callable[[], type] | None  # its constructor's keywords are the recipe options
    exclude: tuple[str, ...]  # constructor arguments transform supplies itself


_REGISTRY: dict[str, _Entry] = {}


def register_pass(
    name: str,
    build: Callable[[dict, Context], FxSparsePass],
    *,
    pass_class: str | type | None = None,
    exclude: Iterable[str] = (),
) -> None:
    """Make ``[name]`` in a recipe run ``build(options, ctx)`` (the pass instance to run).

    ``pass_class`` (a class, or ``"fxsparse.passes.module:Class"`` imported lazily) lets
    ``load_recipe`` check the options against its constructor; ``exclude`` names the constructor
    arguments that ``build`` fills in itself (such as ``data``). Passes run in
    ``fxsparse.passes.PASS_ORDER``, then the others in registration order.
    """
    _REGISTRY[name] = _Entry(name, build, pass_class, tuple(exclude))


def pass_names() -> list[str]:
    """Every registered pass, in the order a recipe runs them."""
    from .passes import PASS_ORDER

    _register_builtins()
    return [n for n in PASS_ORDER if n in _REGISTRY] + [n for n in _REGISTRY if n not in PASS_ORDER]


def pass_option_names(name: str) -> set[str] | None:
    """The options a pass accepts in its recipe table; ``None`` when they cannot be known yet
    (the pass module is not there, or its constructor takes ``**kwargs``)."""
    _register_builtins()
    entry = _REGISTRY.get(name)
    if entry is None or entry.pass_class is None:
        return None
    cls = _import_class(entry.pass_class, missing_ok=True)
    if cls is None:
        return None
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not p.VAR_POSITIONAL} - set(entry.exclude)


def _import_class(spec: str | type | Callable[[], type], *, missing_ok: bool = False) -> type | None:
    if isinstance(spec, type):
        return spec
    if callable(spec):
        return spec()
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        # only the pass's own module may be missing (not yet written); anything else is a bug
        if missing_ok and e.name == mod_name:
            return None
        raise
    return getattr(mod, attr)


# --------------------------------------------------------------------------- built-in passes
def _build_masks(options: dict, ctx: Context) -> FxSparsePass:
    from .passes.mask import MaskPass

    return MaskPass(ctx.masks)


def _build_rescale(options: dict, ctx: Context) -> FxSparsePass:
    if ctx.data is None:
        raise RecipeError(
            f"recipe {ctx.recipe.name!r} enables [rescale] (LRsI), which searches per-layer scales on real "
            f"batches: pass data=<iterable of (inputs, targets)> to fxsparse.transform, or set "
            f"rescale.enabled = false."
        )
    cls = _import_class("fxsparse.passes.rescale_init:RescaleInitPass", missing_ok=True)
    if cls is None:
        raise RecipeError(f"recipe {ctx.recipe.name!r} enables [rescale] (LRsI), but its pass "
                          f"(fxsparse.passes.rescale_init) is not installed; set rescale.enabled = false.")
    return cls(ctx.data, ctx.loss_fn, **options)


def _ghost_builder(group: str) -> Callable[[dict, Context], FxSparsePass]:
    def build(options: dict, ctx: Context) -> FxSparsePass:
        from .passes import GHOST_GROUPS

        spec = "fxsparse.passes." + GHOST_GROUPS[group][0]
        cls = _import_class(spec, missing_ok=True)
        if cls is None:
            raise RecipeError(
                f"recipe {ctx.recipe.name!r} enables [{group}], but its pass ({spec}) is not installed in "
                f"this fxsparse; set {group}.enabled = false."
            )
        if "seed" not in options and "seed" in inspect.signature(cls.__init__).parameters:
            # ghost weights and branch masks follow the run's seed (the mask's), unless the recipe pins one
            options = {**options, "seed": int(ctx.recipe.masks.options.get("seed", 0))}
        return cls(**options)

    return build


def _ghost_class(group: str) -> Callable[[], type | None]:
    def load() -> type | None:
        from .passes import GHOST_GROUPS

        return _import_class("fxsparse.passes." + GHOST_GROUPS[group][0], missing_ok=True)

    return load


def _register_builtins() -> None:
    if "masks" in _REGISTRY:
        return
    from .passes import GHOST_GROUPS

    register_pass("masks", _build_masks)
    register_pass("rescale", _build_rescale, pass_class="fxsparse.passes.rescale_init:RescaleInitPass",
                  exclude=("data", "loss_fn"))
    for group in GHOST_GROUPS:
        register_pass(group, _ghost_builder(group), pass_class=_ghost_class(group))


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
    from .recipe import Recipe, load_recipe

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
    ctx = Context(gm=gm, recipe=recipe, data=data, loss_fn=loss_fn, masks=masks)

    passes = []
    for name in pass_names():
        if name in skip:
            continue
        if name == "masks":
            if masks is not None:  # explicit masks are applied even if the recipe disables [masks]
                passes.append(_REGISTRY["masks"].build({}, ctx))
            continue
        spec = recipe.passes.get(name)
        if spec is None or not spec.enabled:
            continue
        try:
            passes.append(_REGISTRY[name].build(dict(spec.options), ctx))
        except TypeError as e:  # an option the constructor does not take (not checkable at load time)
            raise RecipeError(f"recipe {recipe.name!r}: the options of [{name}] do not fit its pass: {e}") from None

    log.info("recipe %r: running %s", recipe.name, ", ".join(p.name for p in passes) or "no pass")
    if passes:
        gm = run_passes(gm, passes).graph_module
    gm.meta[RECIPE_KEY] = recipe
    return gm


def _compute_masks(gm: GraphModule, recipe, data, loss_fn) -> dict[str, torch.Tensor]:
    import fxsparse.masks as masks_mod

    options = dict(recipe.masks.options)  # method, sparsity, distribution, path (file), method options
    if loss_fn is not None:
        options["loss_fn"] = loss_fn
    return masks_mod.compute(gm, data=data, **options)
