"""Ghost skip connections (ToST's GSC) on any traced graph, and their removal.

ToST (VITA-Group/ToST, ``skip_connection/models/resnet_modified2.py``) hand-writes two extra
branches into ResNet's BasicBlock: a 1x1 convolution (stride of the main conv, no bias, weights
filled with the constant 1e-4) followed by its own BatchNorm, from a 3x3 conv's *input* to the
point just before the next activation::

    out = relu(bn1(conv1(x))      + alpha * bn_j1(jump1(x)))          # jump1: 1x1, conv1's stride
    out = relu(bn2(conv2(out)) + shortcut(x) + alpha * bn_j2(jump2(out)))

``GhostSkipPass`` finds those places in any graph: every 2-D conv with a kernel larger than
``min_kernel - 1`` in some dimension (depthwise and grouped convs included) whose output reaches
an activation through channel-wise ops (BatchNorm, dropout, identity, DropPath) and residual
adds of the same block (``fxsparse.graph.activation_reach``). Each gets a ``GhostSkipBranch`` (a
1x1 conv from the conv's input channels to its output channels with the conv's groups and
stride, the padding that makes the spatial shapes agree, then BatchNorm2d) and the graph
computes, at the point just before the activation::

    merge = main + alpha * branch(x)          # alpha: the gate fxsparse.gates.ghost_skips

At ``alpha == 0`` this is exactly ``main`` (``main + 0 * b == main`` for finite ``b``; the branch
is a 1x1 conv and a BatchNorm with ``eps > 0``, finite for finite inputs) and the gradient that
reaches the original parameters is exactly the original one: ``add`` passes it through unchanged
and the branch sends back exact zeros. In train mode the branch's BatchNorm updates only its own
running statistics.

timm's ``BatchNormAct2d`` keeps BatchNorm and activation in one leaf module, so the point just
before its activation is inside the leaf. The pass then *unfolds* the leaf into the three calls
its forward makes (BatchNorm2d's forward through a ``BatchNormPart``, ``.drop``, ``.act``; role
``unfold``), which compute bit-for-bit what the leaf computed, and merges between them; removal
folds them back.

With ``include_linear=True``, pointwise layers in MLP blocks (a ``Linear`` or 1x1 conv followed
by an activation whose output reaches one other pointwise layer: ViT/Swin MLPs, ConvNeXt's
ConvMlp) get the analogous branch into the point before the activation. See
docs/ghost-skips.md for the choice of the token branch's normalization.

Everything the pass adds lives in ``gm.fxsparse.ghost_skips.<site>`` (``<site>``: the main
layer's module name with dots as underscores, which is its node name in the unmasked trace)
and the gate ``gm.fxsparse.gates.ghost_skips``; every node it adds is tagged (roles ``gate``,
``branch``, ``scaled``, ``merge``, ``unfold``; each with ``site``). ``RemoveGhostSkipsPass``
deletes them and leaves a graph structurally identical to the one before the pass.
"""
from __future__ import annotations

import logging
import collections
import math
import operator
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxsparse import gates
from fxsparse.dropout import is_dropout_module
from fxsparse.errors import PassError
from fxsparse.fused import apply_mask
from fxsparse.graph import (
    LayerCall, PreActivation, activation_reach, channel_chains, describe_where, layer_call, parse_where,
    site_filter,
)
from fxsparse.masks.ranking import random_mask
from fxsparse.passes.mask import masked_parameters
from fxsparse.pass_infra import (
    CONTAINER, FxSparsePass, container, delete_container, require_tagged_state, tagged_nodes,
)

__all__ = [
    "GhostSkipPass", "RemoveGhostSkipsPass", "GhostSkipBranch", "BatchNormPart", "remove_ghost_skips",
    "GROUP", "LINEAR_NORMS",
]

GROUP = "ghost_skips"
LINEAR_NORMS = ("batch", "layer", "none")
# Residual adds a conv's output may cross on its way to the activation: one in a ResNet block,
# two in RepVGG's conv3x3 + conv1x1 + identity. activation_reach never crosses into the next block.
MAX_ADDS = 2

log = logging.getLogger("fxsparse.passes")


