"""Tracing any timm / torchvision / user model into a ``torch.fx.GraphModule``.

What ``fxsparse.trace`` adds to ``torch.fx.symbolic_trace``:

* timm's own leaf-module and autowrap lists (``timm.layers._fx``), plus the user's;
* ``forward``'s keyword defaults pinned as ``concrete_args`` (a ``mask=None`` keyword must not
  become a graph input: hiera silently dropped its head that way);
* the full module hierarchy kept, unused modules included, so ``state_dict`` keys are unchanged;
* functional dropout reads ``module.training`` at run time instead of the value frozen at trace
  time, and any remaining train/eval difference is detected and guarded (see ``ModeGuard``);
* every node's ``meta["tensor_meta"]`` filled by shape propagation on fake/meta tensors: no real
  compute, so tracing a very large model costs almost nothing;
* readable errors that name the module and the source line that broke tracing.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import io
import linecache
import logging
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .dropout import DROPOUT_FUNCTIONS
from .errors import ExampleInputError, TraceError

log = logging.getLogger(__name__)

__all__ = ["trace", "FxSparseTracer", "propagate_shapes", "complete_shapes", "default_leaf_modules", "TraceInfo"]

META_KEY = "fxsparse"  # key of gm.meta and node.meta entries written by fxsparse


# --------------------------------------------------------------------------- leaf lists
def _timm_fx_lists() -> tuple[list[type], list[Callable]]:
    try:
        from timm.layers import _fx as timm_fx
    except Exception:  # timm missing or too old: no timm leaves
        return [], []
    leaves = list(timm_fx.get_notrace_modules())
    # DropPath / DropBlock hold no weights and branch on self.training: as leaves they follow the
    # runtime train/eval flag instead of freezing the trace-time one.
    try:
        from timm.layers import DropBlock2d, DropPath

        leaves += [DropPath, DropBlock2d]
    except Exception:
        pass
    fns = [f for f in timm_fx.get_notrace_functions() if callable(f)]
    return leaves, fns


def _torchvision_fx_lists() -> tuple[list[type], list[Callable]]:
    try:
        from torchvision.ops.stochastic_depth import StochasticDepth
    except Exception:
        return [], []
    # StochasticDepth branches on self.training like timm's DropPath.
    return [StochasticDepth], []


def default_leaf_modules() -> list[type]:
    """The module types fxsparse keeps as leaves by default (timm's list + mode-dependent ones)."""
    return _timm_fx_lists()[0] + _torchvision_fx_lists()[0]


def default_autowrap_functions() -> list[Callable]:
    return _timm_fx_lists()[1] + _torchvision_fx_lists()[1]


# --------------------------------------------------------------------------- tracer
class FxSparseTracer(torch.fx.Tracer):
    """A ``torch.fx.Tracer`` with extra leaves given as types, instances or qualified names."""

    def __init__(
        self,
        leaf_modules: Iterable[type | nn.Module | str] = (),
        autowrap_functions: Iterable[Callable] = (),
    ):
        fns = tuple(dict.fromkeys(autowrap_functions))
        super().__init__(autowrap_functions=fns, param_shapes_constant=False)
        self.leaf_types: tuple[type, ...] = ()
        self.leaf_ids: set[int] = set()
        self.leaf_names: set[str] = set()
        types = []
        for leaf in leaf_modules:
            if isinstance(leaf, type):
                types.append(leaf)
            elif isinstance(leaf, nn.Module):
                self.leaf_ids.add(id(leaf))
            elif isinstance(leaf, str):
                self.leaf_names.add(leaf)
            else:
                raise TypeError(
                    f"leaf_modules entries must be module types, module instances or qualified "
                    f"names; got {leaf!r} ({type(leaf).__name__})"
                )
        self.leaf_types = tuple(dict.fromkeys(types))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self.leaf_types or id(m) in self.leaf_ids:
            return True
        if module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    # torch.fx finds the name of a parameter or buffer by scanning all of root's named_parameters()
    # / named_buffers() on every access: quadratic in model size, a tenth of a trace on timm
    # models. The overrides below look names up in a dict built once per trace; a miss (a
    # tensor registered during forward) falls back to torch.fx's scan.
    def trace(self, root, concrete_args=None):
        self._tensor_names: dict[str, dict[int, str]] | None = None
        return super().trace(root, concrete_args)

    def _tensor_name(self, t: torch.Tensor, kind: str) -> str | None:
        """root's qualified name of parameter (kind="parameters") or buffer ("buffers") ``t``."""
        if not isinstance(self.root, nn.Module):
            return None
        if self._tensor_names is None:
            self._tensor_names = {
                "parameters": {id(p): n for n, p in self.root.named_parameters()},
                "buffers": {id(b): n for n, b in self.root.named_buffers()},
            }
        name = self._tensor_names[kind].get(id(t))
        if name is None:
            return None
        owner, _, attr = name.rpartition(".")
        try:  # still registered there? (the dict may be stale if forward re-registers tensors)
            current = getattr(self.root.get_submodule(owner), "_" + kind)[attr]
        except (AttributeError, KeyError):
            return None
        return name if current is t else None

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if isinstance(attr_val, nn.Parameter):
            name = self._tensor_name(attr_val, "parameters")
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            name = self._tensor_name(a, "parameters" if isinstance(a, nn.Parameter) else "buffers")
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


@dataclass
class TraceInfo:
    """What ``trace`` recorded about a trace; stored in ``gm.meta["fxsparse"]``."""

    model_class: str
    traced_training: bool
    mode_dependent: bool = False
    mode_diff: list[str] = field(default_factory=list)
    leaf_types: list[str] = field(default_factory=list)
    concrete_args: dict[str, Any] = field(default_factory=dict)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    # keys of the model's state_dict that the GraphModule's lacks because they name a tensor it
    # holds under another key (a module shared under two names, e.g. CoaT's shared conv position
    # encodings and MLPs): {alias: key in the GraphModule}; export() writes both
    state_aliases: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- public entry
def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[type | nn.Module | str] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
    propagate: bool = True,
) -> torch.fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` that shares its parameters.

    Args:
        model: any ``nn.Module``; timm's and torchvision's leaf lists are applied automatically.
        example_inputs: a tensor or tuple of tensors used for shape propagation (run on fake or
            meta tensors, never real compute). ``None`` picks a default from the model's config
            (timm's ``pretrained_cfg["input_size"]``, else 2x3x224x224).
        leaf_modules: extra module types, instances or qualified names not to trace through.
        autowrap_functions: extra functions to record as single call_function nodes.
        concrete_args: values pinned at trace time; ``forward``'s keyword defaults not covered by
            ``example_inputs`` are pinned automatically.
        propagate: fill ``node.meta["tensor_meta"]`` with shapes and dtypes.

    The graph is traced in the model's current mode. Functional dropout is rewritten to read the
    module's ``training`` flag at run time; if the train and eval traces still differ, the
    returned module refuses to run in the other mode and says how to fix it.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(
            f"fxsparse.trace expects a torch.nn.Module; got {type(model).__module__}."
            f"{type(model).__qualname__}. Build the model first (e.g. timm.create_model(name) or "
            f"torchvision.models.get_model(name)) and pass the module itself."
        )
    if isinstance(model, torch.fx.GraphModule) and META_KEY in model.meta:
        raise TraceError(
            "this module is already an fxsparse GraphModule; pass it to passes directly instead of "
            "tracing it again (tracing would freeze its gates and masks as constants)."
        )
    inputs = _as_tuple(example_inputs) if example_inputs is not None else default_example_inputs(model)
    leaves = default_leaf_modules() + list(leaf_modules)
    fns = default_autowrap_functions() + list(autowrap_functions)
    pinned = _default_concrete_args(model, len(inputs))
    pinned.update(concrete_args or {})

    gm = _trace_once(model, leaves, fns, pinned)
    _rewrite_functional_dropout(gm)
    info = TraceInfo(
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        traced_training=model.training,
        leaf_types=sorted({t.__name__ for t in leaves if isinstance(t, type)}),
        concrete_args={k: v for k, v in pinned.items() if _is_simple(v)},
        input_shapes=[tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
    )
    info.state_aliases = _state_aliases(model, gm)
    info.mode_diff = _mode_difference(model, gm, leaves, fns, pinned)
    info.mode_dependent = bool(info.mode_diff)
    gm.meta[META_KEY] = info
    if info.mode_dependent:
        log.warning(
            "%s: the graph traced in %s mode differs from the other mode at %s; the GraphModule "
            "will refuse to run in the other mode.",
            info.model_class, "train" if model.training else "eval", ", ".join(info.mode_diff[:5]),
        )
        ModeGuard.install(gm)
    if propagate:
        propagate_shapes(gm, inputs)
    return gm


# --------------------------------------------------------------------------- internals
def _state_aliases(model: nn.Module, gm: torch.fx.GraphModule) -> dict[str, str]:
    """{key of ``model``'s state_dict missing from ``gm``'s: the key ``gm`` holds the same tensor under}.

    A module registered under two names appears twice in ``model.state_dict()``; the traced graph
    reaches it under one name only, so ``gm.state_dict()`` has one key for it.
    """
    held = {id(v): k for k, v in gm.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    ours = set(held.values())
    return {k: held[id(v)] for k, v in model.state_dict(keep_vars=True).items()
            if k not in ours and isinstance(v, torch.Tensor) and id(v) in held}


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _is_simple(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def default_example_inputs(model: nn.Module, batch_size: int = 2) -> tuple[torch.Tensor, ...]:
    """An input batch the model accepts: timm's configured input size, else 3x224x224."""
    size = None
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        size = tuple(cfg["input_size"])
    size = size or tuple(getattr(model, "fxsparse_input_size", (3, 224, 224)))
    device, dtype = _device_dtype(model)
    return (torch.randn(batch_size, *size, device=device, dtype=dtype),)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    return torch.device("cpu"), torch.float32


def _default_concrete_args(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Pin forward's defaulted parameters that the example inputs do not cover."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    pinned = {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for p in positional[n_inputs:] + [p for p in params if p.kind == p.KEYWORD_ONLY]:
        if p.default is not inspect.Parameter.empty:
            pinned[p.name] = p.default
    return pinned


def _trace_once(model, leaves, fns, concrete_args, *, lazy: bool = False) -> torch.fx.GraphModule:
    """One trace in the model's current mode; ``lazy``: a graph only to look at, never run, so
    its Python code is not generated (a tenth of a trace)."""
    tracer = FxSparseTracer(leaves, fns)
    before = set(model.__dict__)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args or None)
        name = type(model).__name__
        gm = (_lazy_graph_module_class() if lazy else torch.fx.GraphModule)(tracer.root, graph, name)
    except Exception as e:  # torch.fx raises many types; all become one readable TraceError
        raise TraceError(_explain_trace_failure(model, tracer, e), cause=e) from None
    finally:
        # torch.fx stores tensor constants on the traced model itself: take them back off
        for attr in set(model.__dict__) - before:
            if attr.startswith("_tensor_constant"):
                delattr(model, attr)
    _unpersist_constants(gm)
    _restore_unused_modules(gm, model)
    return gm


def _lazy_graph_module_class() -> type[torch.fx.GraphModule]:
    """A GraphModule that generates its code on first use (torch's own, private; else the plain one)."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:
        return torch.fx.GraphModule
    return _LazyGraphModule


def _unpersist_constants(gm: torch.fx.GraphModule) -> None:
    """Tensor constants become buffers of the GraphModule; keep them out of its state_dict."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.rpartition(".")[2].startswith("_tensor_constant"):
            path, _, attr = node.target.rpartition(".")
            owner = gm.get_submodule(path) if path else gm
            if attr in owner._buffers:
                owner._non_persistent_buffers_set.add(attr)


def _explain_trace_failure(model: nn.Module, tracer: FxSparseTracer, e: Exception) -> str:
    stack = list(getattr(tracer, "module_stack", {}).items())
    path, mtype = (stack[-1][0], stack[-1][1]) if stack else ("", type(model))
    if isinstance(mtype, tuple):  # newer torch stores (qualname, type)
        mtype = mtype[-1]
    type_name = mtype.__qualname__ if isinstance(mtype, type) else str(mtype)
    type_full = f"{mtype.__module__}.{type_name}" if isinstance(mtype, type) else type_name
    where = _user_frame(e)
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = (
        f"Declare it a leaf so torch.fx records it as one call: "
        f"fxsparse.trace(model, leaf_modules=[{type_full}])"
    )
    if path:
        hint += f" or leaf_modules=['{path}']"
    hint += f" (command line: --leaf {type_full})."
    if not path:
        hint = (
            "The failing code is in the model's own forward, which cannot be a leaf: remove the "
            "data-dependent control flow there, or wrap it in a function passed as "
            "autowrap_functions=[...]."
        )
    module_desc = f"module '{path}' ({type_name})" if path else f"the top-level forward of {type_name}"
    return (
        f"torch.fx could not trace {module_desc}: {type(e).__name__}: {first_line}"
        + (f" -- at {where}" if where else "")
        + f". {hint}"
    )


def _user_frame(e: BaseException) -> str:
    """file:line: code of the innermost frame outside torch.fx (the line that broke tracing)."""
    fx_dir = os.path.dirname(torch.fx.__file__)
    torch_dir = os.path.dirname(torch.__file__)
    best = None
    for fs in traceback.extract_tb(e.__traceback__):
        if fs.filename.startswith(fx_dir) or fs.filename.startswith(torch_dir + os.sep + "_"):
            continue
        if fs.filename == __file__:
            continue
        best = fs
    if best is None:
        return ""
    code = (best.line or linecache.getline(best.filename, best.lineno)).strip()
    return f"{best.filename}:{best.lineno}: `{code}`"


def _restore_unused_modules(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """GraphModule copies only what the graph touches; put the rest back so state_dict keys match."""
    for name, mod in model.named_modules():
        if not name:
            target = gm
        else:
            parent_name, _, leaf = name.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            target = parent._modules.get(leaf)
            if target is None:
                parent.add_module(leaf, mod)
                continue
        if target is mod:
            continue
        for pname, p in mod._parameters.items():
            if pname not in target._parameters and p is not None:
                target.register_parameter(pname, p)
        for bname, b in mod._buffers.items():
            if bname not in target._buffers and b is not None:
                persistent = bname not in mod._non_persistent_buffers_set
                target.register_buffer(bname, b, persistent=persistent)


# Functional dropout variants and the position of their `training` argument (the third for each).
_DROPOUT_FNS: dict[Callable, int] = dict.fromkeys(DROPOUT_FUNCTIONS, 2)


def _rewrite_functional_dropout(gm: torch.fx.GraphModule) -> int:
    """Make functional train/eval switches read the module's ``training`` flag at run time.

    ``F.dropout(x, p, training=self.training)`` -- and any autowrapped function called with a
    ``training=`` keyword, such as torchvision's ``shifted_window_attention`` -- is frozen to a
    constant by tracing; ``getattr(owner, "training")`` in its place makes the same graph right in
    train and eval mode.
    """
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        pos = _DROPOUT_FNS.get(node.target)
        positional = pos is not None and len(node.args) > pos and isinstance(node.args[pos], bool)
        keyword = isinstance(node.kwargs.get("training"), bool) and not _batch_statistics_only(node)
        if not (positional or keyword):
            continue
        owner = _owner_path(node) or next(iter(gm._modules), None)
        if owner is None:  # a model without submodules has nothing to read the flag from
            continue
        with gm.graph.inserting_before(node):
            flag = gm.graph.call_function(getattr, (gm.graph.get_attr(owner), "training"))
        if positional:
            node.args = node.args[:pos] + (flag,) + node.args[pos + 1:]
        else:
            node.kwargs = {**node.kwargs, "training": flag}
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _batch_statistics_only(node: torch.fx.Node) -> bool:
    """``F.batch_norm`` without running stats (weight standardization in timm's StdConv2d) uses
    batch statistics in both modes: its ``training=True`` is not a mode switch."""
    if node.target is not F.batch_norm:
        return False
    running_mean = node.args[1] if len(node.args) > 1 else node.kwargs.get("running_mean")
    return running_mean is None


def _owner_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    key = next(reversed(stack))
    value = stack[key]
    # torch stores {key: (qualified_name, type)}; the qualified name is what get_attr needs
    return value[0] if isinstance(value, tuple) else key


def _mode_difference(model, gm, leaves, fns, pinned) -> list[str]:
    """Trace the other mode too and list where the graphs differ (empty: mode-independent)."""
    from .graph import structure_diff

    was_training = model.training
    try:
        model.train(not was_training)
        other = _trace_once(model, leaves, fns, pinned, lazy=True)  # only compared, never run
        _rewrite_functional_dropout(other)
    except Exception:  # the other mode does not trace at all: treat as mode dependent
        return ["<the model does not trace in the other mode>"]
    finally:
        model.train(was_training)
    return structure_diff(gm, other, limit=10)


class ModeGuard:
    """Refuses to run a mode-dependent graph in the mode it was not traced in."""

    @staticmethod
    def install(gm: torch.fx.GraphModule) -> None:
        gm.register_forward_pre_hook(_mode_guard_hook)
        # GraphModule.__deepcopy__ drops forward hooks but runs these on the copy
        if ModeGuard.reinstall not in gm._deepcopy_hooks:
            gm._deepcopy_hooks.append(ModeGuard.reinstall)

    @staticmethod
    def reinstall(copy: torch.fx.GraphModule) -> None:
        copy.register_forward_pre_hook(_mode_guard_hook)


def _mode_guard_hook(module: nn.Module, args: Any) -> None:
    info: TraceInfo = module.meta[META_KEY]
    if module.training != info.traced_training:
        traced = "train" if info.traced_training else "eval"
        now = "train" if module.training else "eval"
        raise TraceError(
            f"this GraphModule was traced in {traced} mode and {info.model_class} computes a "
            f"different graph in {now} mode (at {', '.join(info.mode_diff[:3])}); running it in "
            f"{now} mode would silently use the {traced}-mode graph. Trace a second GraphModule "
            f"with the model in {now} mode (model.{now}(); fxsparse.trace(model)), or declare the "
            f"modules that branch on self.training as leaf_modules."
        )


# --------------------------------------------------------------------------- shapes
def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Fill ``node.meta["tensor_meta"]`` by running the graph on fake (or meta) tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = _as_tuple(example_inputs)
    on_meta = any(t.is_meta for t in inputs if isinstance(t, torch.Tensor)) or any(
        p.is_meta for p in gm.parameters()
    )
    try:
        # ShapeProp prints a full traceback before re-raising; our error replaces it
        with contextlib.redirect_stderr(io.StringIO()):
            if on_meta:  # meta tensors compute nothing; move the inputs there too
                inputs = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)
                _meta_shape_prop_class()(gm).propagate(*inputs)
            else:
                mode = FakeTensorMode(allow_non_fake_inputs=True)
                fake = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs)
                _fake_state_shape_prop_class()(gm, mode).propagate(*fake)
    except Exception as e:
        if not on_meta and _data_dependent(e):
            # a leaf that branches on tensor values (the fix trace errors suggest) cannot run on
            # fake tensors: compute its shapes for real once instead
            try:
                _propagate_real(gm, inputs)
                return
            except Exception as real_error:
                e = real_error
        raise ExampleInputError(_explain_shape_failure(gm, inputs, e), cause=e) from None


def complete_shapes(gm: torch.fx.GraphModule) -> bool:
    """Give the nodes that passes added without a shape their ``node.meta["tensor_meta"]``.

    Ghost channels compute new widths, so no pass can copy a shape for them. Only the nodes
    without one run, on meta tensors; every other node's value is a meta tensor rebuilt from its
    recorded metadata. That needs no example inputs and costs a fraction of a full propagation.
    Returns whether anything was missing; a graph ``trace`` did not propagate is left alone.
    """
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    if not all("type" in n.meta for n in nodes if n.op == "placeholder"):
        return False  # never propagated
    # ShapeProp records every node's result type, tensor or not: a node with neither is new
    if all("type" in n.meta or "tensor_meta" in n.meta for n in nodes):
        return False
    _CompleteShapes(gm).run(*(None for n in nodes if n.op == "placeholder"))
    return True


class _CompleteShapes(torch.fx.Interpreter):
    """Runs the nodes without a recorded shape on meta tensors and records it; rebuilds the others'
    values from their metadata. Parameters and buffers are read as meta copies, never changed."""

    def run_node(self, n: torch.fx.Node) -> Any:
        if "tensor_meta" in n.meta:
            return self._rebuild(n.meta["tensor_meta"])
        if n.op == "placeholder":  # a non-tensor input: pinned at trace time (its default) or None
            return n.args[0] if n.args else None
        result = super().run_node(n)
        if n.op != "output":
            found: list[bool] = []
            meta = self._describe(result, found)
            if found:
                n.meta["tensor_meta"] = meta
            n.meta["type"] = type(result)
        return result

    def get_attr(self, target: str, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        from torch.func import functional_call

        module = self.fetch_attr(target)
        state = {name: t.to("meta") for name, t in (*module.named_parameters(), *module.named_buffers())}
        return functional_call(module, state, tuple(args), dict(kwargs))

    def _rebuild(self, meta: Any) -> Any:
        from torch.fx.passes.shape_prop import TensorMetadata

        if isinstance(meta, TensorMetadata):
            return torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="meta")
        if isinstance(meta, (list, tuple)):
            return _same_sequence(meta, [self._rebuild(m) for m in meta])
        if isinstance(meta, dict):
            return {k: self._rebuild(m) for k, m in meta.items()}
        return meta

    def _describe(self, value: Any, found: list) -> Any:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        if isinstance(value, torch.Tensor):
            found.append(True)
            return _extract_tensor_metadata(value)
        if isinstance(value, (list, tuple)):
            return _same_sequence(value, [self._describe(v, found) for v in value])
        if isinstance(value, dict):
            return {k: self._describe(v, found) for k, v in value.items()}
        return value


def _same_sequence(like: Sequence, items: list) -> Any:
    """``items`` in the sequence type of ``like`` (list, tuple, namedtuple, torch.return_types)."""
    if type(like) in (list, tuple):
        return type(like)(items)
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)


@functools.cache
def _fake_state_shape_prop_class() -> type:
    from torch.fx.passes.shape_prop import ShapeProp
    from torch.func import functional_call

    class FakeStateShapeProp(_SkipsKnownLeaves, ShapeProp):
        """ShapeProp on fake tensors without a fake copy of the whole module.

        torch's ShapeProp deep-copies the GraphModule onto fake tensors first (half of a trace's
        time on a ResNet-50). Here each parameter and buffer is made fake where it is read (the
        mode memoizes the conversion), and a module runs through ``functional_call`` on them: the
        same fake kernels on the same fake values, and the real module's state is never written
        (train-mode BatchNorm updates the fake running statistics). Normalization and activation
        leaves are not run at all (:func:`_known_output`).
        """

        def __init__(self, gm: torch.fx.GraphModule, fake_mode: Any) -> None:
            torch.fx.Interpreter.__init__(self, gm)
            self.fake_module, self.fake_mode, self.real_module = None, fake_mode, self.module
            self._fakes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def _fake(self, t: torch.Tensor) -> torch.Tensor:
            """``t`` as a fake tensor, once per tensor. A plain strided tensor becomes an empty one
            of its shape, strides, dtype and device made under the fake mode (what ShapeProp reads,
            without ``from_tensor``'s full description of the real tensor: a millisecond each);
            anything else (a view, a subclass, a quantized or sparse tensor) goes through
            ``from_tensor``."""
            hit = self._fakes.get(id(t))
            if hit is not None and hit[0] is t:
                return hit[1]
            if type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided and not t.is_quantized \
                    and not t._is_view():
                with self.fake_mode:
                    fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                fake.requires_grad_(t.requires_grad)
            else:
                fake = self.fake_mode.from_tensor(t)
            self._fakes[id(t)] = (t, fake)  # t kept alive with it, so its id is not reused
            return fake

        def get_attr(self, target, args, kwargs):
            value = super().get_attr(target, args, kwargs)
            return self._fake(value) if isinstance(value, torch.Tensor) else value

        def call_module(self, target, args, kwargs):
            out = self._known_output(target, args, kwargs)  # ShapeProp runs each node under the fake mode
            if out is not None:
                return out
            module = self.fetch_attr(target)
            state = {name: self._fake(t) for name, t in (
                *module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))}
            return functional_call(module, state, tuple(args), dict(kwargs))

    return FakeStateShapeProp


@functools.cache
def _meta_shape_prop_class() -> type:
    from torch.fx.passes.shape_prop import ShapeProp

    class MetaShapeProp(_SkipsKnownLeaves, ShapeProp):
        """ShapeProp that does not run normalization and activation leaves."""

        def call_module(self, target, args, kwargs):
            out = self._known_output(target, args, kwargs) if _is_meta(args) else None
            return out if out is not None else super().call_module(target, args, kwargs)

    return MetaShapeProp


@functools.cache
def _elementwise_module_types() -> frozenset[type]:
    """Activation module types: they return a tensor shaped, typed and laid out like their input."""
    types = {
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
        nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    }
    try:
        from timm.layers import activations, activations_me

        types |= {
            activations.GELU, activations.GELUTanh, activations.QuickGELU, activations.HardMish,
            activations.HardSigmoid, activations.HardSwish, activations.Mish, activations.Sigmoid,
            activations.Swish, activations.Tanh, activations_me.HardMishMe,
            activations_me.HardSigmoidMe, activations_me.HardSwishMe, activations_me.MishMe,
            activations_me.SwishMe,
        }
    except Exception:  # timm missing or reorganized: those layers simply run
        pass
    return frozenset(types)


class _SkipsKnownLeaves:
    """For ShapeProp on fake or meta tensors: normalization and activation leaves are not run.

    Their kernels on fake or meta tensors are Python decompositions (about 1.5 ms per BatchNorm,
    half of shape propagation on a CNN) for an output whose shape, dtype and layout are known up
    front (:func:`_output_layout`).
    """

    def run_node(self, n: torch.fx.Node) -> Any:
        self._node = n
        return super().run_node(n)

    def _known_output(self, target: str, args: Any, kwargs: Any) -> torch.Tensor | None:
        x = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(x, torch.Tensor):
            return None
        # x may stand for the output unless a user of either changes its shape in place
        # (y.unsqueeze_(0)): the other's users would see that
        source = self._node.args[0] if self._node.args else None
        users = [*self._node.users, *(source.users if isinstance(source, torch.fx.Node) else ())]
        alias = not any(_in_place(u) for u in users)
        return _known_output(self.fetch_attr(target), x, alias=alias)


def _is_meta(args: Any) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].is_meta


def _in_place(node: torch.fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and isinstance(name, str) and name.endswith("_") \
        and not name.endswith("__")


def _known_output(m: nn.Module, x: torch.Tensor, *, alias: bool = False) -> torch.Tensor | None:
    """A tensor with the shape, dtype, layout and ``requires_grad`` of ``m(x)`` when these are known
    without running ``m`` (:func:`_output_layout`), else None: ``x`` itself where ``alias`` allows
    and it has them all (a fake or meta tensor holds no values to differ; a new tensor costs a fake
    dispatch, half a millisecond), else a new empty one on ``x``'s device, under whatever fake mode
    is active."""
    layout = _output_layout(m, x)
    if layout is None:
        return None
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in m.parameters()))
    if alias and layout == "like" and grad == x.requires_grad and not (x.is_leaf and x.requires_grad):
        return x
    out = torch.empty_like(x) if layout == "like" else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if grad:  # an op's output, not a leaf: later in-place ops on it must stay legal
        out = out.requires_grad_().clone()
    return out


def _output_layout(m: nn.Module, x: torch.Tensor) -> str | None:
    """How ``m(x)`` is laid out if it is known without running ``m``: "like" ``x`` (elementwise
    ops, batch norm), "contiguous" (layer and group norm), or None (run it).

    Inputs the module would reject (wrong rank, channel count or dtype) return None, so that
    running it raises the module's own error.
    """
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return None  # outputs of gapped or overlapping inputs are laid out case by case
    kind = type(m)
    if kind in _elementwise_module_types():
        return "like"
    if not x.is_floating_point() or any(p.dtype != x.dtype for p in m.parameters(recurse=False)):
        return None
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) or _is_timm_batchnorm_act(m):
        try:
            m._check_input_dim(x)
        except ValueError:
            return None
        if m.training and x.numel() == x.shape[1]:  # one value per channel: F.batch_norm raises
            return None
        return "like" if x.shape[1] == m.num_features else None
    if kind is nn.LayerNorm:
        n = len(m.normalized_shape)
        return "contiguous" if x.dim() >= n and tuple(x.shape[x.dim() - n:]) == tuple(m.normalized_shape) else None
    if kind is nn.GroupNorm:
        return "contiguous" if x.dim() >= 2 and x.shape[1] == m.num_channels else None
    return None


def _is_timm_batchnorm_act(m: nn.Module) -> bool:
    """timm's BatchNormAct2d (a leaf) with an activation (or none) and dropout (or none)."""
    if type(m).__name__ != "BatchNormAct2d" or not type(m).__module__.startswith("timm."):
        return False
    return type(m.act) in _elementwise_module_types() | {nn.Identity} and type(m.drop) in (nn.Identity, nn.Dropout)


def _data_dependent(e: BaseException) -> bool:
    from torch._subclasses.fake_tensor import DataDependentOutputException

    while e is not None:
        if isinstance(e, DataDependentOutputException):
            return True
        e = e.__cause__
    return False


def _propagate_real(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> None:
    """ShapeProp on the real inputs, leaving buffers (BatchNorm running stats) and RNG untouched."""
    from torch.fx.passes.shape_prop import ShapeProp

    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*inputs)
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _explain_shape_failure(gm: torch.fx.GraphModule, inputs: Sequence[Any], e: Exception) -> str:
    shapes = ", ".join(
        f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else repr(t)
        for t in inputs
    )
    root = e
    while root.__cause__ is not None:  # ShapeProp wraps the op's own error
        root = root.__cause__
    lines = [l for l in str(root).strip().splitlines() if l.strip()]
    detail = lines[0] if lines else type(root).__name__
    failing = _failing_node(e)
    node_desc = ""
    if failing is not None:
        node_desc = f" at node '{failing.name}'"
        if failing.op == "call_module":
            node_desc += f" (module '{failing.target}', {type(gm.get_submodule(failing.target)).__name__})"
        elif failing.op in ("call_function", "call_method"):
            node_desc += f" ({getattr(failing.target, '__name__', failing.target)})"
    return (
        f"the example inputs ({shapes}) do not fit the model{node_desc}: {detail}. "
        f"Pass example_inputs with the shape the model expects (for an image classifier usually "
        f"(batch, 3, H, W))."
    )


def _failing_node(e: BaseException) -> torch.fx.Node | None:
    """The fx node whose execution raised: the innermost ``run_node(n)`` frame in the traceback."""
    found = None
    tb = e.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("n")
        if isinstance(node, torch.fx.Node):
            found = node
        tb = tb.tb_next
    return found
