"""Recipes: what a ToST-style sparse training run does, as a validated TOML file.

A recipe names the mask (method, sparsity, distribution), each graph pass and its options, each
ghost's schedule as fractions of training, label smoothing and the training protocol. Shipped
recipes live in ``recipes/`` (``fxsparse.recipes.available()``); ``load_recipe`` takes one of
their names or a path. ``docs/recipes.md`` documents every key.

Validation is strict: an unknown key, a value of the wrong type or out of range, or schedule
fractions out of order raise ``fxsparse.errors.RecipeError`` naming the key path, the bad value
and what is allowed, so a typo never silently falls back to a default. Pass options are checked
against the pass's constructor (``fxsparse.registry.check_options``) in every table, enabled or
not.

Inheritance: ``extends = "tost"`` (a shipped name or a path relative to the extending file)
loads the parent's tables and deep-merges the child's keys over them before validation. A child
(or an override) that sets a ghost's ``schedule`` without its ``schedule_plain`` drops the
inherited ``schedule_plain``: the schedule it gives then holds on every network.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import RecipeError
from .registry import BadOption, check_options, pass_names, pass_option_names

__all__ = [
    "Recipe", "PassSpec", "Schedule", "LabelSmoothing", "Distill", "Training", "load_recipe", "from_dict",
    "schedule_overrides",
    "GHOST_SHAPES", "MASK_METHODS", "MASK_DISTRIBUTIONS",
]

GHOST_SHAPES = ("linear", "cosine")
SMOOTHING_SHAPES = ("constant", "linear", "cosine")
SCHEDULE_STARTS = ("step", "learning")  # where a ghost schedule's fractions count from (Schedule.start)
SMOOTHING_FORMS = ("tost", "torch")  # eps/(C-1) on every other class, or torch's eps/C on all
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("step", "cosine", "constant")
# Used when fxsparse.masks does not say which methods it has (it states them as METHODS).
MASK_METHODS = ("random", "magnitude", "taylor", "snip", "grasp", "synflow", "imp", "file")
MASK_DISTRIBUTIONS = ("global", "uniform", "er", "erk")

_TOP = ("name", "description", "extends", "masks", "label_smoothing", "distill", "training")
_PASS_RESERVED = ("enabled", "schedule", "schedule_plain", "plain_mask_methods")
_MASK_KEYS = ("enabled", "method", "sparsity", "distribution", "path")
_EPS = 1e-12


# --------------------------------------------------------------------------- dataclasses
@dataclass(frozen=True)
class Schedule:
    """How a factor moves over training, as fractions ``t`` of the total steps.

    The factor is 1 until ``hold_until``, falls to 0 by ``anneal_until`` along ``shape``
    (``linear`` or ``cosine``; ``constant`` never moves) and stays 0 after. For a ghost the
    factor is its gate, and ``remove_at`` is when the removal pass deletes the ghost (never before
    the gate reached 0, so removal never changes what the network computes).

    ``start`` (ghosts only) is where the fractions count from: ``"step"``, step 0;
    ``"learning"``, the step at which the training loss has begun to fall
    (``fxsparse.scheduler.LearningOnset``): until then the gate stays at 1, and every fraction is
    counted from there (``RecipeScheduler`` finds the step from the losses it is given).
    """

    hold_until: float = 0.0
    anneal_until: float = 0.0
    shape: str = "cosine"
    remove_at: float | None = None
    start: str = "step"

    def factor(self, t: float) -> float:
        if self.shape == "constant" or t < self.hold_until:
            return 1.0
        if t >= self.anneal_until - 1e-12:  # s/T can land a rounding error short of the fraction
            return 0.0
        p = (t - self.hold_until) / (self.anneal_until - self.hold_until)
        if self.shape == "linear":
            return 1.0 - p
        return 0.5 * (1.0 + math.cos(math.pi * p))

    def describe(self) -> str:
        """``"1 until 60%, linear to 0 by 80%, removed at 80%"`` (fractions as percentages of training)."""
        if self.shape == "constant":
            return "constant"
        held = f"1 until {self.hold_until:.0%}, " if self.hold_until > 0 else ""
        text = (f"{held}{self.shape} {'to' if held else 'from 1 to'} 0 by {self.anneal_until:.0%}"
                if self.anneal_until > self.hold_until else f"1 until {self.hold_until:.0%}, then 0")
        text += f", removed at {self.remove_at:.0%}" if self.remove_at is not None else ""
        return text + (" (counted from the step the training loss starts to fall)" if self.start == "learning" else "")


@dataclass(frozen=True)
class PassSpec:
    """One graph pass of the recipe: whether it runs, its constructor options, its schedule."""

    name: str
    enabled: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    schedule: Schedule | None = None  # ghost groups only
    # ghost groups only: the schedule used instead on a plain network (no path goes around any
    # layer of the traced graph: fxsparse.graph.is_plain), when the recipe gives one
    schedule_plain: Schedule | None = None
    # ghost groups only: on a plain network the ghost runs only with a mask of one of these methods
    # (the recipe's [masks] method); None: with any mask
    plain_mask_methods: tuple[str, ...] | None = None

    def schedule_for(self, plain: bool) -> Schedule | None:
        """The schedule this ghost follows on a network that is (``plain``) or is not plain."""
        return self.schedule_plain if plain and self.schedule_plain is not None else self.schedule

    def off_because(self, plain: bool, mask_method: str | None) -> str | None:
        """Why this ghost does not run on this network (None: it runs): on a plain network, a mask
        method outside ``plain_mask_methods``. ``mask_method`` None (no mask) is never ruled out."""
        if not plain or self.plain_mask_methods is None or mask_method is None or mask_method in self.plain_mask_methods:
            return None
        return (f"a plain network with a {mask_method!r} mask ({self.name}.plain_mask_methods = "
                f"{list(self.plain_mask_methods)})")


@dataclass(frozen=True)
class LabelSmoothing:
    """Cross-entropy against 1-eps on the true class and eps/(C-1) elsewhere (``form="tost"``).

    ``eps`` moves to ``final_eps`` along ``schedule`` (constant by default).
    """

    enabled: bool = False
    eps: float = 0.1
    final_eps: float = 0.0
    form: str = "tost"
    schedule: Schedule = Schedule(shape="constant")

    def eps_at(self, t: float) -> float:
        if not self.enabled:
            return 0.0
        return self.final_eps + (self.eps - self.final_eps) * self.schedule.factor(t)


@dataclass(frozen=True)
class Distill:
    """Distillation from the network with its ghosts into the network that remains.

    At ``at`` (a fraction of training, or a ghost group's name: the step its anneal begins) a
    frozen copy of the network becomes the teacher; from then to the end the loss is
    ``(1 - alpha) * CE + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``.
    """

    enabled: bool = False
    alpha: float = 0.9
    temperature: float = 4.0
    at: float | str = "ghost_neurons"

    def fraction(self, recipe: "Recipe", plain: bool = False) -> float:
        """When the teacher is copied, as a fraction of training (``plain``: on a plain network,
        where a ghost with a ``schedule_plain`` follows that one)."""
        return self.at if not isinstance(self.at, str) else recipe.ghosts[self.at].schedule_for(plain).hold_until

    def describe(self, recipe: "Recipe", plain: bool = False) -> str:
        """``"from 60% of training (when ghost_neurons' anneal begins), alpha 0.9, T 4"``."""
        why = f" (when {self.at}' anneal begins)" if isinstance(self.at, str) else ""
        return f"from {self.fraction(recipe, plain):.0%} of training{why}, alpha {self.alpha:g}, T {self.temperature:g}"


@dataclass(frozen=True)
class Training:
    """The training protocol defaults (ToST's CIFAR protocol unless the recipe says otherwise)."""

    epochs: int = 182
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    lr_schedule: str = "step"
    lr_milestones: tuple[float, ...] = (90 / 182, 135 / 182)
    lr_gamma: float = 0.1
    warmup: float = 0.0
    crop_padding: int = 4
    hflip: bool = True
    bn_recalibrate: int = 0  # after each ghost removal, re-estimate BatchNorm statistics over N batches
    eval_at_removal: bool = False  # validation loss/accuracy right before and after each removal
    # at the end of training, re-estimate BatchNorm statistics over N batches before the final
    # evaluation ("precise BN"): running averages lag behind the weights, and a channel that is
    # constant in training (its weights all masked) turns the lag into eval-mode blow-ups
    precise_bn: int = 0


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``passes`` holds every graph pass by name, in the order they run."""

    name: str
    description: str
    masks: PassSpec
    passes: Mapping[str, PassSpec]
    label_smoothing: LabelSmoothing
    training: Training
    distill: Distill = Distill()
    source: str = field(default="", compare=False)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ghosts(self) -> dict[str, PassSpec]:
        """The enabled ghost groups and their specs (each has a schedule)."""
        return {n: s for n, s in self.passes.items() if s.enabled and s.schedule is not None}

    @property
    def reads_plain(self) -> bool:
        """Whether an enabled ghost has a ``schedule_plain`` or ``plain_mask_methods``: then what the
        ghosts do depends on whether the traced graph is a plain network (``fxsparse.graph.is_plain``)."""
        return any(spec.schedule_plain is not None or spec.plain_mask_methods is not None
                   for spec in self.ghosts.values())

    @property
    def mask_method(self) -> str | None:
        """The ``[masks]`` method (None when masks are off): what ``plain_mask_methods`` reads."""
        return self.masks.options.get("method") if self.masks.enabled else None

    def enabled_passes(self) -> list[PassSpec]:
        """Every enabled pass, masks first, in the order ``transform`` runs them."""
        return ([self.masks] if self.masks.enabled else []) + [s for s in self.passes.values() if s.enabled]

    def to_dict(self) -> dict[str, Any]:
        """The merged TOML tables this recipe was validated from (``from_dict`` rebuilds it)."""
        return copy.deepcopy(dict(self.raw))

    def replace(self, overrides: Mapping[str, Any]) -> "Recipe":
        """A new recipe with dotted-key overrides, validated: ``{"ghost_skips.schedule.anneal_until": 0.4}``."""
        return from_dict(_apply_overrides(self.to_dict(), overrides), source=self.source, name=self.name)


def schedule_overrides(group: str, **keys: Any) -> dict[str, Any]:
    """Dotted-key overrides setting a ghost's schedule on every network: ``keys`` (``hold_until``,
    ``anneal_until``, ``shape``, ``remove_at``) in both ``<group>.schedule`` and
    ``<group>.schedule_plain`` (a plain network follows the second when the recipe has one)."""
    return {f"{group}.{table}.{k}": v for table in ("schedule", "schedule_plain") for k, v in keys.items()}


# --------------------------------------------------------------------------- loading
def load_recipe(name_or_path: str | os.PathLike | Recipe, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe: a shipped name (``"tost"``) or a path to a TOML file.

    ``overrides`` maps dotted key paths to values applied over the file (after ``extends``),
    e.g. ``{"masks.sparsity": 0.98, "ghost_neurons.enabled": False}``.
    """
    if isinstance(name_or_path, Recipe):
        return name_or_path.replace(overrides) if overrides else name_or_path
    raw, source = _read_merged(name_or_path, chain=())
    if overrides:
        raw = _apply_overrides(raw, overrides)
    default_name = Path(source).stem if source else str(name_or_path)
    return from_dict(raw, source=source, name=default_name)


def _shipped(name: str) -> Path | None:
    candidate = resources.files("fxsparse.recipes").joinpath(f"{name}.toml")
    return Path(str(candidate)) if candidate.is_file() else None


def is_recipe_file(name_or_path: str | os.PathLike) -> bool:
    """Whether ``load_recipe`` reads ``name_or_path`` as a TOML file rather than a shipped name."""
    text = os.fspath(name_or_path)
    return text.endswith(".toml") or os.sep in text or "/" in text


def _resolve(name_or_path: str | os.PathLike, relative_to: Path | None) -> Path:
    text = os.fspath(name_or_path)
    if not is_recipe_file(text):
        shipped = _shipped(text)
        if shipped is not None:
            return shipped
    path = Path(text)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.is_file():
        return path
    from fxsparse.recipes import available

    raise RecipeError(
        f"no recipe {text!r}: it is neither a shipped recipe ({', '.join(available())}) nor an "
        f"existing TOML file{f' (looked in {relative_to})' if relative_to else ''}."
    )


def _read_merged(name_or_path, chain: tuple[str, ...], relative_to: Path | None = None) -> tuple[dict, str]:
    path = _resolve(name_or_path, relative_to)
    source = str(path)
    if source in chain:
        raise RecipeError(f"recipe inheritance loops: {' -> '.join([*chain, source])}")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: not valid TOML: {e}") from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw, source
    if not isinstance(parent, str):
        raise RecipeError(f"{source}: extends = {parent!r} must be a string: a shipped recipe name or a path")
    base, _ = _read_merged(parent, (*chain, source), relative_to=path.parent)
    base.pop("name", None)  # a child is never called by its parent's name
    said = {(t, k) for t, v in raw.items() if isinstance(v, Mapping) for k in v}
    return _drop_stale_plain(_deep_merge(base, raw), said, f"{source} sets"), source


def _drop_stale_plain(raw: dict, said: set[tuple[str, str]], who: str) -> dict:
    """A ``schedule_plain`` qualifies the ``schedule`` it was written beside. A later layer (a child
    recipe, or dotted overrides) that sets a ghost's ``schedule`` and not its ``schedule_plain``
    means that schedule on every network, so the inherited ``schedule_plain`` is dropped (said in the
    log); to keep one, the layer sets it too (``schedule_overrides`` sets both). ``said``: the
    (table, key) pairs the layer sets."""
    restated = {t for t, key in said if key == "schedule" and (t, "schedule_plain") not in said}
    for table in sorted(restated):
        if isinstance(raw.get(table), dict) and raw[table].pop("schedule_plain", None) is not None:
            logging.getLogger(__name__).info(
                "%s [%s.schedule] without [%s.schedule_plain]: the inherited schedule_plain no longer applies, "
                "so every network follows the schedule", who, table, table)
    return raw


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _apply_overrides(raw: dict, overrides: Mapping[str, Any]) -> dict:
    raw = copy.deepcopy(raw)
    said = {tuple(parts[:2]) for parts in (k.split(".") for k in overrides) if len(parts) > 1}
    _drop_stale_plain(raw, said, "the overrides set")
    for dotted, value in overrides.items():
        *tables, key = dotted.split(".")
        node = raw
        for t in tables:
            nxt = node.setdefault(t, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"override {dotted!r}: {t!r} is a value, not a table")
            node = nxt
        node[key] = value
    return raw


# --------------------------------------------------------------------------- validation
class _Checker:
    """Reads one table, remembering the key path for error messages."""

    def __init__(self, source: str, path: str, table: Any, allowed: tuple[str, ...] | None):
        self.source, self.path = source, path
        if not isinstance(table, Mapping):
            self.fail_value(path, table, "a table")
        self.table = dict(table)
        if allowed is not None:
            for key in self.table:
                if key not in allowed:
                    raise RecipeError(
                        f"{self._where()}unknown key {self._key(key)!r} = {self.table[key]!r}; "
                        f"allowed keys in [{path or 'top level'}]: {', '.join(allowed)}"
                    )

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail_value(self, key_path: str, value: Any, allowed: str):
        raise RecipeError(f"{self._where()}{key_path} = {value!r} is not allowed; allowed: {allowed}")

    def fail(self, key: str, value: Any, allowed: str):
        self.fail_value(self._key(key), value, allowed)

    def bool(self, key: str, default: bool) -> bool:
        v = self.table.get(key, default)
        if not isinstance(v, bool):
            self.fail(key, v, "true or false")
        return v

    def number(self, key: str, default: float | None, lo: float = -math.inf, hi: float = math.inf,
               lo_open: bool = False, hi_open: bool = False) -> float:
        v = self.table.get(key, default)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            self.fail(key, v, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
        return float(v)

    def integer(self, key: str, default: int, lo: int = 0) -> int:
        v = self.table.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            self.fail(key, v, f"an integer >= {lo}")
        return v

    def choice(self, key: str, default: str | None, choices: tuple[str, ...]) -> str:
        v = self.table.get(key, default)
        if v not in choices:
            self.fail(key, v, " | ".join(repr(c) for c in choices))
        return v

    def string(self, key: str, default: str | None) -> str | None:
        v = self.table.get(key, default)
        if v is not None and not isinstance(v, str):
            self.fail(key, v, "a string")
        return v


def _schedule(source: str, path: str, table: Any, *, ghost: bool, early_removal: bool = False) -> Schedule:
    keys = (("hold_until", "anneal_until", "shape", "remove_at", "start") if ghost
            else ("hold_until", "anneal_until", "shape"))
    c = _Checker(source, path, table, keys)
    shapes = GHOST_SHAPES if ghost else SMOOTHING_SHAPES
    shape = c.choice("shape", "cosine" if ghost else "constant", shapes)
    start = c.choice("start", "step", SCHEDULE_STARTS) if ghost else "step"
    if shape == "constant":
        return Schedule(shape="constant")
    for required in ("hold_until", "anneal_until"):
        if required not in c.table:
            c.fail(required, None, "a fraction of training in [0, 1] (required)")
    hold = c.number("hold_until", None, 0.0, 1.0)
    anneal = c.number("anneal_until", None, 0.0, 1.0)
    remove = c.number("remove_at", anneal, 0.0, 1.0) if ghost else None
    if anneal < hold:
        c.fail("anneal_until", anneal, f"a fraction >= hold_until ({hold:g}): fractions must be in order "
                                      f"hold_until <= anneal_until{' <= remove_at' if ghost else ''}")
    if ghost and remove < anneal and not early_removal:  # a folding ghost keeps its gate's work (fold = true)
        c.fail("remove_at", remove, f"a fraction >= anneal_until ({anneal:g}): a ghost is removed only once "
                                    f"its gate reached 0 (hold_until <= anneal_until <= remove_at)")
    return Schedule(hold_until=hold, anneal_until=anneal, shape=shape, remove_at=remove, start=start)


def _pass_spec(source: str, name: str, table: Any, *, ghost: bool) -> PassSpec:
    c = _Checker(source, name, table, None)
    enabled = c.bool("enabled", False)
    options = {k: v for k, v in c.table.items() if k not in _PASS_RESERVED}
    allowed = pass_option_names(name)
    if allowed is not None:
        reserved = _PASS_RESERVED if ghost else ("enabled",)
        for key, value in options.items():
            if key not in allowed:
                raise RecipeError(
                    f"{c._where()}unknown key {name + '.' + key!r} = {value!r}; allowed keys in [{name}]: "
                    f"{', '.join((*reserved, *sorted(allowed)))}"
                )
    try:  # values too, also in a disabled table: enabling it later must not be what reveals a typo
        check_options(name, options)
    except BadOption as bad:
        if bad.key is None:
            raise RecipeError(f"{c._where()}the options of [{name}] do not fit together: {bad.reason}") from None
        if bad.allowed:
            c.fail(bad.key, bad.value, bad.allowed)
        raise RecipeError(f"{c._where()}{c._key(bad.key)} = {bad.value!r} is not allowed: {bad.reason}") from None
    schedule = None
    if ghost:
        if "schedule" not in c.table:
            if enabled:
                c.fail("schedule", None, "a [" + name + ".schedule] table with hold_until, anneal_until "
                       "(fractions of training), shape, remove_at")
        else:
            schedule = _schedule(source, f"{name}.schedule", c.table["schedule"], ghost=True,
                                 early_removal=options.get("fold") is True)
    elif "schedule" in c.table:
        c.fail("schedule", c.table["schedule"], f"nothing: [{name}] is not a ghost and has no schedule")
    schedule_plain = None
    if "schedule_plain" in c.table:
        if not ghost:
            c.fail("schedule_plain", c.table["schedule_plain"], f"nothing: [{name}] is not a ghost and has no schedule")
        schedule_plain = _schedule(source, f"{name}.schedule_plain", c.table["schedule_plain"], ghost=True,
                                   early_removal=options.get("fold") is True)
    plain_mask_methods = None
    if "plain_mask_methods" in c.table:
        value = c.table["plain_mask_methods"]
        methods = _mask_vocabulary(_masks_module())[0]
        if not ghost:
            c.fail("plain_mask_methods", value, f"nothing: [{name}] is not a ghost")
        if value != "any":  # "any": with every mask, as without the key (what undoes an inherited list)
            if not isinstance(value, list) or not value or any(v not in methods for v in value):
                c.fail("plain_mask_methods", value, f'"any", or a non-empty list of mask methods: {", ".join(methods)}')
            plain_mask_methods = tuple(value)
    return PassSpec(name=name, enabled=enabled, options=options, schedule=schedule, schedule_plain=schedule_plain,
                    plain_mask_methods=plain_mask_methods)


def _mask_spec(source: str, table: Any) -> PassSpec:
    masks_mod = _masks_module()
    methods, distributions = _mask_vocabulary(masks_mod)
    c = _Checker(source, "masks", table, None)
    enabled = c.bool("enabled", True)
    method = c.choice("method", "random", methods)
    sparsity = c.number("sparsity", 0.9, 0.0, 1.0, hi_open=True)
    # no distribution: the method's own default (fxsparse.masks: erk for random, global otherwise)
    distribution = c.choice("distribution", None, distributions) if "distribution" in c.table else None
    if method == "nm":  # N in every M fixes both; a parent's (tost: 0.95, erk) cannot be unset in TOML
        ignored = {k: c.table[k] for k in ("sparsity", "distribution") if k in c.table}
        if ignored:
            logging.getLogger(__name__).warning(
                "%s[masks] method = 'nm': %s do not apply to an N:M mask (its sparsity is 1 - N/M); ignored",
                c._where(), ", ".join(f"{k} = {v!r}" for k, v in ignored.items()))
        sparsity = distribution = None
    path = c.string("path", None)
    if method == "file" and not path:
        c.fail("path", path, "a path to a mask file (fxsparse.masks.save) when method = 'file'")
    extra = {k: v for k, v in c.table.items() if k not in _MASK_KEYS}
    if path:
        extra["path"] = path
    if masks_mod is not None:
        _check_mask_request(c, masks_mod, method, sparsity, distribution, extra)
    options = {"method": method, "sparsity": sparsity, "distribution": distribution, **extra}
    return PassSpec(name="masks", enabled=enabled, options=options)


def _check_mask_request(c: _Checker, masks_mod, method: str, sparsity, distribution, extra: dict) -> None:
    """The extra keys are ``compute``'s keyword options and the method's own (both read off
    fxsparse.masks, never listed here); their values are checked as ``compute`` checks them."""
    from .errors import MaskError, MaskOptionError

    allowed = (*masks_mod.compute_keywords(), *masks_mod.method_options(method, extra))
    for key, value in extra.items():
        if key not in allowed and key != "path":  # path: a key of [masks] itself, checked below
            raise RecipeError(
                f"{c._where()}unknown key {'masks.' + key!r} = {value!r}; allowed keys in [masks] with "
                f"method = {method!r}: {', '.join(dict.fromkeys((*_MASK_KEYS, *allowed)))}"
            )
    try:
        masks_mod.check_request(method, sparsity, distribution, **extra)
    except MaskOptionError as bad:
        c.fail(bad.key, bad.value, bad.allowed)
    except MaskError as bad:
        raise RecipeError(f"{c._where()}[masks] method = {method!r}: {bad}") from None


def _masks_module():
    try:
        import fxsparse.masks as masks_mod
    except ImportError:
        return None
    return masks_mod


def _mask_vocabulary(masks_mod) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Methods and distributions, from fxsparse.masks when it is there."""
    if masks_mod is None:
        return MASK_METHODS, MASK_DISTRIBUTIONS
    methods = tuple(getattr(masks_mod, "METHODS", MASK_METHODS))
    if "file" not in methods:
        methods = (*methods, "file")
    return methods, tuple(getattr(masks_mod, "DISTRIBUTIONS", MASK_DISTRIBUTIONS))


def _label_smoothing(source: str, table: Any) -> LabelSmoothing:
    c = _Checker(source, "label_smoothing", table, ("enabled", "eps", "final_eps", "form", "schedule"))
    enabled = c.bool("enabled", False)
    eps = c.number("eps", 0.1, 0.0, 1.0, hi_open=True)
    final_eps = c.number("final_eps", 0.0, 0.0, 1.0, hi_open=True)
    form = c.choice("form", "tost", SMOOTHING_FORMS)
    schedule = _schedule(source, "label_smoothing.schedule", c.table.get("schedule", {}), ghost=False)
    return LabelSmoothing(enabled=enabled, eps=eps, final_eps=final_eps, form=form, schedule=schedule)


def _distill(source: str, table: Any, ghosts: Mapping[str, PassSpec]) -> Distill:
    c = _Checker(source, "distill", table, ("enabled", "alpha", "temperature", "at"))
    d = Distill()
    enabled = c.bool("enabled", d.enabled)
    alpha = c.number("alpha", d.alpha, 0.0, 1.0)
    temperature = c.number("temperature", d.temperature, 0.0, lo_open=True)
    at = c.table.get("at", d.at)
    if isinstance(at, str):
        if enabled and at not in ghosts:
            c.fail("at", at, f"a fraction of training in (0, 1), or an enabled ghost group "
                             f"({' | '.join(repr(g) for g in ghosts) or 'this recipe enables none'}): the teacher is "
                             f"the network as it is when that group's anneal begins")
        for key in ("schedule", "schedule_plain"):
            schedule = getattr(ghosts[at], key) if enabled else None
            if schedule is not None and schedule.start != "step":
                c.fail("at", at, f"a group whose schedule counts from step 0 ({at}.{key}.start = "
                                 f"{schedule.start!r} here: the teacher's step would depend on the losses): "
                                 f"give distill.at as a fraction of training")
            if schedule is not None and schedule.hold_until <= 0:
                c.fail("at", at, f"a group whose anneal begins after step 0 ({at}.{key}.hold_until = 0 here, so the "
                                 f"teacher would be the untrained network): set {at}.{key}.hold_until > 0, or "
                                 f"give distill.at as a fraction of training")
    else:
        at = c.number("at", None, 0.0, 1.0, lo_open=True, hi_open=True)
    return Distill(enabled=enabled, alpha=alpha, temperature=temperature, at=at)


def _training(source: str, table: Any) -> Training:
    names = tuple(f.name for f in dataclasses.fields(Training))
    c = _Checker(source, "training", table, names)
    d = Training()
    milestones = c.table.get("lr_milestones", list(d.lr_milestones))
    if (not isinstance(milestones, list)
            or not all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < 1 for m in milestones)
            or any(b <= a for a, b in zip(milestones, milestones[1:]))):
        c.fail("lr_milestones", milestones, "a list of increasing fractions of training in (0, 1)")
    return Training(
        epochs=c.integer("epochs", d.epochs, lo=1),
        batch_size=c.integer("batch_size", d.batch_size, lo=1),
        optimizer=c.choice("optimizer", d.optimizer, OPTIMIZERS),
        lr=c.number("lr", d.lr, 0.0, lo_open=True),
        momentum=c.number("momentum", d.momentum, 0.0, 1.0, hi_open=True),
        nesterov=c.bool("nesterov", d.nesterov),
        weight_decay=c.number("weight_decay", d.weight_decay, 0.0),
        lr_schedule=c.choice("lr_schedule", d.lr_schedule, LR_SCHEDULES),
        lr_milestones=tuple(float(m) for m in milestones),
        lr_gamma=c.number("lr_gamma", d.lr_gamma, 0.0, 1.0, lo_open=True),
        warmup=c.number("warmup", d.warmup, 0.0, 1.0, hi_open=True),
        crop_padding=c.integer("crop_padding", d.crop_padding, lo=0),
        hflip=c.bool("hflip", d.hflip),
        bn_recalibrate=c.integer("bn_recalibrate", d.bn_recalibrate, lo=0),
        eval_at_removal=c.bool("eval_at_removal", d.eval_at_removal),
        precise_bn=c.integer("precise_bn", d.precise_bn, lo=0),
    )


def _dynamic_with_masks(source: str, dynamic: PassSpec | None, masks: PassSpec) -> PassSpec:
    """``[dynamic]`` against ``[masks]``: moving masks need masks; gmp ends at ``masks.sparsity``
    (``dynamic.final_sparsity``, when given, replaces it) and never below its initial sparsity."""
    if dynamic is None or not dynamic.enabled:
        return masks
    c = _Checker(source, "dynamic", dynamic.options, None)
    method = dynamic.options.get("method", "rigl")
    if not masks.enabled:
        c.fail("enabled", True, "false while masks.enabled = false: [dynamic] moves the masks [masks] makes")
    if masks.options.get("method") == "nm":
        c.fail("enabled", True, "false with masks.method = 'nm': rigl, set and gmp do not keep an N:M pattern")
    if method != "gmp":
        return masks
    final = dynamic.options.get("final_sparsity")
    key = "final_sparsity"
    if final is None:
        final, key = masks.options.get("sparsity"), "masks.sparsity"
    initial = dynamic.options.get("initial_sparsity") or 0.0
    if final is None or final < initial:
        what = f"dynamic.{key}" if key == "final_sparsity" else key
        c.fail_value(what, final, f"a sparsity >= dynamic.initial_sparsity ({initial:g}): gmp prunes from "
                                  f"initial_sparsity to the final sparsity (masks.sparsity, or dynamic.final_sparsity) "
                                  f"and never regrows")
    return dataclasses.replace(masks, options={**masks.options, "sparsity": float(final)})


def from_dict(raw: Mapping[str, Any], *, source: str = "", name: str = "recipe") -> Recipe:
    """Validate the tables of a recipe (as ``tomllib`` reads them) and build a ``Recipe``."""
    from .passes import GHOST_GROUPS

    passes = [p for p in pass_names() if p != "masks"]
    top = _Checker(source, "", raw, (*_TOP, *passes))
    recipe_name = top.string("name", name) or name
    description = top.string("description", "") or ""
    specs = {p: _pass_spec(source, p, top.table.get(p, {}), ghost=p in GHOST_GROUPS) for p in passes}
    masks = _dynamic_with_masks(source, specs.get("dynamic"), _mask_spec(source, top.table.get("masks", {})))
    ghosts = {n: s for n, s in specs.items() if s.enabled and s.schedule is not None}
    return Recipe(
        name=recipe_name,
        description=description.strip(),
        masks=masks,
        passes=specs,
        label_smoothing=_label_smoothing(source, top.table.get("label_smoothing", {})),
        training=_training(source, top.table.get("training", {})),
        distill=_distill(source, top.table.get("distill", {}), ghosts),
        source=source,
        raw=copy.deepcopy(dict(raw)),
    )
