"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a transformed GraphModule.

FSDP2 all-gathers a unit's parameters in the unit module's forward pre-hook and frees them in its
forward hook. A masked graph never calls its layers: it reads ``c2.weight`` with a ``get_attr`` in
the root's forward and calls ``F.conv2d(x, c2.weight * mask, ...)``, so a sharded ``c2`` would
hand the root its DTensor shard. ``shard(gm, units=...)`` therefore first puts the graph in
*unit form*: every operation that applies a unit's parameters (the weight, its mask multiply,
the bias and the conv/linear call) moves into a ``call_module`` of a ``ShardUnit``, a small
GraphModule registered at the layer's own path that holds the layer's own parameters, buffers
and children under their own names. State-dict keys do not change; masks stay buffers of the
root (FSDP2 does not shard buffers) and reach the unit as inputs. Ghost nodes stay in the root
graph, untouched, so every removal pass works as before; ghost parameters belong to the root
unit (sharded at rest, gathered for the root's forward). Then ``fully_shard`` runs on every unit
(a list of modules for a block) and on the root.

A ghost removal deletes parameters from the module; ``forget_removed`` takes them out of FSDP's
parameter groups too, so they are no longer all-gathered and their shards are freed
(``fxsparse.distributed.step`` calls it). ``export`` gathers the full state dict with
``torch.distributed.checkpoint`` and folds the masks, on every rank.

Checkpoints: ``save_sharded`` / ``load_sharded`` write and read the module's and optimizer's state
with ``torch.distributed.checkpoint`` (``get_state_dict`` / ``set_state_dict``: DTensor shards,
optimizer state by parameter name, so DCP reshards on load); ``read_sharded`` reads the model's
tensors whole in one process, for rebuilding the graph stage before sharding.
``fxsparse.tools.checkpoint.CheckpointManager.save_sharded`` makes the write atomic.

Without a process group of more than one rank, ``shard`` returns ``gm`` unchanged: the graph of a
single-process or DDP run is never put in unit form.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from .distributed import DistributedError, _NOT_SYNCED, _check_same, check_identical, is_distributed, world_size
from .pass_infra import CONTAINER, container

log = logging.getLogger(__name__)

__all__ = [
    "UnitError", "ShardUnit", "shard", "is_sharded", "layer_units", "to_unit_form", "forget_removed",
    "local_shard_bytes", "export", "META_KEY", "save_sharded", "load_sharded", "read_sharded",
]

META_KEY = "fxsparse.fsdp"  # gm.meta entry: {unit: [module paths fully_shard groups]}


class UnitError(DistributedError):
    """A unit given to ``shard`` cannot be an FSDP unit (names the unit and what to do)."""


# --------------------------------------------------------------------------- the unit module
class ShardUnit(GraphModule):
    """The operations that apply one module's parameters, as a module FSDP can wrap.

    Registered at the module's own path in place of it; its parameters, buffers and children are
    the module's own objects under the same names, so the state dict is unchanged. ``replaced``
    names the class it stands in for (the original module object is kept by the user's model).
    """

    replaced: str = ""

    def extra_repr(self) -> str:
        return f"replaces {self.replaced}"


def _owner(target: str) -> str:
    return target.rpartition(".")[0]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _resolve(gm: nn.Module, target: str) -> Any:
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _reads_parameters(gm: nn.Module, node: Node) -> bool:
    """A get_attr of a parameter, or of a module holding parameters (a leaf's functional_call)."""
    if node.op != "get_attr":
        return False
    obj = _resolve(gm, node.target)
    return isinstance(obj, nn.Parameter) or (isinstance(obj, nn.Module) and any(True for _ in obj.parameters()))


def _describe(node: Node) -> str:
    tag = node.meta.get("fxsparse") or {}
    group = tag.get("group")
    what = f" (added by {group})" if group and group != "masks" else ""
    return f"{node.name}{what}"


# --------------------------------------------------------------------------- choosing units
def layer_units(gm: GraphModule, ranks: int | None = None) -> list[str]:
    """The default units: every conv/linear layer of the original model, in graph order.

    Layers held inside leaf modules are left to the root unit, and so are layers too small to
    shard over ``ranks`` (a weight with fewer rows than ranks would leave a rank nothing to hold).
    """
    from .graph import parameterized_layers

    ranks = ranks or world_size()
    out: list[str] = []
    for layer in parameterized_layers(gm):
        name = layer.name
        if layer.inside_leaf or not name or _under(name, CONTAINER) or name in out:
            continue
        if any(_under(name, u) or _under(u, name) for u in out):
            continue
        if _rows(gm.get_submodule(name)) < ranks:
            log.info("fsdp: layer %s left to the root unit: too small to shard over %d ranks", name, ranks)
            continue
        out.append(name)
    return out


def _rows(module: nn.Module) -> int:
    """The most rows (dim 0, what FSDP2 shards) of any parameter of ``module``."""
    return max((p.shape[0] if p.dim() else 1 for p in module.parameters()), default=0)


def _check_units(gm: GraphModule, units: Sequence[str], ranks: int) -> None:
    seen: list[str] = []
    for u in units:
        if not isinstance(u, str) or not u:
            raise UnitError(f"unit {u!r}: a unit is the qualified name of a submodule (e.g. 'layer1.0' or "
                            f"'layer1.0.conv1'); the root is always a unit of its own")
        if _under(u, CONTAINER):
            raise UnitError(
                f"unit {u!r} is fxsparse state (masks, gates, ghost branches), not a module of the model. Ghost "
                f"branches are read in the root graph next to the layers they feed, and removed during training: "
                f"they always belong to the root unit. Name modules of the original model only.")
        try:
            module = gm.get_submodule(u)
        except AttributeError:
            raise UnitError(f"unit {u!r}: no such submodule in the model (see gm.named_modules())") from None
        for other in seen:
            if _under(u, other) or _under(other, u):
                raise UnitError(f"unit {u!r} overlaps unit {other!r}: units must be disjoint subtrees")
        seen.append(u)
        rows = _rows(module)
        if rows == 0:
            raise UnitError(f"unit {u!r} holds no parameters: there is nothing to shard. Leave it out of the units")
        if rows < ranks:
            raise UnitError(
                f"unit {u!r} is too small to shard over {ranks} ranks: FSDP2 shards every parameter along dim 0 and "
                f"its largest parameter has {rows} row(s), so some ranks would hold none of it. Leave it out of the "
                f"units (its parameters then belong to the root unit) or group it with its neighbours in a larger "
                f"unit (a block)")


# --------------------------------------------------------------------------- unit form
def _param_only(graph: Graph) -> set[Node]:
    """Nodes computed from attributes alone (no graph input): weights, masks and products of them."""
    out: set[Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            out.add(node)
        elif node.op in ("call_function", "call_method") and node.all_input_nodes and \
                all(i in out for i in node.all_input_nodes):
            out.add(node)
    return out


def _unit_of(target: str, units: Sequence[str]) -> str | None:
    return next((u for u in units if _under(target, u)), None)


def _clusters(gm: GraphModule, units: Sequence[str]) -> dict[Node, tuple[str, list[Node], set[Node]]]:
    """{layer node: (unit, the unit-parameter reads, every node that would move)}: each operation
    that applies a unit's parameters, with the attribute computations (weight * mask) feeding it."""
    graph = gm.graph
    attr_only = _param_only(graph)
    clusters: dict[Node, tuple[str, list[Node], set[Node]]] = {}
    for read in [n for n in graph.nodes if n.op == "get_attr" and _unit_of(n.target, units)]:
        if not _reads_parameters(gm, read):
            continue  # a buffer (BatchNorm statistics): FSDP2 leaves buffers alone
        unit = _unit_of(read.target, units)
        if isinstance(_resolve(gm, read.target), nn.Module):
            raise UnitError(
                f"unit {unit!r}: {read.target} is a leaf module whose weights the graph swaps in with "
                f"torch.func.functional_call ({_describe(next(iter(read.users)))}); that call cannot run inside an "
                f"FSDP unit. Leave {read.target} out of the units (its parameters then belong to the root unit)")
        derived, frontier, layers = {read}, [read], []
        while frontier:
            node = frontier.pop()
            for user in node.users:
                if user in attr_only:
                    if user not in derived:
                        derived.add(user)
                        frontier.append(user)
                elif user not in layers:
                    layers.append(user)
        if len(layers) != 1:
            readers = ", ".join(_describe(n) for n in layers) or "nothing"
            ghost = _ghost_groups(layers + list(derived))
            why = (f" A {ghost[0]} branch reads it outside its layer: the unit boundary splits the ghost branch from "
                   f"its layer." if ghost else "")
            raise UnitError(
                f"unit {unit!r}: parameter {read.target} is applied by {len(layers)} operations ({readers}); FSDP "
                f"gathers a unit's parameters for one call of its module, so each parameter must feed exactly one "
                f"layer call.{why} Leave {_owner(read.target) or read.target} out of the units (its parameters then "
                f"belong to the root unit)")
        layer = layers[0]
        if layer.op == "call_module" or layer.op in ("placeholder", "output"):
            raise UnitError(f"unit {unit!r}: parameter {read.target} feeds {layer.format_node()}, which cannot be moved "
                            f"into a unit call. Leave {_owner(read.target)} out of the units")
        prev = clusters.get(layer)
        if prev is not None and prev[0] != unit:
            raise UnitError(f"{layer.name} applies parameters of two units, {prev[0]!r} and {unit!r}: make them one unit")
        entry = clusters.setdefault(layer, (unit, [], {layer}))
        entry[1].append(read)
        entry[2].update(derived)
    return clusters


def _ghost_groups(nodes: Iterable[Node]) -> list[str]:
    groups = {(n.meta.get("fxsparse") or {}).get("group") for n in nodes}
    return sorted(g for g in groups if g and g != "masks")


def _common_owner(gm: GraphModule, layer: Node, unit: str, reads: list[Node]) -> str:
    """The module whose ShardUnit applies ``reads``: the innermost module holding all of them."""
    owners = sorted({_owner(r.target) for r in reads})
    common: list[str] = []
    for atoms in zip(*(o.split(".") for o in owners)):
        if len(set(atoms)) != 1:
            break
        common.append(atoms[0])
    owner = ".".join(common)
    if not owner or not _under(owner, unit):
        raise UnitError(f"unit {unit!r}: {layer.name} applies parameters of several modules ({', '.join(owners)}) with "
                        f"no common module inside the unit; leave them out of the units")
    return owner


def _extract(gm: GraphModule, layer: Node, owner: str, reads: list[Node], attr_only: set[Node]) -> ShardUnit:
    """Move ``layer`` and the attribute computations of ``reads`` into a call of a ShardUnit for ``owner``."""
    # the nodes to move: the reads, what is computed from them and attributes alone, the layer
    inner: set[Node] = set(reads)
    frontier = list(reads)
    while frontier:
        for user in frontier.pop().users:
            if user in attr_only and user not in inner:
                inner.add(user)
                frontier.append(user)
    inner.add(layer)
    ordered = [n for n in gm.graph.nodes if n in inner]
    sub = Graph()
    env: dict[Node, Node] = {}
    inputs: list[Node] = []

    def arg(n: Node) -> Node:
        if n not in env:  # a value from outside (the activation, a mask buffer): an input of the call
            env[n] = sub.placeholder(f"in_{len(inputs)}_{n.name}")
            inputs.append(n)
        return env[n]

    for node in ordered:
        if node in reads:
            env[node] = sub.get_attr(node.target[len(owner) + 1:])
            env[node].meta.update(node.meta)
        else:
            env[node] = sub.node_copy(node, arg)
    sub.output(env[layer])
    module = gm.get_submodule(owner)
    unit_module = ShardUnit(module, sub, class_name="ShardUnit")
    # the module's own state under its own names, read by the graph or not: the state dict is unchanged
    unit_module._parameters = OrderedDict(module._parameters)
    unit_module._buffers = OrderedDict(module._buffers)
    unit_module._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    unit_module._modules = OrderedDict(module._modules)
    unit_module._version = getattr(module, "_version", 1)
    unit_module.replaced = type(module).__qualname__
    unit_module.train(module.training)
    # in the root: one call in place of the moved nodes
    with gm.graph.inserting_before(layer):
        call = gm.graph.call_module(owner, tuple(inputs))
    call.meta.update({k: v for k, v in layer.meta.items() if k != "fxsparse"})
    layer.replace_all_uses_with(call)
    for node in reversed(ordered):
        gm.graph.erase_node(node)
    return unit_module


def to_unit_form(gm: GraphModule, units: Sequence[str]) -> dict[str, list[str]]:
    """Rewrite ``gm`` in place so that every unit's parameters are applied inside module calls.

    Returns {unit: the module paths to shard together for it}: the ShardUnits made for the unit
    and the modules under it the graph calls (BatchNorms, unmasked layers). Everything is checked
    before anything changes: a ``UnitError`` leaves ``gm`` as it was.
    """
    attr_only = _param_only(gm.graph)
    clusters = _clusters(gm, units)
    called: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            called[node.target] = called.get(node.target, 0) + 1
    plan: dict[str, tuple[Node, str, list[Node]]] = {}
    for layer, (unit, reads, moved) in clusters.items():
        owner = _common_owner(gm, layer, unit, reads)
        if owner in plan or called.get(owner):
            others = [plan[owner][0]] if owner in plan else []
            others += [n for n in gm.graph.nodes if n.op == "call_module" and n.target == owner]
            ghost = _ghost_groups(moved | set(clusters.get(others[0], (None, [], set()))[2] if others else ()))
            why = (f" One of them is a {ghost[0]} branch reading the layer's parameters: the unit boundary splits the "
                   f"ghost branch from its layer." if ghost else "")
            raise UnitError(f"unit {unit!r}: {owner}'s parameters are applied by {1 + len(others)} operations "
                            f"({', '.join(_describe(n) for n in [*others, layer])}); FSDP gathers a module's parameters "
                            f"for one call of it.{why} Leave {owner} out of the units (its parameters then belong to "
                            f"the root unit)")
        nested = next((o for o in plan if _under(owner, o) or _under(o, owner)), None)
        if nested is not None:
            raise UnitError(f"unit {unit!r}: {owner} and {nested} both apply their own parameters and one holds the "
                            f"other; leave them out of the units")
        plan[owner] = (layer, unit, reads)
    made = {owner: _extract(gm, layer, owner, reads, attr_only) for owner, (layer, _, reads) in plan.items()}
    for path, unit_module in made.items():
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, unit_module)
    members: dict[str, list[str]] = {u: [o for o, (_, unit, _) in plan.items() if unit == u] for u in units}
    for node in gm.graph.nodes:
        unit = _unit_of(node.target, units) if node.op == "call_module" else None
        if unit is not None and node.target not in members[unit] and _rows(gm.get_submodule(node.target)):
            members[unit].append(node.target)
    for unit, paths in members.items():
        # the outermost modules only: each parameter goes to the group of its nearest unit module
        paths[:] = [p for p in paths if not any(q != p and _under(p, q) for q in paths)]
        if not paths:
            raise UnitError(f"unit {unit!r}: the graph applies none of its parameters (is the module used?); leave it "
                            f"out of the units")
    gm.graph.lint()
    gm.recompile()
    return members


# --------------------------------------------------------------------------- sharding
def is_sharded(module: nn.Module) -> bool:
    """True for a module ``fully_shard`` has been applied to."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard(gm: GraphModule, units: str | Iterable[str] = "layers", *, scheduler=None, check: bool = True,
          **fsdp_options: Any) -> GraphModule:
    """Shard a transformed GraphModule with FSDP2, one unit per layer (or per block), and the root.

    Args:
        gm: the transformed GraphModule on this rank's device, identical on every rank (same seed,
            masks and calibration data), before an optimizer is built over it.
        units: ``"layers"`` (every conv/linear layer of the model large enough to shard) or module
            names (``["layer1.0", "layer1.1", ...]``): each becomes one FSDP unit whose parameters
            are gathered together; what no unit holds (the rest, and every ghost) is the root unit.
        scheduler: its ``RecipeScheduler``, checked to agree across ranks like ``wrap`` does.
        check: check before sharding that every rank holds bitwise the same parameters, buffers,
            masks and graph (FSDP2 shards each rank's own copy; it broadcasts nothing).
        fsdp_options: for ``fully_shard`` (``mesh``, ``reshard_after_forward``, ``mp_policy``, ...).

    Returns ``gm`` itself, now an ``FSDPModule``; build the optimizer after this. In a single
    process ``gm`` is returned unchanged.
    """
    from torch.distributed.fsdp import fully_shard

    if not is_distributed():
        return gm
    if is_sharded(gm):
        raise DistributedError("shard(): this module is sharded already")
    ranks = world_size()
    biggest = _rows(gm)
    if biggest < ranks:
        raise UnitError(
            f"the model is too small to shard over {ranks} ranks: FSDP2 shards every parameter along dim 0 and the "
            f"largest has {biggest} row(s), so some ranks would hold nothing. Use DDP (fxsparse.distributed.wrap)")
    skips = container(gm, "ghost_skips", create=False)
    if skips is not None and any(getattr(b, "fold_into", None) is not None for b in skips.children()):
        raise DistributedError(
            "ghost_skips.fold = true is not supported with FSDP: folding a branch writes it into the main conv's "
            "weight, which is sharded. Set ghost_skips.fold = false (the default) or train with DDP")
    if scheduler is not None:
        _check_same({"step": scheduler.step_count, "total_steps": scheduler.total_steps,
                     "removed": list(scheduler.removed)}, "the ghost schedule")
    if check:
        check_identical(gm, graph=True)
    if isinstance(units, str) and units != "layers":
        raise UnitError(f"units must be 'layers' or a list of module names; got {units!r}")
    chosen = layer_units(gm, ranks) if units == "layers" else list(units)
    _check_units(gm, chosen, ranks)
    members = to_unit_form(gm, chosen)
    if check:
        check_identical(gm, prefixes=_NOT_SYNCED, graph=True)
    for unit, paths in members.items():
        modules = [gm.get_submodule(p) for p in paths]
        fully_shard(modules[0] if len(modules) == 1 else modules, **fsdp_options)
    fully_shard(gm, **fsdp_options)
    gm.meta[META_KEY] = {u: list(p) for u, p in members.items()}
    log.info("fsdp: %d units and the root over %d ranks", len(members), ranks)
    return gm


def _param_groups(module: nn.Module):
    """(state, group) for every FSDP parameter group in ``module``'s tree."""
    from torch.distributed.fsdp import FSDPModule

    seen = set()
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        if id(state) in seen:
            continue
        seen.add(id(state))
        for group in list(state._fsdp_param_groups):
            yield state, group


def local_shard_bytes(module: nn.Module) -> int:
    """Bytes of this rank's parameter shards in every FSDP group of ``module`` (padding included)."""
    total = 0
    for _, group in _param_groups(module):
        for fp in group.fsdp_params:
            data = fp._sharded_param_data
            total += data.numel() * data.element_size()
    return total


def forget_removed(module: nn.Module) -> dict[str, Any]:
    """Take parameters a ghost removal deleted out of FSDP's parameter groups.

    FSDP2 has no API for removing a parameter from a group: a removed ghost parameter would stay
    in its group, be all-gathered at every forward, and keep its shard alive. This drops its
    ``FSDPParam``, the state-dict hooks FSDP put on its deleted module, and a group left empty.
    Call it on every rank between steps, after the optimizer dropped the parameters
    (``fxsparse.distributed.step`` does). Returns ``{"parameters": n, "bytes": this rank's shard
    bytes released, "alive": how many of them something else still holds}``.
    """
    live = {id(p) for p in module.parameters()}
    refs: list[weakref.ref] = []
    freed = 0
    for state, group in list(_param_groups(module)):
        freed += _drop_dead(state, group, live, refs)
    gc.collect()
    return {"parameters": len(refs), "bytes": freed, "alive": sum(r() is not None for r in refs)}


def _drop_dead(state, group, live: set[int], refs: list) -> int:
    gone = [fp for fp in group.fsdp_params if id(fp.sharded_param) not in live]
    if not gone:
        return 0
    keep = [fp for fp in group.fsdp_params if id(fp.sharded_param) in live]
    freed = sum(fp._sharded_param_data.numel() * fp._sharded_param_data.element_size() for fp in gone)
    refs.extend(weakref.ref(fp.sharded_param) for fp in gone)
    group.fsdp_params = keep
    holders = {fp._module_info.module for fp in keep}
    for hooks in (group._module_to_pre_save_state_dict_hook_handle, group._module_to_pre_load_state_dict_hook_handle):
        for m in [m for m in hooks if m not in holders]:
            hooks.pop(m).remove()
    if keep:
        group._init_mp_dtypes()
    else:
        state._fsdp_param_groups.remove(group)
    return freed


# --------------------------------------------------------------------------- export
def export(module: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """``fxsparse.export`` for a sharded module: collective, call it on every rank.

    Gathers the full state dict (``torch.distributed.checkpoint.state_dict.get_model_state_dict``
    with ``full_state_dict=True``), folds the masks into the weights and drops ``fxsparse.*``.
    The keys are the original model's (units keep them), so the result loads with
    ``load_state_dict(strict=True)`` into the original class. Every rank gets the whole state.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .export import ExportError, _leftovers, _original_class_version

    if not is_sharded(module):
        from .export import export as plain_export

        return plain_export(module)
    left = _leftovers(module)
    if left:
        raise ExportError(f"cannot export while fxsparse groups other than masks are in the graph: {', '.join(left)}. "
                          f"Remove ghosts first (fxsparse.remove_ghosts(gm) on every rank, then "
                          f"fxsparse.distributed.forget_removed(gm))")
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    prefix = CONTAINER + "."
    masks_prefix = f"{CONTAINER}.masks."
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in full.items():
        if key.startswith(prefix):
            continue
        value = value.detach().clone()
        mask = full.get(masks_prefix + key)
        state[key] = value.mul_(mask) if mask is not None else value
    metadata = OrderedDict((k, v) for k, v in getattr(module.state_dict(), "_metadata", {}).items()
                           if k != CONTAINER and not k.startswith(prefix))
    version = _original_class_version(module)
    if version is not None:
        metadata[""] = {**metadata.get("", {}), "version": version}
    state._metadata = metadata  # type: ignore[attr-defined]
    return state


# --------------------------------------------------------------------------- sharded checkpoints
_EMPTY_GROUPS = "optim_empty_groups"


class _NonEmptyGroups:
    """The optimizer with its empty param groups hidden, for ``torch.distributed.checkpoint.state_dict``.

    ``RecipeScheduler`` keeps one group per ghost group, emptied at its removal (and ghost
    neurons have none at all); DSD maps groups by their parameters' names and handles at most one
    empty group, wrongly (torch 2.14: it copies another group's hyperparameters into it and loses
    its own). Inside ``with``, ``optimizer.param_groups`` holds the non-empty groups only; on
    exit the empty ones are put back at their places, around whatever DSD loaded. Their
    hyperparameters travel beside, under ``optim_empty_groups``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.groups = optimizer, optimizer.param_groups
        self.empty = [i for i, g in enumerate(self.groups) if not g["params"]]

    def hyperparameters(self) -> list[dict[str, Any]]:
        return [{"index": i, **{k: v for k, v in self.groups[i].items() if k != "params"}} for i in self.empty]

    def __enter__(self) -> "_NonEmptyGroups":
        self.optimizer.param_groups = [g for g in self.groups if g["params"]]
        return self

    def __exit__(self, *exc) -> None:
        loaded = iter(self.optimizer.param_groups)  # a new list of new dicts once DSD loaded a state
        self.optimizer.param_groups = [g if i in self.empty else next(loaded) for i, g in enumerate(self.groups)]

    def load(self, saved: list[dict[str, Any]]) -> None:
        if [e["index"] for e in saved] != self.empty:
            raise DistributedError(f"the checkpoint's optimizer has empty param groups at {[e['index'] for e in saved]}, "
                                   f"this one at {self.empty}: it was not built the same way (another recipe?)")
        for entry in saved:
            self.optimizer.param_groups[entry["index"]].update({k: v for k, v in entry.items() if k != "index"})


def _state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"model": ..., "optim": ..., "optim_empty_groups": ...}`` as
    ``torch.distributed.checkpoint.state_dict`` gives them: DTensor shards for a sharded module,
    plain tensors otherwise; optimizer state keyed by parameter name (not by position), so it
    loads into a module sharded another way."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(module)}
    with _NonEmptyGroups(optimizer) as groups:
        model_sd, optim_sd = get_state_dict(module, optimizer)
    return {"model": model_sd, "optim": optim_sd, _EMPTY_GROUPS: groups.hyperparameters()}


def save_sharded(module: nn.Module, optimizer: torch.optim.Optimizer | None, directory) -> None:
    """Write ``module``'s and ``optimizer``'s state to ``directory`` with ``torch.distributed.checkpoint``.

    Collective under a process group: every rank writes its own shards (``__<rank>_0.distcp``),
    rank 0 the ``.metadata`` once all are written; files are fsynced. The state dicts are
    ``get_state_dict``'s (DTensor shards under FSDP2), so ``load_sharded`` can load them into the
    same module sharded over another number of ranks, or not sharded at all. Write to a temporary
    directory and rename it (``CheckpointManager.save_sharded`` does): DCP itself is not atomic.

    Buffers are not sharded and DCP writes one copy of each, from whichever rank its planner picks:
    call ``fxsparse.distributed.sync_buffers(module)`` first when they may differ between ranks
    (BatchNorm statistics after training steps; masks and gates are equal by construction).
    """
    import torch.distributed.checkpoint as dcp

    with _quiet_without_process_group():
        dcp.save(_state_dicts(module, optimizer), storage_writer=dcp.FileSystemWriter(str(directory), sync_files=True),
                 no_dist=not is_distributed())


@contextlib.contextmanager
def _quiet_without_process_group():
    """DCP warns that it assumes a single process when there is no process group: that is meant."""
    with warnings.catch_warnings():
        if not is_distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_sharded(module: nn.Module, optimizer: torch.optim.Optimizer | None, directory) -> None:
    """Load what ``save_sharded`` wrote into ``module`` and ``optimizer`` (collective under a
    process group). ``module`` must already be at the checkpoint's graph stage (removals replayed)
    and sharded as it will train; ``optimizer`` built over it. DCP reshards: the checkpoint may
    come from another number of ranks, or be loaded into an unsharded module. Strict: every key
    of the module and the optimizer must be in the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _state_dicts(module, optimizer)  # the structure to load into: DCP fills it in place
    with _quiet_without_process_group():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=not is_distributed())
    if optimizer is None:
        set_model_state_dict(module, state["model"])
        return
    with _NonEmptyGroups(optimizer) as groups:
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    groups.load(state[_EMPTY_GROUPS])


def read_sharded(directory, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model tensors under ``prefix`` in a ``save_sharded`` checkpoint, whole, read by this
    process alone (no collective): what a resume needs before the model can be sharded (the masks
    for ``transform``, the weights to load before ``fully_shard``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(directory))
    head = "model." + prefix
    wanted = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
              for key, meta in reader.read_metadata().state_dict_metadata.items()
              if key.startswith(head) and isinstance(meta, TensorStorageMetadata)}
    if not wanted:
        return {}
    state = {"model": wanted}
    with warnings.catch_warnings():  # no_dist under a process group too: each rank reads by itself
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state["model"]
