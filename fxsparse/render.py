"""Drawing a GraphModule: DOT source, a standalone SVG, and a self-contained HTML page.

No graphviz binary is needed. The graph is first collapsed by module hierarchy (``collapse``):
at depth ``d`` every node inside a module more than ``d`` levels deep is drawn as part of that
module's box, so ResNet-50 at depth 2 is one box per bottleneck block. Nodes added by passes
become boxes of their own, coloured by pass group, beside the module they hang off; nodes of
weight-rewriting groups (masks, rescale) are drawn inside the layer they rewrite. The layout is
layered: each box sits one row below the lowest of its inputs (longest path over the graph's
topological order) and rows are ordered by the mean position of their inputs.
"""
from __future__ import annotations

import colorsys
import hashlib
import html
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from torch.fx import GraphModule, Node

from .inspect import WEIGHT_GROUPS, Report, format_count, format_shape, module_path, op_name, shape_of

__all__ = [
    "Box", "BoxGraph", "collapse", "auto_depth", "max_depth", "module_types", "layout", "to_dot", "to_svg",
    "to_html", "group_colour", "GROUP_COLOURS",
]

# Fill colour of boxes added by each pass group; unknown groups get a colour from their name.
GROUP_COLOURS = {
    "masks": "#cfe2ff",
    "rescale": "#fff3bf",
    "ghost_neurons": "#ffd8a8",
    "ghost_skips": "#b2f2bb",
    "ghost_channels": "#d0bfff",
}
_PLAIN = "#ffffff"
_MODULE = "#f1f3f5"  # a collapsed module
_IO = "#e9ecef"


def group_colour(group: str) -> str:
    if group in GROUP_COLOURS:
        return GROUP_COLOURS[group]
    hue = int(hashlib.sha1(group.encode()).hexdigest()[:4], 16) / 0xFFFF
    r, g, b = colorsys.hls_to_rgb(hue, 0.82, 0.7)  # a light, saturated colour (valid in DOT too)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


# --------------------------------------------------------------------------- collapse
@dataclass
class Box:
    """One drawn box: a single node, or every node of a module collapsed into one."""

    key: str
    label: str  # first line: module path or node name
    detail: str  # second line: op / module type and node count
    nodes: list[str] = field(default_factory=list)
    group: str | None = None  # pass group that added these nodes (None: original)
    groups: set[str] = field(default_factory=set)  # weight groups folded into this box (masks)
    shape: list[Any] | None = None  # output shape of the box's last node
    added: bool = False  # every node is new relative to the graph before the passes
    changed: bool = False  # some nodes are new
    # position of the box's last node in the graph: a box is drawn below everything it reads
    # (a ghost branch that merges back after the main path's layers sits below those layers)
    order: int = 0

    @property
    def fill(self) -> str:
        if self.group is not None:
            return group_colour(self.group)
        if not self.nodes or self.detail in ("input", "output"):
            return _IO
        return _MODULE if len(self.nodes) > 1 else _PLAIN


@dataclass
class BoxGraph:
    boxes: dict[str, Box]
    edges: set[tuple[str, str]]
    depth: int
    removed: list[str] = field(default_factory=list)  # node names only in the graph before


def _path_of(node: Node) -> list[str]:
    """Module path components of a node; pass-added containers (fxsparse.*) count as none."""
    path = module_path(node)
    if not path or path == "fxsparse" or path.startswith("fxsparse."):
        return []
    return path.split(".")


def _group(node: Node) -> str | None:
    tag = node.meta.get("fxsparse")
    return tag.get("group") if isinstance(tag, dict) else None


def _is_weight_helper(node: Node) -> bool:
    """A node of a weight-rewriting group that only prepares a weight (get_attr, mask multiply);
    the rewritten layer call itself carries ``original`` and is drawn like the layer it replaced."""
    tag = node.meta.get("fxsparse")
    return isinstance(tag, dict) and tag.get("group") in WEIGHT_GROUPS and "original" not in tag


def _is_added(node: Node) -> bool:
    """A node a pass added as new computation (a ghost), drawn in a box of its own group."""
    group = _group(node)
    return group is not None and group not in WEIGHT_GROUPS


