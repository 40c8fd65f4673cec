"""GhostNeuronPass: ghost soft neurons (ToST's GSN), blended in and out by a gate.

Every ReLU-family activation ``a = relu(x)`` becomes

    blend = ghost_blend(a, soft(x), lam) = (1 - lam) * a + lam * soft(x)

with ``soft`` one of swish ``x*sigmoid(x)`` (default), mish ``x*tanh(softplus(x))`` or parametric
swish ``x*sigmoid(beta*x)``, and ``lam`` the group's gate ``fxsparse.gates.ghost_neurons``
(1: the soft activation, 0: exactly the original). Where the activation is a graph node (styles
"module", "function", "method") the original node stays in the graph and three tagged nodes are
added after it: ``gate`` (get_attr of the gate), ``soft`` and ``blend`` (what the users now read).

Inplace activations (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x.relu_()``) run
out of place during the ghost phase, because the soft branch needs the pre-activation ``x``: the
module's ``inplace`` flag is cleared, the function's ``inplace`` argument set to False, ``relu_``
becomes ``relu``. Nodes that read ``x`` *after* an inplace activation read the activated value in
the original program, so they are rewired to the blend too. Removal puts every one of these back.

Activations inside leaf modules (style "leaf", e.g. timm's ``BatchNormAct2d.act`` or
``NormFreeBlock.act1``) are not graph nodes, so the activation submodule itself is swapped for a
``GhostActivation`` that computes the same blend. It holds no state of its own (the leaf's
state_dict keys do not change) and reads the gate, and a learnable beta, from the GraphModule's
``fxsparse`` container through plain references, so ``.to()``, ``deepcopy`` and moving the gate
all keep working. Leaf modules are shared with the model the graph was traced from, which
therefore sees the swapped submodule until removal puts the original back.

For ReLU sites with soft "swish" or "mish" the ``soft`` and ``blend`` nodes are one node,
``fxsparse.fused.ghost_relu_blend(act, x, gate)`` (role ``blend``, tag ``fused=True``): the same
numbers bit for bit, values and gradients, as one autograd node that saves only ``x`` (the two
nodes keep ``relu(x)`` and ``x`` alive for the backward in eager mode; issue 13).

``RemoveGhostNeuronsPass`` (``remove_ghost_neurons(gm)``) undoes all of it: the graph is then
structurally equal to the graph before the pass and computes exactly what the ghost graph
computed at gate 0. See docs/ghost-neurons.md for the exactness argument.
"""
from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from fxsparse import gates
from fxsparse.errors import PassError
from fxsparse.fused import FUSED_SOFTS, ghost_relu_blend
from fxsparse.graph import ActivationSite, activation_sites, leaf_call_target
from fxsparse.pass_infra import (
    CONTAINER, FxSparsePass, container, delete_container, require_tagged_state, tagged_nodes,
)

__all__ = [
    "GhostNeuronPass", "RemoveGhostNeuronsPass", "remove_ghost_neurons", "GhostActivation",
    "ghost_blend", "parametric_swish", "GROUP", "SOFT", "KINDS",
]

log = logging.getLogger("fxsparse.passes")

GROUP = "ghost_neurons"
KINDS = ("relu", "relu6")  # the activation kinds (fxsparse.graph.activation_sites) a ghost replaces


