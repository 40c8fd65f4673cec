"""MaskPass: multiply every selected conv/linear weight by its mask inside the graph.

The mask of parameter ``P`` is the bool buffer ``fxsparse.masks.<P>``; the graph reads it with a
``get_attr`` (role ``mask``) and multiplies it into the weight (role ``masked_weight``), so the
effective weight ``P * mask`` is what every forward uses and what autograd differentiates:
pruned entries get exactly zero gradient and stay exactly zero in the effective weight whatever
the optimizer does to the stored parameter. The layer is then called with the masked weight:

* **module** layers (a plain ``nn.ConvNd`` / ``nn.ConvTransposeNd`` / ``nn.Linear`` called as
  ``m(x)``) are replaced by the functional call ``F.conv2d(x, w * mask, b, ...)`` with the module's
  hyper-parameters (role ``layer``), exactly what the module's own ``forward`` computes
  (``padding_mode != "zeros"`` becomes an ``F.pad`` node, role ``pad``);
* **function** layers (a parameter read with ``get_attr`` and used by a functional conv/linear,
  possibly after weight standardization as in timm's StdConv2d) get the multiply right after the
  ``get_attr``, so everything downstream sees the masked weight;
* **leaf** layers (weights held inside a module the tracer keeps as a leaf: timm's Conv2dSame,
  CondConv2d, NormFreeBlock, ``nn.MultiheadAttention``, or a conv subclass with its own
  ``forward``) are called as ``torch.func.functional_call(leaf, {name: w * mask, ...}, args,
  kwargs)``: the leaf's own forward runs unchanged with the masked weights swapped in, and the
  masks are graph nodes that torch.compile traces without a graph break.

Masks are validated all at once before anything changes (``MaskError`` lists every problem).
``StripMasksPass`` undoes the rewrite; ``fxsparse.export`` folds the masks into the weights.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from fxsparse.errors import MaskError, PassError
from fxsparse.fused import apply_mask
from fxsparse.graph import Layer, layer_of
from fxsparse.pass_infra import (
    CONTAINER, FxSparsePass, container, delete_container, register_nested_buffer, tagged_nodes,
)

__all__ = ["MaskPass", "StripMasksPass", "GROUP", "mask_buffer_name", "masked_parameters", "get_mask"]

GROUP = "masks"

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_PLAIN_FORWARDS = {nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
                   nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward}


def mask_buffer_name(param: str) -> str:
    """Qualified buffer name of the mask of parameter ``param`` (``fxsparse.masks.<param>``)."""
    return f"{CONTAINER}.{GROUP}.{param}"


def masked_parameters(gm: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: mask buffer} for every mask registered on ``gm``."""
    sub = container(gm, GROUP, create=False)
    return dict(sub.named_buffers()) if sub is not None else {}


def get_mask(gm: nn.Module, param: str) -> torch.Tensor | None:
    """The mask buffer of parameter ``param``, or None (looked up by its path, not by listing
    every mask: passes ask once per site)."""
    try:
        return gm.get_buffer(mask_buffer_name(param))
    except AttributeError:
        return None


def _layers_by_node(gm: GraphModule) -> list[tuple[Node, list[Layer]]]:
    out = []
    for node in list(gm.graph.nodes):
        found = layer_of(gm, node)
        layers = [found] if isinstance(found, Layer) else list(found or [])
        if layers:
            out.append((node, layers))
    return out


def _is_plain_module_call(module: nn.Module, node: Node) -> bool:
    """A conv/linear whose forward is torch's own, called as ``m(x)``, with no hooks to keep."""
    if type(module).forward not in _PLAIN_FORWARDS:
        return False  # e.g. timm's Conv2dSame pads in its own forward: keep that forward
    if len(node.args) != 1 or node.kwargs:
        return False  # ConvTranspose's output_size argument: the module computes output_padding
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return False
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed and module.padding_mode != "zeros":
        return False
    return True


