"""``compute``: masks for a model by any method, at exactly the requested sparsity."""
from __future__ import annotations

import inspect
import logging
import numbers
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import MaskError, MaskOptionError
from ..graph import Layer
from . import io, nm, scores, synflow
from .distribution import DISTRIBUTIONS, logical_shape
from .imp import imp_masks
from .ranking import make_budget
from .report import MaskReport
from .selection import select_layers, tied_weights, traced

__all__ = ["compute", "score", "check_request", "method_options", "compute_keywords", "METHODS", "ONE_SHOT"]

log = logging.getLogger(__name__)

METHODS = ("random", "magnitude", "taylor", "snip", "grasp", "synflow", "imp", "file", "nm")
DATA_METHODS = ("taylor", "snip", "grasp")
ONE_SHOT = ("random", "magnitude", *DATA_METHODS, "synflow")  # what score() computes
# the distribution each method uses when none is given: ToST prunes every score with one global
# threshold (scope="global"); random pruning defaults to ERK (Liu et al. 2022's best); N:M masks
# have their own, N in every group of M
DEFAULT_DISTRIBUTION = {m: "global" for m in METHODS} | {"random": "erk", "nm": None}
# the options each method accepts as keyword arguments of compute()
OPTIONS = {
    "random": (), "magnitude": (),
    "taylor": ("train_mode",), "snip": ("train_mode",), "grasp": ("train_mode", "temperature", "eps"),
    "synflow": ("rounds", "input_shape", "dtype"),
    "imp": ("train_fn", "rounds", "rate", "rewind_state"),
    "file": ("path",),
    "nm": ("pattern", "score", "incompatible"),  # plus the options of its score (method_options)
}


def compute(
    model_or_gm: nn.Module,
    method: str,
    sparsity: float | None = None,
    distribution: str | None = None,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    *,
    seed: int = 0,
    min_per_layer: int = 0,
    layers: Sequence[Layer | str] | None = None,
    **method_opts: Any,
) -> dict[str, torch.Tensor]:
    """Masks (``{parameter name: bool tensor shaped like the weight}``) keeping ``1 - sparsity``
    of the selected weights, exactly.

    Args:
        model_or_gm: the model (traced here to find its layers) or its GraphModule. Never
            modified: scores that run the model run a deep copy.
        method: ``random``, ``magnitude``, ``taylor``, ``snip``, ``grasp``, ``synflow``, ``imp``,
            ``file`` or ``nm`` (see docs/masks.md for each formula and its source).
        sparsity: fraction of the selected weights removed, in [0, 1). Optional for ``file``
            (checked against the file's when given); for ``nm`` left out or ``1 - N/M``.
        distribution: ``global`` (one threshold over all layers), ``uniform``, ``er`` or ``erk``
            (per-layer counts). Default: ``erk`` for random, ``global`` for the others (ToST).
        data: iterable of (inputs, targets) batches, for taylor, snip and grasp (and synflow's
            input shape). Passed over once (twice for grasp).
        loss_fn: ``loss_fn(outputs, targets)`` with the outputs as the model returns them; by
            default cross-entropy of the logits (``fxsparse.outputs.logits``: a model that returns a
            namedtuple with auxiliary logits, such as GoogLeNet in train mode, is scored on its logits).
        seed: seeds random scores and any dropout while scoring.
        min_per_layer: keep at least this many weights in every layer (all of a smaller layer),
            taken from the globally lowest-ranked kept weights so the total stays exact.
        layers: the layers to mask (Layers or weight names); default ``select_layers(model)``.
        method_opts: ``train_mode`` (taylor/snip/grasp, default True), ``temperature``/``eps``
            (grasp, 200 / 1e-10), ``rounds``/``input_shape``/``dtype`` (synflow, 100 rounds),
            ``train_fn``/``rounds``/``rate``/``rewind_state`` (imp), ``path`` (file);
            ``pattern`` (``"N:M"``, required), ``score`` (a one-shot method, ``magnitude`` by
            default) and its options, ``incompatible`` (``"error"`` or ``"dense"``) for nm.

    Raises ``MaskError`` for impossible requests. Warns (``LayerCollapseWarning``) when a layer
    keeps no weights.
    """
    method, distribution = _check_request(method, sparsity, distribution, min_per_layer, method_opts)
    gm = traced(model_or_gm)
    selected = _layer_names(gm, layers)
    names, tied = _untie(gm, selected)
    if method == "file":
        if "path" not in method_opts:
            raise MaskError("method='file' reads the masks from a file: pass path=... (a file fxsparse.masks.save "
                            "or `fxsparse train` wrote; in a recipe, [masks] path = \"...\")")
        masks = io.load(method_opts["path"], gm)
        file_tied = tied_weights(gm, masks)  # the file's own names: it may hold both of a tied weight
        _check_file_sparsity(masks, method_opts["path"], sparsity, file_tied)
        _finish(masks, method, None, sparsity, file_tied)
        return masks
    runner = model_or_gm  # the user's own module (or GraphModule) runs the forward passes
    if method == "nm":
        return _retie(_nm_masks(runner, gm, names, data, loss_fn, seed, **method_opts), selected, tied)
    budget = make_budget(_shapes(gm, names), sparsity, distribution, min_per_layer)
    if method == "synflow":
        opts = dict(method_opts)
        opts["input_shape"] = _input_shape(opts.get("input_shape"), data, gm, model_or_gm)
        masks = synflow.synflow_masks(runner, names, budget, **opts)
    elif method == "imp":
        masks = imp_masks(runner, names, budget, **method_opts)
    elif method == "random" and budget.per_layer is not None:
        # per-layer counts of random scores: a uniform subset of each count, drawn without scores
        masks = budget.draw({n: gm.get_parameter(n) for n in names}, seed)
    else:
        raw = score(runner, method, data, loss_fn, layers=names, seed=seed, **method_opts)
        masks = budget.select(raw, consume=True)  # raw is ours: one copy of the scores at a time
    masks = _retie(masks, selected, tied)
    _finish(masks, method, distribution, sparsity, tied)
    return masks