def ghost_blend(act: torch.Tensor, soft: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``(1 - gate) * act + gate * soft``: at ``gate == 0`` exactly ``act``, value and gradient.

    Forward: ``1 * act`` is ``act`` and ``0 * soft`` is a signed zero, so the sum is ``act`` for
    every finite input; the one case where adding a zero could change a bit, ``act == -0.0``,
    happens only at ``x == -0.0``, where ``soft(-0.0)`` is ``-0.0`` too and ``-0.0 + -0.0`` is
    ``-0.0``. (``act + gate * (soft - act)`` would turn ``relu(-0.0) == -0.0`` into ``+0.0``.)
    Backward: ``act`` is read once, so its gradient is ``g * 1``, bit for bit ``g``; the soft
    branch adds ``(g * 0) * soft'(x)``, a zero that has the sign of ``g`` wherever ReLU's own
    gradient can be ``-0.0`` (x > 0, where ``soft'(x) > 0``), so ``x``'s gradient is unchanged.
    At ``x = +-inf`` the soft branch is ``inf`` or ``nan`` and ``0 * soft`` is ``nan``.
    """
    return (1 - gate) * act + gate * soft


def parametric_swish(x: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """``x * sigmoid(beta * x)`` (swish is beta = 1)."""
    return x * torch.sigmoid(beta * x)


# soft activation name -> the function the graph calls (``parametric_swish`` also takes beta)
SOFT: dict[str, Any] = {"swish": F.silu, "mish": F.mish, "pswish": parametric_swish}


def _soft(name: str, x: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    return parametric_swish(x, beta) if name == "pswish" else SOFT[name](x)


def _relu_out_of_place(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a ReLU-family module computes, never writing into ``x`` (the soft branch reads it)."""
    if isinstance(act, nn.ReLU):
        return torch.relu(x)
    if isinstance(act, nn.Hardtanh):  # nn.ReLU6 is Hardtanh(0, 6)
        return F.hardtanh(x, act.min_val, act.max_val)
    raise PassError(f"GhostNeuronPass: no out-of-place form known for {type(act).__qualname__}")


class GhostActivation(nn.Module):
    """Stands in for a ReLU-family submodule of a leaf module while ghost neurons are on.

    ``act`` is the original activation module (registered, so the module tree shows it; ReLU and
    ReLU6 hold no state, so the leaf's state_dict keys are unchanged); removal puts it back. The
    gate and a learnable beta are read at call time from the GraphModule's ``fxsparse`` container,
    kept as plain (unregistered) references: they belong to the container, not to the leaf.
    """

    def __init__(self, act: nn.Module, soft: str, beta: float, gates_module: nn.Module,
                 beta_module: nn.Module | None = None):
        super().__init__()
        self.act = act
        self.soft = soft
        self.beta = beta
        object.__setattr__(self, "_gates", gates_module)  # object.__setattr__: not a submodule
        object.__setattr__(self, "_beta_module", beta_module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.soft in FUSED_SOFTS and type(self.act) is nn.ReLU:
            return ghost_relu_blend(torch.relu(x), x, getattr(self._gates, GROUP), self.soft)
        beta = self._beta_module.beta if self._beta_module is not None else self.beta
        return ghost_blend(_relu_out_of_place(self.act, x), _soft(self.soft, x, beta),
                           getattr(self._gates, GROUP))

    def extra_repr(self) -> str:
        return f"soft={self.soft}" + (f", beta={self.beta:g}" if self.soft == "pswish" else "")


def _input(node: Node) -> Node:
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, Node):
        raise PassError(f"GhostNeuronPass: the activation {node.format_node()} has no tensor input node")
    return x


def _present(gm: GraphModule) -> bool:
    return bool(
        tagged_nodes(gm, group=GROUP) or container(gm, GROUP, create=False) is not None
        or GROUP in gates.get(gm) or any(isinstance(m, GhostActivation) for m in gm.modules())
    )


def _copy_meta(src: Node, *dst: Node) -> None:
    for key in ("tensor_meta", "nn_module_stack"):
        if key in src.meta:
            for d in dst:
                d.meta[key] = src.meta[key]


# ops that move a tensor's elements around without computing on them
_LAYOUT_FUNCTIONS = {torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.unflatten,
                     torch.squeeze, torch.unsqueeze, torch.t, operator.getitem, F.pad}
_LAYOUT_METHODS = {"transpose", "permute", "view", "reshape", "flatten", "unflatten", "squeeze",
                   "unsqueeze", "contiguous", "t", "mT", "float", "to", "type_as"}
_PRODUCTS = {torch.matmul, torch.bmm, torch.einsum, operator.matmul}


def _kernel_feature_map(gm: GraphModule, site: ActivationSite) -> str | None:
    """Why ``site`` is a linear attention's feature map (not a neuron), or None."""
    if site.style == "leaf":
        # inside a leaf the uses are not in the graph; timm's linear attention (LiteMLA) names it
        if site.module and site.module.rpartition(".")[2] == "kernel_func":
            return "the feature map of a linear attention (a leaf's kernel_func), not a neuron"
        return None
    frontier, seen = [site.node], set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and user.target in _PRODUCTS:
                operands = [a for a in user.args if isinstance(a, Node)]
                if len(operands) >= 2 and not any(a.op == "get_attr" for a in operands):
                    return (f"its output is multiplied by another activation ({user.name}): the feature map "
                            f"of a linear attention, not a neuron")
            elif (user.op == "call_function" and user.target in _LAYOUT_FUNCTIONS) or (
                    user.op == "call_method" and user.target in _LAYOUT_METHODS):
                frontier.append(user)
    return None


class GhostNeuronPass(FxSparsePass):
    """Blend a soft activation into every ReLU-family activation (see the module docstring).

    Args:
        soft: "swish" (``x*sigmoid(x)``, the paper's default), "mish" or "pswish"
            (``x*sigmoid(beta*x)``).
        beta: pswish's beta (ToST: 2).
        learn_beta: pswish only: one learnable scalar beta per site, a parameter at
            ``fxsparse.ghost_neurons.<site>.beta`` (``fxsparse.ghosts.parameters(gm,
            "ghost_neurons")`` hands them to the optimizer). Otherwise the group has no parameters.
        kinds: activation kinds to replace: ("relu",) or ("relu", "relu6").
        initial_gate: the gate's value after the pass (1: fully soft; 0: identity).

    A ReLU that is the feature map of a linear attention (``relu(q) @ (relu(k)^T v)``, divided by
    a sum that the ReLU keeps positive: timm's EfficientViT) is not a neuron, and a soft activation
    there makes that sum cross zero; such sites are left alone, with the reason in ``skipped``.

    Stats: ``sites`` (the activation sites of ``kinds`` rewritten), ``skipped``, the sites per style (``module``,
    ``function``, ``method``, ``leaf``), ``inplace`` (inplace sites made out of place),
    ``readers_rewired`` and ``nodes`` (nodes added).
    """

    group = GROUP

    def __init__(self, *, soft: str = "swish", beta: float = 2.0, learn_beta: bool = False,
                 kinds: tuple[str, ...] = ("relu",), initial_gate: float = 1.0):
        super().__init__()
        if soft not in SOFT:
            raise PassError(f"GhostNeuronPass: soft must be one of {sorted(SOFT)}; got {soft!r}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise PassError(f"GhostNeuronPass: kinds must be a non-empty subset of {KINDS}; got {kinds!r}")
        if learn_beta and soft != "pswish":
            raise PassError(f"GhostNeuronPass: learn_beta=True needs soft='pswish' (soft={soft!r} has no beta)")
        if not 0.0 <= float(initial_gate) <= 1.0:
            raise PassError(f"GhostNeuronPass: initial_gate must lie in [0, 1]; got {initial_gate}")
        self.soft, self.beta, self.learn_beta = soft, float(beta), bool(learn_beta)
        self.kinds, self.initial_gate = kinds, float(initial_gate)

    def requires(self, graph_module: GraphModule) -> None:
        super().requires(graph_module)
        if _present(graph_module):
            raise PassError(
                "GhostNeuronPass: this graph already has ghost neurons; remove them first "
                "(fxsparse.passes.ghost_neurons.remove_ghost_neurons(gm)) before running the pass again."
            )

    def call(self, gm: GraphModule) -> PassResult:
        sites = []
        for site in activation_sites(gm, self.kinds):
            why = _kernel_feature_map(gm, site)
            if why:
                where = site.module or site.node.name
                self.skipped[where] = why
                log.info("GhostNeuronPass: no ghost at %s: %s", where, why)
            else:
                sites.append(site)
        if self.skipped:
            self.stats["skipped"] = len(self.skipped)
        self.stats["sites"] = len(sites)
        if not sites and self.skipped:
            return PassResult(gm, False)
        if not sites:
            found = sorted({s.kind for s in activation_sites(gm)})
            log.info("GhostNeuronPass: no %s activation in this graph (it has: %s); nothing to do",
                     "/".join(self.kinds), ", ".join(found) or "no activations")
            return PassResult(gm, False)
        for style in ("module", "function", "method", "leaf"):  # logged in this order
            if any(s.style == style for s in sites):
                self.stats[style] = sum(s.style == style for s in sites)
        self.stats["inplace"] = sum(s.inplace for s in sites)
        gates.register(gm, GROUP, self.initial_gate)
        group = container(gm, GROUP)  # also marks the group as present when every site is a leaf
        gates_module = gm.get_submodule(gates.target(GROUP).rpartition(".")[0])
        self._device = getattr(gates_module, GROUP).device
        for site in sites:
            with self.at(site.node):
                if site.style == "leaf":
                    self._rewrite_leaf(gm, site, group, gates_module)
                else:
                    self._rewrite_node(gm, site, group)
        return PassResult(gm, True)

    # ------------------------------------------------------------------ graph sites
    def _rewrite_node(self, gm: GraphModule, site: ActivationSite, group: nn.Module) -> None:
        graph, act = gm.graph, site.node
        x = _input(act)
        restore, readers = None, []
        if site.inplace:
            # in the original program every later reader of x saw the activated x
            order = {n: i for i, n in enumerate(graph.nodes)}
            readers = [u for u in x.users if u is not act and order[u] > order[act]]
            restore = self._out_of_place(gm, act)
        name = self._site_name(group, act.name)
        if site.kind == "relu" and self.soft in FUSED_SOFTS:
            # one node: ghost_relu_blend(act, x, gate), which saves only x for the backward
            with graph.inserting_before(act.next):
                gate = self.tag(graph.get_attr(gates.target(GROUP)), "gate")
                blend = graph.call_function(ghost_relu_blend, (act, x, gate), {"soft": self.soft})
                self.tag(blend, "blend", site=name, style=site.style, kind=site.kind, restore=restore,
                         input_readers=[u.name for u in readers], fused=True)
            _copy_meta(act, blend)
            act.replace_all_uses_with(blend, delete_user_cb=lambda u: u is not blend)
            for u in readers:
                u.replace_input_with(x, blend)
                self.stats["readers_rewired"] += 1
            self.stats["nodes"] += 2
            self.stats["fused"] += 1
            return
        with graph.inserting_before(act.next):
            gate = self.tag(graph.get_attr(gates.target(GROUP)), "gate")
            beta: Any = self.beta
            if self.learn_beta:
                self._beta(group, name)
                beta = self.tag(graph.get_attr(f"{CONTAINER}.{GROUP}.{name}.beta"), "soft", param="beta")
            soft = graph.call_function(SOFT[self.soft], (x, beta) if self.soft == "pswish" else (x,))
            self.tag(soft, "soft", site=name)
            blend = graph.call_function(ghost_blend, (act, soft, gate))
            self.tag(blend, "blend", site=name, style=site.style, kind=site.kind, restore=restore,
                     input_readers=[u.name for u in readers])
        _copy_meta(act, soft, blend)
        act.replace_all_uses_with(blend, delete_user_cb=lambda u: u is not blend)
        for u in readers:
            u.replace_input_with(x, blend)
            self.stats["readers_rewired"] += 1
        self.stats["nodes"] += 3 + self.learn_beta

    def _out_of_place(self, gm: GraphModule, act: Node) -> dict[str, Any]:
        """Make an inplace activation node out of place; return what removal needs to undo it."""
        if act.op == "call_module":
            gm.get_submodule(act.target).inplace = False
            return {"module": act.target}
        if act.op == "call_method":  # x.relu_()
            restore = {"target": act.target}
            act.target = act.target.rstrip("_")
            return restore
        if act.target in (torch.relu_, F.relu_):
            restore = {"target": act.target}
            act.target = torch.relu
            return restore
        if act.kwargs.get("inplace"):
            act.kwargs = {**act.kwargs, "inplace": False}
            return {"kwarg": "inplace"}
        for i, a in enumerate(act.args[1:], start=1):  # F.relu(x, True)
            if a is True:
                act.args = act.args[:i] + (False,) + act.args[i + 1:]
                return {"arg": i}
        raise PassError(f"GhostNeuronPass: cannot make {act.format_node()} out of place")

    # ------------------------------------------------------------------ leaf sites
    def _rewrite_leaf(self, gm: GraphModule, site: ActivationSite, group: nn.Module,
                      gates_module: nn.Module) -> None:
        leaf_path = site.node.target if site.node.op == "call_module" else leaf_call_target(site.node)
        parent_path, _, attr = site.module.rpartition(".")
        act = gm.get_submodule(parent_path)._modules[attr]
        if isinstance(act, GhostActivation):  # the same leaf called a second time
            return
        if any(True for _ in act.parameters()) or any(True for _ in act.buffers()):
            raise PassError(f"GhostNeuronPass: the activation {site.module} holds state; swapping it would "
                            f"change the state_dict of {leaf_path}")
        beta_module = None
        if self.learn_beta:
            beta_module = self._beta(group, self._site_name(group, site.module.replace(".", "_")))
        ghost = GhostActivation(act, self.soft, self.beta, gates_module, beta_module)
        # every slot of the leaf holding this module (a module may be registered twice)
        slots = [(mod, slot) for mod in gm.get_submodule(leaf_path).modules()
                 for slot, child in mod._modules.items() if child is act]
        for mod, slot in slots:
            mod._modules[slot] = ghost
        self.stats["leaf_modules_swapped"] += len(slots)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _site_name(group: nn.Module, base: str) -> str:
        name, i = base, 1
        while name in group._modules:
            name, i = f"{base}_{i}", i + 1
        return name

    def _beta(self, group: nn.Module, name: str) -> nn.Module:
        """Create the module ``fxsparse.ghost_neurons.<name>`` holding a learnable scalar ``beta``."""
        site = nn.Module()
        site.beta = nn.Parameter(torch.tensor(self.beta, dtype=torch.float32, device=self._device))
        group.add_module(name, site)
        return site


class RemoveGhostNeuronsPass(FxSparsePass):
    """Undo ``GhostNeuronPass``: users read the original activation again, inplace flags and leaf
    activation submodules are restored, the tagged nodes, the gate and the container go."""

    group = GROUP

    def requires(self, graph_module: GraphModule) -> None:
        super().requires(graph_module)
        require_tagged_state(graph_module, GROUP, self.name)

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        for blend in tagged_nodes(gm, group=GROUP, role="blend"):
            info = blend.meta["fxsparse"]
            act = blend.args[0]
            x = _input(act)
            readers = set(info["input_readers"])
            for user in list(blend.users):
                user.replace_input_with(blend, x if user.name in readers else act)
            if info["restore"] is not None:
                _restore_inplace(gm, act, info["restore"])
                self.stats["inplace"] += 1
            self.stats["sites"] += 1
            self.stats[info["style"]] += 1
        for node in reversed(tagged_nodes(gm, group=GROUP)):
            if node.users:
                raise PassError(f"RemoveGhostNeuronsPass: {node.format_node()} is still used by {list(node.users)}")
            graph.erase_node(node)
            self.stats["nodes_removed"] += 1
        for mod in gm.modules():
            for slot, child in mod._modules.items():
                if isinstance(child, GhostActivation):
                    mod._modules[slot] = child.act
                    self.stats["leaf_modules_restored"] += 1
        had_state = GROUP in gates.get(gm) or container(gm, GROUP, create=False) is not None
        gates.unregister(gm, GROUP)
        delete_container(gm, GROUP)
        return PassResult(gm, bool(self.stats) or had_state)

    def ensures(self, graph_module: GraphModule) -> None:
        super().ensures(graph_module)
        if _present(graph_module):
            raise PassError("RemoveGhostNeuronsPass: ghost neurons are still present after removal")


def _restore_inplace(gm: GraphModule, act: Node, restore: dict[str, Any]) -> None:
    if "module" in restore:
        gm.get_submodule(restore["module"]).inplace = True
    elif "target" in restore:
        act.target = restore["target"]
    elif "kwarg" in restore:
        act.kwargs = {**act.kwargs, restore["kwarg"]: True}
    else:
        i = restore["arg"]
        act.args = act.args[:i] + (True,) + act.args[i + 1:]


def remove_ghost_neurons(gm: GraphModule) -> GraphModule:
    """Remove ghost neurons now (see ``RemoveGhostNeuronsPass``); returns ``gm``, changed in place."""
    return RemoveGhostNeuronsPass()(gm).graph_module