class MaskPass(FxSparsePass):
    """Multiply each weight named in ``masks`` by its bool mask inside the graph.

    Args:
        masks: {qualified parameter name: bool tensor of the parameter's shape}. Every name must be
            the weight of a conv/linear layer the graph uses (also inside leaf modules); biases and
            other parameters are never masked. Masks are copied to the weight's device.

    Stats: ``masked_weights`` (parameters masked), ``module_layers`` (call_module convs/linears
    made functional), ``function_layers`` (get_attr weights multiplied in place), ``leaf_calls``
    (leaf modules called through functional_call), ``kept`` (weights kept, summed over masks),
    ``total`` (weights covered by masks).
    """

    group = GROUP

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        super().__init__()
        if not isinstance(masks, Mapping):
            raise MaskError(f"MaskPass takes a dict {{parameter name: bool tensor}}; got {type(masks).__name__}")
        self.masks = dict(masks)

    # ------------------------------------------------------------------ checks
    def requires(self, gm: GraphModule) -> None:
        super().requires(gm)
        self._validate(gm)

    def _validate(self, gm: GraphModule) -> None:
        params = dict(gm.named_parameters(remove_duplicate=False))
        maskable = {l.weight for _, layers in _layers_by_node(gm) for l in layers}
        existing = masked_parameters(gm)
        problems = []
        for name, mask in self.masks.items():
            if name in existing:
                problems.append(f"{name}: already masked (edit the buffer {mask_buffer_name(name)} in place "
                                f"or strip the masks first)")
                continue
            if name not in params:
                problems.append(f"{name}: no such parameter")
                continue
            if name not in maskable:
                problems.append(f"{name}: not the weight of a conv/linear layer the graph uses "
                                f"(masks cover conv/linear weights only, never biases)")
                continue
            if not isinstance(mask, torch.Tensor):
                problems.append(f"{name}: mask is a {type(mask).__name__}, not a tensor")
                continue
            if mask.dtype != torch.bool:
                problems.append(f"{name}: mask dtype {mask.dtype}, expected torch.bool (use mask.bool())")
            if tuple(mask.shape) != tuple(params[name].shape):
                problems.append(f"{name}: mask shape {tuple(mask.shape)}, parameter shape {tuple(params[name].shape)}")
        if problems:
            shown = "\n  ".join(problems[:50])
            more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
            raise MaskError(
                f"{len(problems)} of {len(self.masks)} masks do not fit the model; nothing was applied. "
                f"Masks must map conv/linear weight names (see fxsparse.graph.parameterized_layers) "
                f"to bool tensors of the weight's shape:\n  {shown}{more}"
            )

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        used = {n.target for n in tagged_nodes(gm, group=GROUP, role="mask")}
        missing = sorted(mask_buffer_name(p) for p in self.masks if mask_buffer_name(p) not in used)
        if missing:
            raise PassError(f"MaskPass registered masks the graph never reads: {', '.join(missing[:10])}")

    # ------------------------------------------------------------------ rewrite
    def call(self, gm: GraphModule) -> PassResult:
        if not self.masks:
            return PassResult(gm, False)
        params = dict(gm.named_parameters(remove_duplicate=False))
        for name, mask in self.masks.items():
            w = params[name]
            # a copy on the weight's device (the caller's dict stays theirs), in the layout the
            # convolution will want the weight in (see _mask_memory_format)
            buf = mask.detach().to(device=w.device, dtype=torch.bool, memory_format=_mask_memory_format(mask), copy=True)
            register_nested_buffer(gm, mask_buffer_name(name), buf)
            self.stats["masked_weights"] += 1
            self.stats["kept"] += int(torch.count_nonzero(buf))
            self.stats["total"] += mask.numel()

        graph = gm.graph
        function_weights: set[str] = set()
        for node, layers in _layers_by_node(gm):
            layers = [l for l in layers if l.weight in self.masks]
            if not layers:
                continue
            style = layers[0].style
            if style == "function":
                function_weights.update(l.weight for l in layers)
                continue
            with self.at(node):
                if style == "module" and _is_plain_module_call(gm.get_submodule(node.target), node):
                    self._functional_module_call(gm, node, layers[0])
                else:
                    self._functional_call(gm, node, layers)
        for getattr_node in [n for n in graph.nodes if n.op == "get_attr" and n.target in function_weights]:
            with self.at(getattr_node):
                self._mask_get_attr(gm, getattr_node)
        return PassResult(gm, True)

    def _masked_weight(self, gm: GraphModule, weight_node: Node, param: str) -> Node:
        """``weight_node * get_attr(mask)``, inserted right after ``weight_node``."""
        graph = gm.graph
        with graph.inserting_after(weight_node):
            mask_node = self.tag(graph.get_attr(mask_buffer_name(param)), "mask", param=param)
        with graph.inserting_after(mask_node):
            # apply_mask(w, mask) is w * mask, with a fast eager form on CPU (fxsparse.fused)
            mul = self.tag(graph.call_function(apply_mask, (weight_node, mask_node)), "masked_weight", param=param)
        _copy_tensor_meta(weight_node, mul)
        return mul

    def _mask_get_attr(self, gm: GraphModule, weight_node: Node) -> None:
        users = list(weight_node.users)
        mul = self._masked_weight(gm, weight_node, weight_node.target)
        for user in users:
            user.replace_input_with(weight_node, mul)
        self.stats["function_layers"] += 1

    def _original(self, node: Node) -> dict[str, Any]:
        # node inputs by name only: Node objects in meta go stale across deepcopy; restoring reads
        # the live inputs from the replacement node instead
        as_name = lambda a: torch.fx.node.map_arg(a, lambda n: n.name)  # noqa: E731
        return {"op": node.op, "target": node.target, "args": as_name(node.args), "kwargs": as_name(dict(node.kwargs))}

    def _replace(self, node: Node, new: Node, **extra: Any) -> None:
        """Swap the layer call ``node`` for ``new``, keeping its meta (shapes, module stack)."""
        new.meta.update({k: v for k, v in node.meta.items() if k != "fxsparse"})
        self.tag(new, "layer", original=self._original(node), **extra)
        node.replace_all_uses_with(new)
        node.graph.erase_node(node)

    def _functional_module_call(self, gm: GraphModule, node: Node, layer: Layer) -> None:
        graph = gm.graph
        m = gm.get_submodule(node.target)
        (x,) = node.args
        with graph.inserting_before(node):
            w = self.tag(graph.get_attr(layer.weight), "weight", param=layer.weight)
            mw = self._masked_weight(gm, w, layer.weight)
        with graph.inserting_after(mw):
            b = self.tag(graph.get_attr(f"{node.target}.bias"), "bias") if m.bias is not None else None
        with graph.inserting_before(node):
            if isinstance(m, nn.Linear):
                new = graph.call_function(F.linear, (x, mw, b))
            elif m.transposed:
                nd = len(m.kernel_size)
                new = graph.call_function(
                    _CONV_T_FN[nd], (x, mw, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation))
            else:
                nd = len(m.kernel_size)
                padding = m.padding
                if m.padding_mode != "zeros":  # what nn.ConvNd._conv_forward does
                    x = self.tag(graph.call_function(
                        F.pad, (x, m._reversed_padding_repeated_twice), {"mode": m.padding_mode}), "pad")
                    padding = (0,) * nd
                new = graph.call_function(_CONV_FN[nd], (x, mw, b, m.stride, padding, m.dilation, m.groups))
        self._replace(node, new, param=layer.weight)
        self.stats["module_layers"] += 1

    def _functional_call(self, gm: GraphModule, node: Node, layers: list[Layer]) -> None:
        graph = gm.graph
        extend = node.op == "call_function"  # a leaf an earlier MaskPass already calls this way
        leaf = node.args[0].target if extend else node.target
        if not extend:
            with graph.inserting_before(node):
                mod = self.tag(graph.get_attr(leaf), "module")
            swapped: dict[str, Node] = {}
        else:
            mod, swapped = node.args[0], dict(node.args[1])
        anchor = mod
        for layer in layers:
            with graph.inserting_after(anchor):
                w = self.tag(graph.get_attr(layer.weight), "weight", param=layer.weight)
            anchor = swapped[layer.weight[len(leaf) + 1:]] = self._masked_weight(gm, w, layer.weight)
        if extend:
            node.args = (mod, swapped, *node.args[2:])
            node.meta["fxsparse"]["params"] = [*node.meta["fxsparse"]["params"], *(l.weight for l in layers)]
        else:
            with graph.inserting_before(node):
                new = graph.call_function(torch.func.functional_call, (mod, swapped, tuple(node.args), dict(node.kwargs)))
            self._replace(node, new, params=[l.weight for l in layers])
        self.stats["leaf_calls"] += 1


