"""Graph queries over a traced GraphModule, on a networkx view of its fx graph.

The passes ask the graph four kinds of question, all answered here so that no pass re-derives
them: which nodes are parameterized layers (conv/linear, also inside leaf modules and in their
functional or masked form), which nodes are activations, how a producer layer reaches its
consumers through channel-wise ops, and whether two graphs have the same structure.
"""
from __future__ import annotations

import hashlib
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import networkx as nx
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

__all__ = [
    "Layer", "ActivationSite", "Chain", "to_networkx", "parameterized_layers", "layer_of",
    "activation_sites", "channel_chains", "is_channelwise", "same_structure", "structure_diff",
    "node_signatures", "owner_module", "leaf_call_target", "LayerCall", "layer_call", "PreActivation",
    "activation_reach", "is_residual_add", "articulation_nodes", "stem_layer", "SITE_KINDS",
    "parse_where", "where_kinds", "site_filter", "describe_where", "disconnected_channels",
]


# --------------------------------------------------------------------------- networkx view
def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """A DiGraph with one vertex per fx node (keyed by node name) and an edge per data dependency.

    Vertex attributes: ``op``, ``target`` (str), ``type`` (module class name for call_module),
    ``tag`` (the fxsparse tag, if a pass added the node), ``node`` (the fx Node itself).
    """
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(
            node.name, op=node.op, target=_target_str(node), type=_module_type_name(gm, node),
            tag=node.meta.get("fxsparse"), node=node,
        )
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _target_str(node: Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)
    return f"{mod}.{name}" if mod else name


def _module_type_name(gm: GraphModule, node: Node) -> str | None:
    if node.op != "call_module":
        return None
    return type(gm.get_submodule(node.target)).__name__


# --------------------------------------------------------------------------- layers
CONV_FUNCTIONS: tuple[Callable, ...] = (
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
    torch.conv_transpose3d,
)
LINEAR_FUNCTIONS: tuple[Callable, ...] = (F.linear, torch._C._nn.linear)


