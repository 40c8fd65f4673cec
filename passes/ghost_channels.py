"""Ghost channels: temporary extra width between a producer layer and its one consumer.

For a producer layer P (conv or linear) whose output reaches exactly one consumer layer C only
through channel-wise ops (BatchNorm, activation, dropout), ``GhostChannelPass`` adds a branch that
behaves like k extra output channels of P feeding k extra input channels of C::

    x ──► P ──► bn ──► act ──► C ──────────────────────► (+) ──► users of C
    │                                                      ▲
    └──► P' (k ch) ─► bn' ─► act' ─► C' (k in-ch) ─► gamma *

``P'`` has P's kernel size, stride, padding and dilation; ``bn'``, ``act'`` are fresh copies of the
chain's ops for k channels (their own parameters and running statistics); ``C'`` is the ghost
slice of C's kernel, shape ``(C.out, k, *C.kernel)`` (``(C.out, k)`` for a linear C), applied with
C's stride/padding/dilation and without C's bias. ``gamma`` is the gate ``fxsparse.gates.
ghost_channels``; at 0 the graph computes ``C(x) + 0 * ghost``, exactly the original.

Everything the branch owns lives in ``gm.fxsparse.ghost_channels.<site>`` (a ``GhostChannelBranch``);
``<site>`` is the producer's module name with dots replaced by underscores (the producer's node
name in the unmasked trace). With ``masked=True`` the ghost weights get random bool masks at the
density of the producer's (for P') and the consumer's (for C') masks, multiplied in inside the
graph like ``MaskPass`` does. ``RemoveGhostChannelsPass`` deletes the branch again. See
docs/ghost-channels.md.
"""
from __future__ import annotations

import copy
import logging
import math
import operator
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from fxsparse import gates
from fxsparse.dropout import DROPOUT_FUNCTIONS, is_dropout_module
from fxsparse.errors import PassError
from fxsparse.fused import apply_mask
from fxsparse.graph import (
    CONV_FUNCTIONS, LINEAR_FUNCTIONS, Layer, describe_where, is_channelwise, layer_of, parameterized_layers,
    parse_where, site_filter,
)
from fxsparse.masks.ranking import random_mask
from fxsparse.passes.mask import masked_parameters
from fxsparse.pass_infra import (
    CONTAINER, FxSparsePass, container, delete_container, require_tagged_state, tagged_nodes,
)

__all__ = [
    "GhostChannelPass", "RemoveGhostChannelsPass", "GhostChannelBranch", "remove_ghost_channels",
    "GROUP", "INITS",
]

GROUP = "ghost_channels"
INITS = ("kaiming", "default", "zero_slice")

log = logging.getLogger("fxsparse.passes")

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PLAIN_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}
_TRANSPOSED = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
               torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
# Functional norms read the original layer's statistics and affine tensors: a ghost copy of the
# node would share (and update) them, so such chains are skipped.
_FUNCTIONAL_NORMS = {F.batch_norm, F.instance_norm}
# Per-channel tensors of modules without reset_parameters (FrozenBatchNorm2d and friends)
_FRESH = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