class _BoxKeys:
    """Which box each node of a graph is drawn in, at any depth.

    * get_attr reads are drawn inside their first user;
    * weight helpers (mask multiplies, ...) inside the layer call they feed;
    * added nodes by (group, site): all nodes a pass added for one site form one unit, drawn
      beside the original node that unit hangs off (its anchor);
    * every other node by its module path cut at the depth.
    """

    def __init__(self, gm: GraphModule):
        self._homes: dict[Node, Node | None] = {}
        self.anchors: dict[tuple[str, str], Node | None] = {}
        for node in gm.graph.nodes:
            unit = self._unit(node)
            if unit is not None and unit not in self.anchors:  # the unit's first node decides
                self.anchors[unit] = _anchor(node)

    @staticmethod
    def _unit(node: Node) -> tuple[str, str] | None:
        if not _is_added(node) or node.op == "get_attr":
            return None
        tag = node.meta["fxsparse"]
        return tag["group"], str(tag.get("site", node.name))

    def key(self, node: Node, depth: int) -> tuple[str, str | None]:
        """(box key, pass group of an added box) of ``node`` at ``depth``."""
        if node.op == "get_attr" and node.users:
            return self.key(next(iter(node.users)), depth)
        unit = self._unit(node)
        if unit is not None:
            anchor = self.anchors.get(unit)
            base = self.key(anchor, depth)[0] if anchor is not None else ""
            return f"{unit[0]}@{base}", unit[0]
        if _is_weight_helper(node):
            home = self._home(node)
            if home is not None:
                return self.key(home, depth)
        path = _path_of(node)
        # a module call exactly at the cut stays one box per call (a shared ReLU called twice must
        # not merge two places of the graph into one box)
        if len(path) > depth or (len(path) == depth and node.op != "call_module" and path):
            return "mod:" + ".".join(path[:depth]), None
        return "node:" + node.name, None

    def _home(self, node: Node) -> Node | None:
        """The node a weight helper feeds (transitively): the layer call it is drawn inside."""
        if node not in self._homes:
            self._homes[node] = None
            for user in node.users:
                found = self._home(user) if _is_weight_helper(user) else user
                if found is not None:
                    self._homes[node] = found
                    break
        return self._homes[node]


def _anchor(node: Node) -> Node | None:
    """The nearest original computing node an added node hangs off (inputs first, then users)."""
    seen: set[Node] = set()
    for direction in ("inputs", "users"):
        frontier = list(node.all_input_nodes if direction == "inputs" else node.users)
        while frontier:
            n = frontier.pop(0)
            if n in seen:
                continue
            seen.add(n)
            if not _is_added(n) and n.op != "get_attr":
                return n
            frontier.extend(n.all_input_nodes if direction == "inputs" else n.users)
    return None


def max_depth(gm: GraphModule) -> int:
    """The deepest module nesting of any node; one more than this draws every node separately."""
    return max((len(_path_of(n)) for n in gm.graph.nodes), default=0)


