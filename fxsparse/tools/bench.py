"""The speed study behind ``fxsparse bench``: what fxsparse costs per training step, and per transform.

Training step (forward + cross-entropy + backward + SGD-momentum step) of one model under
several **variants**, each on its own copy of the same seeded model with the same random (ERK)
mask:

==============  ==========================================================================
``dense``       the model as is, no mask: the reference of every mask variant
``masked``      ``fxsparse.trace`` + ``MaskPass``: ``F.conv2d(x, w * mask)`` in the graph
``ghosts``      the ghost phase: the mask plus the tost recipe's ghost passes (neurons, skip
                edges, channels, gates at 1), exactly what ``fxsparse.transform`` builds for
                ``tost`` minus LRsI (which only changes weight values)
``prune``       ``torch.nn.utils.prune.custom_from_mask``: a forward pre-hook recomputes
                ``weight = weight_orig * weight_mask`` before every forward
``parametrize`` ``torch.nn.utils.parametrize`` with ``torch.ao.pruning``'s ``FakeSparsity``
                (what ``torch.ao.pruning`` sparsifiers install)
==============  ==========================================================================

and, on request, ``ghost_neurons`` / ``ghost_skips`` / ``ghost_channels``: the mask plus one
ghost technique (the ablation recipes' graphs), against ``masked``.

in two **modes**, ``eager`` and ``compiled`` (``torch.compile``, inductor). Every round times
one step of every variant of a mode in turn (the order reversed every other round), so load
from other processes hits them alike; a ratio is the median over rounds of the two variants'
times *in the same round*. That is what makes these numbers usable on a shared machine.

**Peak memory of a step**: static bytes (parameters, buffers, masks, optimizer state) plus the
largest amount of memory allocated *during* the step above what was live before it (activations,
gradients, temporaries). On CUDA the latter is ``torch.cuda.max_memory_allocated``; on CPU it
comes from ``torch.profiler`` memory events (every allocation and free of torch's CPU allocator,
compiled kernels included), summed in time order. Process RSS (``ru_maxrss``) cannot be reset
between variants and counts compiler memory, and ``tracemalloc`` sees Python objects only, so
neither can tell variants apart.

**Transform time**: trace, mask scoring (random ERK), ``MaskPass``, each ghost pass and the
removal of every ghost, per model (``transform_times``), and over a whole zoo (``zoo_times``).

    from fxsparse.tools.bench import BenchConfig, run_bench
    rows = run_bench(BenchConfig(models=("resnet18",), rounds=5))
"""
from __future__ import annotations

import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FxSparseError

log = logging.getLogger(__name__)

__all__ = [
    "BenchConfig", "BenchError", "VARIANTS", "MODES", "MODELS", "build_variant", "random_masks", "Runner",
    "measure", "step_memory", "transform_times", "zoo_times", "bench_model", "run_bench", "machine",
    "markdown", "zoo_markdown", "read_rows", "append_rows", "edge_costs", "edges_markdown", "plain_forms",
]

VARIANTS = ("dense", "masked", "ghosts", "prune", "parametrize")
# one ghost technique at a time (the ablation recipes' graphs), on request: --variants masked ghost_skips
GHOST_VARIANTS = ("ghost_neurons", "ghost_skips", "ghost_channels")
# the forms before issue 13's speed work, to measure a change side by side (--variants masked masked_mul):
# masked_mul / ghosts_mul are the masked / ghost-phase graphs with neither of fxsparse.fused's forms:
# the plain ``w * mask`` multiply instead of apply_mask and, in ghosts_mul, ghost neurons' two-node
# blend instead of ghost_relu_blend (ghosts_mul is measured against masked_mul); *_unfused have
# only the blend put back (one change at a time)
BEFORE_VARIANTS = {"masked_mul": "masked", "ghosts_mul": "ghosts", "ghosts_unfused": "ghosts",
                   "ghost_neurons_unfused": "ghost_neurons"}
ALL_VARIANTS = VARIANTS + GHOST_VARIANTS + tuple(BEFORE_VARIANTS)
MODES = ("eager", "compiled")
MODELS = ("resnet18", "resnet50", "vit_tiny_patch16_224", "efficientnet_b0")
# what each variant's time is divided by: masks against dense, the ghost phase against the mask
REFERENCE = {"masked": "dense", "prune": "dense", "parametrize": "dense", "ghosts": "masked",
             **{g: "masked" for g in GHOST_VARIANTS}, "masked_mul": "dense", "ghosts_mul": "masked_mul",
             "ghosts_unfused": "masked", "ghost_neurons_unfused": "masked"}
