"""The pass registry: which pass a recipe's ``[name]`` table runs, and which options it takes.

``fxsparse.recipe`` (validation) and ``fxsparse.transform`` (building and running passes) both
read it; it depends on neither. The built-in entries are the mask pass, LRsI (``rescale``) and
every ghost group of ``fxsparse.passes.GHOST_GROUPS``; ``register_pass`` plugs in another.

Option checks happen when a recipe loads, for every table, enabled or not, and need no graph:

* each value must fit the annotation of its constructor argument (``bool``, ``int``, ``float``,
  ``str``, ``Literal[...]``, ``tuple[str, ...]``, unions of these);
* then the pass is constructed from the options alone, since pass constructors only validate and
  store their options (a convention, docs/architecture.md): a value the constructor refuses fails
  here, named by key, instead of when the pass is built for a run.
"""
from __future__ import annotations

import collections.abc
import importlib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping

from .errors import FxSparseError, RecipeError

if TYPE_CHECKING:
    import torch
    from torch.fx import GraphModule

    from .pass_infra import FxSparsePass

__all__ = [
    "Context", "register_pass", "unregister_pass", "pass_names", "pass_option_names", "check_options",
    "build_pass", "BadOption",
]


@dataclass
class Context:
    """What a pass builder may need besides its recipe options."""

    gm: "GraphModule"
    recipe: Any
    data: Iterable | None
    loss_fn: Callable | None
    masks: "dict[str, torch.Tensor] | None"


@dataclass
class _Entry:
    name: str
    build: Callable[[dict, Context], "FxSparsePass"]
    pass_class: str | Callable[[], type] | None  # its constructor's keywords are the recipe options
    exclude: tuple[str, ...]  # constructor arguments transform supplies itself


_REGISTRY: dict[str, _Entry] = {}


def register_pass(
    name: str,
    build: Callable[[dict, Context], "FxSparsePass"],
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
    _register_builtins()
    _REGISTRY[name] = _Entry(name, build, pass_class, tuple(exclude))


def unregister_pass(name: str) -> None:
    """Forget a pass registered with ``register_pass``."""
    _REGISTRY.pop(name, None)


def pass_names() -> list[str]:
    """Every registered pass, in the order a recipe runs them."""
    from .passes import PASS_ORDER

    _register_builtins()
    return [n for n in PASS_ORDER if n in _REGISTRY] + [n for n in _REGISTRY if n not in PASS_ORDER]


def build_pass(name: str, options: dict, ctx: Context) -> "FxSparsePass":
    """The pass instance ``[name]`` with ``options`` runs."""
    _register_builtins()
    return _REGISTRY[name].build(options, ctx)


def _options_of(name: str) -> tuple[type, dict[str, inspect.Parameter]] | None:
    """The pass class of ``name`` and its recipe options (constructor arguments but the excluded),
    or ``None`` when they cannot be known (no class, its module is missing, ``**kwargs``)."""
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
    return cls, {p.name: p for p in params if p.kind is not p.VAR_POSITIONAL and p.name not in entry.exclude}


def pass_option_names(name: str) -> set[str] | None:
    """The options a pass accepts in its recipe table; ``None`` when they cannot be known yet
    (the pass module is not there, or its constructor takes ``**kwargs``)."""
    found = _options_of(name)
    return None if found is None else set(found[1])


class BadOption(Exception):
    """An option value a pass does not accept: ``allowed`` says what is (from the annotation), or
    ``reason`` is what the constructor said; ``key`` is None when the options do not fit together."""

    def __init__(self, key: str | None, value: Any, allowed: str = "", reason: str = ""):
        super().__init__(f"{key} = {value!r}: {allowed or reason}")
        self.key, self.value, self.allowed, self.reason = key, value, allowed, reason


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Check the values of ``[name]``'s options without a graph; raise ``BadOption`` on the first
    bad one. Option names are checked by the caller (``pass_option_names``)."""
    found = _options_of(name)
    if found is None:
        return
    cls, params = found
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve at run time: check what the constructor does
        hints = {}
    for key, value in options.items():
        if key in hints and not _fits(value, hints[key]):
            raise BadOption(key, value, _describe(hints[key]))
    # the constructor's own checks (ranges, choices, options that need each other)
    problem = _refused(cls, dict(options))
    if problem is None:
        return
    for key, value in options.items():  # name the key when one value alone is refused
        if _refused(cls, {key: value}) is not None:
            raise BadOption(key, value, reason=problem)
    raise BadOption(None, dict(options), reason=problem)


def _refused(cls: type, options: dict) -> str | None:
    try:
        cls(**options)
    except (FxSparseError, TypeError, ValueError) as e:
        return str(e)
    return None


def _fits(value: Any, tp: Any) -> bool:
    """Whether a TOML value fits an annotation (unknown annotations accept anything)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    return True


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    if tp in simple:
        return simple[tp]
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if args:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return "a list"


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
def _build_masks(options: dict, ctx: Context) -> "FxSparsePass":
    from .passes.mask import MaskPass

    return MaskPass(ctx.masks)


def _build_rescale(options: dict, ctx: Context) -> "FxSparsePass":
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


def _ghost_builder(group: str) -> Callable[[dict, Context], "FxSparsePass"]:
    def build(options: dict, ctx: Context) -> "FxSparsePass":
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

    _REGISTRY["masks"] = _Entry("masks", _build_masks, None, ())
    _REGISTRY["rescale"] = _Entry("rescale", _build_rescale, "fxsparse.passes.rescale_init:RescaleInitPass",
                                  ("data", "loss_fn"))
    for group in GHOST_GROUPS:
        _REGISTRY[group] = _Entry(group, _ghost_builder(group), _ghost_class(group), ())
    # [dynamic]: masks that move (RigL, SET, gmp); runs last, after the ghosts (docs/dynamic-masks.md)
    _REGISTRY["dynamic"] = _Entry("dynamic", _build_dynamic, "fxsparse.passes.dynamic_masks:DynamicMaskPass", ())


def _build_dynamic(options: dict, ctx: Context) -> "FxSparsePass":
    from .passes.dynamic_masks import DynamicMaskPass

    options = dict(options)
    if "seed" not in options:  # SET's random regrowth follows the run's seed (the mask's)
        options["seed"] = int(ctx.recipe.masks.options.get("seed", 0))
    # gmp ends at the [masks] mask (final_sparsity, when given, became masks.sparsity at load)
    return DynamicMaskPass(**options)