def collapse(gm: GraphModule, depth: int | None = None, before: GraphModule | None = None,
             max_boxes: int = 150) -> BoxGraph:
    """Group the nodes of ``gm`` into boxes at module ``depth`` (None: ``auto_depth``).

    Given the graph ``before`` the passes, boxes whose nodes are all new are marked ``added``.
    """
    if depth is None:
        depth = auto_depth(gm, max_boxes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    before_names = {n.name for n in before.graph.nodes} if before is not None else None
    keys = _BoxKeys(gm)
    key_of: dict[Node, str] = {}
    boxes: dict[str, Box] = {}
    for node in gm.graph.nodes:
        key, group = keys.key(node, depth)
        key_of[node] = key
        box = boxes.get(key)
        if box is None:
            box = boxes[key] = Box(key, "", "", group=group)
        box.nodes.append(node.name)
        if node.op != "get_attr":
            box.order = order[node]
        g = _group(node)
        if g in WEIGHT_GROUPS:
            box.groups.add(g)
        if node.op != "get_attr":
            box.shape = shape_of(node.args[0]) if node.op == "output" and isinstance(node.args[0], Node) else shape_of(node)
    by_name = {n.name: n for n in gm.graph.nodes}
    types = module_types(gm)
    for key, box in boxes.items():
        _label(gm, box, key, by_name, types)
        if before_names is not None:
            new = [n for n in box.nodes if n not in before_names]
            box.added = len(new) == len(box.nodes)
            box.changed = bool(new) and not box.added
    edges = set()
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            a, b = key_of[inp], key_of[node]
            if a != b:
                edges.add((a, b))
    removed = []
    if before is not None:
        names = {n.name for n in gm.graph.nodes}
        removed = [n.name for n in before.graph.nodes if n.name not in names]
    return BoxGraph(boxes, edges, depth, removed)


def _label(gm: GraphModule, box: Box, key: str, by_name: dict[str, Node], module_types: dict[str, str]) -> None:
    members = [by_name[n] for n in box.nodes]
    main = next((n for n in members if n.op != "get_attr" and not _is_weight_helper(n)), members[0])
    if box.group is not None:
        roles = Counter(((n.meta.get("fxsparse") or {}).get("role") or "?") for n in members)
        box.label = box.group
        box.detail = ", ".join(f"{c} {r}" if c > 1 else r for r, c in roles.items())
    elif key.startswith("mod:"):
        path = key[4:]
        kind = module_types.get(path, "module")
        box.label = path
        box.detail = f"{kind} ({len(members)} nodes)" if len(members) > 1 else kind
    else:
        box.label = module_path(main) or main.name
        box.detail = op_name(gm, main) if main.op not in ("placeholder", "output") else main.op
        if main.op == "placeholder":
            box.detail = "input"
    if box.groups:
        box.detail += " [" + ", ".join(sorted(box.groups)) + "]"


def module_types(gm: GraphModule) -> dict[str, str]:
    """{module path: class name} of the traced model's modules.

    GraphModule keeps traced-through modules only as plain ``nn.Module`` containers; the
    ``nn_module_stack`` the tracer recorded on each node still names their classes.
    """
    out = {}
    for node in gm.graph.nodes:
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            path, cls = value if isinstance(value, tuple) else (key, value)
            if path not in out:
                out[path] = cls.__name__ if isinstance(cls, type) else str(cls).rpartition(".")[2].strip("'>")
    return out


def auto_depth(gm: GraphModule, max_boxes: int = 150) -> int:
    """The deepest module level whose drawing has at most ``max_boxes`` boxes (at least 1)."""
    keys = _BoxKeys(gm)
    best = 1
    for depth in range(1, max_depth(gm) + 2):
        if len({keys.key(n, depth)[0] for n in gm.graph.nodes}) > max_boxes:
            break
        best = depth
    return best


# --------------------------------------------------------------------------- layout
_BOX_W, _BOX_H, _GAP_X, _GAP_Y, _MARGIN = 190, 44, 24, 34, 20


def layout(bg: BoxGraph) -> dict[str, tuple[float, float]]:
    """Top-left corner of every box: rows by longest path, columns by mean input position."""
    order = sorted(bg.boxes, key=lambda k: bg.boxes[k].order)
    pos = {k: i for i, k in enumerate(order)}
    g = nx.DiGraph()
    g.add_nodes_from(order)
    # only edges that go forward in graph order rank boxes; the rest (a box spanning a stretch of
    # the graph that another box reads from midway) are drawn as back edges
    g.add_edges_from((a, b) for a, b in bg.edges if pos[a] < pos[b])
    rank: dict[str, int] = {}
    for k in nx.topological_sort(g):
        rank[k] = max((rank[p] + 1 for p in g.predecessors(k)), default=0)
    rows: dict[int, list[str]] = {}
    for k in order:
        rows.setdefault(rank[k], []).append(k)
    column: dict[str, float] = {}
    for r in sorted(rows):
        def barycentre(k: str) -> float:
            preds = [column[p] for p in g.predecessors(k) if p in column]
            return sum(preds) / len(preds) if preds else pos[k] * 1e-6
        rows[r].sort(key=barycentre)
        for i, k in enumerate(rows[r]):
            column[k] = i - (len(rows[r]) - 1) / 2
    width = max(len(r) for r in rows.values()) if rows else 1
    return {
        k: (_MARGIN + (column[k] + (width - 1) / 2) * (_BOX_W + _GAP_X), _MARGIN + rank[k] * (_BOX_H + _GAP_Y))
        for k in order
    }


# --------------------------------------------------------------------------- svg
def _clip(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def to_svg(bg: BoxGraph, *, title: str = "") -> str:
    """The box graph as a standalone SVG document (hover a box for its node list)."""
    xy = layout(bg)
    # at least wide enough for the legend line
    width = max(max((x for x, _ in xy.values()), default=0) + _BOX_W + _MARGIN, 560)
    height = max((y for _, y in xy.values()), default=0) + _BOX_H + _MARGIN + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
        f"<title>{html.escape(title)}</title>" if title else "",
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" fill="#868e96"/></marker></defs>',
    ]
    pos = {k: bg.boxes[k].order for k in bg.boxes}
    for a, b in sorted(bg.edges):
        (xa, ya), (xb, yb) = xy[a], xy[b]
        x1, y1, x2, y2 = xa + _BOX_W / 2, ya + _BOX_H, xb + _BOX_W / 2, yb
        back = pos[a] > pos[b] or y2 <= y1
        if back:  # leave from the box's side and come back round
            x1, y1, x2, y2 = xa + _BOX_W, ya + _BOX_H / 2, xb + _BOX_W, yb + _BOX_H / 2
            bend = _BOX_W / 2 + 10
            d = f"M{x1:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} {x2 + bend:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
        else:
            span = y2 - y1
            # an edge skipping rows bows sideways so it does not run through the boxes between
            bow = 0.0 if span <= _GAP_Y + 1 else _BOX_W * 0.6
            d = (f"M{x1:.1f},{y1:.1f} C{x1 + bow:.1f},{y1 + span * 0.4:.1f} "
                 f"{x2 + bow:.1f},{y2 - span * 0.4:.1f} {x2:.1f},{y2:.1f}")
        dash = ' stroke-dasharray="4 3"' if back else ""
        out.append(f'<path d="{d}" fill="none" stroke="#adb5bd" stroke-width="1.2"{dash} marker-end="url(#arrow)"/>')
    for key, box in bg.boxes.items():
        x, y = xy[key]
        stroke, sw = ("#2b8a3e", 2.5) if box.added else (("#e67700", 2.0) if box.changed else ("#495057", 1.0))
        if box.groups:
            stroke, sw = "#1c7ed6", max(sw, 2.0)
        tip = "\n".join([box.label, box.detail, f"output {format_shape(box.shape)}"]
                        + (["new in the rewritten graph"] if box.added else [])
                        + [f"nodes: {', '.join(box.nodes[:20])}" + (" ..." if len(box.nodes) > 20 else "")])
        rx = 9 if len(box.nodes) > 1 else 4
        out.append(
            f'<g><title>{html.escape(tip)}</title>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{_BOX_W}" height="{_BOX_H}" rx="{rx}" '
            f'fill="{box.fill}" stroke="{stroke}" stroke-width="{sw}"/>'
            f'<text x="{x + _BOX_W / 2:.1f}" y="{y + 16:.1f}" text-anchor="middle" font-weight="bold">'
            f"{html.escape(_clip(('+ ' if box.added else '') + box.label))}</text>"
            f'<text x="{x + _BOX_W / 2:.1f}" y="{y + 30:.1f}" text-anchor="middle" fill="#495057">'
            f"{html.escape(_clip(box.detail, 30))}</text>"
            f'<text x="{x + _BOX_W / 2:.1f}" y="{y + 41:.1f}" text-anchor="middle" fill="#868e96" font-size="9">'
            f"{html.escape(format_shape(box.shape))}</text></g>"
        )
    out.append(_legend(bg, height - 30))
    out.append("</svg>")
    return "\n".join(s for s in out if s)


def _legend(bg: BoxGraph, y: float) -> str:
    groups = sorted({b.group for b in bg.boxes.values() if b.group} | set().union(*(b.groups for b in bg.boxes.values())))
    parts, x = [], _MARGIN
    for g in groups:
        parts.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{group_colour(g)}" stroke="#495057"/>'
                     f'<text x="{x + 16}" y="{y + 10}">{html.escape(g)}</text>')
        x += 30 + 7 * len(g)
    note = f"depth {bg.depth}, {len(bg.boxes)} boxes"
    if bg.removed:
        note += f", {len(bg.removed)} nodes of the original removed (see the diff)"
    parts.append(f'<text x="{x}" y="{y + 10}" fill="#868e96">{html.escape(note)}</text>')
    return "<g>" + "".join(parts) + "</g>"