RESULTS = "bench.jsonl"
ZOO_RESULTS = "zoo.jsonl"
EDGE_RESULTS = "edges.jsonl"


class BenchError(FxSparseError):
    """The benchmark cannot run as asked."""


def _is_ghost_variant(kind: str) -> bool:
    """Whether ``kind`` is a graph of a ghost recipe (the ghost phase, one technique, or their forms before)."""
    kind = BEFORE_VARIANTS.get(kind, kind)
    return kind == "ghosts" or kind in GHOST_VARIANTS


@dataclass
class BenchConfig:
    """What to measure. ``size``: input height = width (``None``: the model's own); ViTs get
    ``img_size=size`` so that their patch grid fits it."""

    models: tuple[str, ...] = MODELS
    variants: tuple[str, ...] = VARIANTS
    modes: tuple[str, ...] = MODES
    batch: int = 8
    size: int | None = 64
    sparsity: float = 0.9
    warmup: int = 2
    rounds: int = 10
    threads: int | None = None
    device: str = "cpu"
    bf16: bool | None = None  # None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA
    memory: bool = True
    transform: bool = True
    num_classes: int = 1000
    out: str | None = None  # a directory: rows appended to bench.jsonl, finished (model, mode) skipped
    progress: bool = True
    recipe: str = "tost"  # the ghost phase's recipe (name or TOML path): its ghost passes and options
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe keys, e.g. {"ghost_channels.ratio": 0.1}

    def __post_init__(self):
        bad = [v for v in self.variants if v not in ALL_VARIANTS]
        if bad:
            raise BenchError(f"variants {bad}: choose from {', '.join(ALL_VARIANTS)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise BenchError(f"modes {bad}: choose from {', '.join(MODES)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BenchError(f"--device {self.device}: CUDA is not available here")
        if self.rounds < 1 or self.warmup < 1:
            raise BenchError("rounds and warmup must be >= 1 (the first step compiles; it is never timed)")
        cuda = self.device.startswith("cuda")
        self.bf16 = cuda if self.bf16 is None else self.bf16
        self.channels_last = cuda if self.channels_last is None else self.channels_last
        self.ghost_recipe()  # a bad recipe or key fails now, not after the first model

    def ghost_recipe(self, kind: str = "ghosts"):
        """The recipe a ghost variant runs: ``recipe`` for ``ghosts``, the technique's ablation
        recipe for one technique; ``overrides`` on both."""
        from ..recipe import load_recipe

        return load_recipe(self.recipe if kind == "ghosts" else kind, self.overrides)

    @property
    def recipe_label(self) -> str:
        return " ".join([self.recipe, *(f"{k}={v}" for k, v in self.overrides.items())])


# --------------------------------------------------------------------------- building
def create_model(name: str, config: BenchConfig) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(seeded model in train mode, inputs, targets) on the config's device."""
    from ..models import create

    kwargs: dict[str, Any] = {"num_classes": config.num_classes}
    if config.size and "vit" in name and not name.startswith("tv:"):
        kwargs["img_size"] = config.size  # timm ViTs: the patch grid follows the input
    torch.manual_seed(0)
    model = create(name, **kwargs).train()
    shape = getattr(model, "fxsparse_input_size", None) or (3, 224, 224)
    if config.size:
        shape = (shape[0], config.size, config.size)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(config.batch, *shape, generator=gen)
    y = torch.randint(0, config.num_classes, (config.batch,), generator=gen)
    return model.to(config.device), x.to(config.device), y.to(config.device)


def random_masks(model: nn.Module, x: torch.Tensor, sparsity: float) -> dict[str, torch.Tensor]:
    """Random ERK masks over every conv/linear weight (fxsparse.masks' own layer selection)."""
    import fxsparse
    import fxsparse.masks

    gm = fxsparse.trace(copy.deepcopy(model), x)  # traced with x: a model's default input may not fit
    return fxsparse.masks.compute(gm, "random", sparsity=sparsity, distribution="erk", seed=0)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def build_variant(kind: str, model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor,
                  recipe: Any = None) -> nn.Module:
    """A copy of ``model`` masked (or not) the ``kind`` way; ``model`` is left untouched. ``recipe``:
    the ghost variants' recipe (default: ``tost``, or the technique's ablation recipe)."""
    import fxsparse
    from ..passes.mask import MaskPass

    if kind in BEFORE_VARIANTS:
        return plain_forms(build_variant(BEFORE_VARIANTS[kind], model, masks, x, recipe), mask=kind.endswith("_mul"))
    model = copy.deepcopy(model)
    if kind == "dense":
        return model
    if kind == "masked":
        gm = fxsparse.trace(model, x)
        MaskPass(masks)(gm)
        return gm
    if kind == "ghosts" or kind in GHOST_VARIANTS:
        # the tost recipe's passes with its options (or one technique's ablation recipe), minus
        # LRsI: it only rescales weights
        torch.manual_seed(0)  # ghost branch initializations
        recipe = recipe if recipe is not None else "tost" if kind == "ghosts" else kind
        return fxsparse.transform(model, recipe, masks=masks, example_inputs=x, skip=("rescale",), copy=False)
    if kind == "prune":
        from torch.nn.utils import prune

        for name, mask in masks.items():
            prune.custom_from_mask(*_owner(model, name), mask=mask)
        return model
    if kind == "parametrize":
        from torch.ao.pruning.sparsifier.utils import FakeSparsity
        from torch.nn.utils import parametrize

        for name, mask in masks.items():
            parametrize.register_parametrization(*_owner(model, name), FakeSparsity(mask.clone()))
        return model
    raise BenchError(f"unknown variant {kind!r}; choose from {', '.join(VARIANTS)}")


def plain_forms(gm: nn.Module, mask: bool = True, blend: bool = True) -> nn.Module:
    """The graph with fxsparse.fused's forms put back to what the graphs ran before issue 13:
    ``apply_mask(w, m)`` -> ``w * m`` (``mask``), ``ghost_relu_blend(act, x, gate)`` -> ``ghost_blend(act,
    soft(x), gate)`` (``blend``; graph sites only: the leaf-style sites keep the fused form)."""
    import operator

    from ..fused import apply_mask, ghost_relu_blend
    from ..passes.ghost_neurons import SOFT, ghost_blend

    for node in list(gm.graph.nodes):
        if mask and node.op == "call_function" and node.target is apply_mask:
            node.target = operator.mul
        if blend and node.op == "call_function" and node.target is ghost_relu_blend:
            act, x, gate = node.args
            with gm.graph.inserting_before(node):
                soft = gm.graph.call_function(SOFT[node.kwargs.get("soft", "swish")], (x,))
            node.target, node.args, node.kwargs = ghost_blend, (act, soft, gate), {}
    gm.recompile()
    return gm


# --------------------------------------------------------------------------- one step
class Runner:
    """One variant's training step: forward + cross-entropy + backward + SGD(momentum) step."""

    def __init__(self, kind: str, module: nn.Module, compiled: bool, x: torch.Tensor, y: torch.Tensor,
                 bf16: bool = False, channels_last: bool = False):
        self.kind, self.y, self.bf16 = kind, y, bf16
        self.x = x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
        if channels_last:
            module.to(memory_format=torch.channels_last)
        self.module = module.train()
        self.opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-5)
        self.fn = torch.compile(module) if compiled else module
        self.warmup_s = 0.0
        self.graph_breaks: int | None = None

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def forward_backward_step(self) -> None:
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.fn(self.x)
        F.cross_entropy(logits.float(), self.y).backward()
        self.opt.step()

    def step(self) -> float:
        """One step; its wall time in seconds (synchronized on CUDA)."""
        sync = torch.cuda.synchronize if self.x.is_cuda else (lambda: None)
        sync()
        t = time.perf_counter()
        self.zero_grad()
        self.forward_backward_step()
        sync()
        return time.perf_counter() - t

    def static_bytes(self) -> int:
        """Parameters, buffers (masks included), optimizer state, and the float copies of the masks
        that eager mode multiplies by (``fxsparse.fused``)."""
        from ..fused import mask_cache_bytes

        seen: set[int] = set()
        total = 0
        tensors = [*self.module.parameters(), *self.module.buffers(),
                   *(v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v))]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total + mask_cache_bytes(self.module)