class _Skip(Exception):
    """A candidate site that cannot get ghost channels: a short ``kind`` and the full reason."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


# --------------------------------------------------------------------------- layer geometry
@dataclass(frozen=True)
class _Geometry:
    """How a conv/linear node applies its weight, enough to apply another weight the same way."""

    kind: str  # "conv" | "linear"
    fn: Callable  # F.conv2d, torch.conv2d, F.linear, ...
    out_channels: int
    in_channels: int  # total input channels (in per group * groups)
    kernel: tuple[int, ...]  # () for linear
    groups: int = 1
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1

    def call(self, graph, x: Node, weight: Node, bias: Node | None, groups: int = 1) -> Node:
        if self.kind == "linear":
            return graph.call_function(self.fn, (x, weight, bias))
        return graph.call_function(self.fn, (x, weight, bias, self.stride, self.padding, self.dilation, groups))


def _geometry(gm: GraphModule, layer: Layer) -> _Geometry:
    node = layer.node
    try:
        w = gm.get_parameter(layer.weight)
    except AttributeError:
        raise _Skip("weight is not a parameter", f"{layer.weight} is a buffer or an attribute") from None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m).forward not in _PLAIN_FORWARDS:
            raise _Skip("custom conv module", f"{layer.name} is a {type(m).__name__} with its own forward "
                        f"(it may pad or transform the weight)")
        if m._forward_hooks or m._forward_pre_hooks or len(node.args) != 1 or node.kwargs:
            raise _Skip("hooked or unusual call", f"{layer.name} has hooks or is called with extra arguments")
        if isinstance(m, nn.Linear):
            return _Geometry("linear", F.linear, m.out_features, m.in_features, ())
        if m.padding_mode != "zeros":
            raise _Skip("padding_mode", f"{layer.name} uses padding_mode={m.padding_mode!r}")
        return _Geometry("conv", _CONV_FN[len(m.kernel_size)], m.out_channels, m.in_channels,
                         tuple(m.kernel_size), m.groups, m.stride, m.padding, m.dilation)
    if node.op != "call_function" or node.target in _TRANSPOSED:
        raise _Skip("not a plain conv/linear", f"{layer.name} is applied by {node.format_node()}")
    if node.target in LINEAR_FUNCTIONS:
        if w.dim() != 2:
            raise _Skip("unexpected weight shape", f"{layer.weight} has shape {tuple(w.shape)}, not (out, in)")
        return _Geometry("linear", node.target, w.shape[0], w.shape[1], ())
    assert node.target in CONV_FUNCTIONS
    bound = {**_CONV_DEFAULTS, **dict(zip(_CONV_ARGS, node.args)), **node.kwargs}
    geo = {k: bound[k] for k in ("stride", "padding", "dilation", "groups")}
    dynamic: list[Node] = []
    torch.fx.node.map_arg(list(geo.values()), dynamic.append)
    if dynamic:
        raise _Skip("dynamic geometry", f"{layer.name}: stride/padding/dilation/groups are computed at run time")
    if w.dim() < 3:
        raise _Skip("unexpected weight shape", f"{layer.weight} has shape {tuple(w.shape)}, not a conv kernel")
    return _Geometry("conv", node.target, w.shape[0], w.shape[1] * geo["groups"], tuple(w.shape[2:]), **geo)


# --------------------------------------------------------------------------- the chain P -> C
@dataclass(frozen=True, eq=False)
class _Op:
    """One channel-wise op of the original architecture on the path from P to C.

    The ghost chain calls a fresh copy of ``module`` (a call_module target) or, when ``module`` is
    None, the node's own function/method, on the ghost tensor followed by ``args``/``kwargs``.
    """

    node: Node  # the op in the graph (for an unfolded BatchNormAct2d leaf: its norm part)
    module: str | None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, node: Node) -> "_Op":
        module = node.target if node.op == "call_module" else None
        return cls(node, module, tuple(node.args[1:]), dict(node.kwargs))


def _tag(node: Node) -> tuple[str | None, str | None]:
    t = node.meta.get("fxsparse") or {}
    return t.get("group"), t.get("role")


def _reads_once(node: Node, value: Node, position: int | None = 0) -> bool:
    """``node`` reads ``value`` exactly once, as its positional argument ``position`` (None: anywhere)."""
    seen: list[Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: seen.append(n) if n is value else None)
    if position is None:
        return len(seen) == 1
    return len(node.args) > position and node.args[position] is value and len(seen) == 1


def _readers(value: Node) -> list[Node]:
    """The nodes reading ``value``, less ghost skip branches (they read a conv's input, which is
    the end of some chain, as a side branch of their own)."""
    return [u for u in value.users if _tag(u) != ("ghost_skips", "branch")]


def _ghost_neuron_unit(value: Node) -> tuple[Node, Node] | None:
    """(activation, blend) when ``value`` feeds GhostNeuronPass's blend of an activation and its
    soft twin, ``ghost_blend(act(value), soft(value), lam)``, and nothing else."""
    users = _readers(value)
    fused = [u for u in users if _tag(u) == ("ghost_neurons", "blend") and (u.meta["fxsparse"].get("fused"))]
    if len(users) == 2 and len(fused) == 1:  # ghost_relu_blend(act(value), value, lam) (fxsparse.fused)
        (blend,) = fused
        act = blend.args[0]
        if set(users) != {act, blend} or blend.args[1] is not value or not _reads_once(act, value):
            return None
        return (act, blend) if list(act.users) == [blend] else None
    blends = {b for u in users for b in u.users if _tag(b) == ("ghost_neurons", "blend")}
    if len(users) != 2 or len(blends) != 1:
        return None
    (blend,) = blends
    act, soft = blend.args[0], blend.args[1]
    if set(users) != {act, soft} or _tag(soft) != ("ghost_neurons", "soft"):
        return None
    if not _reads_once(act, value) or len(act.users) != 1 or len(soft.users) != 1:
        return None
    return act, blend


def _walk(gm: GraphModule, producer: Layer) -> tuple[Layer, list[_Op]] | None:
    """Follow P's output through channel-wise ops to the one layer that reads it.

    Returns (consumer, ops) or None when the output goes anywhere else (two readers, a residual
    add, a concat, pooling, a leaf, the output). On a graph without other ghosts this finds what
    ``fxsparse.graph.channel_chains`` reports as ``single_consumer`` (along a simple path). Other
    ghosts' rewrites are seen through so that the ghost chain copies the *original* ops and never
    depends on another ghost group's nodes or state: a ghost skip's merge is left out, a ghost
    neuron's blend contributes its original activation, a BatchNormAct2d leaf that GhostSkipPass
    unfolded contributes the whole leaf once, a ghost skip branch reading C's input is ignored.
    """
    value, ops, unfolded = producer.node, [], None
    while True:
        unit = _ghost_neuron_unit(value)
        if unit is not None:
            ops.append(_Op.of(unit[0]))
            value = unit[1]
            continue
        users = _readers(value)
        if len(users) != 1:
            return None
        (node,) = users
        group, role = _tag(node)
        if group == "ghost_skips" and role == "merge" and _reads_once(node, value):
            value = node  # main + alpha * skip: the ghost channels get no skip
            continue
        if group == "ghost_skips" and role == "unfold":
            t = node.meta["fxsparse"]
            # the norm part's form is GhostSkipPass's business; the leaf it came from is in the tag
            if t.get("part") == "norm" and _reads_once(node, value, None):
                ops.append(_Op(node, t["leaf"]))  # the whole leaf: norm, drop and act
                unfolded = t["leaf"]
            elif not (t.get("part") in ("drop", "act") and t["leaf"] == unfolded and _reads_once(node, value)):
                return None
            value = node
            continue
        found = layer_of(gm, node)
        if found is not None:
            if isinstance(found, Layer) and not found.inside_leaf and _reads_once(node, value):
                return found, ops
            return None
        if group is not None or not is_channelwise(gm, node) or not _reads_once(node, value):
            return None
        ops.append(_Op.of(node))
        value = node


def _is_dropout(gm: GraphModule, op: _Op) -> bool:
    if op.module is not None:
        return is_dropout_module(gm.get_submodule(op.module))
    return op.node.op == "call_function" and op.node.target in DROPOUT_FUNCTIONS


def _has_channel_state(module: nn.Module, channels: int) -> bool:
    """A module with per-channel tensors (a norm, a PReLU): it indexes channels along dim 1."""
    return any(t.dim() == 1 and t.shape[0] == channels for t in (*module.parameters(), *module.buffers()))


def _ghost_activation_type() -> type | None:
    try:
        from fxsparse.passes.ghost_neurons import GhostActivation
    except ImportError:
        return None
    return GhostActivation


def _per_channel(t: torch.Tensor | None, channels: int) -> bool:
    return t is not None and t.dim() == 1 and t.shape[0] == channels


def _shared_modules(gm: GraphModule) -> dict[int, nn.Module]:
    """Modules under gm.fxsparse (the gates a GhostActivation refers to), as a deepcopy memo that
    keeps them shared, never copied; built once per pass (hundreds of modules: masks, gates)."""
    shared = container(gm, create=False)
    return {id(x): x for x in shared.modules()} if shared is not None else {}


def _ghost_module(gm: GraphModule, module: nn.Module, channels: int, k: int,
                  shared: dict[int, nn.Module] | None = None) -> nn.Module:
    """A fresh copy of a channel-wise module for ``k`` ghost channels.

    Per-channel tensors (1-d, ``channels`` long: BN weight/bias/running stats, PReLU slopes) are
    re-created with ``k`` entries and re-initialized, so the copy shares no state with the original
    and starts from the module type's defaults; everything else (eps, momentum, activation, p) is
    kept. A ghost neuron swapped into the module (``GhostActivation``) is copied as the original
    activation it stands in for.
    """
    memo = dict(_shared_modules(gm) if shared is None else shared)  # deepcopy adds to its memo
    # the per-channel tensors are replaced below: not cloned first (a tenth of the pass's time)
    memo.update({id(t): t for sub in module.modules() for t in (*sub._parameters.values(), *sub._buffers.values())
                 if _per_channel(t, channels)})
    m = copy.deepcopy(module, memo)
    ghost_act = _ghost_activation_type()
    if ghost_act is not None:
        if isinstance(m, ghost_act):
            m = m.act
        for sub in m.modules():
            for slot, child in sub._modules.items():
                if isinstance(child, ghost_act):
                    sub._modules[slot] = child.act
    for sub in m.modules():
        resized = []
        for store in (sub._parameters, sub._buffers):
            for name, t in list(store.items()):
                if not _per_channel(t, channels):
                    continue
                fresh = torch.empty(k, dtype=t.dtype, device=t.device)
                store[name] = nn.Parameter(fresh, t.requires_grad) if isinstance(t, nn.Parameter) else fresh
                resized.append(name)
        if not resized:
            continue
        for attr in ("num_features", "num_parameters"):
            if isinstance(getattr(sub, attr, None), int):
                setattr(sub, attr, k)
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()  # BatchNorm: also zeroes running stats and num_batches_tracked
        else:
            unknown = [n for n in resized if n not in _FRESH]
            if unknown:
                raise _Skip("unknown per-channel state",
                            f"cannot initialize {type(sub).__name__}.{unknown[0]} for ghost channels")
            with torch.no_grad():
                for name in resized:
                    getattr(sub, name).fill_(_FRESH[name])
    return m


# --------------------------------------------------------------------------- branch state
class GhostChannelBranch(nn.Module):
    """What one ghost-channel site owns; the graph applies it (this module has no forward).

    ``weight`` (+ ``bias``, ``weight_mask``, ``index`` for a grouped producer) computes the ghost
    channels from the producer's input, ``ops`` are the fresh copies of the chain's channel-wise
    modules, and ``slice_weight`` (+ ``slice_mask``) is the consumer's kernel slice for them.
    """

    def __init__(self, producer: str, consumer: str, channels: int):
        super().__init__()
        self.producer, self.consumer, self.channels = producer, consumer, channels
        self.ops = nn.ModuleList()

    def extra_repr(self) -> str:
        return f"producer={self.producer}, consumer={self.consumer}, channels={self.channels}"


@dataclass(eq=False)
class _Site:
    name: str
    producer: Layer
    consumer: Layer
    pgeo: _Geometry
    cgeo: _Geometry
    ops: list[_Op]
    k: int
    branch: GhostChannelBranch | None = None
    op_modules: dict[_Op, int] = field(default_factory=dict)  # op -> index of its copy in branch.ops


def _site_name(layer: Layer) -> str:
    return layer.name.replace(".", "_") or "root"


def _density(gm: GraphModule, param: str) -> float:
    """Kept fraction of ``param``'s mask (1.0 when it has none)."""
    from fxsparse.passes.mask import get_mask

    mask = get_mask(gm, param)
    if mask is None:
        return 1.0
    return int(torch.count_nonzero(mask)) / mask.numel()  # count_nonzero: 5x a bool sum's speed