def _special_weight_layers() -> dict[type, tuple[str, tuple[str, ...]]]:
    """Module types that hold conv/linear weights without subclassing nn.ConvNd / nn.Linear."""
    special: dict[type, tuple[str, tuple[str, ...]]] = {
        nn.MultiheadAttention: ("linear", ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")),
    }
    try:
        from timm.layers import CondConv2d

        special[CondConv2d] = ("conv", ("weight",))
    except Exception:
        pass
    return special


_SPECIAL = None


def _special() -> dict[type, tuple[str, tuple[str, ...]]]:
    global _SPECIAL
    if _SPECIAL is None:
        _SPECIAL = _special_weight_layers()
    return _SPECIAL


@dataclass(frozen=True, eq=False)
class Layer:
    """A conv or linear weight and the graph node that applies it.

    ``node`` is the call_module node of the layer itself, the call_module node of the leaf module
    that holds it (``inside_leaf``), or the call_function conv/linear that consumes it.
    """

    name: str  # qualified name of the module owning the weight ("layer1.0.conv1")
    weight: str  # qualified parameter name ("layer1.0.conv1.weight")
    kind: str  # "conv" | "linear"
    node: Node
    style: str  # "module" | "function" | "leaf"
    leaf: str | None = None  # qualified name of the leaf module holding the layer

    @property
    def inside_leaf(self) -> bool:
        return self.style == "leaf"

    def __repr__(self) -> str:
        where = f" in leaf {self.leaf}" if self.leaf else ""
        return f"Layer({self.weight}, {self.kind}, {self.style}{where})"


def _module_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


def _leaf_layers(gm: GraphModule, node: Node, path: str, module: nn.Module) -> Iterator[Layer]:
    for sub_name, sub in module.named_modules():
        full = f"{path}.{sub_name}" if sub_name else path
        kind = _module_kind(sub)
        if kind is not None and isinstance(getattr(sub, "weight", None), nn.Parameter):
            yield Layer(full, f"{full}.weight", kind, node, "leaf", path)
            continue
        spec = _special().get(type(sub))
        if spec is not None:
            for pname in spec[1]:
                if isinstance(getattr(sub, pname, None), nn.Parameter):
                    yield Layer(full, f"{full}.{pname}", spec[0], node, "leaf", path)


def weight_source(node: Node) -> Node | None:
    """The get_attr parameter node a conv/linear weight argument comes from.

    Walks up through mask multiplies and weight standardization (StdConv2d's reshape/batch_norm)
    and returns the one get_attr reached whose tensor has at least 2 dimensions.
    """
    seen, stack, found = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            tag = n.meta.get("fxsparse") or {}
            if tag.get("role") in ("mask", "grad_probe"):  # a mask, or [dynamic]'s gradient probe (rigl)
                continue
            found.append(n)
            continue
        if n.op == "placeholder":
            return None  # the weight is data, not a parameter
        stack.extend(n.all_input_nodes)
    candidates = [n for n in found if _attr_ndim(n) != 1]
    if len(candidates) > 1:
        # ScaledStdConv2d also reads a per-channel gain of shape (out, 1, 1, 1): the weight is the
        # one tensor larger than every other candidate
        sizes = [_attr_numel(n) for n in candidates]
        biggest = max(sizes)
        if None not in sizes and sizes.count(biggest) == 1:
            return candidates[sizes.index(biggest)]
    return candidates[0] if len(candidates) == 1 else None


def _attr_ndim(n: Node) -> int | None:
    tm = n.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return len(tm.shape)
    try:
        obj = _resolve_attr(n.graph.owning_module, n.target)
    except AttributeError:
        return None
    return obj.dim() if isinstance(obj, torch.Tensor) else None


def _attr_numel(n: Node) -> int | None:
    tm = n.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tm.shape.numel()
    try:
        obj = _resolve_attr(n.graph.owning_module, n.target)
    except AttributeError:
        return None
    return obj.numel() if isinstance(obj, torch.Tensor) else None


def _resolve_attr(root: nn.Module, target: str) -> Any:
    obj = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _is_parameter(gm: GraphModule, target: str) -> bool:
    try:
        return isinstance(_resolve_attr(gm, target), nn.Parameter)
    except AttributeError:
        return False


def layer_of(gm: GraphModule, node: Node) -> Layer | list[Layer] | None:
    """The layer(s) a node applies: one Layer, a list (a leaf holding several), or None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        kind = _module_kind(m)
        if kind is not None and _is_traced_leaf(m) and isinstance(getattr(m, "weight", None), torch.Tensor):
            return Layer(node.target, f"{node.target}.weight", kind, node, "module")
        layers = list(_leaf_layers(gm, node, node.target, m))
        return layers or None
    leaf = leaf_call_target(node)
    if leaf is not None:  # MaskPass's torch.func.functional_call(leaf, {masked weights}, args, kwargs)
        return list(_leaf_layers(gm, node, leaf, gm.get_submodule(leaf))) or None
    if node.op == "call_function" and (node.target in CONV_FUNCTIONS or node.target in LINEAR_FUNCTIONS):
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        src = weight_source(w) if isinstance(w, Node) else None
        if src is None or not _is_parameter(gm, src.target):
            return None  # a fixed filter held in a buffer (timm's BlurPool2d) is not a layer to mask
        kind = "conv" if node.target in CONV_FUNCTIONS else "linear"
        owner = src.target.rpartition(".")[0]
        return Layer(owner, src.target, kind, node, "function")
    return None


def leaf_call_target(node: Node) -> str | None:
    """The leaf module a ``torch.func.functional_call(get_attr(leaf), ...)`` node calls, else None.

    MaskPass calls leaf modules that hold masked weights this way; queries treat such a node like
    the ``call_module`` of the leaf.
    """
    if node.op == "call_function" and node.target is torch.func.functional_call and node.args:
        mod = node.args[0]
        if isinstance(mod, Node) and mod.op == "get_attr":
            return mod.target
    return None


def _is_traced_leaf(m: nn.Module) -> bool:
    # a call_module conv/linear with no child modules is the layer itself, not a container
    return not any(True for _ in m.children())


def parameterized_layers(gm: GraphModule, kinds: tuple[str, ...] = ("conv", "linear")) -> list[Layer]:
    """Every conv/linear weight the graph uses, in graph order, each reported once.

    Includes layers held inside leaf modules (timm's NormFreeBlock, CondConv2d, Conv2dSame, nn.MultiheadAttention)
    and functional conv/linear calls whose weight is a parameter (masked or standardized).
    """
    out, seen = [], set()
    for node in gm.graph.nodes:
        found = layer_of(gm, node)
        for layer in [found] if isinstance(found, Layer) else (found or []):
            if layer.kind in kinds and layer.weight not in seen:
                seen.add(layer.weight)
                out.append(layer)
    return out


def owner_module(gm: GraphModule, qualified_param: str) -> tuple[nn.Module, str]:
    """(module, attribute name) of a qualified parameter name."""
    path, _, attr = qualified_param.rpartition(".")
    return (gm.get_submodule(path) if path else gm), attr


# --------------------------------------------------------------------------- activations
# Module types and functions of the activation family fxsparse recognizes, by kind.
_ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu",
    nn.SiLU: "silu", nn.Mish: "mish", nn.Hardswish: "hardswish", nn.ELU: "elu", nn.SELU: "selu",
    nn.CELU: "celu", nn.PReLU: "prelu", nn.Softplus: "softplus", nn.Hardtanh: "hardtanh",
}
_ACT_FUNCTIONS: dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.relu6: "relu6",
    F.leaky_relu: "leaky_relu", F.gelu: "gelu", F.silu: "silu", F.mish: "mish",
    F.hardswish: "hardswish", F.elu: "elu", F.selu: "selu", F.celu: "celu", F.hardtanh: "hardtanh",
    torch.nn.functional.softplus: "softplus",
}
_INPLACE_FUNCTIONS = {F.relu_, torch.relu_}
_ACT_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu"}


def _timm_act_modules() -> dict[type, str]:
    try:
        from timm.layers import activations as A
    except Exception:
        return {}
    names = {"Swish": "silu", "Mish": "mish", "GELU": "gelu", "HardSwish": "hardswish",
             "GELUTanh": "gelu", "PReLU": "prelu", "QuickGELU": "gelu"}
    return {getattr(A, n): k for n, k in names.items() if hasattr(A, n)}


_ACT_MODULES.update(_timm_act_modules())


@dataclass(frozen=True, eq=False)
class ActivationSite:
    """One activation in the graph.

    ``style`` is "module" (call_module of an activation module), "function", "method", or "leaf"
    (an activation submodule inside a leaf module, e.g. timm's BatchNormAct2d ``.act``).
    """

    node: Node
    kind: str
    style: str
    inplace: bool
    module: str | None = None  # qualified name of the activation module (module / leaf styles)

    def __repr__(self) -> str:
        where = f" {self.module}" if self.module else ""
        return f"ActivationSite({self.node.name}, {self.kind}, {self.style}{where}, inplace={self.inplace})"


def activation_kind(gm: GraphModule, node: Node) -> str | None:
    """The activation kind a node computes directly (relu, gelu, ...), else None."""
    if node.op == "call_module":
        return _ACT_MODULES.get(type(gm.get_submodule(node.target)))
    if node.op == "call_function":
        return _ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ACT_METHODS.get(node.target)
    return None


def activation_sites(gm: GraphModule, kinds: tuple[str, ...] | None = None) -> list[ActivationSite]:
    """Every activation site, in graph order; ``kinds`` filters (e.g. ("relu", "relu6"))."""
    out = []
    for node in gm.graph.nodes:
        for site in _sites_at(gm, node):
            if kinds is None or site.kind in kinds:
                out.append(site)
    return out


def _sites_at(gm: GraphModule, node: Node) -> Iterator[ActivationSite]:
    kind = activation_kind(gm, node)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if kind is not None:
            yield ActivationSite(node, kind, "module", bool(getattr(m, "inplace", False)), node.target)
            return
        for sub_name, sub in m.named_modules():
            sub_kind = _ACT_MODULES.get(type(sub))
            if sub_name and sub_kind is not None:
                yield ActivationSite(node, sub_kind, "leaf", bool(getattr(sub, "inplace", False)),
                                     f"{node.target}.{sub_name}")
    elif node.op == "call_function" and leaf_call_target(node) is not None:
        leaf = leaf_call_target(node)
        for sub_name, sub in gm.get_submodule(leaf).named_modules():
            sub_kind = _ACT_MODULES.get(type(sub))
            if sub_name and sub_kind is not None:
                yield ActivationSite(node, sub_kind, "leaf", bool(getattr(sub, "inplace", False)), f"{leaf}.{sub_name}")
    elif kind is not None and node.op == "call_function":
        inplace = node.target in _INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace", False))
        if not inplace and node.target in (F.relu, F.relu6, F.leaky_relu, F.elu, F.hardtanh, F.silu,
                                           F.hardswish, F.mish, F.celu, F.selu):
            inplace = _positional_inplace(node)
        yield ActivationSite(node, kind, "function", inplace)
    elif kind is not None and node.op == "call_method":
        yield ActivationSite(node, kind, "method", node.target.endswith("_"))


def _positional_inplace(node: Node) -> bool:
    # F.relu(x, True) / F.leaky_relu(x, slope, True): inplace is the last positional bool
    extra = [a for a in node.args[1:] if isinstance(a, bool)]
    return bool(extra and extra[-1])


# --------------------------------------------------------------------------- chains
_CHANNELWISE_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)
_CHANNELWISE_FUNCTIONS = {F.batch_norm, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.instance_norm}


def _timm_channelwise() -> tuple[type, ...]:
    try:
        from timm.layers import BatchNormAct2d, DropPath, FrozenBatchNormAct2d
    except Exception:
        return ()
    return (BatchNormAct2d, FrozenBatchNormAct2d, DropPath)


_CHANNELWISE_MODULES = _CHANNELWISE_MODULES + _timm_channelwise()


def is_channelwise(gm: GraphModule, node: Node) -> bool:
    """True when the node maps each channel independently (norm per channel, activation, dropout).

    Channel-wise ops let a producer's output channels reach a consumer one-to-one, which is what
    ghost channels and skip edges need to know.
    """
    if activation_kind(gm, node) is not None:
        return True
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS
    return False


@dataclass(eq=False)
class Chain:
    """A producer layer's output followed forward through channel-wise ops.

    ``ops`` are the channel-wise nodes crossed (in graph order), ``consumers`` the layers reached,
    ``others`` every other node reached (residual adds, pooling, the output...).
    """

    producer: Layer
    ops: list[Node] = field(default_factory=list)
    consumers: list[Layer] = field(default_factory=list)
    others: list[Node] = field(default_factory=list)

    @property
    def single_consumer(self) -> Layer | None:
        """The consumer, when the producer reaches exactly one layer and nothing else."""
        if len(self.consumers) == 1 and not self.others:
            return self.consumers[0]
        return None


def channel_chains(gm: GraphModule, layers: list[Layer] | None = None) -> list[Chain]:
    """For each non-leaf layer, where its output goes through channel-wise ops (see ``Chain``)."""
    layers = [l for l in (layers if layers is not None else parameterized_layers(gm)) if not l.inside_leaf]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    chains = []
    for layer in layers:
        chain = Chain(layer)
        seen, frontier = set(), list(layer.node.users)
        while frontier:
            n = frontier.pop()
            if n in seen:
                continue
            seen.add(n)
            found = layer_of(gm, n)
            if isinstance(found, Layer) and not found.inside_leaf:
                chain.consumers.append(found)
            elif is_channelwise(gm, n) and _is_main_input(n, seen, layer.node):
                chain.ops.append(n)
                frontier.extend(n.users)
            else:
                chain.others.append(n)
        chain.ops.sort(key=order.__getitem__)
        chain.consumers.sort(key=lambda l: order[l.node])
        chain.others.sort(key=order.__getitem__)
        chains.append(chain)
    return chains


def _is_main_input(n: Node, seen: set[Node], producer: Node) -> bool:
    # a channel-wise op counts only if the chain's tensor is its data input (args[0])
    first = n.args[0] if n.args else None
    return isinstance(first, Node) and (first in seen or first is producer)


# --------------------------------------------------------------------------- structure
def node_signatures(gm: GraphModule) -> dict[Node, str]:
    """A Merkle hash per node: op, target and argument structure, with inputs by their hashes.

    Two graphs have the same structure iff they have the same multiset of signatures; node names
    and node order do not matter.
    """
    sigs: dict[Node, str] = {}

    def norm(a: Any) -> Any:
        if isinstance(a, Node):
            return ("%", sigs[a])
        if isinstance(a, (tuple, list)):
            return (type(a).__name__, tuple(norm(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, norm(v)) for k, v in a.items()))
        if isinstance(a, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return str(a)
        if isinstance(a, slice):
            return ("slice", norm(a.start), norm(a.stop), norm(a.step))
        if isinstance(a, float) and a != a:
            return "nan"
        return repr(a)

    for node in gm.graph.nodes:
        target = _target_str(node)
        if node.op == "call_module":
            target += ":" + type(gm.get_submodule(node.target)).__qualname__
        elif node.op == "get_attr" and target.rpartition(".")[2].startswith("_tensor_constant"):
            target = _constant_signature(gm, target)  # tracer-chosen names differ between traces
        key = repr((node.op, target, norm(node.args), norm(dict(node.kwargs))))
        sigs[node] = hashlib.sha1(key.encode()).hexdigest()
    return sigs


def _constant_signature(gm: GraphModule, target: str) -> str:
    value = _resolve_attr(gm, target)
    if not isinstance(value, torch.Tensor):
        return f"const:{value!r}"
    head = f"const:{tuple(value.shape)}:{value.dtype}"
    if value.is_meta or value.device.type != "cpu":
        return head
    return head + ":" + hashlib.sha1(value.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def structure_diff(gm_a: GraphModule, gm_b: GraphModule, limit: int = 20) -> list[str]:
    """Where two graphs differ, as readable node descriptions (empty when the structure is equal).

    Reports only the roots of each difference (nodes whose inputs all match), each prefixed with
    "-" (only in a) or "+" (only in b).
    """
    sa, sb = node_signatures(gm_a), node_signatures(gm_b)
    ca, cb = Counter(sa.values()), Counter(sb.values())
    only_a, only_b = ca - cb, cb - ca
    out = []
    for sign, sigs, counts, gm in (("-", sa, only_a, gm_a), ("+", sb, only_b, gm_b)):
        differing = {n for n, s in sigs.items() if s in counts}
        for n in gm.graph.nodes:
            if n in differing and not any(i in differing for i in n.all_input_nodes):
                out.append(f"{sign} {n.format_node() or n.name}")
    return out[:limit]


def same_structure(gm_a: GraphModule, gm_b: GraphModule) -> bool:
    """Structural equality of two graphs: ops, targets, constant arguments and edges, modulo node names."""
    return Counter(node_signatures(gm_a).values()) == Counter(node_signatures(gm_b).values())


# --------------------------------------------------------------------------- layer calls
_CONV_T_FUNCTIONS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                     torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}


@dataclass(frozen=True, eq=False)
class LayerCall:
    """A node that applies one conv/linear weight to one data input, with the layer's geometry.

    ``node`` is a call_module of the conv/linear itself, a functional conv/linear (also the masked
    form ``F.conv2d(x, w * mask, ...)``) or MaskPass's ``torch.func.functional_call`` of a
    conv/linear module kept as a leaf (timm's Conv2dSame). ``weight_shape`` is the weight's shape
    (``(out, in // groups, *kernel)`` for a conv, ``(in, out // groups, *kernel)`` transposed,
    ``(out, in)`` for a linear); ``stride`` is ``()`` for a linear.
    """

    layer: Layer
    node: Node
    input: Node
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    groups: int = 1
    transposed: bool = False

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def in_channels(self) -> int:
        if self.transposed:
            return self.weight_shape[0]
        return self.weight_shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        if self.transposed:
            return self.weight_shape[1] * self.groups
        return self.weight_shape[0]


def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _arg(node: Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def layer_call(gm: GraphModule, node: Node) -> LayerCall | None:
    """How ``node`` applies a single conv/linear layer (see ``LayerCall``), else None.

    Nodes applying several layers at once (a leaf module holding a block) and layers whose weight
    or data input is not a graph value are not layer calls.
    """
    if node.op == "call_module" or leaf_call_target(node) is not None:
        target = node.target if node.op == "call_module" else leaf_call_target(node)
        m = gm.get_submodule(target)
        kind = _module_kind(m)
        if kind is None or not _is_traced_leaf(m) or not isinstance(getattr(m, "weight", None), torch.Tensor):
            return None
        if node.op == "call_module":
            args = node.args
        else:
            args = node.args[2] if len(node.args) > 2 else ()
            args = args if isinstance(args, (tuple, list)) else (args,)
        x = args[0] if args else None
        if not isinstance(x, Node):
            return None
        style = "module" if node.op == "call_module" else "leaf"
        layer = Layer(target, f"{target}.weight", kind, node, style, target if style == "leaf" else None)
        shape = tuple(m.weight.shape)
        if kind == "linear":
            return LayerCall(layer, node, x, shape)
        return LayerCall(layer, node, x, shape, _ntuple(m.stride, len(shape) - 2), int(m.groups), bool(m.transposed))
    if node.op != "call_function" or not (node.target in CONV_FUNCTIONS or node.target in LINEAR_FUNCTIONS):
        return None
    layer = layer_of(gm, node)
    x = _arg(node, 0, "input", None)
    w = _arg(node, 1, "weight", None)
    if not isinstance(layer, Layer) or not isinstance(x, Node) or not isinstance(w, Node):
        return None
    shape = _shape(w)
    if shape is None:
        try:
            shape = tuple(_resolve_attr(gm, layer.weight).shape)
        except AttributeError:
            return None
    if layer.kind == "linear":
        return LayerCall(layer, node, x, shape)
    transposed = node.target in _CONV_T_FUNCTIONS
    groups = _arg(node, 6, "groups", 1)  # index 6 in both conv and conv_transpose signatures
    stride = _ntuple(_arg(node, 3, "stride", 1), len(shape) - 2)
    return LayerCall(layer, node, x, shape, stride, int(groups), transposed)


def _shape(node: Any) -> tuple[int, ...] | None:
    """The static shape propagated into ``node.meta["tensor_meta"]``, if any."""
    tm = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    shape = getattr(tm, "shape", None)
    return tuple(shape) if shape is not None else None


# --------------------------------------------------------------------------- pre-activation points
_ADD_FUNCTIONS = {operator.add, torch.add}


def is_residual_add(node: Node, operand: Node) -> bool:
    """True when ``node`` adds ``operand`` to another tensor of the same shape (``f(x) + x``).

    In-place adds are excluded (the sum is then ``operand`` itself, mutated); both operands and the
    sum must have known, equal shapes, so a broadcast add of a bias or a scale never counts.
    """
    if node.op == "call_function":
        if node.target not in _ADD_FUNCTIONS:
            return False
    elif not (node.op == "call_method" and node.target == "add"):
        return False
    tensors = [a for a in node.args[:2] if isinstance(a, Node)]
    if len(tensors) != 2 or operand not in tensors:
        return False
    shapes = {_shape(n) for n in (node, *tensors)}
    return len(shapes) == 1 and None not in shapes


def articulation_nodes(gm: GraphModule) -> set[Node]:
    """The nodes that every path from the graph's inputs to its output goes through.

    A layer in this set has nothing around it: no residual shortcut, no concatenation of its
    input with its output, no parallel branch (VGG's convs, MobileNetV2's convs in blocks without
    a residual add, any network's stem). A layer outside it is bypassed by another path (the
    convs inside a ResNet block, a DenseNet layer). Computed as the dominators of the output in
    the data-flow graph rooted at the inputs (``networkx.immediate_dominators``); parameters,
    buffers and constants (``get_attr``) are not inputs, and a ghost skip or ghost channel branch
    (fxsparse's passes tag its merge node) is not a path: the answer is the original graph's.
    """
    g = nx.DiGraph()
    source = object()  # one root above every placeholder
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            g.add_edge(source, node)
        tag = node.meta.get("fxsparse") or {}
        # a ghost branch (skip or channel) is no path around a layer: its merge reads the main
        # value first (``main + gate * branch``), and only that edge counts
        inputs = node.args[:1] if tag.get("role") == "merge" else node.all_input_nodes
        for inp in inputs:
            g.add_edge(inp, node)
    out = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    if out is None or out not in g or source not in g:
        return set()
    idom = nx.immediate_dominators(g, source)
    if out not in idom:
        return set()
    chain, node = set(), out
    while node is not source:
        chain.add(node)
        node = idom[node]
    return chain


def is_plain(gm: GraphModule) -> bool:
    """True when no path goes around any conv or linear layer (``articulation_nodes`` holds them
    all): a VGG, an MLP. False for a network with residual blocks, concatenations or parallel
    branches around a layer (ResNets, MobileNetV2, DenseNets), and for one with no such layer."""
    plain = articulation_nodes(gm)
    layers = [n for n in gm.graph.nodes if layer_call(gm, n) is not None]
    return bool(layers) and all(n in plain for n in layers)


# ``where = "..."`` of a ghost pass: which layers get the ghost, decided from the traced graph (and,
# for "disconnected", from the masks MaskPass applied to it). "all", or one kind of layer, or a
# union of terms joined by "+" ("bypassed+stem"), where a term is one kind or kinds joined by "&"
# that a layer must all be ("stem+plain&disconnected": the stem, and plain layers the mask cuts).
SITE_KINDS = ("plain", "bypassed", "stem", "disconnected", "grouped", "ungrouped")


def parse_where(where: str) -> tuple[tuple[str, ...], ...]:
    """The terms of a ``where`` value, a union of intersections of kinds (``()`` for ``"all"``):
    ``"stem+plain&disconnected"`` -> ``(("stem",), ("plain", "disconnected"))``. ValueError if
    malformed: an unknown or empty kind, a kind twice in a term, or a term twice."""
    if where == "all":
        return ()
    terms = tuple(tuple(t.split("&")) for t in where.split("+")) if isinstance(where, str) else ()
    if (not terms or any(k not in SITE_KINDS for t in terms for k in t)
            or any(len(set(t)) != len(t) for t in terms) or len({frozenset(t) for t in terms}) != len(terms)):
        raise ValueError(f"where must be 'all', one of {SITE_KINDS}, or several of them joined by '+' (either) "
                         f"and '&' (both) (e.g. 'bypassed+stem', 'stem+plain&disconnected'); got {where!r}")
    return terms


def where_kinds(where: str) -> set[str]:
    """Every kind a ``where`` value names (``parse_where``): ``"disconnected" in where_kinds(w)``
    says whether the masks are read."""
    return {k for term in parse_where(where) for k in term}


def stem_layer(gm: GraphModule, plain: set[Node] | None = None) -> Node | None:
    """The stem: the first conv/linear layer node in graph order, when every input-to-output path
    goes through it (a CIFAR ResNet's or VGG's first conv); None when the input first reaches
    parallel layers (an Inception-style first block has no single stem)."""
    plain = articulation_nodes(gm) if plain is None else plain
    first = next((n for n in gm.graph.nodes if layer_call(gm, n) is not None), None)
    return first if first in plain else None


def disconnected_channels(call: LayerCall, mask: torch.Tensor) -> int:
    """How many of the layer's output channels ``mask`` (the weight's bool mask) cuts off: every
    weight into the channel pruned, so it carries its bias only."""
    m = mask.reshape(call.weight_shape)
    if call.transposed:  # (in, out // groups, *k) -> (out, in // groups, *k)
        g = call.groups
        m = m.reshape(g, m.shape[0] // g, *m.shape[1:]).transpose(1, 2).flatten(0, 1)
    return int((~m.flatten(1).any(1)).sum())


def site_filter(
    gm: GraphModule, where: str,
    masks: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> Callable[[Node], bool]:
    """A predicate on layer nodes for a ``where`` value (``parse_where``): ``"all"``; ``"plain"``,
    layers no other path goes around (``articulation_nodes``: VGG's convs, the stem);
    ``"bypassed"``, layers inside a residual block or another multi-path structure; ``"stem"``,
    the first layer every path goes through (``stem_layer``); ``"disconnected"``, layers whose mask
    (``masks``: {weight name: bool tensor}, or a function returning them, called only when
    ``where`` names this kind, for which they are required) cuts an output channel off
    (``disconnected_channels``); ``"grouped"``, grouped and depthwise convs (``groups > 1``);
    ``"ungrouped"``, every other layer (linears too); ``"a+b"``, layers of either kind; ``"a&b"``,
    layers of both."""
    terms = parse_where(where)
    if not terms:
        return lambda node: True
    kinds = where_kinds(where)
    if "disconnected" in kinds:
        if masks is None:
            raise ValueError(f"where={where!r}: 'disconnected' reads the layers' masks, and none were given")
        masks = masks() if callable(masks) else masks
    # the dominator computation only when a kind reads it
    plain = articulation_nodes(gm) if kinds & {"plain", "bypassed", "stem"} else set()
    stem = stem_layer(gm, plain) if "stem" in kinds else None

    def disconnected(node: Node) -> bool:
        call = layer_call(gm, node)
        mask = masks.get(call.layer.weight) if call is not None else None
        return mask is not None and disconnected_channels(call, mask) > 0

    def groups(node: Node) -> int:
        call = layer_call(gm, node)
        return call.groups if call is not None else 1

    tests = {"plain": lambda n: n in plain, "bypassed": lambda n: n not in plain, "stem": lambda n: n is stem,
             "disconnected": disconnected, "grouped": lambda n: groups(n) > 1, "ungrouped": lambda n: groups(n) == 1}
    return lambda node: any(all(tests[k](node) for k in term) for term in terms)


def describe_where(where: str) -> str:
    """Why a layer was refused under ``where``: the reason stored in a pass's ``skipped``."""
    said = {"plain": "another path goes around this layer",
            "bypassed": "no other path goes around this layer",
            "stem": "this layer is not the stem",
            "disconnected": "no mask cuts an output channel of this layer off",
            "grouped": "this layer is not a grouped or depthwise conv",
            "ungrouped": "this layer is a grouped or depthwise conv (groups > 1)"}
    # refused by every term: by at least one kind of each
    return " and ".join(" or ".join(said[k] for k in term) for term in parse_where(where))


@dataclass(frozen=True, eq=False)
class PreActivation:
    """Where a node's output reaches an activation: the activation and the value it reads.

    ``value`` is the point just before the activation (its data input). ``site`` is the
    ``ActivationSite`` found there (None when a caller's ``is_activation`` predicate matched);
    ``inside_leaf`` means the activation sits inside a channel-wise leaf module (timm's
    BatchNormAct2d), so the point just before it is inside that module and ``value`` is the leaf's
    input. ``path`` lists the nodes crossed from the start in order (channel-wise ops and residual
    adds), ``adds`` the residual adds among them.
    """

    activation: Node
    value: Node
    site: ActivationSite | None
    path: tuple[Node, ...] = ()
    adds: tuple[Node, ...] = ()

    @property
    def inside_leaf(self) -> bool:
        return self.site is not None and self.site.style == "leaf"


def activation_reach(
    gm: GraphModule,
    node: Node,
    *,
    max_adds: int = 1,
    is_activation: Callable[[Node], bool] | None = None,
) -> list[PreActivation]:
    """The next activations ``node``'s output reaches through channel-wise ops and residual adds.

    Follows the output forward through channel-wise ops (``is_channelwise``: BatchNorm, dropout,
    identity, DropPath, norm+act leaves without an activation) and stops at the first activation
    on each path: an activation node, a channel-wise leaf holding an activation (BatchNormAct2d),
    or a node ``is_activation`` accepts (e.g. a node another pass put in place of an activation).
    Where no activation is reached that way, it goes on through residual adds
    (``is_residual_add``), at most ``max_adds`` of them; a value that already reaches an
    activation is the end of its block, so the adds after it (a pre-activation network's next
    residual) are not followed. Used to find where ToST's skip edges land: for the second conv
    of a residual block, ``conv2 -> bn2 -> add -> relu`` gives the add as ``value``; RepVGG's
    ``conv3x3 + conv1x1 + identity`` gives the second add with ``max_adds=2``.

    Returns one ``PreActivation`` per activation reached, in graph order.
    """
    found: dict[Node, PreActivation] = {}
    frontier: list[tuple[Node, tuple[Node, ...], tuple[Node, ...]]] = [(node, (), ())]
    while frontier:
        start, start_path, adds = frontier.pop()
        closure, stack, reached = [], [(start, start_path)], False
        while stack:  # the channel-wise closure of ``start``
            cur, path = stack.pop()
            closure.append((cur, path))
            for user in cur.users:
                main = user.args[0] if user.args else None
                if main is not cur:
                    continue
                site = _activation_site(gm, user)
                if site is not None or (is_activation is not None and is_activation(user)):
                    found.setdefault(user, PreActivation(user, cur, site, path, adds))
                    reached = True
                elif is_channelwise(gm, user):
                    stack.append((user, path + (user,)))
        if reached or len(adds) >= max_adds:
            continue
        for cur, path in closure:
            for user in cur.users:
                if is_residual_add(user, cur):
                    frontier.append((user, path + (user,), adds + (user,)))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(found.values(), key=lambda p: order[p.activation])


def _activation_site(gm: GraphModule, node: Node) -> ActivationSite | None:
    """The activation ``node`` applies to its input: its own, or that of a channel-wise leaf."""
    sites = list(_sites_at(gm, node))
    if not sites:
        return None
    if sites[0].style == "leaf" and not is_channelwise(gm, node):
        return None  # a leaf block with an activation somewhere inside: not the next op
    return sites[0]