def score(
    model_or_gm: nn.Module,
    method: str,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    *,
    layers: Sequence[Layer | str] | None = None,
    seed: int = 0,
    **method_opts: Any,
) -> dict[str, torch.Tensor]:
    """The raw scores of a one-shot method (higher = kept): ``{parameter name: scores}``.

    ``synflow`` gives its first round's scores (nothing pruned yet).
    """
    if method not in ONE_SHOT:
        raise MaskError(f"score() computes one-shot scores: {', '.join(ONE_SHOT)}; got {method!r}.")
    _check_options(method, method_opts)
    if method == "synflow" and "rounds" in method_opts:
        raise MaskError("score() gives SynFlow's first-round scores; rounds is an option of compute().")
    if layers is None:
        names = [l.weight for l in select_layers(model_or_gm)]
    else:
        names = [l.weight if isinstance(l, Layer) else l for l in layers]
    if method == "random":
        return scores.random_scores(model_or_gm, names, seed=seed)
    if method == "magnitude":
        return scores.magnitude_scores(model_or_gm, names)
    if method == "synflow":
        opts = dict(method_opts)
        opts["input_shape"] = _input_shape(opts.get("input_shape"), data, None, model_or_gm)
        return synflow.synflow_scores(model_or_gm, names, **opts)
    fn = {"taylor": scores.taylor_scores, "snip": scores.snip_scores, "grasp": scores.grasp_scores}[method]
    return fn(model_or_gm, names, data, loss_fn, seed=seed, **method_opts)


def _nm_masks(model, gm, names, data, loss_fn, seed, *, pattern, incompatible: str = "error",
              **score_opts) -> dict[str, torch.Tensor]:
    n, m = nm.parse_pattern(pattern)
    dense = nm.check_fit(gm, names, n, m, incompatible)  # before any scoring work
    method = score_opts.pop("score", "magnitude")
    raw = score(model, method, data, loss_fn, layers=names, seed=seed, **score_opts)
    masks = nm.nm_masks(gm, raw, n, m, dense=dense)
    report = MaskReport.from_masks(masks, method="nm", pattern=f"{n}:{m}")
    log.info("%s", report.summary())
    return masks


# --------------------------------------------------------------------------- checks
def check_request(method: str, sparsity: float | None = None, distribution: str | None = None, **options: Any) -> None:
    """Check what ``compute(model, method, sparsity, distribution, **options)`` would be asked,
    without a model (a recipe's ``[masks]`` table at load). Raises ``MaskError``, and
    ``MaskOptionError`` (with the key) for a bad option value."""
    method_opts = {k: v for k, v in options.items() if k not in compute_keywords()}
    _check_request(method, sparsity, distribution, options.get("min_per_layer", 0), method_opts)


def compute_keywords() -> tuple[str, ...]:
    """``compute``'s own keyword-only options, taken by every method (seed, min_per_layer, layers)."""
    return tuple(p.name for p in inspect.signature(compute).parameters.values() if p.kind is p.KEYWORD_ONLY)


def method_options(method: str, opts: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The option names ``method`` takes as keywords of ``compute`` (for ``nm``, with those of the
    score ``opts`` names; SynFlow's ``rounds`` belongs to its iterative method, not its score)."""
    names = OPTIONS.get(method, ())
    if method == "nm":
        chosen = (opts or {}).get("score", "magnitude")
        names += tuple(o for o in OPTIONS.get(chosen, ()) if o != "rounds") if chosen in ONE_SHOT else ()
    return names


def _check_request(method, sparsity, distribution, min_per_layer, opts) -> tuple[str, str | None]:
    if method not in METHODS:
        raise MaskError(f"unknown mask method {method!r}; choose one of {', '.join(METHODS)}.")
    if method == "nm":
        _check_nm_request(sparsity, distribution, min_per_layer, opts)
        return method, None
    distribution = DEFAULT_DISTRIBUTION[method] if distribution is None else distribution
    if distribution not in DISTRIBUTIONS:
        raise MaskError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}.")
    if sparsity is None and method != "file":
        raise MaskError(f"method {method!r} needs a sparsity (fraction of weights removed, in [0, 1)).")
    if sparsity is not None:
        number = isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool)
        if not number or not 0 <= sparsity < 1:
            hint = " (a percentage? use 0.9 for 90%)" if number and 1 < sparsity <= 100 else ""
            raise MaskError(f"sparsity is the fraction of weights removed and must be in [0, 1); got {sparsity!r}{hint}.")
    if isinstance(min_per_layer, bool) or not isinstance(min_per_layer, int) or min_per_layer < 0:
        raise MaskError(f"min_per_layer must be a non-negative int, got {min_per_layer!r}.")
    _check_options(method, opts)
    return method, distribution


