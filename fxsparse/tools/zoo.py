"""The zoo sweep: trace every timm / torchvision classification model and report what broke.

Each model is built on the meta device (``fxsparse.models.create(spec, device="meta")``) and
traced with ``fxsparse.trace``; nothing is computed, so the whole timm zoo takes minutes. With
``numeric=True`` the models up to ``max_params`` parameters are also built on CPU with random
weights and the traced graph's eval-mode output is compared with the module's.

Models run in a small pool of long-lived worker processes (importing torch and timm costs
seconds, so one process per model would dominate the sweep). A worker that crashes or runs past
the per-model timeout is killed and replaced, and the model it was on is recorded as
``"crashed"`` / ``"timeout"``: one bad model never stops the sweep.

With ``pipeline=True`` (``fxsparse zoo --pipeline``) each model within ``max_params`` goes
through what a user of the ``tost`` recipe does, on CPU with random weights and a batch of 2 at
the smallest input size the model accepts (``check_pipeline``): trace, every mask method that
needs no training, ``fxsparse.transform`` with the shipped recipe (LRsI shortened), SGD steps at
every gate value, the equivalence of the identity gates with the mask-only graph, every removal,
``export`` loaded strict into a fresh instance, and its equivalence with the final graph. The
first stage that fails is recorded with its error; a worker that dies or times out is recorded
with the stage it was in.

``sweep(specs)`` returns one ``ModelResult`` per model; ``write_report`` writes them as JSON
plus a markdown summary beside it.
"""
from __future__ import annotations

import collections
import collections.abc
import dataclasses
import datetime
import fnmatch
import gc
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import signal
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = [
    "ModelResult",
    "list_specs",
    "select",
    "check_model",
    "check_pipeline",
    "PipelineOptions",
    "PIPELINE_STAGES",
    "sweep",
    "summarize",
    "write_report",
    "render_markdown",
    "load_report",
    "append_log",
    "read_log",
]

SOURCES = ("timm", "torchvision", "all")
DEFAULT_MAX_PARAMS = 30_000_000
# Worker start-up (importing torch, timm and torchvision) is not charged to any model, but a
# worker that cannot even start within this many seconds is an error of the sweep itself. A dead
# worker is seen at once; this bound is only for a live one that never gets ready. Generous: on a
# loaded machine a sweep at `nice 19` took over 300 s to import torch three times in a row (a
# 2-core machine with four other jobs), and the whole sweep stopped for it.
_STARTUP_TIMEOUT_S = 1200.0
_ERROR_CHARS = 300  # error messages are cut to this length in the report


@dataclass
class ModelResult:
    """What the sweep recorded about one model (one row of the report)."""

    model: str  # the MODEL spec: a timm name or tv:NAME
    source: str
    status: str  # "ok", "error" (an exception), "timeout" or "crashed" (the worker died)
    stage: str | None = None  # where it failed: "build" or "trace"
    error_type: str | None = None
    error: str | None = None  # first line of the message
    params: int | None = None
    nodes: int | None = None
    build_s: float | None = None
    trace_s: float | None = None  # wall time of fxsparse.trace on the meta device
    trace_cpu_s: float | None = None  # CPU time of the same call (less noisy on a shared machine)
    mode_dependent: bool | None = None
    # --numeric: "equal" (bit-identical), "close" (within rtol=1e-5, atol=1e-6), "mismatch",
    # "error", or "skipped" (too many parameters, or the meta trace failed); None when not asked
    numeric: str | None = None
    numeric_detail: str | None = None
    numeric_s: float | None = None
    # --pipeline: "ok" (every stage passed), "error" (a stage failed; also a timeout or a crash
    # during the pipeline), or "skipped" (over the parameter budget); None when not asked
    pipeline: str | None = None
    pipeline_stage: str | None = None  # the first stage that failed (or the one a dead worker was in)
    pipeline_error: str | None = None  # "ErrorType: first line" of that failure
    pipeline_cause: str | None = None  # the innermost exception it chains to, when that says more
    pipeline_failures: dict[str, str] | None = None  # every failed stage (mask methods go on after one fails)
    pipeline_detail: str | None = None  # why it was skipped
    pipeline_s: float | None = None
    stage_s: dict[str, float] | None = None  # seconds per stage
    input_size: list[int] | None = None  # C, H, W of the batch the pipeline ran on
    ghosts: list[str] | None = None  # the ghost groups the tost transform added
    identity: str | None = None  # gates at identity vs the mask-only graph: "equal" or "close"
    exported: str | None = None  # exported model vs the final graph: "equal" or "close"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        d["ok"] = self.ok
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------- model lists
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
        specs = [s for s in specs if fnmatch.fnmatchcase(s, filter) or fnmatch.fnmatchcase(_bare(s), filter)]
    if limit is not None:
        specs = specs[: max(limit, 0)]
    return specs


def _bare(spec: str) -> str:
    return spec[3:] if spec.startswith("tv:") else spec


# --------------------------------------------------------------------------- one model
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
        result.error_type, result.error = type(e).__name__, _first_line(e)
    finally:
        model = gm = None  # noqa: F841 -- free the meta model before the numeric check
    if isinstance(max_params, collections.abc.Mapping):  # a budget per source
        max_params = max_params.get(result.source, max_params.get("default", DEFAULT_MAX_PARAMS))
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
        return "error", f"{type(e).__name__}: {_first_line(e)}"
    if not diffs:
        return "equal", None
    detail = "; ".join(str(m).strip() for m in diffs[:3])[:_ERROR_CHARS]
    return ("mismatch" if beyond_tol else "close"), detail


