"""The tost pipeline on one model (``fxsparse zoo --pipeline``): every stage a user of the recipe runs,
each recorded with its time and, if it fails, its error."""
from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable

from .result import DEFAULT_MAX_PARAMS, ModelResult, budget_for, first_line
from .trace_check import check_model


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
    mask_cache: str = "float"  # fxsparse.fused's eager mask copies ("off": 4 bytes per masked weight less)

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
    max_params = budget_for(max_params, result.source)
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
        from fxsparse.fused import using_mask_cache

        with using_mask_cache(options.mask_cache):
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
            error = f"{type(e).__name__}: {first_line(e)}"
            self.r.pipeline_failures[name] = error
            if self.r.pipeline_stage is None:
                self.r.pipeline, self.r.pipeline_stage, self.r.pipeline_error = "error", name, error
                cause = _innermost(e)
                if cause is not e:
                    self.r.pipeline_cause = f"{type(cause).__name__}: {first_line(cause)}"
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
                errors.append(f"{'x'.join(map(str, size[1:]))}: {type(e).__name__}: {first_line(e)}")
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
        import fxsparse

        self.gm = fxsparse.trace(self.model, self.x)
        # the reference of the identity check: the same trace, to be given the final weights and
        # the masks (a copy, not a second trace: tracing is a large share of a small model's time).
        # Its weights are on the meta device until then: a large model's copy would cost gigabytes
        # through every stage in between (ViT-H/14: 2.5 GB)
        self.plain = _weightless_copy(self.gm)

    def _masks(self, method: str) -> None:
        import fxsparse.masks

        opts = {"rounds": self.o.synflow_rounds} if method == "synflow" else {}
        # the default loss, as a user calls it: cross-entropy of the output's logits
        masks = fxsparse.masks.compute(self.gm, method=method, sparsity=self.o.sparsity, data=self.data,
                                       seed=self.o.seed, **opts)
        if not masks:
            raise PipelineCheckFailed("no mask computed")
        # a weight two layers share (tied) has one mask under each name: counted once
        report = fxsparse.masks.MaskReport.from_masks(masks, tied=fxsparse.masks.tied_weights(self.gm, masks))
        total, kept = report.total, report.kept
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
        self.opt.zero_grad(set_to_none=True)  # the next stage's checks take their own gradients
        if gates.get(self.sgm) and any(v != value for v in gates.get(self.sgm).values()):
            raise PipelineCheckFailed(f"the gates moved during the steps: {gates.get(self.sgm)}")

    def _identity(self) -> None:
        """Gates at identity: outputs and gradients equal the mask-only graph's (same weights)."""
        import fxsparse
        from fxsparse.passes.mask import MaskPass, masked_parameters

        fxsparse.gates.set_identity(self.sgm)
        self.ref, self.plain = self.plain, None
        _load_weights(self.ref, self.sgm)  # the weights LRsI and the steps left
        MaskPass({k: v.clone() for k, v in masked_parameters(self.sgm).items()})(self.ref)
        self.r.identity = self._compare(self.ref, self.sgm, grads=True, what="at identity gates, the tost graph vs the mask-only graph")

    def _removal(self) -> None:
        import fxsparse
        from fxsparse.ghosts import present

        for _ in range(self.sched.total_steps):  # the scheduler removes each ghost at its remove_at
            if not present(self.sgm):
                break
            # a flat loss: a schedule that waits for the loss to fall (start = "learning") starts at
            # its deadline, the latest step that still removes its ghost by the last one
            self.sched.step(1.0)
            # as at the end of a long anneal: every removal happens at identity gates (a removal
            # that folds its branch, GhostSkipPass(fold=True), then folds nothing)
            fxsparse.gates.set_identity(self.sgm)
        left = present(self.sgm)
        if left or fxsparse.gates.get(self.sgm):
            raise PipelineCheckFailed(f"after the scheduler's last step, still present: {left or fxsparse.gates.get(self.sgm)}")
        fxsparse.remove_ghosts(self.sgm)  # a no-op now; it must stay one
        # training is over: the optimizer's momentum is a copy of the weights that export and the
        # fresh model would otherwise sit beside (RegNetY-128GF: 2.6 GB, killed for memory in export)
        self.opt.state.clear()  # now, not when a garbage collection finds the scheduler's cycles
        self.sched = self.opt = None
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


def _weightless_copy(gm: Any) -> Any:
    """A deep copy of ``gm`` whose parameters and buffers are on the meta device (tied ones stay tied)."""
    torch = _torch()
    memo: dict[int, Any] = {}
    for t in itertools.chain(gm.parameters(), gm.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(gm, memo)


def _load_weights(ref: Any, sgm: Any) -> None:
    """Give ``ref`` (a weightless copy of the trace) copies of ``sgm``'s weights and buffers.

    The state dict must match key for key, as ``load_state_dict(strict=True)`` checks (the
    transform's own masks aside); buffers outside it (``persistent=False``) are copied by name.
    A tensor shared by several names is copied once, so ties survive.
    """
    from fxsparse.pass_infra import CONTAINER

    torch = _torch()
    copies: dict[int, Any] = {}

    def copy_of(t):
        if id(t) not in copies:
            c = t.detach().clone()
            copies[id(t)] = torch.nn.Parameter(c, t.requires_grad) if isinstance(t, torch.nn.Parameter) else c
        return copies[id(t)]

    state = {k: copy_of(v) for k, v in sgm.state_dict(keep_vars=True).items() if not k.startswith(CONTAINER + ".")}
    ref.load_state_dict(state, strict=True, assign=True)
    for name, buffer in list(ref.named_buffers(remove_duplicate=False)):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            ref.get_submodule(owner)._buffers[attr] = copy_of(sgm.get_buffer(name))
    left = [n for n, t in itertools.chain(ref.named_parameters(), ref.named_buffers()) if t.is_meta]
    if left:
        raise PipelineCheckFailed(f"the reference graph has no weights for {', '.join(left[:5])}")


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