def _check_options(method: str, opts: dict[str, Any]) -> None:
    allowed = method_options(method, opts)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise MaskError(f"method {method!r} takes no option(s) {', '.join(unknown)} (its options: {', '.join(allowed) or 'none'}).")


def _check_nm_request(sparsity, distribution, min_per_layer, opts: dict[str, Any]) -> None:
    """N:M fixes every count itself: one pattern, a one-shot score, what to do with misfits."""
    if "pattern" not in opts:
        raise MaskOptionError("pattern", None, nm.PATTERN_FORM + " (required for method 'nm')")
    n, m = nm.parse_pattern(opts["pattern"])
    score_name = opts.get("score", "magnitude")
    if score_name not in ONE_SHOT:
        raise MaskOptionError("score", score_name, " | ".join(repr(s) for s in ONE_SHOT))
    if opts.get("incompatible", "error") not in nm.INCOMPATIBLE:
        raise MaskOptionError("incompatible", opts["incompatible"], " | ".join(repr(s) for s in nm.INCOMPATIBLE))
    if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
        raise MaskError(f"a {n}:{m} mask removes {m - n} of every {m} weights (sparsity {1 - n / m:g}); "
                        f"leave sparsity out or set it to {1 - n / m:g}, got {sparsity!r}.")
    if distribution is not None or min_per_layer:
        raise MaskError("an N:M mask keeps N weights in every group of M: it takes no distribution and no "
                        "min_per_layer.")
    _check_options("nm", opts)


def _layer_names(gm: GraphModule, layers: Sequence[Layer | str] | None) -> list[str]:
    if layers is None:
        names = [l.weight for l in select_layers(gm)]
    else:
        names = [l.weight if isinstance(l, Layer) else l for l in layers]
        params = dict(gm.named_parameters(remove_duplicate=False))  # a tied weight's every name
        unknown = [n for n in names if n not in params]
        if unknown:
            raise MaskError(f"layers names parameters the model does not have: {unknown[:10]}.")
    if not names:
        raise MaskError("no conv/linear weights selected: there is nothing to mask.")
    return names


def _untie(gm: GraphModule, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The names of distinct weights, and ``{alias: first name}`` of the tied ones
    (``selection.tied_weights``): a tied weight is scored and counted once."""
    tied = tied_weights(gm, names)
    return [n for n in names if n not in tied], tied


def _retie(masks: dict[str, torch.Tensor], names: list[str], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """``masks`` for every selected name, in their order: an alias gets a copy of its weight's mask."""
    if not tied:
        return masks
    return {n: masks[tied[n]].clone() if n in tied else masks[n] for n in names}


def _shapes(gm: GraphModule, names: list[str]) -> dict[str, tuple[int, ...]]:
    out = {}
    for n in names:
        owner, _, _ = n.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        out[n] = logical_shape(module, tuple(gm.get_parameter(n).shape))
    return out


def _input_shape(given, data, gm: GraphModule | None, model: nn.Module) -> tuple[int, ...]:
    """SynFlow's input shape (without batch): given, else the first data batch's, else the trace's."""
    if given is not None:
        return tuple(given)
    if data is not None:
        for inputs, _ in data:
            first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
            return tuple(first.shape[1:])
    info = (gm.meta if gm is not None else getattr(model, "meta", {})).get("fxsparse")
    if info is not None and getattr(info, "input_shapes", None):
        return tuple(info.input_shapes[0][1:])
    from ..trace import default_example_inputs

    return tuple(default_example_inputs(model)[0].shape[1:])


def _check_file_sparsity(masks: dict[str, torch.Tensor], path, sparsity: float | None, tied: dict[str, str]) -> None:
    if sparsity is not None:
        report = MaskReport.from_masks(masks, tied=tied)
        exact = report.total - report.kept == round(sparsity * report.total)  # what compute() keeps
        if not exact and abs(report.achieved_sparsity - sparsity) > 1e-3:
            raise MaskError(
                f"{str(path)!r} has sparsity {report.achieved_sparsity:.4f}, not the requested {sparsity:.4f}."
            )


def _finish(masks: dict[str, torch.Tensor], method: str, distribution: str | None, sparsity: float | None,
            tied: dict[str, str]) -> None:
    report = MaskReport.from_masks(masks, requested_sparsity=sparsity, method=method, distribution=distribution,
                                   tied=tied)
    log.info("%s", report.summary())
    report.warn_collapse(stacklevel=4)