def step_memory(runner: Runner) -> int:
    """Largest memory allocated during one step above what was live before it (bytes)."""
    runner.zero_grad()  # gradients are allocated inside the measured step, like every other step
    if runner.x.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.forward_backward_step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.forward_backward_step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:  # frees of blocks allocated before the step are not reported: they cannot lower it
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(runners: Sequence[Runner], rounds: int) -> dict[str, list[float]]:
    """Alternating rounds: every runner one step per round, the order reversed every other round."""
    times: dict[str, list[float]] = {r.kind: [] for r in runners}
    for i in range(rounds):
        for r in (runners if i % 2 == 0 else runners[::-1]):
            times[r.kind].append(r.step())
    return times


def _quiet_profiler():
    """Silence kineto's start/stop chatter on stderr (it writes from C++, so at the fd level)."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        sys.stderr.flush()
        saved = os.dup(2)
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)

    return cm()


# --------------------------------------------------------------------------- one model
def bench_model(name: str, mode: str, config: BenchConfig, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Step time (and memory) of every variant of ``config`` for one model in one mode."""
    model, x, y = create_model(name, config)
    masks = random_masks(model, x, config.sparsity)
    # One reset per (model, mode), none between variants: a reset drops every compiled variant's
    # code cache, so each earlier variant would recompile inside the first timed round (on a cold
    # GPU machine, a compile per variant). Each variant is its own module, so its warm-up is still
    # its own compile; the recompile limit is raised so that no variant falls back to eager.
    torch._dynamo.reset()
    dynamo = torch._dynamo.config
    key = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # the older name
    with dynamo.patch(**{key: max(getattr(dynamo, key), 8 * len(config.variants))}):
        runners, failed = _build_runners(name, mode, config, model, masks, x, y, say)
        times = measure(runners, config.rounds)
    memory = {}
    if config.memory:
        with _quiet_profiler():
            for r in runners:
                memory[r.kind] = step_memory(r)
    return _rows(name, mode, runners, times, memory) + failed