# --------------------------------------------------------------------------- the branch
class GhostSkipBranch(nn.Module):
    """One site's ghost branch: a dense 1x1 conv (or a linear) filled with ``init``, then a norm.

    The weight is a parameter of this module, not an ``nn.Conv2d`` child, so that graph queries
    (``parameterized_layers``, ``layer_of``) never take a ghost for a layer of the model: masks,
    mask scores and ghost channels only ever see the original layers. ``mask`` (optional bool
    buffer) makes the branch sparse (``masked_branch=True``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kind: str = "conv",
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        groups: int = 1,
        init: float = 1e-4,
        norm: str = "batch",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if kind not in ("conv", "linear"):
            raise ValueError(f"kind must be 'conv' or 'linear'; got {kind!r}")
        if norm not in LINEAR_NORMS:
            raise ValueError(f"norm must be one of {LINEAR_NORMS}; got {norm!r}")
        self.kind = kind
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        if kind == "linear" and groups != 1:
            raise ValueError(f"a linear branch has no groups; got groups={groups}")
        if in_features % groups or out_features % groups:
            raise ValueError(f"groups={groups} must divide in_features={in_features} and out_features={out_features}")
        self.groups = groups
        shape = (out_features, in_features // groups, 1, 1) if kind == "conv" else (out_features, in_features)
        # ToST fills the jump convs with the constant 1e-4 (weight.data.fill_(0.0001)), no bias
        self.weight = nn.Parameter(torch.full(shape, float(init), device=device, dtype=dtype))
        factory = {"device": device, "dtype": dtype}
        if norm == "batch":
            self.norm = nn.BatchNorm2d(out_features, **factory) if kind == "conv" else nn.BatchNorm1d(out_features, **factory)
        elif norm == "layer":
            self.norm = nn.LayerNorm(out_features, **factory)
        else:
            self.norm = nn.Identity()
        self.register_buffer("mask", None)
        # GhostSkipPass(fold=True): where RemoveGhostSkipsPass adds this branch (a plain dict, no state)
        self.fold_into: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.mask is None else apply_mask(self.weight, self.mask)  # weight * mask
        if self.kind == "conv":
            return self.norm(F.conv2d(x, w, None, self.stride, self.padding, 1, self.groups))
        y = F.linear(x, w)
        if isinstance(self.norm, nn.BatchNorm1d):
            # per-feature statistics over every token, as BatchNorm2d takes them over every pixel
            return self.norm(y.reshape(-1, y.shape[-1])).reshape(y.shape)
        return self.norm(y)

    def extra_repr(self) -> str:
        masked = "" if self.mask is None else f", density={self.mask.float().mean().item():.3f}"
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        return f"kind={self.kind}, weight={tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}{groups}{masked}"


class BatchNormPart(nn.Module):
    """The BatchNorm half of a timm ``BatchNormAct2d`` leaf, called on its own.

    ``BatchNormAct2d.forward`` is a copy of ``nn.BatchNorm2d.forward`` followed by ``self.drop``
    and ``self.act``; calling BatchNorm2d's forward on the same module runs the same
    ``F.batch_norm`` with the same running-statistics update. The leaf is held by plain reference,
    not as a submodule, so that it stays where the model has it and its state_dict keys neither
    move nor repeat; as a module (rather than a function taking the leaf) it is a leaf for every
    tracer, so the graph module survives pickling.
    """

    def __init__(self, leaf: nn.BatchNorm2d):
        super().__init__()
        object.__setattr__(self, "leaf", leaf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.BatchNorm2d.forward(self.leaf, x)


def _unfoldable(m: nn.Module) -> str | None:
    """None when ``m`` is a norm+act leaf the pass can unfold, else why not."""
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return f"activation inside a {type(m).__name__} leaf (timm missing)"
    if type(m).forward is not BatchNormAct2d.forward:
        return f"activation inside a {type(m).__name__} leaf, which the pass cannot split"
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
        return f"activation inside a {type(m).__name__} leaf with hooks"
    return None


# --------------------------------------------------------------------------- planning
class _Skip(Exception):
    """A candidate site that cannot get a skip edge: a short ``kind`` and the full reason."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


@dataclass
class _Point:
    """One merge point: the activations reading ``value`` (or the leaf that holds one)."""

    value: Node
    activations: list[Node]
    leaf: Node | None = None  # a BatchNormAct2d call to unfold first


@dataclass
class _Site:
    name: str
    call: LayerCall
    kind: str  # "conv" (spatial conv), "pointwise" (1x1 conv in an MLP), "linear"
    in_features: int
    out_features: int
    points: list[_Point] = field(default_factory=list)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    fold: dict | None = None  # fold=True: how removal adds the branch into the main layer (see _fold_plan)


def _shape(node: Node) -> tuple[int, ...] | None:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(shape) if shape is not None else None


def _branch_padding(in_hw, out_hw, stride, kernel) -> tuple[int, int] | None:
    """The padding a 1x1 conv of ``stride`` needs to map ``in_hw`` to ``out_hw``, if any."""
    pads = []
    for h, o, s, k in zip(in_hw, out_hw, stride, kernel):
        p = next((p for p in range(max(k, 1)) if (h + 2 * p - 1) // s + 1 == o), None)
        if p is None:
            return None
        pads.append(p)
    return tuple(pads)


def _is_ghost_neuron(node: Node) -> bool:
    # GhostNeuronPass (run before this pass) reads the pre-activation value with its own nodes;
    # the skip edge must feed them too, or the soft and the hard activation would see different inputs
    return (node.meta.get("fxsparse") or {}).get("group") == "ghost_neurons"


def _site_name(call: LayerCall, taken: set[str]) -> str:
    base = call.layer.name.replace(".", "_") or "root"
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


# --------------------------------------------------------------------------- folding (fold=True)
def _identity_in_eval(m: nn.Module) -> bool:
    """An ``nn.Identity`` or a dropout of any kind (torch's, timm's DropPath / DropBlock2d,
    torchvision's StochasticDepth): the identity in eval mode, where a fold is exact."""
    return isinstance(m, nn.Identity) or is_dropout_module(m)


def _call_arg(node: Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _conv_geometry(gm: GraphModule, call: LayerCall) -> tuple[tuple[int, int], tuple[int, int], str | None]:
    """(padding, dilation, bias parameter name or None) of a 2-D conv call; ``_Skip`` if unknown."""
    node, k = call.node, call.kernel_size
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m).forward is not nn.Conv2d.forward or m.padding_mode != "zeros":
            raise _Skip("fold", f"{node.target} is a {type(m).__name__} with padding_mode={m.padding_mode!r}")
        padding, dilation = m.padding, m.dilation
        bias = f"{node.target}.bias" if m.bias is not None else None
    elif node.op == "call_function" and node.target is F.conv2d:
        padding = _call_arg(node, 4, "padding", 0)
        dilation = _call_arg(node, 5, "dilation", 1)
        b = _call_arg(node, 2, "bias", None)
        if b is None:
            bias = None
        elif isinstance(b, Node) and b.op == "get_attr" and _is_param(gm, b.target):
            bias = b.target
        else:
            raise _Skip("fold", f"the bias of {node.name} is computed in the graph ({b})")
    else:
        raise _Skip("fold", f"{node.format_node()} is not a plain conv2d call (a leaf or a functional_call)")
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k))
        else:
            raise _Skip("fold", f"padding={padding!r}")
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return padding, dilation, bias