# --------------------------------------------------------------------------- dot
def _dot_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(bg: BoxGraph, *, name: str = "fxsparse") -> str:
    """Graphviz source of the box graph (render with ``dot -Tsvg`` where graphviz is installed)."""
    lines = [f"digraph {_dot_quote(name)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];']
    for key, box in sorted(bg.boxes.items(), key=lambda kv: kv[1].order):
        label = f"{box.label}\\n{box.detail}\\n{format_shape(box.shape)}"
        attrs = f'label="{_dot_escape_label(label)}", fillcolor={_dot_quote(box.fill)}'
        if box.added:
            attrs += ', color="#2b8a3e", penwidth=2.5'
        lines.append(f"  {_dot_quote(key)} [{attrs}];")
    for a, b in sorted(bg.edges):
        lines.append(f"  {_dot_quote(a)} -> {_dot_quote(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_escape_label(s: str) -> str:
    # keep the \n line breaks we put in, escape quotes
    return s.replace('"', '\\"')


# --------------------------------------------------------------------------- html
_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #212529; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border-bottom: 1px solid #dee2e6; padding: 3px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.added td { background: #fff0f6; } tr.activation td { color: #1864ab; }
.graph { overflow: auto; border: 1px solid #dee2e6; max-height: 80vh; }
pre { background: #f8f9fa; padding: 8px; font-size: 12px; overflow-x: auto; }
"""


def to_html(report: Report, bg: BoxGraph, *, title: str | None = None) -> str:
    """A self-contained page: summary, the drawing, the diff and the table (no external assets)."""
    from .inspect import summary_lines

    s = report.summary
    title = title or f"fxsparse inspect: {s['model']}"
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<ul>" + "".join(f"<li>{e(line)}</li>" for line in summary_lines(report)) + "</ul>",
        f"<h2>Graph (depth {bg.depth}; hover a box for its nodes)</h2>",
        f'<div class="graph">{to_svg(bg, title=title)}</div>',
    ]
    if report.diff is not None:
        d = report.diff
        parts.append("<h2>Diff against the traced original</h2><ul>"
                     + "".join(f"<li>{e(line)}</li>" for line in d.lines()) + "</ul>")
        if d.structure:
            parts.append("<p>Where the structure first differs ('-' only before, '+' only after):</p>"
                         f"<pre>{e(chr(10).join(d.structure))}</pre>")
        if d.removed:
            parts.append(f"<p>Removed nodes: {e(', '.join(d.removed[:200]))}</p>")
    parts.append("<h2>Layers</h2><table><tr><th>layer</th><th>op</th><th>output shape</th>"
                 "<th>params</th><th>mask density</th><th>added by pass</th></tr>")
    for r in report.rows:
        density = f"{r.density:.1%}" if r.density is not None else ("dense" if r.kind == "layer" else "")
        parts.append(
            f'<tr class="{e(r.kind)}"><td>{e(r.layer or "(" + r.node + ")")}</td><td>{e(r.op)}</td>'
            f"<td>{e(format_shape(r.shape))}</td><td class=num>{f'{r.params:,}' if r.params else ''}</td>"
            f"<td class=num>{density}</td><td>{e(r.tag or '')}</td></tr>"
        )
    parts.append("</table>")
    if s["passes"]:
        parts.append("<h2>Passes run</h2><ol>" + "".join(
            f"<li>{e(p['pass'])}: {e(', '.join(f'{k}={v}' for k, v in p.get('changes', {}).items()) or 'no change')}</li>"
            for p in s["passes"]) + "</ol>")
    parts.append(f"<p style='color:#868e96'>{format_count(s['parameters'])} parameters, {s['nodes']} nodes.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