def _mask_memory_format(mask: torch.Tensor) -> torch.memory_format:
    """Conv masks are stored channels-last: values and dtype unchanged, only the strides differ.

    On CPU, inductor runs every convolution channels-last (mkldnn), so ``w * mask`` is produced in
    that layout. With a contiguous bool mask it reads the mask transposed, and inductor's
    transposed bool loads are slow: a compiled resnet18 training step took 1.6x dense's time,
    against 1.09x with the mask already channels-last (1.07x with float masks, which would cost 4x
    the memory and change the mask dtype everyone reads). Eager is unaffected either way.
    """
    if mask.dim() == 4:
        return torch.channels_last
    if mask.dim() == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def _copy_tensor_meta(src: Node, dst: Node) -> None:
    if "tensor_meta" in src.meta:
        dst.meta["tensor_meta"] = src.meta["tensor_meta"]


class StripMasksPass(FxSparsePass):
    """Undo ``MaskPass``: restore each replaced layer call and delete the mask nodes and buffers.

    With ``fold=True`` (the default) each masked weight is first multiplied by its mask in place,
    so the stripped graph computes what the masked graph computed.
    """

    group = GROUP

    def __init__(self, *, fold: bool = True):
        super().__init__()
        self.fold = fold

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        masks = masked_parameters(gm)
        if self.fold:
            params = dict(gm.named_parameters(remove_duplicate=False))
            with torch.no_grad():
                for name, mask in masks.items():
                    params[name].mul_(mask)
                    self.stats["folded"] += 1
        for node in tagged_nodes(gm, group=GROUP, role="layer"):
            original = node.meta["fxsparse"]["original"]
            if node.target is torch.func.functional_call:
                args, kwargs = node.args[2], node.args[3]
            else:
                x = node.args[0]
                if isinstance(x, Node) and (x.meta.get("fxsparse") or {}).get("role") == "pad":
                    x = x.args[0]
                args, kwargs = (x,), {}
            with graph.inserting_before(node):
                restored = graph.create_node(original["op"], original["target"], tuple(args), dict(kwargs))
            restored.meta.update({k: v for k, v in node.meta.items() if k != "fxsparse"})
            node.replace_all_uses_with(restored)
            graph.erase_node(node)
            self.stats["layers_restored"] += 1
        # the remaining tagged nodes (mask, masked_weight, weight, bias, pad, module) now have no
        # users outside the group; for function layers the multiply's users read the weight again
        for node in reversed(tagged_nodes(gm, group=GROUP)):
            role = node.meta["fxsparse"]["role"]
            if role == "masked_weight":
                node.replace_all_uses_with(node.args[0])
            if node.users:
                if role == "weight":  # read by a later pass too (a ghost slicing this kernel): keep it, untagged
                    del node.meta["fxsparse"]
                    continue
                raise PassError(f"StripMasksPass: {node.format_node()} is still used by {list(node.users)}")
            graph.erase_node(node)
            self.stats["nodes_removed"] += 1
        delete_container(gm, GROUP)
        return PassResult(gm, bool(self.stats))