# --------------------------------------------------------------------------- the pipeline
MASK_METHODS = ("random", "magnitude", "snip", "grasp", "synflow")  # every method that needs no training
GATE_VALUES = (1.0, 0.5, 0.0)  # ghost fully on, half-way through the anneal, identity
PIPELINE_STAGES = (
    "build", "input", "trace", *(f"masks:{m}" for m in MASK_METHODS), "transform",
    *(f"train@gate={g:g}" for g in GATE_VALUES), "identity", "removal", "export", "equivalence",
)


@dataclass
class PipelineOptions:
    """How ``check_pipeline`` runs each stage (kept small: the point is that every stage runs)."""

    recipe: str = "tost"
    sparsity: float = 0.95  # of every mask method
    lrsi_iters: int = 2  # rescale.iters (the recipe's 180 search iterations cost minutes per model)
    synflow_rounds: int = 2  # SynFlow's 100 rounds differ only in the density each one keeps
    steps_per_gate: int = 2
    batch_size: int = 2
    small_size: int = 64  # the smallest spatial size tried (or the model's min_input_size)
    seed: int = 0

    def to_settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PipelineCheckFailed(AssertionError):
    """A check of the pipeline did not hold (the stage ran without an exception, but wrongly)."""


def check_pipeline(
    spec: str,
    *,
    max_params: float | dict[str, float] = DEFAULT_MAX_PARAMS,
    options: PipelineOptions | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ModelResult:
    """Trace ``spec`` on the meta device (as ``check_model``), then, if it has at most
    ``max_params`` parameters (or ``max_params[source]``, e.g. ``{"timm": 30e6, "torchvision":
    inf}``), run the whole ``options.recipe`` pipeline on CPU (see the module docstring and
    ``PIPELINE_STAGES``). Never raises for a model's own failure.

    ``on_stage(name)`` is called as each stage starts (the pool's workers tell the parent, so a
    timeout or crash is reported with its stage).
    """
    if on_stage:
        on_stage("meta-trace")
    result = check_model(spec)
    if isinstance(max_params, collections.abc.Mapping):  # a budget per source
        max_params = max_params.get(result.source, max_params.get("default", DEFAULT_MAX_PARAMS))
    if result.params is not None and result.params > max_params:
        result.pipeline, result.pipeline_detail = "skipped", f"{result.params:,} parameters > {max_params:,.0f}"
        return result
    if result.params is None:  # not even built on the meta device: that is the pipeline's failure too
        result.pipeline, result.pipeline_stage = "error", "build"
        result.pipeline_error = f"{result.error_type}: {result.error}"
        result.pipeline_failures = {"build": result.pipeline_error}
        return result
    options = options or PipelineOptions()
    run = _PipelineRun(spec, options, result, on_stage)
    t0 = time.perf_counter()
    try:
        run.run()
    finally:
        run.release()
        result.pipeline_s = round(time.perf_counter() - t0, 3)
        gc.collect()
    return result


class _PipelineRun:
    """One model through the pipeline; each stage records its time and, if it fails, its error."""

    def __init__(self, spec: str, options: PipelineOptions, result: ModelResult, on_stage):
        self.spec, self.o, self.r, self.on_stage = spec, options, result, on_stage
        self.r.stage_s, self.r.pipeline_failures = {}, {}
        self.model = self.gm = self.plain = self.sgm = self.ref = self.fresh = None

    def release(self) -> None:
        self.model = self.gm = self.plain = self.sgm = self.ref = self.fresh = None

    def stage(self, name: str, fn: Callable[[], Any], *, fatal: bool = True) -> bool:
        """Run one stage; False (and the failure recorded) if it raised. With ``fatal`` a
        failure ends the pipeline (the later stages need what this one made)."""
        if self.on_stage:
            self.on_stage(name)
        t0 = time.perf_counter()
        try:
            fn()
            ok = True
        except Exception as e:  # a model's own failure, whatever the type
            error = f"{type(e).__name__}: {_first_line(e)}"
            self.r.pipeline_failures[name] = error
            if self.r.pipeline_stage is None:
                self.r.pipeline, self.r.pipeline_stage, self.r.pipeline_error = "error", name, error
                cause = _innermost(e)
                if cause is not e:
                    self.r.pipeline_cause = f"{type(cause).__name__}: {_first_line(cause)}"
            ok = False
        self.r.stage_s[name] = round(time.perf_counter() - t0, 3)
        if not ok and fatal:
            raise _Stop
        return ok

    def run(self) -> None:
        import torch

        torch.manual_seed(self.o.seed)
        try:
            self.stage("build", self._build)
            self.stage("input", self._input)
            self.stage("trace", self._trace)
            for method in MASK_METHODS:
                self.stage(f"masks:{method}", lambda m=method: self._masks(m), fatal=False)
            self.stage("transform", self._transform)
            for g in GATE_VALUES:
                self.stage(f"train@gate={g:g}", lambda g=g: self._train(g))
            self.stage("identity", self._identity)
            self.stage("removal", self._removal)
            self.stage("export", self._export)
            self.stage("equivalence", self._equivalence)
        except _Stop:
            return
        if self.r.pipeline is None:
            self.r.pipeline = "ok"
        if not self.r.pipeline_failures:
            self.r.pipeline_failures = None

    # ----------------------------------------------------------------- stages
    def _build(self) -> None:
        from fxsparse.models import create

        torch = _torch()
        torch.manual_seed(self.o.seed)
        self.model = create(self.spec, device="cpu").train()

    def _input(self) -> None:
        """The smallest input the model's eager forward accepts in eval *and* train mode (batch
        ``batch_size``), and the targets. Both modes: a model can take a different path in
        training (Inception v3's auxiliary head needs 299x299 there, 75x75 suffice in eval)."""
        torch = _torch()
        gen = torch.Generator().manual_seed(self.o.seed + 1)
        errors = []
        for size in _input_sizes(self.model, self.o.small_size):
            x = torch.randn(self.o.batch_size, *size, generator=gen)
            try:
                out = _runs_in_both_modes(self.model, x)
            except Exception as e:
                errors.append(f"{'x'.join(map(str, size[1:]))}: {type(e).__name__}: {_first_line(e)}")
                continue
            break
        else:
            raise PipelineCheckFailed("the model runs on no input size tried (" + "; ".join(errors) + ")")
        self.model.train()
        if out.ndim != 2:
            raise PipelineCheckFailed(f"the model's output is shaped {tuple(out.shape)}, not (batch, classes)")
        self.x = x
        self.y = torch.randint(out.shape[-1], (self.o.batch_size,), generator=gen)
        self.data = [(self.x, self.y)]
        self.r.input_size = list(size)

    def _trace(self) -> None:
        import copy

        import fxsparse

        self.gm = fxsparse.trace(self.model, self.x)
        # the reference of the identity check: the same trace, to be given the final weights and
        # the masks (a copy, not a second trace: tracing is a large share of a small model's time)
        self.plain = copy.deepcopy(self.gm)

    def _masks(self, method: str) -> None:
        import fxsparse.masks

        opts = {"rounds": self.o.synflow_rounds} if method == "synflow" else {}
        # the default loss, as a user calls it: cross-entropy of the output's logits
        masks = fxsparse.masks.compute(self.gm, method=method, sparsity=self.o.sparsity, data=self.data,
                                       seed=self.o.seed, **opts)
        if not masks:
            raise PipelineCheckFailed("no mask computed")
        total = sum(m.numel() for m in masks.values())
        kept = sum(int(m.sum()) for m in masks.values())
        expected = total - int(self.o.sparsity * total)
        if abs(kept - expected) > max(1, 0.001 * total):  # compute promises the exact count
            raise PipelineCheckFailed(f"{kept} of {total} weights kept, expected about {expected}")

    def _transform(self) -> None:
        import fxsparse
        from fxsparse.ghosts import present

        # LRsI on, whatever the recipe's default: the sweep proves the whole pipeline runs on the model
        recipe = fxsparse.load_recipe(self.o.recipe, overrides={"rescale.enabled": True,
                                                                "rescale.iters": self.o.lrsi_iters})
        # transform takes the trace the trace stage made (it would make the same one); copy=False:
        # neither it nor the eager model is needed afterwards
        self.sgm = fxsparse.transform(self.gm, recipe, data=self.data, loss_fn=_loss, copy=False)
        self.model = self.gm = None
        self.r.ghosts = present(self.sgm)
        self.mode_dependent = bool(self.sgm.meta["fxsparse"].mode_dependent)
        self.sched = fxsparse.RecipeScheduler(self.sgm, total_steps=10)
        self.opt = self.sched.build_optimizer()

    def _train(self, value: float) -> None:
        from fxsparse import gates

        torch = _torch()
        for group in gates.get(self.sgm):
            gates.set(self.sgm, group, value)
        self.sgm.train()
        for step in range(self.o.steps_per_gate):
            loss = self.sched.loss(_main_output(self.sgm(self.x)), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if not torch.isfinite(loss):
                raise PipelineCheckFailed(f"the loss is {loss.item()} at step {step + 1}")
        if gates.get(self.sgm) and any(v != value for v in gates.get(self.sgm).values()):
            raise PipelineCheckFailed(f"the gates moved during the steps: {gates.get(self.sgm)}")

    def _identity(self) -> None:
        """Gates at identity: outputs and gradients equal the mask-only graph's (same weights)."""
        import fxsparse
        from fxsparse.pass_infra import CONTAINER
        from fxsparse.passes.mask import MaskPass, masked_parameters

        fxsparse.gates.set_identity(self.sgm)
        state = {k: v for k, v in self.sgm.state_dict().items() if not k.startswith(CONTAINER + ".")}
        self.ref, self.plain = self.plain, None
        self.ref.load_state_dict(state, strict=True)  # the weights LRsI and the steps left
        MaskPass({k: v.clone() for k, v in masked_parameters(self.sgm).items()})(self.ref)
        self.r.identity = self._compare(self.ref, self.sgm, grads=True, what="at identity gates, the tost graph vs the mask-only graph")

    def _removal(self) -> None:
        import fxsparse
        from fxsparse.ghosts import present

        for _ in range(self.sched.total_steps):  # the scheduler removes each ghost at its remove_at
            if not present(self.sgm):
                break
            self.sched.step()
            # as at the end of a long anneal: every removal happens at identity gates (a removal
            # that folds its branch, GhostSkipPass(fold=True), then folds nothing)
            fxsparse.gates.set_identity(self.sgm)
        left = present(self.sgm)
        if left or fxsparse.gates.get(self.sgm):
            raise PipelineCheckFailed(f"after the scheduler's last step, still present: {left or fxsparse.gates.get(self.sgm)}")
        fxsparse.remove_ghosts(self.sgm)  # a no-op now; it must stay one
        fxsparse.testing.assert_same_structure(self.ref, self.sgm)
        self._compare(self.ref, self.sgm, grads=True, what="after removal, the graph vs the mask-only graph", exact=True)
        self.ref = None

    def _export(self) -> None:
        import fxsparse
        from fxsparse.models import create

        torch = _torch()
        state = fxsparse.export(self.sgm)
        torch.manual_seed(self.o.seed + 7)  # other random weights: every value must come from state
        self.fresh = create(self.spec, device="cpu")
        self.fresh.load_state_dict(state, strict=True)

    def _equivalence(self) -> None:
        # outputs only: the masked graph's gradients are zero at pruned weights, the fresh model's are not
        self.r.exported = self._compare(self.fresh, self.sgm, grads=False, what="the exported model vs the final graph")
        self.fresh = None

    def _compare(self, a, b, *, grads: bool, what: str, exact: bool = False) -> str:
        """'equal' (bit-identical) or 'close' (within rtol=1e-5 of each tensor's max |value|, atol=1e-6); raises otherwise.

        The modules are not copied (memory): both run the same batches in train mode, so their
        BatchNorm statistics move alike, and stay equal if the outputs are.
        """
        from fxsparse.dropout import dropout_off
        from fxsparse.testing import compare

        modes = ("train",) if self.mode_dependent else ("train", "eval")
        ghost_dropouts = bool(_ghost_dropouts(b))
        # the rerun below starts from these (only graphs with a ghost dropout can need it)
        buffers = [{k: v.clone() for k, v in m.named_buffers()} for m in (a, b)] if ghost_dropouts else None
        diffs = compare(a, b, self.x, modes=modes, grads=grads, exact=True, copy_modules=False)
        if not diffs:
            return "equal"
        if any(m.what.startswith("train") for m in diffs) and ghost_dropouts:
            # a ghost branch copied a dropout (ghost_channels.dropout = true): it draws from the
            # global RNG and shifts the draws of every later random op, as docs/ghost-channels.md
            # says; with dropout off (the ghost's and the original's) the graphs must still agree.
            # The outputs that differed moved the BatchNorm statistics apart: put them back first
            for m, saved in zip((a, b), buffers):
                for name, buffer in m.named_buffers():
                    buffer.copy_(saved[name])
            with dropout_off():
                diffs = compare(a, b, self.x, modes=modes, grads=grads, exact=True, copy_modules=False)
            if not diffs:
                return "equal-without-dropout"
        if not exact:
            # reordered sums round differently: the tolerance is scaled to each tensor's largest value
            beyond = compare(a, b, self.x, modes=modes, grads=grads, scale="tensor", copy_modules=False)
            if not beyond:
                return "close"
            diffs = beyond
        raise PipelineCheckFailed(f"{what}: {len(diffs)} mismatches, first: {str(diffs[0]).strip()}")


def _ghost_dropouts(gm: Any) -> list[str]:
    """The ghost-branch nodes of ``gm`` that are dropouts (copies of the chain's dropout ops)."""
    from fxsparse.dropout import DROPOUT_FUNCTIONS, is_dropout_module
    from fxsparse.pass_infra import tagged_nodes

    out = []
    for node in tagged_nodes(gm):
        if node.meta["fxsparse"].get("group") in (None, "masks"):
            continue
        if node.op == "call_module":
            if is_dropout_module(gm.get_submodule(node.target)):
                out.append(node.name)
        elif node.op == "call_function" and node.target in DROPOUT_FUNCTIONS:
            out.append(node.name)
    return out


class _Stop(Exception):
    """A fatal stage failed: the later stages cannot run."""


def _torch():
    import torch

    return torch


def _innermost(e: BaseException) -> BaseException:
    seen = {id(e)}
    while True:
        nxt = e.__cause__ or (e.__context__ if not e.__suppress_context__ else None)
        if nxt is None or id(nxt) in seen:
            return e
        seen.add(id(nxt))
        e = nxt


def _runs_in_both_modes(model: Any, x: Any):
    """The model's eval-mode logits on ``x`` after a train-mode forward on it too (no gradients;
    the buffers a train-mode forward updates, BatchNorm's statistics, and the RNG are restored)."""
    torch = _torch()
    model.eval()
    with torch.no_grad():
        out = _main_output(model(x))
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        model.train()
        try:
            with torch.random.fork_rng(devices=[]):
                model(x)
        finally:
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return out


def _main_output(out: Any):
    """The logits of a model's output (``fxsparse.outputs.logits``: torchvision's GoogLeNet and
    Inception v3 add auxiliary logits in train mode)."""
    from fxsparse.outputs import logits

    return logits(out)


def _loss(out: Any, targets: Any):
    from fxsparse.outputs import cross_entropy

    return cross_entropy(out, targets)


def _input_sizes(model: Any, small: int) -> list[tuple[int, ...]]:
    """Input sizes to try, smallest first: ``small`` (or timm's ``min_input_size``), 128, then the
    model's default. Models that fix their input size (timm's ``fixed_input_size``, torchvision's
    ViTs) get only their default."""
    from fxsparse.trace import default_example_inputs

    default = tuple(default_example_inputs(model, batch_size=1)[0].shape[1:])
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if len(default) != 3 or default[1] != default[2] or cfg.get("fixed_input_size") or getattr(model, "image_size", None):
        return [default]
    c, side = default[0], default[1]
    first = small
    if cfg.get("min_input_size"):
        first = max(first, int(cfg["min_input_size"][-1]))
    sides = sorted({s for s in (first, 128) if s < side}) + [side]
    return [(c, s, s) for s in sides]


def _first_line(e: BaseException | str) -> str:
    """The message's first line, with installed packages' paths made relative (timm/models/...)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    first = _SITE_PACKAGES.sub("", lines[0]) if lines else type(e).__name__
    return first if len(first) <= _ERROR_CHARS else first[: _ERROR_CHARS - 3] + "..."


_SITE_PACKAGES = re.compile(r"[^\s`'\"]*[/\\](?:site|dist)-packages[/\\]")


# --------------------------------------------------------------------------- worker pool
def _worker_main(conn: multiprocessing.connection.Connection, options: dict[str, Any]) -> None:
    """A pool worker: import once, then check one model per message until told to stop (None)."""
    # Ctrl-C reaches the whole process group; the parent handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(options.get("threads", 1))
    warnings.filterwarnings("ignore")
    # the sweep records mode-dependent graphs itself; per-model log lines would bury the progress bar
    logging.getLogger("fxsparse").setLevel(logging.ERROR)
    import timm  # noqa: F401 -- paid once per worker, not per model
    import torchvision  # noqa: F401

    import fxsparse.testing  # noqa: F401

    _warm_up()
    # torch, timm and torchvision are ~500k long-lived objects: moved out of the collector's
    # reach, full collections (triggered often by tracing) stop costing a tenth of a trace
    gc.freeze()
    conn.send(("ready", os.getpid()))
    done = 0
    while True:
        spec = conn.recv()
        if spec is None:
            return
        if options.get("pipeline") is not None:
            result = check_pipeline(spec, max_params=options["max_params"], options=options["pipeline"],
                                    on_stage=lambda stage: conn.send(("stage", stage)))
        else:
            result = check_model(spec, numeric=options["numeric"], max_params=options["max_params"])
        conn.send(("result", result))
        done += 1
        if options.get("max_tasks") and done >= options["max_tasks"]:
            # a fresh process for the next models: memory a long pipeline run fragments is given back
            conn.send(("retire", done))
            return


def _warm_up() -> None:
    """Trace a tiny model once so the first real model's time excludes torch's lazy imports."""
    import torch
    from torch import nn

    import fxsparse

    with torch.device("meta"):
        tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    fxsparse.trace(tiny, torch.randn(1, 3, 8, 8, device="meta"))


class _Worker:
    """One worker process, its pipe, and the model it is working on."""

    def __init__(self, ctx: Any, options: dict[str, Any]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, options), daemon=True, name="fxsparse-zoo")
        self.process.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.spec: str | None = None
        self.stage: str | None = None  # the pipeline stage the current model is in
        self.deadline = math.inf
        self.done = 0  # models it returned a result for
        # it has done its max_tasks and is about to send "retire" and exit: give it no model (one
        # sent between its result and its "retire" message would be lost with it)
        self.retiring = False

    def submit(self, spec: str, timeout: float) -> None:
        self.conn.send(spec)
        self.spec, self.stage, self.deadline = spec, None, time.monotonic() + timeout

    def stop(self, *, kill: bool = False) -> None:
        if not kill and self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                kill = True
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


def sweep(
    specs: Sequence[str],
    *,
    timeout: float = 120.0,
    workers: int = 2,
    numeric: bool = False,
    max_params: float | dict[str, float] = DEFAULT_MAX_PARAMS,
    pipeline: PipelineOptions | bool | None = None,
    max_tasks: int | None = None,
    time_budget: float | None = None,
    progress: bool = True,
    on_result: Callable[[ModelResult], None] | None = None,
) -> list[ModelResult]:
    """Check every spec (see ``check_model``) in ``workers`` processes; results in ``specs`` order.

    A model that takes longer than ``timeout`` seconds, or whose worker dies, is recorded as
    ``"timeout"`` / ``"crashed"`` and its worker replaced. ``workers=0`` runs everything in this
    process: no isolation and no timeout, but easy to debug. After ``time_budget`` seconds no
    new model is started: the models not reached are left out of the results.

    ``pipeline`` (``True`` or a ``PipelineOptions``) runs ``check_pipeline`` on each model instead
    (``max_params`` is then its budget). ``max_tasks``: a worker is replaced by a fresh process
    after that many models (default: 10 with ``pipeline``, never without).
    """
    if pipeline is True:
        pipeline = PipelineOptions()
    pipeline = pipeline or None
    if max_tasks is None and pipeline is not None:
        max_tasks = 10
    specs = list(dict.fromkeys(specs))  # each model once
    stop_at = time.monotonic() + time_budget if time_budget is not None else math.inf
    bar = _progress_bar(len(specs), progress)
    results: dict[str, ModelResult] = {}

    def record(r: ModelResult) -> None:
        results[r.model] = r
        if on_result:
            on_result(r)
        if bar is not None:
            failed = sum(not x.ok for x in results.values())
            bar.set_postfix_str(f"failed={failed}" + (f" last={r.model}" if not r.ok else ""), refresh=False)
            bar.update(1)

    try:
        if workers <= 0:
            for spec in specs:
                if time.monotonic() >= stop_at:
                    break
                if pipeline is not None:
                    record(check_pipeline(spec, max_params=max_params, options=pipeline))
                else:
                    record(check_model(spec, numeric=numeric, max_params=max_params))
        else:
            options = {"numeric": numeric, "max_params": max_params, "pipeline": pipeline, "max_tasks": max_tasks}
            _run_pool(specs, record, timeout=timeout, workers=min(workers, max(len(specs), 1)),
                      options=options, stop_at=stop_at)
    finally:
        if bar is not None:
            bar.close()
    return [results[s] for s in specs if s in results]


def _run_pool(specs: list[str], record: Callable[[ModelResult], None], *, timeout: float,
              workers: int, options: dict[str, Any], stop_at: float = math.inf) -> None:
    ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's threads and state
    pending = collections.deque(specs)
    pool = [_Worker(ctx, options) for _ in range(workers)]
    failed_starts = 0
    try:
        while (pending and time.monotonic() < stop_at) or any(w.spec is not None for w in pool):
            for w in pool:
                if w.ready and not w.retiring and w.spec is None and pending and time.monotonic() < stop_at:
                    w.submit(pending.popleft(), timeout)
            now = time.monotonic()
            deadlines = [w.deadline if w.ready else w.started + _STARTUP_TIMEOUT_S for w in pool]
            wait_s = max(0.0, min(deadlines) - now)
            handles = [w.conn for w in pool] + [w.process.sentinel for w in pool]
            multiprocessing.connection.wait(handles, timeout=min(wait_s, 1.0))
            for i, w in enumerate(pool):
                replace, reason = _poll(w, record, max_tasks=options.get("max_tasks"))
                if not replace and time.monotonic() > (w.deadline if w.ready else w.started + _STARTUP_TIMEOUT_S):
                    replace, reason = True, "timeout"
                if not replace:
                    continue
                if reason == "retired" and w.spec is None:
                    pass  # it did its share of models; a fresh one takes its place
                elif reason == "retired":  # it retired holding a model it never started: not the model's fault
                    pending.appendleft(w.spec)
                elif w.spec is not None:
                    record(_lost(w.spec, reason, timeout, w.process, stage=w.stage,
                                 pipeline=options.get("pipeline") is not None))
                    failed_starts = 0
                elif not w.ready:
                    failed_starts += 1
                    if failed_starts >= 3:
                        raise RuntimeError(
                            f"zoo workers fail to start (exit code {w.process.exitcode}); run with "
                            f"workers=0 (--workers 0) to see the error in this process."
                        )
                w.stop(kill=True)
                pool[i] = _Worker(ctx, options)
    finally:
        for w in pool:
            w.stop()


def _poll(w: _Worker, record: Callable[[ModelResult], None], *, max_tasks: int | None = None) -> tuple[bool, str]:
    """Read what worker ``w`` sent; (True, reason) if it died and must be replaced."""
    try:
        while w.conn.poll():
            kind, payload = w.conn.recv()
            if kind == "ready":
                w.ready = True
            elif kind == "stage":
                w.stage = payload
            elif kind == "retire":
                return True, "retired"
            else:
                record(payload)
                w.spec, w.stage, w.deadline = None, None, math.inf
                w.done += 1
                w.retiring = bool(max_tasks) and w.done >= max_tasks
    except (EOFError, OSError):
        return True, "retired" if w.retiring and w.spec is None else "crashed"
    if not w.process.is_alive():
        return True, "retired" if w.retiring and w.spec is None else "crashed"
    return False, ""


def _lost(spec: str, reason: str, timeout: float, process: Any, *, stage: str | None = None,
          pipeline: bool = False) -> ModelResult:
    from fxsparse.models import source_of

    if reason == "timeout":
        error = f"still running after {timeout:g} s; the worker was killed"
    else:
        process.join(1)  # the pipe closes a moment before the process is reaped: wait for its exit code
        code = process.exitcode
        how = f"signal {-code} ({_signal_name(-code)})" if code is not None and code < 0 else f"exit code {code}"
        error = f"the worker process died ({how})"
    if stage:
        error += f" (in stage {stage})"
    r = ModelResult(model=spec, source=source_of(spec), status=reason, error_type=reason, error=error)
    if pipeline:
        r.pipeline, r.pipeline_stage, r.pipeline_error = "error", stage or "meta-trace", f"{reason}: {error}"
        r.pipeline_failures = {r.pipeline_stage: r.pipeline_error}
    return r


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return "?"


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="model", dynamic_ncols=True, smoothing=0.05)


# --------------------------------------------------------------------------- reports
def environment() -> dict[str, Any]:
    """Versions and machine a report was produced with."""
    import timm
    import torch
    import torchvision

    import fxsparse

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "fxsparse": fxsparse.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile (q in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(results: Sequence[ModelResult]) -> dict[str, Any]:
    """The headline figures of a sweep (what the markdown summary shows)."""
    ok = [r for r in results if r.ok]
    times = [r.trace_s for r in ok if r.trace_s is not None]
    cpu = [r.trace_cpu_s for r in ok if r.trace_cpu_s is not None]
    slowest = max(ok, key=lambda r: r.trace_s or 0.0, default=None)
    largest = max(ok, key=lambda r: r.nodes or 0, default=None)
    failures: dict[str, list[str]] = collections.defaultdict(list)
    for r in results:
        if not r.ok:
            failures[error_key(r)].append(r.model)
    out: dict[str, Any] = {
        "models": len(results),
        "traced": len(ok),
        "success_rate": round(len(ok) / len(results), 4) if results else None,
        "by_status": dict(collections.Counter(r.status for r in results)),
        "trace_s": {
            "median": _round(statistics.median(times)) if times else None,
            "p90": _round(_quantile(times, 0.9)),
            "max": _round(slowest.trace_s) if slowest else None,
            "max_model": slowest.model if slowest else None,
            "total": _round(sum(times)),
        },
        "trace_cpu_s": {"median": _round(statistics.median(cpu)) if cpu else None, "p90": _round(_quantile(cpu, 0.9))},
        "largest_graph": {"model": largest.model, "nodes": largest.nodes} if largest else None,
        "mode_dependent": sorted(r.model for r in ok if r.mode_dependent),
        "failures": dict(sorted(failures.items(), key=lambda kv: (-len(kv[1]), kv[0]))),
    }
    checked = [r for r in results if r.numeric not in (None, "skipped")]
    if any(r.numeric is not None for r in results):
        out["numeric"] = {
            "checked": len(checked),
            **{k: sum(r.numeric == k for r in results) for k in ("equal", "close", "mismatch", "error", "skipped")},
            "not_equal": {r.model: f"{r.numeric}: {r.numeric_detail}" for r in checked if r.numeric != "equal"},
        }
    if any(r.pipeline is not None for r in results):
        out["pipeline"] = summarize_pipeline(results)
    return out


def summarize_pipeline(results: Sequence[ModelResult]) -> dict[str, Any]:
    """The pipeline figures: completed / ran, failures grouped by stage and message, skipped models."""
    ran = [r for r in results if r.pipeline in ("ok", "error")]
    ok = [r for r in ran if r.pipeline == "ok"]
    failures: dict[str, list[str]] = collections.defaultdict(list)
    for r in ran:
        if r.pipeline == "error":
            failures[pipeline_error_key(r)].append(r.model)
    times = [r.pipeline_s for r in ok if r.pipeline_s is not None]
    slowest = max(ok, key=lambda r: r.pipeline_s or 0.0, default=None)
    stage_totals: dict[str, float] = collections.defaultdict(float)
    for r in ok:
        for stage, t in (r.stage_s or {}).items():
            stage_totals[stage] += t
    by_source = {}
    for source in sorted({r.source for r in results}):
        mine = [r for r in results if r.source == source]
        by_source[source] = {"models": len(mine), "ran": sum(r.pipeline in ("ok", "error") for r in mine),
                             "ok": sum(r.pipeline == "ok" for r in mine),
                             "skipped": sum(r.pipeline == "skipped" for r in mine)}
    return {
        "models": len(results),
        "ran": len(ran),
        "ok": len(ok),
        "by_source": by_source,
        "error": len(ran) - len(ok),
        "skipped": sum(r.pipeline == "skipped" for r in results),
        "success_rate": round(len(ok) / len(ran), 4) if ran else None,
        "by_stage": dict(collections.Counter(r.pipeline_stage for r in ran if r.pipeline == "error").most_common()),
        "failures": dict(sorted(failures.items(), key=lambda kv: (-len(kv[1]), kv[0]))),
        "causes": {r.model: r.pipeline_cause for r in ran if r.pipeline_cause},
        "skipped_models": {r.model: r.pipeline_detail for r in results if r.pipeline == "skipped"},
        "identity": dict(collections.Counter(r.identity for r in ok)),
        "exported": dict(collections.Counter(r.exported for r in ok)),
        "ghosts": dict(collections.Counter(g for r in ok for g in (r.ghosts or ()))),
        "no_ghosts": sorted(r.model for r in ok if not r.ghosts),
        "input_sizes": dict(collections.Counter("x".join(map(str, r.input_size[1:])) for r in ran if r.input_size)),
        "pipeline_s": {
            "median": _round(statistics.median(times)) if times else None,
            "p90": _round(_quantile(times, 0.9)),
            "max": _round(slowest.pipeline_s) if slowest else None,
            "max_model": slowest.model if slowest else None,
            "total": _round(sum(r.pipeline_s or 0.0 for r in ran)),
        },
        "stage_share": {k: round(v / sum(stage_totals.values()), 3) for k, v in stage_totals.items()} if stage_totals else {},
    }


def pipeline_error_key(r: ModelResult) -> str:
    """How pipeline failures are grouped: the stage, then the message without the model's name."""
    name = re.escape(_bare(r.model))
    msg = re.sub(rf"(?<![\w.-]){name}(?![\w.-])", "<model>", r.pipeline_error or "")
    return f"{r.pipeline_stage}: {msg}"


def error_key(r: ModelResult) -> str:
    """How failures are grouped: the error type and first line, without the failing model's name."""
    name = re.escape(_bare(r.model))
    msg = re.sub(rf"(?<![\w.-]){name}(?![\w.-])", "<model>", r.error or "")
    return f"{r.error_type}: {msg}" if r.error_type not in (None, "timeout", "crashed") else f"{r.status}: {msg}"


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def write_report(results: Sequence[ModelResult], path: str | os.PathLike, *, settings: dict[str, Any] | None = None,
                 title: str | None = None, env: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``path`` (JSON, one model per line) and the markdown summary beside it (``.md``).

    ``env`` (default: this machine now, see ``environment``) records where the results came from.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = env or environment()
    summary = summarize(results)
    head = {"environment": env, "settings": settings or {}, "summary": summary}
    # one model per line keeps the file small and its diffs readable
    body = ",\n".join("  " + json.dumps(r.to_json(), sort_keys=False) for r in results)
    text = json.dumps(head, indent=1)[:-2] + ',\n "models": [\n' + body + "\n ]\n}\n"
    path.write_text(text)
    md = path.with_suffix(".md")
    md.write_text(render_markdown(results, env=env, settings=settings or {}, summary=summary,
                                  title=title, json_name=path.name))
    return path, md


def render_markdown(results: Sequence[ModelResult], *, env: dict[str, Any], settings: dict[str, Any],
                    summary: dict[str, Any] | None = None, title: str | None = None, json_name: str = "") -> str:
    s = summary or summarize(results)
    t, c = s["trace_s"], s["trace_cpu_s"]
    lines = [
        f"# {title or 'fxsparse zoo sweep'}",
        "",
        f"{env['date']} · torch {env['torch']} · timm {env['timm']} · torchvision {env['torchvision']} · "
        f"Python {env['python']} · {env['cpu_cores']} CPU cores ({env['cpu']})",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) if settings else "",
        "",
        "| | |",
        "|---|---|",
        f"| traced | **{s['traced']} / {s['models']}** ({_pct(s['traced'], s['models'])}) |",
    ]
    if t["median"] is not None:
        lines += [
            f"| trace time, wall (s) | median {t['median']:.3f} · p90 {t['p90']:.3f} · max {t['max']:.2f} "
            f"(`{t['max_model']}`) |",
            f"| trace time, CPU (s) | median {c['median']:.3f} · p90 {c['p90']:.3f} |",
        ]
    if s["largest_graph"]:
        lines.append(f"| largest graph | {s['largest_graph']['nodes']} nodes (`{s['largest_graph']['model']}`) |")
    lines.append(f"| mode-dependent graphs | {len(s['mode_dependent'])} |")
    num = s.get("numeric")
    if num:
        lines.append(
            f"| numeric check (eval, batch 1) | {num['checked']} checked: **{num['equal']} bit-identical**, "
            f"{num['close']} close, {num['mismatch']} mismatch, {num['error']} error; {num['skipped']} skipped |"
        )
    pipe = s.get("pipeline")
    if pipe:
        lines.append(
            f"| {settings.get('recipe', 'tost')} pipeline (CPU, random weights, batch "
            f"{settings.get('batch_size', 2)}) | **{pipe['ok']} / {pipe['ran']} completed** "
            f"({_pct(pipe['ok'], pipe['ran'])}); {pipe['skipped']} skipped by the parameter budget |"
        )
        pt = pipe["pipeline_s"]
        if len(pipe["by_source"]) > 1:
            for source, b in pipe["by_source"].items():
                lines.append(f"| {source} | {b['ok']} / {b['ran']} completed ({_pct(b['ok'], b['ran'])}); "
                             f"{b['skipped']} skipped |")
        if pt["median"] is not None:
            lines.append(f"| pipeline time per model (s) | median {pt['median']:.1f} · p90 {pt['p90']:.1f} · max "
                         f"{pt['max']:.1f} (`{pt['max_model']}`) · total {pt['total'] / 3600:.2f} h |")
        if pipe["ok"]:
            ident = ", ".join(f"{v} {k}" for k, v in pipe["identity"].items())
            exp = ", ".join(f"{v} {k}" for k, v in pipe["exported"].items())
            lines.append(f"| identity gates vs mask-only graph · exported vs final graph | {ident} · {exp} |")
            ghosts = ", ".join(f"{k} {v}" for k, v in pipe["ghosts"].items())
            lines.append(f"| models that got each ghost | {ghosts}; none: {len(pipe['no_ghosts'])} |")
    lines += ["", f"## Failures ({s['models'] - s['traced']})", ""]
    if not s["failures"]:
        lines.append("None.")
    for key, models in s["failures"].items():
        lines.append(f"- **{len(models)}×** `{_md_code(key)}`  ")
        lines.append("  " + ", ".join(f"`{m}`" for m in models))
    if pipe:
        lines += ["", f"## Pipeline failures ({pipe['error']})", ""]
        if pipe["by_stage"]:
            lines.append("By stage: " + ", ".join(f"{k} {v}" for k, v in pipe["by_stage"].items()) + ".")
            lines.append("")
        if not pipe["failures"]:
            lines.append("None.")
        for key, models in pipe["failures"].items():
            lines.append(f"- **{len(models)}×** `{_md_code(key)}`  ")
            lines.append("  " + ", ".join(f"`{m}`" for m in models))
            causes = sorted({pipe["causes"][m] for m in models if m in pipe["causes"]})
            for c in causes[:3]:
                lines.append(f"  cause: `{_md_code(c)}`")
        if pipe["skipped_models"]:
            lines += ["", f"## Skipped by the parameter budget ({pipe['skipped']})", ""]
            lines.append(", ".join(f"`{m}` ({d.split(' ')[0]})" for m, d in pipe["skipped_models"].items()))
        if pipe["no_ghosts"]:
            lines += ["", f"## Completed without any ghost site ({len(pipe['no_ghosts'])})", ""]
            lines.append(", ".join(f"`{m}`" for m in pipe["no_ghosts"]))
    if num and num["not_equal"]:
        lines += ["", "## Numeric differences", ""]
        lines += [f"- `{m}`: {_md_code(d)}" for m, d in num["not_equal"].items()]
    if s["mode_dependent"]:
        lines += ["", "## Mode-dependent graphs", "",
                  "Traced in train mode; the eval-mode trace differs (the GraphModule refuses to run in eval mode):", "",
                  ", ".join(f"`{m}`" for m in s["mode_dependent"])]
    if json_name:
        lines += ["", f"Per-model results: `{json_name}`."]
    return "\n".join(lines) + "\n"


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "n/a"


def _md_code(s: str) -> str:
    return s.replace("`", "'").replace("|", "\\|")


def append_log(path: str | os.PathLike, result: ModelResult) -> None:
    """Append one result to a sweep's log (JSON lines): what ``--resume`` reads back."""
    with open(path, "a") as f:
        f.write(json.dumps(result.to_json()) + "\n")


def read_log(path: str | os.PathLike) -> list[ModelResult]:
    """The results in a sweep's log; a last line cut short by a kill is ignored."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(ModelResult.from_json(json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return out


def load_report(path: str | os.PathLike) -> list[ModelResult]:
    """The per-model results of a report written by ``write_report``."""
    return [ModelResult.from_json(d) for d in json.loads(Path(path).read_text())["models"]]
