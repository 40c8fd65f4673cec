"""What a GraphModule contains, as records a person or a program can read.

``inspect_graph(gm)`` works on any ``torch.fx.GraphModule`` -- a fresh trace or the output of any
pass -- and reports one row per parameterized layer or notable node (layer path, op, output shape,
parameter count, mask density, pass tags), a summary, and optionally the difference from the
graph before the passes ran. Rendering lives beside it: ``to_text`` / ``to_json`` here, the
drawings (DOT, SVG, HTML) in ``fxsparse.render``.

Nothing here depends on a particular pass: masks are read from the ``fxsparse.masks.<param>``
buffers and pass-added nodes from their ``node.meta["fxsparse"]`` tags, so what later passes add
shows up without changes here.
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.fx import GraphModule, Node

from . import graph as fxgraph
from .masks import MaskReport, tied_weights
from .pass_infra import CONTAINER, HISTORY_KEY, container

log = logging.getLogger(__name__)

__all__ = [
    "Row", "GraphDiff", "Report", "inspect_graph", "rows", "summary", "graph_diff", "masks_of",
    "module_path", "op_name", "shape_of", "to_text", "to_json", "WEIGHT_GROUPS",
]

# Groups whose nodes rewrite an existing layer's weight rather than add computation: their nodes
# are shown as part of the layer (mask density) instead of as rows / boxes of their own.
WEIGHT_GROUPS = frozenset({"masks", "rescale", "dynamic"})  # dynamic: RigL's gradient probe on a masked weight


# --------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One table row: a layer, an activation, another module call, or a node a pass added."""

    node: str  # fx node name
    layer: str  # module path ("layer1.0.conv1"); "" for top-level functions
    op: str  # module type ("Conv2d"), function ("add") or method (".relu()")
    kind: str  # input, layer, activation, module, added, output (+ function, attribute with all_nodes)
    shape: list[Any] | None  # output shape(s) from node.meta["tensor_meta"]
    params: int  # parameters the node applies
    density: float | None  # kept fraction of its masked weights; None: no mask (dense)
    tag: str | None = None  # "group/role" of a node a pass added