def _eval_norm(gm: GraphModule, target: str) -> nn.BatchNorm2d:
    """The BatchNorm at ``target`` if its eval-mode map is a per-channel affine with a bias to shift."""
    m = gm.get_submodule(target)
    if not isinstance(m, nn.BatchNorm2d):
        raise _Skip("fold", f"{target} is a {type(m).__name__}, not a BatchNorm2d")
    if not (m.affine and m.track_running_stats and m.running_var is not None):
        raise _Skip("fold", f"{target} has no affine weight/bias or no running statistics (eval map unknown)")
    return m


def _linear_step(gm: GraphModule, node: Node, cur: Node) -> str | None:
    """What ``node`` does to ``cur`` in eval mode: ``"id"`` (identity or an add of it to something
    else), the module name of a BatchNorm (a per-channel affine map), or None (anything else)."""
    if node.op == "call_module":
        if node.args != (cur,) or node.kwargs:
            return None
        m = gm.get_submodule(node.target)
        if isinstance(m, BatchNormPart):
            leaf = (node.meta.get("fxsparse") or {}).get("leaf")
            return leaf if leaf is not None and gm.get_submodule(leaf) is m.leaf else None
        if isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward:
            return node.target
        if _unfoldable(m) is None and isinstance(m.act, nn.Identity) and _identity_in_eval(m.drop):
            return node.target  # a BatchNormAct2d without activation (RepVGG's conv_kxk.bn): a BatchNorm in eval
        if _identity_in_eval(m):
            return "id"
        return None
    is_add = (node.op == "call_function" and node.target in (operator.add, torch.add)) or (
        node.op == "call_method" and node.target == "add")
    if is_add and len(node.args) == 2 and not node.kwargs and list(node.args).count(cur) == 1:
        return "id"
    return None


def _fold_walk(gm: GraphModule, start: Node, stop: Node) -> list[str]:
    """The BatchNorms (module names, in order) on the single-reader path from ``start`` to ``stop``.

    Every node from ``start`` up to (not including) ``stop`` must have exactly one reader and
    every node after ``start`` must be linear in it in eval mode (``_linear_step``): then a
    change of ``start``'s output reaches ``stop`` scaled by the BatchNorms' ``gamma/s`` alone.
    """
    norms, cur = [], start
    while cur is not stop:
        users = list(cur.users)
        if len(users) != 1:
            raise _Skip("fold", f"{cur.name} is read by {len(users)} nodes ({', '.join(u.name for u in users)}): "
                                f"folding into it would change what the others read")
        nxt = users[0]
        step = _linear_step(gm, nxt, cur)
        if step is None:
            raise _Skip("fold", f"{nxt.format_node()} lies between the conv and the merge point and is not a "
                                f"BatchNorm, dropout, identity or add")
        if step != "id":
            _eval_norm(gm, step)
            norms.append(step)
        cur = nxt
    return norms