def _build_runners(name: str, mode: str, config: BenchConfig, model: nn.Module, masks: dict[str, torch.Tensor],
                   x: torch.Tensor, y: torch.Tensor, say: Callable[[str], None]) -> tuple[list[Runner], list[dict]]:
    """Every variant's runner, warmed up (compiled); a variant that fails is reported, not raised."""
    from torch._dynamo.utils import counters

    runners, failed = [], []
    for kind in config.variants:
        counters.clear()
        try:
            recipe = config.ghost_recipe(BEFORE_VARIANTS.get(kind, kind)) if _is_ghost_variant(kind) else None
            r = Runner(kind, build_variant(kind, model, masks, x, recipe), mode == "compiled", x, y, config.bf16,
                       config.channels_last)
            t = time.perf_counter()
            for _ in range(config.warmup):
                r.step()
        except Exception as e:  # torch's own masking under compile can fail: that is a result too
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            failed.append({"model": name, "mode": mode, "variant": kind, "error": f"{type(e).__name__}: {first}"[:300]})
            say(f"  {name} {mode} {kind}: FAILED {failed[-1]['error']}")
            continue
        r.warmup_s = time.perf_counter() - t
        if mode == "compiled":
            r.graph_breaks = sum(counters["graph_break"].values())
        runners.append(r)
        say(f"  {name} {mode} {kind}: warm-up {r.warmup_s:.1f} s"
            + (f", graph breaks {r.graph_breaks}" if r.graph_breaks is not None else ""))
    return runners, failed