def _init_(w: torch.Tensor, fan_in: int, init: str, gen: torch.Generator, zero: bool = False) -> None:
    with torch.no_grad():
        if zero:
            w.zero_()
        elif init == "default":  # torch's own conv/linear init: kaiming_uniform(a=sqrt(5))
            bound = 1.0 / math.sqrt(fan_in)
            w.uniform_(-bound, bound, generator=gen)
        else:  # He normal for ReLU networks
            w.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)


# --------------------------------------------------------------------------- the pass
class GhostChannelPass(FxSparsePass):
    """Give every eligible producer k = max(1, round(ratio * out_channels)) ghost channels.

    Args:
        ratio: ghost channels per producer output channel (> 0).
        masked: mask the ghost weights at the producer's / consumer's density (random masks);
            ``False`` makes them dense. Layers without a mask give dense ghosts either way.
        initial_gate: start value of the gate ``gamma`` (1 = ghost fully on, 0 = identity).
        init: ``"kaiming"`` (He normal; the slice uses the fan-in of the widened consumer,
            ``(C.in + k) * kernel``), ``"default"`` (torch's own layer init, same fans), or
            ``"zero_slice"`` (producer He normal, slice zeros: the ghost contributes nothing until
            the slice has learned something).
        dropout: copy the chain's dropout ops into the branch (same p). A ghost dropout draws from
            the global RNG, which shifts the draws of random ops that run after it; ``False``
            leaves them out so train-mode outputs at gate 0 stay bit-identical in every model.
        seed: seeds the ghost weights and masks (each site draws from its own generator).
        where: which producers get ghost channels, read from the traced graph with the grammar of
            ``GhostSkipPass``'s ``where`` (``fxsparse.graph.site_filter``): ``"all"``, or kinds
            such as ``"ungrouped"`` (every producer but grouped and depthwise convs),
            ``"grouped"``, ``"plain"``, ``"bypassed"``, ``"stem"``, ``"disconnected"`` (MaskPass's
            masks, read when the pass runs), joined by ``+`` (either) and ``&`` (both). Ghost skip
            branches already in the graph are no path around a layer here. Refused producers are
            counted as ``skipped`` with the reason.

    Sites: conv/linear producers whose output reaches exactly one conv/linear consumer, as its
    input, through channel-wise ops only (``fxsparse.graph.is_channelwise``; what
    ``channel_chains`` reports as ``single_consumer``). Ghost neurons and ghost skips already in
    the chain are seen through; the branch copies the original ops (see ``_walk``). Skipped, with
    the reason logged: grouped/depthwise consumers, custom conv modules (their own ``forward``),
    transposed convs, conv -> linear layouts, functional norms in the chain. Grouped producers
    are handled: ghost channel j is one more filter of group ``j % groups`` (reading that
    group's input channels).

    Stats: ``sites``, ``channels`` (ghost channels added in total), ``skipped``.
    """

    group = GROUP

    def __init__(self, ratio: float = 0.25, *, masked: bool = True, initial_gate: float = 1.0,
                 init: str = "kaiming", dropout: bool = True, seed: int = 0, where: str = "all"):
        super().__init__()
        if not ratio > 0:
            raise PassError(f"GhostChannelPass: ratio must be > 0 (ghost channels per producer channel); got {ratio}")
        if not 0.0 <= initial_gate <= 1.0:
            raise PassError(f"GhostChannelPass: initial_gate must lie in [0, 1]; got {initial_gate}")
        if init not in INITS:
            raise PassError(f"GhostChannelPass: init must be one of {INITS}; got {init!r}")
        self.ratio, self.masked, self.initial_gate = float(ratio), masked, float(initial_gate)
        try:
            parse_where(where)
        except ValueError as bad:
            raise PassError(f"GhostChannelPass: {bad}") from None
        self.init, self.dropout, self.seed, self.where = init, dropout, seed, where
        self.sites: list[dict[str, Any]] = []  # what the last call added
        self._names: set[str] = set()

    def requires(self, gm: GraphModule) -> None:
        super().requires(gm)
        if tagged_nodes(gm, group=GROUP) or container(gm, GROUP, create=False) is not None:
            raise PassError(
                "GhostChannelPass: this graph already has ghost channels. Remove them first "
                "(fxsparse.passes.ghost_channels.remove_ghost_channels(gm)) to apply them again."
            )

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        for merge in tagged_nodes(gm, group=GROUP, role="merge"):
            if (merge.args[0].meta.get("fxsparse") or {}).get("group") == GROUP:
                raise PassError(f"GhostChannelPass: {merge.name} merges into a ghost node, not a layer")

    # ------------------------------------------------------------------ planning
    def _plan(self, gm: GraphModule, P: Layer, C: Layer, ops: list[_Op]) -> _Site:
        pgeo, cgeo = _geometry(gm, P), _geometry(gm, C)
        if P.weight == C.weight:
            raise _Skip("shared weight", f"{P.weight} is both producer and consumer")
        if pgeo.kind != cgeo.kind or len(pgeo.kernel) != len(cgeo.kernel):
            raise _Skip("layout mismatch", f"{P.kind} {P.name} feeds {C.kind} {C.name}: channels are another dim")
        if cgeo.groups != 1:
            raise _Skip("grouped consumer", f"{C.name} (groups={cgeo.groups}) has no room for extra input channels")
        if cgeo.in_channels != pgeo.out_channels:
            raise _Skip("channel mismatch", f"{C.name} reads {cgeo.in_channels} channels, {P.name} makes "
                        f"{pgeo.out_channels}")
        for op in ops:
            if op.module is None and op.node.target in _FUNCTIONAL_NORMS:
                raise _Skip("functional norm", f"{op.node.name}: a copy would share the original's statistics")
            if pgeo.kind == "linear" and op.module is not None and _has_channel_state(
                    gm.get_submodule(op.module), pgeo.out_channels):
                # per-channel modules index dim 1; a linear's features are the last dim
                shape = getattr(op.node.meta.get("tensor_meta"), "shape", None)
                if shape is None or len(shape) != 2:
                    raise _Skip("layout mismatch", f"{op.node.name} after linear {P.name} indexes dim 1, "
                                f"not the features")
        k = max(1, round(self.ratio * pgeo.out_channels))
        site = _Site(self._unique_name(_site_name(P)), P, C, pgeo, cgeo, list(ops), k)
        self._build_branch(gm, site)
        return site

    def _unique_name(self, base: str) -> str:
        # "a.b_c" and "a_b.c" would both be "a_b_c"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _build_branch(self, gm: GraphModule, site: _Site) -> None:
        """Create the site's parameters, masks and op copies (nothing touches the graph yet)."""
        P, C, pgeo, cgeo, k = site.producer, site.consumer, site.pgeo, site.cgeo, site.k
        pw, cw = gm.get_parameter(P.weight), gm.get_parameter(C.weight)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(site.name.encode()))
        branch = GhostChannelBranch(P.name, C.name, k)
        kernel = math.prod(pgeo.kernel)
        per_group = pgeo.in_channels // pgeo.groups

        weight = torch.empty(k, per_group, *pgeo.kernel, dtype=pw.dtype)
        _init_(weight, per_group * kernel, self.init, gen)
        branch.weight = nn.Parameter(weight.to(pw.device))
        if self.masked:
            branch.register_buffer("weight_mask", random_mask(weight.shape, _density(gm, P.weight), gen).to(pw.device))
        if self._has_bias(gm, P):
            bias = torch.zeros(k, dtype=pw.dtype)
            if self.init == "default":
                _init_(bias, per_group * kernel, "default", gen)
            branch.bias = nn.Parameter(bias.to(pw.device))
        if pgeo.groups > 1:
            # ghost channel j is one more filter of group j % groups: select that group's inputs
            g = torch.arange(k) % pgeo.groups
            index = (g[:, None] * per_group + torch.arange(per_group)).flatten()
            branch.register_buffer("index", index.to(pw.device))

        slice_weight = torch.empty(cgeo.out_channels, k, *cgeo.kernel, dtype=cw.dtype)
        _init_(slice_weight, (cgeo.in_channels + k) * math.prod(cgeo.kernel), self.init, gen,
               zero=self.init == "zero_slice")
        branch.slice_weight = nn.Parameter(slice_weight.to(cw.device))
        if self.masked:
            branch.register_buffer(
                "slice_mask", random_mask(slice_weight.shape, _density(gm, C.weight), gen).to(cw.device))

        if not self.dropout:
            site.ops = [op for op in site.ops if not _is_dropout(gm, op)]
        for op in site.ops:
            if op.module is not None:
                site.op_modules[op] = len(branch.ops)
                branch.ops.append(_ghost_module(gm, gm.get_submodule(op.module), pgeo.out_channels, k,
                                                self._shared))
        site.branch = branch

    @staticmethod
    def _has_bias(gm: GraphModule, layer: Layer) -> bool:
        node = layer.node
        if node.op == "call_module":
            return gm.get_submodule(node.target).bias is not None
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return bias is not None

    # ------------------------------------------------------------------ rewrite
    def call(self, gm: GraphModule) -> PassResult:
        self.sites, self._names = [], set()  # self.skipped: producer -> "kind: reason" (FxSparsePass resets it)
        self._shared = _shared_modules(gm)
        reasons: Counter[str] = Counter()
        planned = []
        wanted = site_filter(gm, self.where, masks=lambda: masked_parameters(gm))  # listed only if read
        for layer in parameterized_layers(gm):
            if layer.inside_leaf or layer.weight.startswith(CONTAINER + "."):
                continue  # layers inside leaves have no graph node of their own; never ghost a ghost
            found = _walk(gm, layer)
            if found is None:
                continue
            if not wanted(layer.node):
                self.skipped[layer.name] = f"where={self.where!r}: {describe_where(self.where)}"
                reasons["where"] += 1
                continue
            try:
                planned.append(self._plan(gm, layer, *found))
            except _Skip as e:
                self.skipped[layer.name] = str(e)
                reasons[e.kind] += 1
                log.debug("GhostChannelPass: skipping %s: %s", layer.name, e)
        if self.skipped:
            self.stats["skipped"] = len(self.skipped)
            log.info("GhostChannelPass skipped %d candidate sites: %s", len(self.skipped),
                     ", ".join(f"{r} ({n})" for r, n in reasons.most_common()))
        if not planned:
            return PassResult(gm, False)

        gate = gates.register(gm, GROUP, self.initial_gate)
        root = container(gm, GROUP)
        for site in planned:
            root.add_module(site.name, site.branch)
            with self.at(site.producer.node):
                self._insert(gm, site, gate)
            self.stats["sites"] += 1
            self.stats["channels"] += site.k
            self.sites.append({"site": site.name, "producer": site.producer.name,
                               "consumer": site.consumer.name, "channels": site.k})
        return PassResult(gm, True)

    def _insert(self, gm: GraphModule, site: _Site, gate_target: str) -> None:
        graph, branch = gm.graph, site.branch
        prefix = f"{CONTAINER}.{GROUP}.{site.name}"
        P, C = site.producer.node, site.consumer.node
        tag = lambda node, role, **kw: self.tag(node, role, site=site.name, **kw)  # noqa: E731

        def weight(name: str, mask: str, role: str) -> Node:
            w = tag(graph.get_attr(f"{prefix}.{name}"), role, part="weight")
            if mask in branch._buffers:
                m = tag(graph.get_attr(f"{prefix}.{mask}"), role, part="mask")
                w = tag(graph.call_function(apply_mask, (w, m)), role, part="masked_weight")  # w * m
            return w

        # The ghost producer reads P's input right after P does (an in-place op later in the
        # graph could otherwise change what it reads).
        with graph.inserting_before(P.next):
            x = P.args[0]
            if "index" in branch._buffers:
                idx = tag(graph.get_attr(f"{prefix}.index"), "branch", part="index")
                x = tag(graph.call_function(torch.index_select, (x, 1, idx)), "branch", part="select")
            w = weight("weight", "weight_mask", "branch")
            b = tag(graph.get_attr(f"{prefix}.bias"), "branch", part="bias") if "bias" in branch._parameters else None
            groups = site.k if site.pgeo.groups > 1 else 1
            ghost = tag(site.pgeo.call(graph, x, w, b, groups), "branch", part="producer")

        # The chain copies run after C, so a ghost dropout draws after every original draw up to C.
        with graph.inserting_before(C.next):
            for op in site.ops:
                if op.module is not None:
                    target = f"{prefix}.ops.{site.op_modules[op]}"
                    ghost = graph.call_module(target, (ghost, *op.args), dict(op.kwargs))
                else:
                    ghost = graph.create_node(op.node.op, op.node.target, (ghost, *op.args), dict(op.kwargs))
                tag(ghost, "branch", part="op", copy_of=op.module or op.node.name)
            sw = weight("slice_weight", "slice_mask", "slice")
            contribution = tag(site.cgeo.call(graph, ghost, sw, None), "slice", part="consumer")
            g = tag(graph.get_attr(gate_target), "gate")
            scaled = tag(graph.call_function(operator.mul, (g, contribution)), "scaled")
            merge = tag(graph.call_function(operator.add, (C, scaled)), "merge",
                        producer=site.producer.weight, consumer=site.consumer.weight, channels=site.k)
        C.replace_all_uses_with(merge, delete_user_cb=lambda user: user is not merge)