# --------------------------------------------------------------------------- the pass
class GhostSkipPass(FxSparsePass):
    """Add ToST's ghost skip connections to every matching conv (and, optionally, MLP) site.

    Args:
        init: the constant the branch weights start at (ToST: 1e-4).
        masked_branch: mask each branch weight with a random bool mask at the density of the
            main layer's mask (``fxsparse.masks.<weight>``; density 1 when it has none), stored as
            the ``mask`` buffer of the branch. ToST's branches are dense.
        match_groups: a grouped or depthwise conv gets a branch with its ``groups`` (a depthwise
            3x3 conv gets a depthwise 1x1 branch), so the branch mixes channels only as the conv
            it shadows does. ``False``: a dense 1x1 branch everywhere, which next to a depthwise
            3x3 conv of C channels costs C/9 times that conv's multiply-adds. The two are the
            same for ordinary convs (ToST's ResNets have no groups).
        include_linear: also add branches around the activation of MLP blocks (``Linear`` or 1x1
            conv -> activation -> ``Linear`` or 1x1 conv, on more than one position per sample).
        initial_gate: the value the gate ``fxsparse.gates.ghost_skips`` starts at (1 = on).
        min_kernel: a conv is spatial (gets a branch) when some kernel dimension is at least this.
        linear_norm: the norm after a ``Linear`` branch: ``"batch"`` (per-feature statistics over
            all tokens, ToST's BatchNorm applied to tokens; default), ``"layer"`` or ``"none"``.
        seed: seeds the random branch masks (per site, independent of graph order).
        fold: re-parameterize at removal instead of dropping the branch. A conv site whose
            branch equals the main conv's centre tap (odd kernel, 'same'-style padding, same
            stride and groups) gets its branch masked to the main mask's centre tap, and
            ``RemoveGhostSkipsPass`` adds ``alpha * BN_b(W_b x)`` into the main conv's centre tap
            and the bias of the BatchNorm after it (or the conv's own bias), exactly in eval mode.
            Other sites keep a plain branch (``self.not_foldable`` and the log say why).
        where: which layers get a branch, read from the traced graph: ``"all"``; ``"plain"``,
            only layers that every input-to-output path goes through (no residual shortcut or
            other path around them: VGG's convs, the stem, MobileNetV2's blocks without a
            residual add); ``"bypassed"``, only layers that another path goes around
            (``fxsparse.graph.articulation_nodes``); ``"stem"``, only the first layer the input
            reaches (``fxsparse.graph.stem_layer``); ``"disconnected"``, only layers whose mask
            (MaskPass's, read when the pass runs) leaves an output channel with no kept weight,
            so that the branch is the only path that channel has (none, on a graph without
            masks: nothing is cut off there); ``"grouped"``, only grouped and depthwise convs
            (``groups > 1``), ``"ungrouped"``, only the others; kinds joined by ``+`` take
            their union (``"bypassed+stem"``), kinds joined by ``&`` their intersection, which
            binds first (``"stem+plain&disconnected"``: the stem, and the plain layers whose mask
            cuts a channel off). Refused sites are counted as ``skipped`` with the reason.

    Stats: ``edges`` (merge points added), ``conv_edges``, ``mlp_edges``, ``unfolded``
    (BatchNormAct2d leaves split), ``skipped`` (candidates refused; reasons in ``self.skipped``
    and the log), ``nodes``; with ``fold``: ``foldable`` and ``not_foldable`` sites.
    ``self.sites`` maps each site to its layer, merge points and branch.
    """

    group = GROUP

    def __init__(
        self,
        *,
        init: float = 1e-4,
        masked_branch: bool = False,
        match_groups: bool = True,
        include_linear: bool = False,
        initial_gate: float = 1.0,
        min_kernel: int = 2,
        linear_norm: str = "batch",
        seed: int = 0,
        fold: bool = False,
        where: str = "all",
    ):
        super().__init__()
        if not math.isfinite(init):
            raise PassError(f"GhostSkipPass: init must be finite; got {init}")
        if not 0.0 <= initial_gate <= 1.0:
            raise PassError(f"GhostSkipPass: initial_gate must lie in [0, 1]; got {initial_gate}")
        if min_kernel < 1:
            raise PassError(f"GhostSkipPass: min_kernel must be at least 1; got {min_kernel}")
        if linear_norm not in LINEAR_NORMS:
            raise PassError(f"GhostSkipPass: linear_norm must be one of {LINEAR_NORMS}; got {linear_norm!r}")
        self.init = float(init)
        self.masked_branch = masked_branch
        self.match_groups = match_groups
        self.include_linear = include_linear
        self.initial_gate = float(initial_gate)
        self.min_kernel = min_kernel
        self.linear_norm = linear_norm
        self.seed = seed
        try:
            parse_where(where)
        except ValueError as bad:
            raise PassError(f"GhostSkipPass: {bad}") from None
        self.fold = bool(fold)
        self.where = where
        self.sites: dict[str, dict] = {}
        self.not_foldable: dict[str, str] = {}
        self._weight_uses: collections.Counter | None = None

    # ------------------------------------------------------------------ checks
    def requires(self, gm: GraphModule) -> None:
        super().requires(gm)
        if tagged_nodes(gm, group=GROUP) or container(gm, GROUP, create=False) is not None:
            raise PassError(
                "GhostSkipPass: this graph already has ghost skip connections; remove them first "
                "(fxsparse.passes.ghost_skips.remove_ghost_skips(gm)) or keep the ones it has."
            )
        if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
            raise PassError(
                "GhostSkipPass needs the tensor shapes fxsparse.trace records (node.meta['tensor_meta']) "
                "to match branch shapes; trace with example inputs: fxsparse.trace(model, example_inputs)."
            )

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        sub = container(gm, GROUP, create=False)
        for node in tagged_nodes(gm, group=GROUP, role="branch"):
            site = node.meta["fxsparse"]["site"]
            if sub is None or site not in sub._modules:
                raise PassError(f"GhostSkipPass: branch node {node.name} calls a missing module {site!r}")
        for node in tagged_nodes(gm, group=GROUP, role="merge"):
            if not node.users:
                raise PassError(f"GhostSkipPass: merge node {node.name} feeds nothing")

    # ------------------------------------------------------------------ planning
    def _plan(self, gm: GraphModule) -> list[_Site]:
        sites, taken = [], set()
        wanted = site_filter(gm, self.where, masks=lambda: masked_parameters(gm))  # listed only if read
        for node in list(gm.graph.nodes):
            with self.at(node):
                site = self._plan_site(gm, node, wanted, taken)
            if site is not None:
                sites.append(site)
        return sites

    def _plan_site(self, gm: GraphModule, node: Node, wanted, taken: set[str]) -> "_Site | None":
        """The site of ``node``'s layer, or None (not a candidate, or skipped: the reason is kept)."""
        call = layer_call(gm, node)
        if call is None:
            return None
        kind = self._candidate_kind(call)
        if kind is None:
            return None
        reaches = activation_reach(gm, node, max_adds=MAX_ADDS if kind == "conv" else 0,
                                   is_activation=_is_ghost_neuron)
        if not reaches:
            return None  # no activation next: not a skip-edge site
        if kind != "conv":
            why = self._not_mlp(gm, call)
            if why:
                log.debug("GhostSkipPass: %s is not in an MLP block: %s", call.layer.name, why)
                return None
        if not wanted(node):
            self.skipped[call.layer.name] = f"where={self.where!r}: {describe_where(self.where)}"
            self.stats["skipped"] += 1
            return None
        name = _site_name(call, taken)
        try:
            return self._site(gm, name, call, kind, reaches)
        except _Skip as skip:
            self.skipped[name] = f"{skip.kind}: {skip}"
            self.stats["skipped"] += 1
            log.info("GhostSkipPass: no edge at %s (%s): %s", name, skip.kind, skip)
            return None

    def _candidate_kind(self, call: LayerCall) -> str | None:
        if call.kind == "conv":
            if call.transposed or len(call.kernel_size) != 2:
                return None  # ToST's branch is a 1x1 Conv2d + BatchNorm2d: 2-D convolutions only
            if max(call.kernel_size) >= self.min_kernel:
                return "conv"
            if self.include_linear and call.stride == (1, 1):
                return "pointwise"
            return None
        return "linear" if self.include_linear else None

    def _site(self, gm: GraphModule, name: str, call: LayerCall, kind: str, reaches: list[PreActivation]) -> _Site:
        x_shape, out_shape = _shape(call.input), _shape(call.node)
        if x_shape is None or out_shape is None:
            raise _Skip("no_shape", f"no tensor shapes recorded at {call.node.name}")
        site = _Site(name, call, kind, call.in_channels, call.out_channels)
        if kind == "linear":
            if x_shape[-1] != call.in_channels or x_shape[:-1] != out_shape[:-1]:
                raise _Skip("shape", f"linear input {x_shape} and output {out_shape} do not fit a token-wise branch")
        else:
            if len(x_shape) != 4 or x_shape[1] != call.in_channels:
                raise _Skip("shape", f"conv input of shape {x_shape}, expected N x {call.in_channels} x H x W")
            padding = _branch_padding(x_shape[2:], out_shape[2:], call.stride, call.kernel_size)
            if padding is None:
                raise _Skip("shape", f"no 1x1 conv of stride {call.stride} maps {x_shape[2:]} to {out_shape[2:]} "
                                     f"(kernel {call.kernel_size})")
            site.stride, site.padding = tuple(call.stride), padding
            site.groups = call.groups if self.match_groups else 1
        for point in self._points(gm, reaches):
            if _shape(point.value) != out_shape:
                raise _Skip("shape", f"the value before {point.activations[0].name} has shape "
                                     f"{_shape(point.value)}, the branch would give {out_shape}")
            site.points.append(point)
        if self.fold:
            try:
                site.fold = self._fold_plan(gm, site)
                self.stats["foldable"] += 1
            except _Skip as why:
                self.not_foldable[name] = f"{why.kind}: {why}"
                self.stats["not_foldable"] += 1
                log.info("GhostSkipPass: %s is not foldable (%s): %s; it keeps a plain branch", name, why.kind, why)
        return site

    def _not_mlp(self, gm: GraphModule, call: LayerCall) -> str | None:
        """None when a pointwise layer sits in an MLP block (layer -> act -> pointwise layer), else why not."""
        out_shape = _shape(call.node)
        if out_shape is None:
            return "no tensor shapes recorded"
        positions = math.prod(out_shape[2:]) if call.kind == "conv" else math.prod(out_shape[1:-1])
        if positions <= 1:
            # squeeze-excitation gates and classifier heads: one position per sample, not a token MLP
            return f"one position per sample (output {out_shape})"
        chains = channel_chains(gm, [call.layer]) if not call.layer.inside_leaf else []
        consumer = chains[0].single_consumer if chains else None
        nxt = layer_call(gm, consumer.node) if consumer is not None else None
        if nxt is None or not (nxt.kind == "linear" or (
                len(nxt.kernel_size) == 2 and max(nxt.kernel_size) == 1 and not nxt.transposed)):
            return "its activation does not feed exactly one pointwise layer"
        return None

    def _points(self, gm: GraphModule, reaches: list[PreActivation]) -> list[_Point]:
        """Group the activations reached by the value they read; check each can take a merge."""
        points: dict[Node, _Point] = {}
        for r in reaches:
            if r.inside_leaf:
                reason = _unfoldable(gm.get_submodule(r.activation.target)) if r.activation.op == "call_module" else (
                    f"activation inside {r.activation.format_node()}")
                if reason is not None:
                    raise _Skip("leaf", reason)
                points[r.activation] = _Point(r.value, [r.activation], leaf=r.activation)
            else:
                points.setdefault(r.value, _Point(r.value, [])).activations.append(r.activation)
        for p in points.values():
            if p.leaf is not None:
                continue
            others = [u for u in p.value.users if u not in p.activations]
            inplace = [a for a in p.activations if _inplace(gm, a)]
            if inplace and others:
                raise _Skip("inplace", f"{inplace[0].name} works in place on {p.value.name}, which "
                                       f"{others[0].name} also reads")
        return list(points.values())

    # ------------------------------------------------------------------ rewrite
    def call(self, gm: GraphModule) -> PassResult:
        self.sites, self.not_foldable = {}, {}
        self._weight_uses = None
        plan = self._plan(gm)
        if not plan:
            log.info("GhostSkipPass: no conv reaches an activation through channel-wise ops; nothing to add")
            return PassResult(gm, False)
        gate_target = gates.register(gm, GROUP, self.initial_gate)
        gate_meta = _extract_tensor_metadata(gm.get_buffer(gate_target))
        sub = container(gm, GROUP)
        unfolded: dict[Node, tuple[Node, Node]] = {}  # leaf call -> (act node, value before it)
        for site in plan:
            with self.at(site.call.node):
                self._rewrite_site(gm, sub, site, unfolded, gate_target, gate_meta)
        self.stats["nodes"] = len(tagged_nodes(gm, group=GROUP))
        return PassResult(gm, True)

    def _rewrite_site(self, gm: GraphModule, sub: nn.Module, site: _Site,
                      unfolded: dict[Node, tuple[Node, Node]], gate_target: str, gate_meta) -> None:
        """Add ``site``'s branch and its merges; ``unfolded`` collects the leaves it unfolds."""
        # an earlier site may have unfolded the leaf that produces this conv's input
        x = site.call.input
        x = unfolded[x][0] if x in unfolded else x
        branch_node = self._add_branch(gm, sub, site, x)
        merges = []
        for point in site.points:
            if point.leaf is not None:
                if point.leaf not in unfolded:
                    unfolded[point.leaf] = self._unfold(gm, point.leaf, site.name)
                act, value = unfolded[point.leaf]
                activations = [act]
            else:
                activations, value = point.activations, point.value
            merges.append(self._merge(gm, site, branch_node, value, activations, gate_target, gate_meta))
        self.stats["edges"] += len(merges)
        self.stats["conv_edges" if site.kind == "conv" else "mlp_edges"] += len(merges)
        self.sites[site.name] = {
            "layer": site.call.layer.name, "weight": site.call.layer.weight, "kind": site.kind,
            "branch": branch_node.name,
            "merges": [m.name for m in merges],
            "before": [a.name for m in merges for a in m.users],
            "fold": site.fold is not None,
        }
        log.debug("GhostSkipPass: %s: %s -> %s", site.name, site.call.input.name, self.sites[site.name]["before"])

    def _add_branch(self, gm: GraphModule, sub: nn.Module, site: _Site, x: Node) -> Node:
        w = gm.get_parameter(site.call.layer.weight) if _is_param(gm, site.call.layer.weight) else None
        factory = {"device": w.device, "dtype": w.dtype} if w is not None else {}
        branch = GhostSkipBranch(
            site.in_features, site.out_features, kind="linear" if site.kind == "linear" else "conv",
            stride=site.stride, padding=site.padding, groups=site.groups, init=self.init,
            norm=self.linear_norm if site.kind == "linear" else "batch", **factory,
        )
        if site.fold is not None:
            branch.mask = self._centre_mask(gm, site, branch.weight)
            branch.fold_into = site.fold
        elif self.masked_branch:
            branch.mask = self._random_mask(gm, site, branch.weight)
        sub.add_module(site.name, branch)
        graph = gm.graph
        # read the conv's input where the conv reads it: a later in-place op cannot have changed it
        with graph.inserting_before(site.call.node):
            node = graph.call_module(f"{CONTAINER}.{GROUP}.{site.name}", (x,))
        self.tag(node, "branch", site=site.name)
        return node

    # ------------------------------------------------------------------ fold=True
    def _fold_plan(self, gm: GraphModule, site: _Site) -> dict:
        """How removal will add this site's branch into the main layer; ``_Skip`` when it cannot.

        The branch ``conv1x1(x; stride s, padding p_b)`` equals the main conv's centre tap when
        the kernel is odd, the main padding is ``p_b + d*(k-1)/2`` (the centre tap of a 'same' conv
        reads the pixel a 1x1 conv with the branch's padding reads), and the groups agree. The
        branch must reach the merge point along one path of eval-mode affine ops.
        """
        call = site.call
        if site.kind != "conv":
            raise _Skip("fold", f"a {site.kind} branch (only spatial conv sites fold)")
        if call.layer.inside_leaf:
            raise _Skip("fold", f"the conv lives inside the leaf {call.layer.leaf}")
        k = call.kernel_size
        if any(kk % 2 == 0 for kk in k):
            raise _Skip("fold", f"even kernel {k}: no centre tap")
        if site.groups != call.groups:
            raise _Skip("fold", f"branch groups {site.groups} != conv groups {call.groups} (match_groups=False)")
        padding, dilation, bias = _conv_geometry(gm, call)
        need = tuple(p - d * (kk - 1) // 2 for p, d, kk in zip(padding, dilation, k))
        if need != tuple(site.padding):
            raise _Skip("fold", f"padding {padding} with dilation {dilation} and kernel {k}: the centre tap is not "
                                f"the branch's 1x1 conv (padding {site.padding})")
        if not _is_param(gm, call.layer.weight):
            raise _Skip("fold", f"{call.layer.weight} is not a parameter")
        if self._weight_uses is None:
            self._weight_uses = collections.Counter(
                c.layer.weight for c in (layer_call(gm, n) for n in gm.graph.nodes) if c is not None)
        if self._weight_uses[call.layer.weight] != 1:
            raise _Skip("fold", f"{call.layer.weight} is used by {self._weight_uses[call.layer.weight]} layer calls")
        if len(site.points) != 1:
            raise _Skip("fold", f"the conv reaches {len(site.points)} merge points; the fold would add the branch to each")
        point = site.points[0]
        norms = _fold_walk(gm, call.node, point.value)
        if point.leaf is not None:
            leaf = gm.get_submodule(point.leaf.target)
            if list(point.value.users) != [point.leaf]:
                raise _Skip("fold", f"{point.value.name} is also read outside {point.leaf.target}")
            if not _identity_in_eval(leaf.drop):
                raise _Skip("fold", f"{point.leaf.target}.drop is a {type(leaf.drop).__name__}")
            _eval_norm(gm, point.leaf.target)
            norms.append(point.leaf.target)
        else:
            others = [u for u in point.value.users if u not in point.activations and not _is_ghost_neuron(u)]
            if others:
                raise _Skip("fold", f"{point.value.name} is also read by {others[0].name}")
        for target in norms:
            calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
            if len(calls) != 1:
                raise _Skip("fold", f"the BatchNorm {target} is called {len(calls)} times")
        if not norms and bias is None:
            raise _Skip("no_bias", "no BatchNorm between the conv and the merge point and the conv has no bias: "
                                   "the branch BatchNorm's shift would have nowhere to go")
        return {"weight": call.layer.weight, "bias": bias, "norms": norms,
                "centre": tuple(kk // 2 for kk in k)}

    def _centre_mask(self, gm: GraphModule, site: _Site, weight: torch.Tensor) -> torch.Tensor | None:
        """The main mask's centre tap, shaped as the branch weight (None when the layer has no mask)."""
        from fxsparse.passes.mask import get_mask

        main = get_mask(gm, site.call.layer.weight)
        if main is None:
            return None
        ci, cj = site.fold["centre"]
        return main[:, :, ci, cj].reshape(weight.shape).to(device=weight.device, dtype=torch.bool).clone()

    def _random_mask(self, gm: GraphModule, site: _Site, weight: torch.Tensor) -> torch.Tensor:
        from fxsparse.passes.mask import get_mask

        main = get_mask(gm, site.call.layer.weight)
        density = float(main.float().mean()) if main is not None else 1.0
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(site.name.encode()))
        return random_mask(tuple(weight.shape), density, gen).to(weight.device)

    def _merge(self, gm, site: _Site, branch: Node, value: Node, activations: list[Node], gate_target: str, gate_meta) -> Node:
        """``value + gate * branch``, read by ``activations`` (and ghost-neuron nodes) instead of ``value``."""
        graph = gm.graph
        # a previous site may already have merged here: chain onto what the activation reads now
        cur = activations[0].args[0]
        readers = [u for u in cur.users if u in activations or _is_ghost_neuron(u)]
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min(readers, key=order.__getitem__)
        with graph.inserting_before(first):
            gate = self.tag(graph.get_attr(gate_target), "gate", site=site.name)
            scaled = self.tag(graph.call_function(operator.mul, (gate, branch)), "scaled", site=site.name)
            merge = self.tag(graph.call_function(operator.add, (cur, scaled)), "merge", site=site.name)
        gate.meta["tensor_meta"] = gate_meta
        for n in (branch, scaled, merge):
            n.meta["tensor_meta"] = value.meta.get("tensor_meta")
        for reader in readers:
            reader.replace_input_with(cur, merge)
        return merge

    def _unfold(self, gm: GraphModule, leaf: Node, site: str) -> tuple[Node, Node]:
        """Split a BatchNormAct2d call into BatchNorm, drop and act calls; (act node, its input)."""
        graph, m, target = gm.graph, gm.get_submodule(leaf.target), leaf.target
        (x,) = leaf.args
        extra = {"site": site, "leaf": target}
        sub = container(gm, GROUP)
        name = f"{target.replace('.', '_')}_bn"
        while name in sub._modules:
            name += "_"
        sub.add_module(name, BatchNormPart(m))
        with graph.inserting_before(leaf):
            value = self.tag(graph.call_module(f"{CONTAINER}.{GROUP}.{name}", (x,)), "unfold", part="norm", **extra)
            parts = [value]
            if not isinstance(m.drop, nn.Identity):
                value = self.tag(graph.call_module(f"{target}.drop", (value,)), "unfold", part="drop", **extra)
                parts.append(value)
            act = self.tag(graph.call_module(f"{target}.act", (value,)), "unfold", part="act", **extra)
        for n in (*parts, act):
            n.meta["tensor_meta"] = leaf.meta.get("tensor_meta")  # norm, drop and act keep the shape
        act.meta["nn_module_stack"] = leaf.meta.get("nn_module_stack")
        leaf.replace_all_uses_with(act)
        graph.erase_node(leaf)
        self.stats["unfolded"] += 1
        return act, value


def _is_param(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False


def _inplace(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        if getattr(node.target, "__name__", "").endswith("_") or node.kwargs.get("inplace", False):
            return True
        return any(a is True for a in node.args[1:])
    return False


# --------------------------------------------------------------------------- removal
class RemoveGhostSkipsPass(FxSparsePass):
    """Delete every ghost skip connection: tagged nodes, unfolded leaves, branch modules, gate.

    The graph afterwards is structurally identical (``fxsparse.graph.same_structure``) to the one
    ``GhostSkipPass`` started from and computes what the ghosted graph computed at gate 0.
    """

    group = GROUP

    def requires(self, gm: GraphModule) -> None:
        super().requires(gm)
        require_tagged_state(gm, GROUP, self.name)

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        nodes = tagged_nodes(gm, group=GROUP)
        self.folded, self.fold_refused = [], {}
        self._reparameterize(gm, nodes)
        for node in nodes:
            tag = node.meta["fxsparse"]
            if tag["role"] == "merge":
                node.replace_all_uses_with(node.args[0])
                self.stats["edges"] += 1
            elif tag["role"] == "unfold" and tag.get("part") == "norm":
                self._fold(gm, node)
        for node in reversed(nodes):
            if node.users:
                raise PassError(f"RemoveGhostSkipsPass: {node.format_node()} is still used by "
                                f"{[u.name for u in node.users]}; the graph was edited after GhostSkipPass")
            graph.erase_node(node)
            self.stats["nodes_removed"] += 1
        had = container(gm, GROUP, create=False) is not None
        delete_container(gm, GROUP)
        gates.unregister(gm, GROUP)
        return PassResult(gm, bool(nodes) or had)

    # ------------------------------------------------------------------ fold=True
    def _reparameterize(self, gm: GraphModule, nodes: list[Node]) -> None:
        """Add every foldable branch (``GhostSkipPass(fold=True)``) into its main layer, at the
        current gate: the eval-mode output is unchanged by the removal that follows."""
        sub = container(gm, GROUP, create=False)
        if sub is None:
            return
        plans = {name: b for name, b in sub.named_children()
                 if isinstance(b, GhostSkipBranch) and getattr(b, "fold_into", None) is not None}
        if not plans:
            return
        alpha = float(gates.get(gm).get(GROUP, 0.0))
        if alpha == 0.0:
            # nothing to add, and adding zeros could still flip a -0.0: exactly the plain removal
            log.info("RemoveGhostSkipsPass: alpha is 0, %d foldable branches add nothing", len(plans))
            return
        merges = {n.meta["fxsparse"]["site"]: n for n in nodes if n.meta["fxsparse"]["role"] == "merge"}
        calls = {}
        for n in gm.graph.nodes:
            c = layer_call(gm, n)
            if c is not None:
                calls.setdefault(c.layer.weight, []).append(c)
        for name, branch in plans.items():
            plan = branch.fold_into
            try:
                found = calls.get(plan["weight"], [])
                if len(found) != 1 or name not in merges:
                    raise _Skip("fold", f"{plan['weight']} is applied by {len(found)} layer calls now")
                norms = _fold_walk(gm, found[0].node, merges[name])
                if norms != list(plan["norms"]):
                    raise _Skip("fold", f"the BatchNorms between the conv and the merge are {norms} now, "
                                        f"{list(plan['norms'])} when the branch was added")
                self._fold_branch(gm, branch, plan, alpha)
            except _Skip as why:
                self.fold_refused[name] = str(why)
                self.stats["fold_refused"] += 1
                log.warning("RemoveGhostSkipsPass: branch %s not folded, dropped instead: %s", name, why)
                continue
            self.folded.append(name)
            self.stats["folded_branches"] += 1
        log.info("RemoveGhostSkipsPass: folded %d ghost skip branches into their convs at alpha %.4g",
                 len(self.folded), alpha)

    @torch.no_grad()
    def _fold_branch(self, gm: GraphModule, branch: GhostSkipBranch, plan: dict, alpha: float) -> None:
        """``alpha * BN_b(W_b x)`` into the main conv's centre tap and the last BatchNorm's bias.

        With the path's BatchNorms ``BN_i`` (eval: ``gamma_i (u - mu_i) / s_i + beta_i``) between
        the conv and the merge, a change ``d`` of the conv output reaches the merge as
        ``A * d``, ``A = prod_i gamma_i / s_i``. The branch is ``(alpha gamma_b / s_b) W_b x +
        alpha (beta_b - gamma_b mu_b / s_b)``, so ``W_b * alpha gamma_b / (s_b A)`` goes into the
        centre tap and the constant into the bias of the BatchNorm nearest the merge (only adds
        and identities follow it), or into the conv's bias when there is no BatchNorm.
        """
        from fxsparse.passes.mask import get_mask

        f64 = torch.float64
        w_b = branch.weight if branch.mask is None else branch.weight * branch.mask
        w_b = w_b.detach().to(f64)[:, :, 0, 0]
        bn = branch.norm
        s_b = (bn.running_var.to(f64) + bn.eps).sqrt()
        g_b = bn.weight.to(f64) if bn.weight is not None else torch.ones_like(s_b)
        beta_b = bn.bias.to(f64) if bn.bias is not None else torch.zeros_like(s_b)
        scale = alpha * g_b / s_b
        const = alpha * (beta_b - g_b * bn.running_mean.to(f64) / s_b)
        gain = torch.ones_like(s_b)
        for target in plan["norms"]:
            m = gm.get_submodule(target)
            gain = gain * m.weight.to(f64) / (m.running_var.to(f64) + m.eps).sqrt()
        live = (scale[:, None] * w_b != 0).any(1)
        if bool((live & (gain == 0)).any()):
            raise _Skip("fold", "a BatchNorm on the path has gamma = 0 on a channel the branch writes to")
        delta = torch.where(gain[:, None] != 0, scale[:, None] * w_b / gain[:, None], torch.zeros_like(w_b))
        weight = gm.get_parameter(plan["weight"])
        ci, cj = plan["centre"]
        mask = get_mask(gm, plan["weight"])
        if mask is not None:
            outside = ~mask[:, :, ci, cj].to(delta.device)
            if bool((delta[outside] != 0).any()):
                raise PassError(f"RemoveGhostSkipsPass: folding {plan['weight']} would write outside its mask "
                                f"(the branch mask is no longer inside the main mask's centre tap)")
        if plan["norms"]:
            shift = gm.get_submodule(plan["norms"][-1]).bias
        else:
            if plan["bias"] is None:  # GhostSkipPass refuses such sites; checked again for a hand-made plan
                raise _Skip("no_bias", "the conv has no bias for the branch BatchNorm's shift")
            shift = gm.get_parameter(plan["bias"])
        before = weight[:, :, ci, cj].clone()
        weight[:, :, ci, cj] += delta.to(weight.dtype)
        shift += const.to(shift.dtype)
        if mask is not None:  # every pruned weight is untouched, so the masked weight keeps every zero
            outside = ~mask[:, :, ci, cj].to(weight.device)
            assert torch.equal(weight[:, :, ci, cj][outside], before[outside]), \
                f"folding changed a pruned weight of {plan['weight']}"

    def _fold(self, gm: GraphModule, norm: Node) -> None:
        """Put the BatchNormAct2d call back in place of its unfolded norm/drop/act nodes."""
        leaf = norm.meta["fxsparse"]["leaf"]
        act = next(n for n in tagged_nodes(gm, group=GROUP, role="unfold")
                   if n.meta["fxsparse"].get("part") == "act" and n.meta["fxsparse"]["leaf"] == leaf)
        with gm.graph.inserting_before(norm):
            restored = gm.graph.call_module(leaf, (norm.args[0],))
        restored.meta.update({k: v for k, v in act.meta.items() if k != "fxsparse"})
        act.replace_all_uses_with(restored)
        self.stats["folded"] += 1


def remove_ghost_skips(gm: GraphModule) -> GraphModule:
    """Remove every ghost skip connection from ``gm`` in place (see ``RemoveGhostSkipsPass``)."""
    return RemoveGhostSkipsPass()(gm).graph_module