def _rows(name: str, mode: str, runners: Sequence[Runner], times: dict[str, list[float]],
          memory: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for r in runners:
        ts = times[r.kind]
        ref = REFERENCE.get(r.kind)
        row = {"model": name, "mode": mode, "variant": r.kind, "median_ms": 1e3 * statistics.median(ts),
               "min_ms": 1e3 * min(ts), "rounds": len(ts), "times_ms": [round(1e3 * t, 3) for t in ts], "warmup_s": r.warmup_s, "graph_breaks": r.graph_breaks,
               "reference": ref if ref in times else None,
               "ratio": statistics.median(t / d for t, d in zip(ts, times[ref])) if ref in times else None,
               "static_mb": r.static_bytes() / 2**20}
        if r.kind in memory:
            row["step_peak_mb"] = memory[r.kind] / 2**20
            row["peak_mb"] = row["static_mb"] + row["step_peak_mb"]
        rows.append(row)
    for row in rows:  # memory ratios against the same reference
        ref = next((q for q in rows if q["variant"] == row["reference"]), None)
        if ref is not None and "peak_mb" in row and "peak_mb" in ref:
            row["memory_ratio"] = row["peak_mb"] / ref["peak_mb"]
    return rows


def paired_ratio(rows: Sequence[dict[str, Any]], model: str, mode: str, variant: str, reference: str) -> float | None:
    """Median over rounds of ``variant``'s step / ``reference``'s step in the same round (any two
    variants of one (model, mode) block: e.g. a change against its ``*_mul`` before-form)."""
    idx = {(r["model"], r["mode"], r["variant"]): r for r in rows if "times_ms" in r}
    a, b = idx.get((model, mode, variant)), idx.get((model, mode, reference))
    if a is None or b is None:
        return None
    return statistics.median(x / y for x, y in zip(a["times_ms"], b["times_ms"]))


def compiled_over_eager(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(model, variant) -> compiled median / eager median (different rounds: indicative only)."""
    idx = {(r["model"], r["mode"], r["variant"]): r for r in rows if "error" not in r}
    return {(m, v): idx[(m, "compiled", v)]["median_ms"] / idx[(m, "eager", v)]["median_ms"]
            for (m, mode, v) in idx if mode == "compiled" and (m, "eager", v) in idx}


# --------------------------------------------------------------------------- transform time
def transform_times(model: nn.Module, x: torch.Tensor, sparsity: float = 0.9, recipe: Any = "tost") -> dict[str, float]:
    """Seconds of each stage of the tost pipeline (LRsI left out: it trains) on a copy of ``model``:
    trace, mask scoring, MaskPass, each ghost pass, and removing every ghost again."""
    import fxsparse
    from ..passes import GHOST_GROUPS, PASS_ORDER, load
    from ..passes.mask import MaskPass
    from ..recipe import load_recipe

    recipe = load_recipe(recipe)
    model = copy.deepcopy(model)
    out: dict[str, float] = {}
    t = time.perf_counter()
    gm = fxsparse.trace(model, x)
    out["trace"] = time.perf_counter() - t
    t = time.perf_counter()
    masks = fxsparse.masks.compute(gm, "random", sparsity=sparsity, distribution="erk", seed=0)
    out["mask_scores"] = time.perf_counter() - t
    t = time.perf_counter()
    MaskPass(masks)(gm)
    out["mask_pass"] = time.perf_counter() - t
    torch.manual_seed(0)
    for group in PASS_ORDER:
        spec = recipe.passes.get(group)
        if group not in GHOST_GROUPS or spec is None or not spec.enabled:
            continue
        t = time.perf_counter()
        load(GHOST_GROUPS[group][0])(**spec.options)(gm)
        out[group] = time.perf_counter() - t
    t = time.perf_counter()
    fxsparse.remove_ghosts(gm)
    out["remove_ghosts"] = time.perf_counter() - t
    out["total"] = sum(out.values())
    out["nodes"] = len(gm.graph.nodes)
    return out


def edge_costs(name: str, config: BenchConfig, lrsi_iters: int = 3,
               say: Callable[[str], None] = print) -> dict[str, Any]:
    """What the edges of a tost run cost, next to a training step (seconds; issue 13, item 3).

    * ``transform_s``: ``fxsparse.transform(model, "tost", skip=("rescale",))`` (trace, mask scores,
      MaskPass, every ghost pass) on the config's input; ``transform`` its stages (``transform_times``).
      ``*_cpu_s``: the same in process CPU time (what the wall time would be on an idle core).
    * ``lrsi_iter_s``: one LRsI iteration (``RescaleInitPass``): the difference between runs of
      ``lrsi_iters + 1`` and 1 iterations, divided by ``lrsi_iters`` (the setup cancels), against
      ``masked_step_s``, the masked network's eager training step at the same batch.
    * per mode: ``ghost_step_s`` (a ghost-phase step, warm), ``removal_s`` (``remove_ghosts``:
      every removal pass and the graph's recompile), ``first_step_after_s`` (the next step: under
      torch.compile it recompiles the smaller graph) and ``step_after_s`` (the step after that).
    """
    import fxsparse
    from ..passes.rescale_init import RescaleInitPass

    model, x, y = create_model(name, config)
    masks = random_masks(model, x, config.sparsity)
    out: dict[str, Any] = {"model": name, "batch": config.batch, "size": config.size, "device": config.device}
    torch.manual_seed(0)
    cpu = copy.deepcopy(model).cpu()
    t, c = time.perf_counter(), time.process_time()
    fxsparse.transform(cpu, config.ghost_recipe(), example_inputs=x[:2].cpu(), skip=("rescale",), copy=False)
    # process CPU time too: on a loaded machine the wall time is mostly waiting for a core
    out["transform_s"], out["transform_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    out["transform"] = transform_times(model.cpu(), x[:2].cpu(), config.sparsity, config.ghost_recipe())
    model = model.to(config.device)

    masked = build_variant("masked", model, masks, x)
    runner = Runner("masked", masked, False, x, y, config.bf16, config.channels_last)
    for _ in range(config.warmup):
        runner.step()
    out["masked_step_s"] = statistics.median(runner.step() for _ in range(3))
    c = time.process_time()
    runner.step()
    out["masked_step_cpu_s"] = time.process_time() - c
    lrsi, lrsi_cpu = {}, {}
    for iters in (1, lrsi_iters + 1):
        gm = build_variant("masked", model, masks, x)
        t, c = time.perf_counter(), time.process_time()
        RescaleInitPass([(x, y)], iters=iters)(gm)
        _sync(x)
        lrsi[iters], lrsi_cpu[iters] = time.perf_counter() - t, time.process_time() - c
    out["lrsi_iter_s"] = (lrsi[lrsi_iters + 1] - lrsi[1]) / lrsi_iters
    out["lrsi_iter_cpu_s"] = (lrsi_cpu[lrsi_iters + 1] - lrsi_cpu[1]) / lrsi_iters
    say(f"  {name}: transform {out['transform_s']:.2f} s, LRsI iteration {out['lrsi_iter_s']:.3f} s, "
        f"masked step {out['masked_step_s']:.3f} s")
    for mode in config.modes:
        torch._dynamo.reset()
        gm = build_variant("ghosts", model, masks, x, config.ghost_recipe())
        r = Runner("ghosts", gm, mode == "compiled", x, y, config.bf16, config.channels_last)
        for _ in range(config.warmup):
            r.step()
        row = {"ghost_step_s": statistics.median(r.step() for _ in range(3))}
        t, c = time.perf_counter(), time.process_time()
        fxsparse.remove_ghosts(gm)
        row["removal_s"], row["removal_cpu_s"] = time.perf_counter() - t, time.process_time() - c
        row["first_step_after_s"] = r.step()
        row["step_after_s"] = statistics.median(r.step() for _ in range(3))
        out[mode] = row
        say(f"  {name} {mode}: removal {row['removal_s']:.3f} s, first step after {row['first_step_after_s']:.2f} s "
            f"(then {row['step_after_s']:.3f} s; ghost step {row['ghost_step_s']:.3f} s)")
    return out


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def edges_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (model, mode): transform, LRsI iteration vs step, removal and the step after it."""
    cpu = lambda r, k: f" ({r[k]:.3f} CPU)" if k in r else ""  # noqa: E731
    lines = ["| model | mode | transform s (no LRsI) | LRsI iteration s | masked step s (eager) | ghost step s "
             "| removal s | first step after removal s | step after s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for mode in MODES:
            if mode in r:
                m = r[mode]
                lines.append(f"| {r['model']} | {mode} | {r['transform_s']:.3f}{cpu(r, 'transform_cpu_s')} | "
                             f"{r['lrsi_iter_s']:.3f}{cpu(r, 'lrsi_iter_cpu_s')} | "
                             f"{r['masked_step_s']:.3f}{cpu(r, 'masked_step_cpu_s')} | {m['ghost_step_s']:.3f} | "
                             f"{m['removal_s']:.3f}{cpu(m, 'removal_cpu_s')} | "
                             f"{m['first_step_after_s']:.2f} | {m['step_after_s']:.3f} |")
    return "\n".join(lines)


def zoo_times(models: Iterable[tuple[str, tuple[int, int, int]]], sparsity: float = 0.9,
              say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``transform_times`` over a list of (MODEL, input C,H,W), each model built on CPU with random
    weights (building is not timed). A model that fails is reported with its error, not raised."""
    from ..models import create

    rows = []
    for spec, shape in models:
        row: dict[str, Any] = {"model": spec, "input": list(shape)}
        try:
            torch.manual_seed(0)
            model = create(spec).train()
            x = torch.randn(2, *shape)
            row.update(transform_times(model, x, sparsity))
            say(f"  {spec}: {row['total']:.2f} s ({row['nodes']} nodes)")
        except Exception as e:  # a zoo sweep reports every model
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            say(f"  {spec}: FAILED {row['error']}")
        rows.append(row)
    return rows


def zoo_models(limit: int | None = None, source: str = "zoo") -> list[tuple[str, tuple[int, int, int]]]:
    """The fixed test zoo (``tests/zoo_models.py`` of a source checkout) or the first ``limit``
    timm models (``source="timm"``, 64x64 inputs, 224 for transformers that need it)."""
    if source == "timm":
        import timm

        names = timm.list_models()[:limit] if limit else timm.list_models()
        return [(n, (3, 224, 224) if any(k in n for k in ("vit", "deit", "swin", "beit", "levit")) else (3, 64, 64))
                for n in names]
    path = Path(__file__).resolve().parent.parent / "tests" / "zoo_models.py"
    if not path.exists():
        raise BenchError(f"the test zoo ({path}) comes with a source checkout; use --zoo-source timm --limit N")
    scope: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), scope)  # a plain data module: the ZOO list
    zoo = list(scope["ZOO"])
    return zoo[:limit] if limit else zoo


# --------------------------------------------------------------------------- the study
def machine(config: BenchConfig | None = None) -> dict[str, Any]:
    """Where and with what the numbers were taken (load average included: it moves them)."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": _cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(v, 2) for v in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    if config is not None and config.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(config.device)
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def append_rows(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the JSON-lines file ``path`` as they finish (``read_rows`` reads them back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut short by a kill
    return rows


def run_bench(config: BenchConfig, say: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every (model, mode) of ``config``; with ``config.out``, rows are appended to
    ``out/bench.jsonl`` as each (model, mode) finishes and those already there are skipped."""
    say = say or (lambda s: print(s, file=sys.stderr, flush=True)) if config.progress else (lambda s: None)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as the Trainer on CUDA: autotuned convolutions (warm-up picks them)
    logging.getLogger("fxsparse").setLevel(logging.WARNING)
    out = Path(config.out) if config.out else None
    rows = read_rows(out / RESULTS) if out else []
    done = {(r["model"], r["mode"]) for r in rows}
    info = machine(config)
    for name in config.models:
        for mode in config.modes:
            if (name, mode) in done:
                continue
            say(f"{name} {mode} (load average {os.getloadavg()[0]:.1f})")
            new = bench_model(name, mode, config, say)
            extra = {"batch": config.batch, "size": config.size, "sparsity": config.sparsity, "device": config.device,
                     "bf16": config.bf16, "channels_last": config.channels_last, "recipe": config.recipe_label,
                     "machine": info,
                     "load_average_after": round(os.getloadavg()[0], 2)}
            new = [{**r, **extra} for r in new]
            if config.transform and mode == config.modes[0]:
                model, x, _ = create_model(name, config)
                times = transform_times(model.cpu(), x[:2].cpu(), config.sparsity, config.ghost_recipe())
                for r in new:
                    r["transform_s"] = times
            rows += new
            if out:
                append_rows(out / RESULTS, new)
    return rows


# --------------------------------------------------------------------------- tables
def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Step time, ratios and peak memory per (model, mode, variant), then transform times."""
    lines = ["| model | mode | variant | step ms (median) | ratio (median of rounds) | vs | peak MB (static + step) "
             "| memory ratio | warm-up s | graph breaks |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['variant']} | failed: {r['error']} |" + " |" * 6)
            continue
        peak = f"{r['peak_mb']:.0f} ({r['static_mb']:.0f} + {r['step_peak_mb']:.0f})" if "peak_mb" in r else "–"
        lines.append(f"| {r['model']} | {r['mode']} | {r['variant']} | {r['median_ms']:.1f} | {_fmt(r['ratio'])} | "
                     f"{r['reference'] or ''} | {peak} | {_fmt(r.get('memory_ratio'))} | {r['warmup_s']:.1f} | "
                     f"{'' if r['graph_breaks'] is None else r['graph_breaks']} |")
    before = [(r["model"], r["mode"], BEFORE_VARIANTS[r["variant"]], r["variant"]) for r in rows
              if r.get("variant") in BEFORE_VARIANTS and "times_ms" in r]
    pairs = [(m, mode, a, b, paired_ratio(rows, m, mode, a, b)) for m, mode, a, b in before]
    if any(p[-1] is not None for p in pairs):
        lines += ["", "Each change against its form before issue 13 (median of same-round step ratios):", "",
                  "| model | mode | after / before | ratio |", "|---|---|---|---:|"]
        lines += [f"| {m} | {mode} | {a} / {b} | {v:.3f} |" for m, mode, a, b, v in pairs if v is not None]
    ce = compiled_over_eager(rows)
    if ce:
        lines += ["", "Compiled / eager median step time (measured in different rounds: indicative):", "",
                  "| model | " + " | ".join(VARIANTS) + " |", "|---|" + "---:|" * len(VARIANTS)]
        for m in dict.fromkeys(r["model"] for r in rows):
            lines.append(f"| {m} | " + " | ".join(_fmt(ce.get((m, v)), ".2f") for v in VARIANTS) + " |")
    tt = {r["model"]: r["transform_s"] for r in rows if "transform_s" in r}
    if tt:
        lines += ["", zoo_markdown([{"model": m, **t} for m, t in tt.items()], totals=False)]
    return "\n".join(lines)


def zoo_markdown(rows: Sequence[dict[str, Any]], totals: bool = True) -> str:
    """Transform time per model (seconds per stage)."""
    stages = ["trace", "mask_scores", "mask_pass", "ghost_neurons", "ghost_skips", "ghost_channels", "remove_ghosts",
              "total"]
    lines = ["| model | " + " | ".join(stages) + " | nodes |", "|---|" + "---:|" * (len(stages) + 1)]
    ok = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} |" + " |" * len(stages))
            continue
        lines.append(f"| {r['model']} | " + " | ".join(_fmt(r.get(s), ".3f") for s in stages)
                     + f" | {r.get('nodes', '')} |")
    if totals and ok:
        lines.append(f"| **all {len(ok)} models** | " + " | ".join(f"{sum(r.get(s, 0.0) for r in ok):.2f}" for s in stages)
                     + f" | {sum(r.get('nodes', 0) for r in ok)} |")
        med = statistics.median(r["total"] for r in ok)
        lines.append(f"\n{len(ok)} of {len(rows)} models; median pipeline time per model {med:.3f} s, "
                     f"slowest {max(ok, key=lambda r: r['total'])['model']} ({max(r['total'] for r in ok):.2f} s).")
    return "\n".join(lines)


def bars(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's bars, one line each, per model: masked/dense <= 1.10 compiled; ghosts/masked <= 1.25;
    masked and ghosts faster than prune and parametrize (same mode)."""
    idx = {(r["model"], r["mode"], r["variant"]): r for r in rows if "error" not in r}
    failed = {(r["model"], r["mode"], r["variant"]): r["error"] for r in rows if "error" in r}
    out = []
    for m in dict.fromkeys(r["model"] for r in rows):
        for mode in MODES:
            get = lambda v: idx.get((m, mode, v))  # noqa: E731
            if get("masked") is None:
                continue
            checks = []
            if mode == "compiled" and get("masked")["ratio"] is not None:
                checks.append(f"masked/dense {get('masked')['ratio']:.3f} "
                              f"{'<=' if get('masked')['ratio'] <= 1.10 else '>'} 1.10")
            if get("ghosts") is not None and get("ghosts")["ratio"] is not None:
                checks.append(f"ghosts/masked {get('ghosts')['ratio']:.3f} "
                              f"{'<=' if get('ghosts')['ratio'] <= 1.25 else '>'} 1.25")
            for other in ("prune", "parametrize"):
                o = get(other)
                if (m, mode, other) in failed:
                    checks.append(f"{other} FAILED ({failed[(m, mode, other)]})")
                    continue
                if o is None or o["ratio"] is None or get("masked")["ratio"] is None:
                    continue
                checks.append(f"masked {'faster' if get('masked')['ratio'] < o['ratio'] else 'NOT faster'} than "
                              f"{other} ({get('masked')['ratio']:.3f} vs {o['ratio']:.3f} of dense)")
            out.append(f"{m} {mode}: " + "; ".join(checks))
    return out