# --------------------------------------------------------------------------- removal
class RemoveGhostChannelsPass(FxSparsePass):
    """Delete every ghost-channel branch, its container and the gate.

    Each consumer's users read the consumer again; the graph is then structurally equal to the
    graph before ``GhostChannelPass`` ran. Untagged nodes left without users that read a deleted
    node (e.g. another pass's rewrite inside a branch) go with it.

    Stats: ``sites`` (branches removed), ``nodes`` (graph nodes deleted).
    """

    group = GROUP

    def requires(self, gm: GraphModule) -> None:
        super().requires(gm)
        require_tagged_state(gm, GROUP, self.name)

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        for merge in tagged_nodes(gm, group=GROUP, role="merge"):
            merge.replace_all_uses_with(merge.args[0])
            self.stats["sites"] += 1
        doomed = set(tagged_nodes(gm, group=GROUP))
        for node in reversed(list(graph.nodes)):
            if node not in doomed and not (not node.users and any(i in doomed for i in node.all_input_nodes)):
                continue
            if node.users:
                raise PassError(f"RemoveGhostChannelsPass: {node.format_node()} is still used by "
                                f"{[u.name for u in node.users]}; was the graph edited after GhostChannelPass?")
            doomed.add(node)
            graph.erase_node(node)
            self.stats["nodes"] += 1
        had_state = container(gm, GROUP, create=False) is not None or GROUP in gates.get(gm)
        delete_container(gm, GROUP)
        gates.unregister(gm, GROUP)
        return PassResult(gm, bool(self.stats) or had_state)

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        left = tagged_nodes(gm, group=GROUP)
        if left:
            raise PassError(f"RemoveGhostChannelsPass left ghost nodes behind: {[n.name for n in left[:10]]}")


GhostChannelPass.removal = RemoveGhostChannelsPass


def remove_ghost_channels(gm: GraphModule) -> GraphModule:
    """Remove every ghost channel from ``gm`` now (in place); returns ``gm``."""
    return RemoveGhostChannelsPass()(gm).graph_module