def masks_of(gm: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: mask} from the ``fxsparse.masks.<param>`` buffers (empty: no masks)."""
    sub = container(gm, "masks", create=False)
    return dict(sub.named_buffers()) if sub is not None else {}


def shape_of(node: Node) -> list[Any] | None:
    """The output shape, a list of shapes for tuple outputs, or None when not propagated."""

    def convert(tm: Any) -> Any:
        if hasattr(tm, "shape"):
            return list(tm.shape)
        if isinstance(tm, (tuple, list)):
            return [convert(t) for t in tm]
        if isinstance(tm, dict):
            return [convert(t) for t in tm.values()]
        return None

    tm = node.meta.get("tensor_meta")
    return convert(tm) if tm is not None else None


def _tag(node: Node) -> dict[str, Any] | None:
    t = node.meta.get("fxsparse")
    return t if isinstance(t, dict) else None


def module_path(node: Node) -> str:
    """The module a node belongs to: its call_module target, the layer a pass rewrote, or the
    innermost module on its ``nn_module_stack``; "" for top-level code or unknown."""
    tag = _tag(node) or {}
    original = tag.get("original")
    if isinstance(original, dict) and original.get("op") == "call_module":
        return str(original["target"])
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        key, value = next(reversed(stack.items()))
        return value[0] if isinstance(value, tuple) else key  # torch stores (path, type)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    return ""


def op_name(gm: GraphModule, node: Node) -> str:
    """A short description of what a node computes: module type, function or method name."""
    tag = _tag(node) or {}
    original = tag.get("original")
    if isinstance(original, dict) and original.get("op") == "call_module":
        node_target, op = original["target"], "call_module"
    else:
        node_target, op = node.target, node.op
    if op == "call_module":
        try:
            return type(gm.get_submodule(node_target)).__name__
        except AttributeError:  # the rewritten module is gone
            return str(node_target)
    if op == "call_function":
        return getattr(node_target, "__name__", str(node_target))
    if op == "call_method":
        return f".{node_target}()"
    return op


def _layers_at(gm: GraphModule, node: Node) -> list[fxgraph.Layer]:
    found = fxgraph.layer_of(gm, node)
    return [found] if isinstance(found, fxgraph.Layer) else list(found or [])


def _applied_params(gm: GraphModule, node: Node, layers: list[fxgraph.Layer]) -> list[str]:
    """Qualified names of the parameters a node applies (for counting and mask density)."""
    path = None
    if node.op == "call_module":
        path = str(node.target)
    else:
        leaf = fxgraph.leaf_call_target(node)
        if leaf is not None:
            path = leaf
        elif layers:  # a functional conv/linear: the weight's module (weight, bias, ...)
            owner, _, _ = layers[0].weight.rpartition(".")
            try:
                mod = gm.get_submodule(owner) if owner else gm
            except AttributeError:
                return [l.weight for l in layers]
            prefix = f"{owner}." if owner else ""
            return [prefix + n for n, _ in mod.named_parameters(recurse=False)]
    if path is None:
        return []
    try:
        mod = gm.get_submodule(path)
    except AttributeError:
        return []
    return [f"{path}.{n}" for n, _ in mod.named_parameters()]


def rows(gm: GraphModule, *, all_nodes: bool = False) -> list[Row]:
    """One row per input, parameterized layer, activation, module call, added node and output.

    Plain functions (add, flatten, getattr, ...) and get_attr reads are left out unless
    ``all_nodes``; nodes of the weight-rewriting groups (masks, rescale) are never rows of their
    own (their effect is the layer's mask density).
    """
    params = dict(gm.named_parameters(remove_duplicate=False))
    masks = masks_of(gm)
    activations = {site.node for site in fxgraph.activation_sites(gm)}
    out = []
    for node in gm.graph.nodes:
        tag = _tag(node)
        group = tag.get("group") if tag else None
        layers = _layers_at(gm, node)
        if node.op == "placeholder":
            kind = "input"
        elif node.op == "output":
            kind = "output"
        elif layers:
            kind = "layer"
        elif group is not None and group not in WEIGHT_GROUPS and node.op != "get_attr":
            kind = "added"
        elif node in activations:
            kind = "activation"
        elif node.op == "call_module" and not isinstance(gm.get_submodule(node.target), nn.Identity):
            kind = "module"  # nn.Identity placeholders (timm's drop_block=None, aa=None) are noise
        elif all_nodes and group is None:
            kind = "function" if node.op != "get_attr" else "attribute"
        else:
            continue
        applied = _applied_params(gm, node, layers)
        masked = [p for p in applied if p in masks]
        density = None
        if masked:
            kept = sum(int(masks[p].sum()) for p in masked)
            density = kept / sum(masks[p].numel() for p in masked)
        out.append(Row(
            node=node.name,
            layer=module_path(node),
            op=op_name(gm, node) + (f" ({len(layers)} layers)" if len(layers) > 1 else ""),
            kind=kind,
            shape=shape_of(node.args[0]) if node.op == "output" and isinstance(node.args[0], Node) else shape_of(node),
            params=sum(_numel(params[p]) for p in applied if p in params),
            density=density,
            tag=f"{tag['group']}/{tag['role']}" if tag and group not in WEIGHT_GROUPS else None,
        ))
    return out


# --------------------------------------------------------------------------- summary
def summary(gm: GraphModule) -> dict[str, Any]:
    """Counts over the whole graph: nodes, parameters, layers, activations, masks, gates, passes."""
    layers = fxgraph.parameterized_layers(gm)
    sites = fxgraph.activation_sites(gm)
    params = dict(gm.named_parameters())
    added = {n for n in params if n.startswith(CONTAINER + ".")}
    masks = masks_of(gm)
    info = gm.meta.get("fxsparse")
    out: dict[str, Any] = {
        "model": getattr(info, "model_class", type(gm).__name__),
        "traced_mode": ("train" if info.traced_training else "eval") if info is not None else None,
        "mode_dependent": getattr(info, "mode_dependent", False),
        "input_shapes": [list(s) for s in getattr(info, "input_shapes", [])],
        "nodes": len(gm.graph.nodes),
        "nodes_by_op": dict(Counter(n.op for n in gm.graph.nodes)),
        "parameters": sum(_numel(p) for n, p in params.items() if n not in added),
        "parameters_added": sum(_numel(params[n]) for n in added),
        "layers": len(layers),
        "layers_by_kind": dict(Counter(l.kind for l in layers)),
        "activation_sites": len(sites),
        "activations_by_kind": dict(Counter(s.kind for s in sites)),
        "masks": None,
        "gates": _gates(gm),
        "tagged_nodes": dict(Counter(t["group"] for n in gm.graph.nodes if (t := _tag(n)))),
        "passes": list(gm.meta.get(HISTORY_KEY, [])),
        "dynamic": _dynamic(gm),
        **_ghost_schedules(gm),
    }
    if masks:
        masked_params = [params[p] for p in masks if p in params]
        counted = MaskReport.from_masks(masks, tied=tied_weights(gm, masks))  # a tied weight once
        out["masks"] = {
            "tensors": len(masks),
            "density": counted.kept / max(1, counted.total),
            "weights_masked": sum(_numel(p) for p in masked_params),
        }
    return out


def _ghost_schedules(gm: GraphModule) -> dict[str, Any]:
    """``schedules``: how each ghost group still in the graph will move (its recipe's schedule);
    ``distill``: the recipe's ``[distill]``, described (None when off or no recipe)."""
    recipe = gm.meta.get("fxsparse.recipe")
    if recipe is None or not hasattr(recipe, "ghosts"):
        return {"schedules": {}, "distill": None, "ghosts_off": {}}
    from .scheduler import ghost_schedules_plain

    present, plain = _gates(gm), ghost_schedules_plain(gm, recipe)
    schedules = {g: spec.schedule_for(plain).describe()
                 + (" (schedule_plain: a plain network)" if plain and spec.schedule_plain is not None else "")
                 for g, spec in recipe.ghosts.items() if g in present}
    distill = recipe.distill.describe(recipe, plain) if recipe.distill.enabled else None
    from .transform import GHOSTS_OFF_KEY

    return {"schedules": schedules, "distill": distill, "ghosts_off": dict(gm.meta.get(GHOSTS_OFF_KEY, {}))}


def _dynamic(gm: GraphModule) -> dict[str, Any] | None:
    """The ``[dynamic]`` mask schedule of the recipe ``gm`` was transformed with (None: masks fixed)."""
    recipe = gm.meta.get("fxsparse.recipe")
    spec = getattr(recipe, "passes", {}).get("dynamic") if recipe is not None else None
    if spec is None or not spec.enabled:
        return None
    from .masks.dynamic import DynamicSchedule, describe

    options = {k: v for k, v in spec.options.items() if k != "final_sparsity"}
    schedule = DynamicSchedule.create(**options)
    final = recipe.masks.options.get("sparsity")
    return {"method": schedule.method, "options": dict(spec.options), "final_sparsity": final,
            "schedule": describe(schedule, final_sparsity=final)}


def _numel(p: torch.Tensor) -> int:
    # a lazy module's parameters have no size until its first forward
    return 0 if isinstance(p, nn.parameter.UninitializedParameter) else p.numel()


def _gates(gm: GraphModule) -> dict[str, float]:
    from . import gates

    return gates.get(gm)


# --------------------------------------------------------------------------- diff
@dataclass
class GraphDiff:
    """What changed between a graph before passes and after them.

    Nodes are matched by name (passes keep the names of nodes they do not touch); ``added`` and
    ``removed`` hold the names of nodes found in only one graph, ``added_by_group`` counts the
    added nodes by the pass group that tagged them ("untagged" otherwise), and ``structure`` is
    ``fxsparse.graph.structure_diff``'s name-independent view (roots of each difference).
    """

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    added_by_group: dict[str, int] = field(default_factory=dict)
    removed_ops: dict[str, int] = field(default_factory=dict)
    same_structure: bool = True
    structure: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """A human-readable summary, one line per fact."""
        if self.same_structure and not self.added and not self.removed:
            return ["same structure as the traced original"]
        out = [f"+{n} nodes added by {g}" for g, n in sorted(self.added_by_group.items())]
        out += [f"-{n} {op} nodes removed" for op, n in sorted(self.removed_ops.items())]
        return out


def graph_diff(before: GraphModule, after: GraphModule, limit: int = 40) -> GraphDiff:
    """The difference between ``before`` (e.g. the traced original) and ``after`` (rewritten)."""
    names_before = {n.name: n for n in before.graph.nodes}
    names_after = {n.name for n in after.graph.nodes}
    added = [n for n in after.graph.nodes if n.name not in names_before]
    removed = [n for name, n in names_before.items() if name not in names_after]
    by_group = Counter(((_tag(n) or {}).get("group") or "untagged") for n in added)
    removed_ops = Counter(op_name(before, n) for n in removed)
    return GraphDiff(
        added=[n.name for n in added],
        removed=[n.name for n in removed],
        added_by_group=dict(by_group),
        removed_ops=dict(removed_ops),
        same_structure=fxgraph.same_structure(before, after),
        structure=fxgraph.structure_diff(before, after, limit=limit),
    )


# --------------------------------------------------------------------------- report
@dataclass
class Report:
    """Everything ``fxsparse inspect`` shows about one GraphModule."""

    gm: GraphModule
    rows: list[Row]
    summary: dict[str, Any]
    diff: GraphDiff | None = None
    before: GraphModule | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "rows": [asdict(r) for r in self.rows],
            "diff": asdict(self.diff) if self.diff is not None else None,
        }


def inspect_graph(gm: GraphModule, before: GraphModule | None = None, *, all_nodes: bool = False) -> Report:
    """Rows, summary and (given the graph ``before`` the passes) the diff of any GraphModule."""
    if not isinstance(gm, GraphModule):
        from .errors import FxSparseError

        raise FxSparseError(
            f"inspect expects a torch.fx.GraphModule; got {type(gm).__name__}. Trace the model "
            f"first: fxsparse.trace(model)."
        )
    _complete_shapes(gm)
    diff = graph_diff(before, gm) if before is not None else None
    return Report(gm, rows(gm, all_nodes=all_nodes), summary(gm), diff, before)


def _complete_shapes(gm: GraphModule) -> None:
    # passes add nodes without a shape (ghost channels have new widths): fill them in here, where
    # they are shown, rather than in every transform
    from .trace import complete_shapes

    try:
        complete_shapes(gm)
    except Exception as e:  # an annotation, not worth failing the report: those rows show "?"
        log.warning("could not propagate shapes to the nodes passes added: %s: %s", type(e).__name__, e)


# --------------------------------------------------------------------------- text / json
def format_shape(shape: Any) -> str:
    if shape is None:
        return "?"
    if shape and all(isinstance(s, int) for s in shape):
        return "x".join(str(s) for s in shape)
    if not shape:
        return "scalar"
    return "(" + ", ".join(format_shape(s) for s in shape[:3]) + (", ..." if len(shape) > 3 else "") + ")"


def format_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _table(report: Report) -> Table:
    s = report.summary
    table = Table(title=f"{s['model']} ({s['traced_mode'] or 'untraced'} mode)", title_justify="left")
    table.add_column("layer", overflow="fold")
    table.add_column("op")
    table.add_column("output shape")
    table.add_column("params", justify="right")
    table.add_column("mask density", justify="right")
    table.add_column("added by pass")
    styles = {"added": "bold magenta", "input": "dim", "output": "dim", "activation": "cyan"}
    for r in report.rows:
        table.add_row(
            r.layer or f"({r.node})",
            r.op,
            format_shape(r.shape),
            f"{r.params:,}" if r.params else "",
            f"{r.density:.1%}" if r.density is not None else ("dense" if r.kind == "layer" else ""),
            r.tag or "",
            style=styles.get(r.kind),
        )
    return table


def summary_lines(report: Report) -> list[str]:
    s = report.summary
    lines = [
        f"{s['nodes']} nodes, {format_count(s['parameters'])} parameters"
        + (f" (+{format_count(s['parameters_added'])} added by passes)" if s["parameters_added"] else "")
        + f", {s['layers']} layers ({', '.join(f'{n} {k}' for k, n in s['layers_by_kind'].items()) or 'none'})"
        + f", {s['activation_sites']} activation sites"
        + (f" ({', '.join(f'{n} {k}' for k, n in s['activations_by_kind'].items())})" if s["activations_by_kind"] else ""),
    ]
    if s["mode_dependent"]:
        lines.append(f"mode dependent: this graph runs in {s['traced_mode']} mode only")
    if s["masks"]:
        lines.append(f"masks: {s['masks']['tensors']} weight tensors, overall density {s['masks']['density']:.2%}")
    if s["gates"]:
        lines.append("gates: " + ", ".join(f"{k}={v:g}" for k, v in s["gates"].items()))
    if s.get("schedules"):
        lines.append("schedules (gate, as fractions of training): "
                     + "; ".join(f"{g} {text}" for g, text in s["schedules"].items()))
    for group, why in (s.get("ghosts_off") or {}).items():
        lines.append(f"{group}: not added here: {why}")
    if s.get("distill"):
        lines.append(f"distill: {s['distill']}")
    if s.get("dynamic"):
        lines.extend(s["dynamic"]["schedule"])
    if s["passes"]:
        lines.append("passes: " + "; ".join(
            f"{p['pass']} ({', '.join(f'{k}={v}' for k, v in p.get('changes', {}).items()) or 'no change'})"
            for p in s["passes"]))
    lines.extend(_skipped_lines(s["passes"]))
    if report.diff is not None:
        lines.append("diff vs traced original: " + "; ".join(report.diff.lines()))
    return lines


def _skipped_lines(passes: list[dict[str, Any]], shown: int = 4) -> list[str]:
    """One line per pass and reason: the sites a pass left alone (e.g. ``ghost_skips.where``)."""
    lines = []
    for p in passes:
        by_reason: dict[str, list[str]] = {}
        for site, why in p.get("skipped", {}).items():
            by_reason.setdefault(why, []).append(site)
        for why, sites in by_reason.items():
            names = ", ".join(sites[:shown]) + (f" and {len(sites) - shown} more" if len(sites) > shown else "")
            lines.append(f"{p['pass']} left {len(sites)} site{'s' * (len(sites) != 1)} alone ({why}): {names}")
    return lines


def to_text(report: Report, *, width: int = 140, color: bool = False) -> str:
    """The table and the summary as text (rich markup rendered; ANSI colours only if ``color``)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=color, color_system="auto" if color else None)
    print_report(report, console)
    return buf.getvalue()


def print_report(report: Report, console: Console) -> None:
    console.print(_table(report))
    for line in summary_lines(report):
        console.print(line, highlight=False, markup=False)


def to_json(report: Report, *, indent: int = 2) -> str:
    return json.dumps(report.to_dict(), indent=indent, default=str)
