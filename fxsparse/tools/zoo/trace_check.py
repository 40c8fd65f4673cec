"""Which models a sweep covers, and the trace check of one model (meta device; optionally numeric on CPU)."""
from __future__ import annotations

import fnmatch
import time
from typing import Sequence

from .result import DEFAULT_MAX_PARAMS, ERROR_CHARS, SOURCES, ModelResult, bare, budget_for, first_line


def list_specs(source: str = "timm", *, filter: str | None = None, limit: int | None = None) -> list[str]:
    """The MODEL specs a sweep covers: timm names and/or ``tv:NAME`` for torchvision classifiers.

    ``filter`` is a glob matched against the name with and without the ``tv:`` prefix
    (``"resnet*"`` selects both timm's and torchvision's ResNets); ``limit`` keeps the first N.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    specs: list[str] = []
    if source in ("timm", "all"):
        import timm

        specs += timm.list_models()
    if source in ("torchvision", "all"):
        import torchvision

        # module=torchvision.models lists the classification models only (no detection etc.)
        specs += [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    return select(specs, filter=filter, limit=limit)


def select(specs: Sequence[str], *, filter: str | None = None, limit: int | None = None) -> list[str]:
    """``specs`` matching the glob ``filter`` (with or without a ``tv:`` prefix), the first ``limit``."""
    specs = list(specs)
    if filter:
        specs = [s for s in specs if fnmatch.fnmatchcase(s, filter) or fnmatch.fnmatchcase(bare(s), filter)]
    if limit is not None:
        specs = specs[: max(limit, 0)]
    return specs


def check_model(spec: str, *, numeric: bool = False, max_params: float | dict[str, float] = DEFAULT_MAX_PARAMS) -> ModelResult:
    """Build ``spec`` on the meta device and trace it; with ``numeric`` also check outputs on CPU.

    Never raises for a model's own failure: exceptions become ``status="error"`` with the stage,
    type and first line of the message.
    """
    import fxsparse
    from fxsparse.models import create, source_of

    result = ModelResult(model=spec, source=source_of(spec), status="ok")
    stage = "build"
    try:
        t0 = time.perf_counter()
        model = create(spec, device="meta")
        result.build_s = round(time.perf_counter() - t0, 4)
        result.params = sum(p.numel() for p in model.parameters())
        stage = "trace"
        t0, c0 = time.perf_counter(), time.process_time()
        gm = fxsparse.trace(model)
        result.trace_s = round(time.perf_counter() - t0, 4)
        result.trace_cpu_s = round(time.process_time() - c0, 4)
        result.nodes = len(gm.graph.nodes)
        result.mode_dependent = bool(gm.meta["fxsparse"].mode_dependent)
    except Exception as e:
        result.status, result.stage = "error", stage
        result.error_type, result.error = type(e).__name__, first_line(e)
    finally:
        model = gm = None  # noqa: F841 -- free the meta model before the numeric check
    max_params = budget_for(max_params, result.source)
    if numeric:
        if not result.ok:
            result.numeric, result.numeric_detail = "skipped", "the meta trace failed"
        elif result.params > max_params:
            result.numeric, result.numeric_detail = "skipped", f"{result.params:,} parameters > {max_params:,.0f}"
        else:
            t0 = time.perf_counter()
            result.numeric, result.numeric_detail = _check_numeric(spec)
            result.numeric_s = round(time.perf_counter() - t0, 3)
    return result


def _check_numeric(spec: str) -> tuple[str, str | None]:
    """Compare the traced graph with the module on CPU: eval mode, batch 1, the default input size."""
    import torch

    import fxsparse
    from fxsparse.models import create
    from fxsparse.testing import compare
    from fxsparse.trace import default_example_inputs

    try:
        torch.manual_seed(0)
        model = create(spec, device="cpu").eval()
        torch.manual_seed(1)
        x = default_example_inputs(model, batch_size=1)
        gm = fxsparse.trace(model, x)
        with torch.no_grad():
            # eval mode changes no state, and gm shares model's parameters: no copies needed
            diffs = compare(model, gm, x, modes=("eval",), grads=False, exact=True, copy_modules=False)
            if diffs:  # not bit-identical: within compare's default tolerance?
                beyond_tol = compare(model, gm, x, modes=("eval",), grads=False, copy_modules=False)
    except Exception as e:
        return "error", f"{type(e).__name__}: {first_line(e)}"
    if not diffs:
        return "equal", None
    detail = "; ".join(str(m).strip() for m in diffs[:3])[:ERROR_CHARS]
    return ("mismatch" if beyond_tol else "close"), detail


