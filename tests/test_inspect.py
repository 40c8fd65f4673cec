"""fxsparse.inspect / fxsparse.render: rows, summary, diff and drawings of any GraphModule."""
from __future__ import annotations

import html.parser
import json
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

import fxsparse
import fxsparse.nets
from conftest import build, masked, random_masks
from fxsparse import render
from fxsparse.errors import FxSparseError
from fxsparse.inspect import inspect_graph, shape_of, to_json, to_text
from fxsparse.pass_infra import FxSparsePass


@pytest.fixture(scope="module")
def resnet18():
    """(model, traced gm, masked gm): resnet18 at 64x64, masked with random 90% sparse masks."""
    model, gm, _ = build("resnet18")
    _, mgm, _ = masked("resnet18")
    return model, gm, mgm


class ToyGhostPass(FxSparsePass):
    """A stand-in ghost pass: every ReLU module becomes relu + gate * (silu - relu)."""

    group = "toy_ghosts"

    def call(self, gm):
        gate_target = fxsparse.gates.register(gm, self.group, 1.0)
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.ReLU):
                continue
            users = list(node.users)
            with gm.graph.inserting_after(node):
                soft = self.tag(gm.graph.call_function(F.silu, (node.args[0],)), "soft", site=node.name)
            with gm.graph.inserting_after(soft):
                gate = self.tag(gm.graph.get_attr(gate_target), "gate", site=node.name)
            with gm.graph.inserting_after(gate):
                delta = self.tag(gm.graph.call_function(torch.sub, (soft, node)), "delta", site=node.name)
            with gm.graph.inserting_after(delta):
                scaled = self.tag(gm.graph.call_function(torch.mul, (gate, delta)), "scaled", site=node.name)
            with gm.graph.inserting_after(scaled):
                blend = self.tag(gm.graph.call_function(torch.add, (node, scaled)), "blend", site=node.name)
            for user in users:
                user.replace_input_with(node, blend)
            self.stats["sites"] += 1
        return PassResult(gm, bool(self.stats))


# --------------------------------------------------------------------------- rows and summary
def test_rows_cover_layers_activations_and_modules(resnet18):
    model, gm, _ = resnet18
    rows = inspect_graph(gm).rows
    layers = fxsparse.graph.parameterized_layers(gm)
    assert [r.layer for r in rows if r.kind == "layer"] == [l.name for l in layers]
    assert len([r for r in rows if r.kind == "activation"]) == len(fxsparse.graph.activation_sites(gm))
    assert (rows[0].kind, rows[-1].kind) == ("input", "output")
    assert rows[-1].shape == [2, 1000]
    assert not any(r.op == "Identity" for r in rows)  # timm's drop_block/aa placeholders are noise

    conv = next(r for r in rows if r.layer == "layer2.0.conv1")
    assert (conv.op, conv.shape, conv.params, conv.density, conv.tag) == ("Conv2d", [2, 128, 8, 8], 64 * 128 * 9, None, None)
    bn = next(r for r in rows if r.layer == "layer2.0.bn1")
    assert (bn.kind, bn.params) == ("module", 256)

    every = inspect_graph(gm, all_nodes=True).rows
    assert len(every) > len(rows) and any(r.op == "add" for r in every)


def test_summary_counts(resnet18):
    model, gm, _ = resnet18
    s = inspect_graph(gm).summary
    assert s["model"] == "timm.models.resnet.ResNet" and s["traced_mode"] == "train"
    assert s["nodes"] == len(gm.graph.nodes)
    assert s["parameters"] == sum(p.numel() for p in model.parameters())
    assert (s["layers"], s["layers_by_kind"]) == (21, {"conv": 20, "linear": 1})
    assert (s["activation_sites"], s["activations_by_kind"]) == (17, {"relu": 17})
    assert (s["masks"], s["gates"], s["passes"], s["parameters_added"]) == (None, {}, [], 0)
    assert s["input_shapes"] == [[2, 3, 64, 64]]


def test_masked_graph_shows_mask_density_per_layer(resnet18):
    _, gm, mgm = resnet18
    masks = fxsparse.inspect.masks_of(mgm)
    assert len(masks) == 21
    rows = inspect_graph(mgm).rows
    layer_rows = {r.layer: r for r in rows if r.kind == "layer"}
    assert set(layer_rows) == {l.name for l in fxsparse.graph.parameterized_layers(gm)}
    for layer in fxsparse.graph.parameterized_layers(gm):
        row = layer_rows[layer.name]
        assert row.density == pytest.approx(masks[layer.weight].float().mean().item())
        assert row.tag is None  # the mask shows as density, not as a pass tag
    assert layer_rows["layer1.0.conv1"].op == "Conv2d"  # named after the module it replaced
    s = inspect_graph(mgm).summary
    assert s["masks"]["tensors"] == 21 and s["masks"]["density"] == pytest.approx(0.1, abs=0.01)
    assert [p["pass"] for p in s["passes"]] == ["MaskPass"]


def test_diff_against_the_traced_original(resnet18):
    _, gm, mgm = resnet18
    diff = inspect_graph(mgm, before=gm).diff
    assert set(diff.added_by_group) == {"masks"}
    assert diff.removed_ops == {"Conv2d": 20, "Linear": 1}
    assert not diff.same_structure and diff.structure
    assert "+" in diff.lines()[0] and "masks" in diff.lines()[0]
    same = inspect_graph(gm, before=build("resnet18")[1]).diff
    assert same.lines() == ["same structure as the traced original"]


@pytest.fixture(scope="module")
def toy_ghosts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
    x = torch.randn(2, 3, 10, 10)
    before = fxsparse.trace(model, x)
    after = fxsparse.trace(model, x)
    ToyGhostPass()(after)
    return before, after


def test_added_nodes_show_their_tags(toy_ghosts):
    before, after = toy_ghosts
    report = inspect_graph(after, before=before)
    tagged = [r for r in report.rows if r.kind == "added"]
    assert [r.tag for r in tagged] == ["toy_ghosts/soft", "toy_ghosts/delta", "toy_ghosts/scaled", "toy_ghosts/blend"] * 2
    assert report.summary["tagged_nodes"] == {"toy_ghosts": 10}  # 4 computing nodes + 1 gate read per site
    assert report.summary["gates"] == {"toy_ghosts": 1.0}
    assert report.summary["passes"][0]["changes"] == {"sites": 2}
    assert report.diff.added_by_group == {"toy_ghosts": 10} and report.diff.removed == []
    assert "toy_ghosts/blend" in to_text(report)


def test_drawing_puts_each_ghost_site_in_one_coloured_box(toy_ghosts):
    before, after = toy_ghosts
    boxes = render.collapse(after, before=before)
    ghost = [b for b in boxes.boxes.values() if b.group == "toy_ghosts"]
    assert len(ghost) == 2 and all(b.added for b in ghost)
    assert all(len(b.nodes) == 5 and b.fill == render.group_colour("toy_ghosts") for b in ghost)
    assert not any(b.added for b in boxes.boxes.values() if b.group is None)
    svg = render.to_svg(boxes)
    assert render.group_colour("toy_ghosts") in svg and "toy_ghosts" in svg


# --------------------------------------------------------------------------- text / json
def test_text_table_and_summary(resnet18):
    _, gm, mgm = resnet18
    text = to_text(inspect_graph(mgm, before=gm), width=160)
    for expected in ("layer", "op", "output shape", "params", "mask density", "added by pass",
                     "layer1.0.conv1", "2x64x16x16", "36,864", "BatchNorm2d", "masks: 21 weight tensors",
                     "diff vs traced original", "MaskPass"):
        assert expected in text
    assert "\x1b[" not in text  # no colour codes unless asked


def test_json_round_trip(resnet18):
    _, gm, mgm = resnet18
    report = inspect_graph(mgm, before=gm)
    data = json.loads(to_json(report))
    assert set(data) == {"summary", "rows", "diff"}
    assert len(data["rows"]) == len(report.rows)
    row = next(r for r in data["rows"] if r["layer"] == "fc")
    assert row["shape"] == [2, 1000] and 0 < row["density"] < 1 and row["params"] == 513_000
    assert data["diff"]["removed_ops"] == {"Conv2d": 20, "Linear": 1}


def test_summary_states_each_ghost_schedule_and_distillation():
    torch.manual_seed(0)
    model = fxsparse.nets.resnet8()
    late = {"ghost_neurons.schedule.hold_until": 0.6, "ghost_neurons.schedule.anneal_until": 0.8,
            "ghost_neurons.schedule.remove_at": 0.8, "distill.enabled": True, "masks.sparsity": 0.9}
    gm = fxsparse.transform(model, fxsparse.load_recipe("tost", late), example_inputs=torch.randn(2, 3, 32, 32))
    s = inspect_graph(gm).summary
    assert s["schedules"] == {"ghost_neurons": "1 until 60%, linear to 0 by 80%, removed at 80%",
                              "ghost_skips": "linear from 1 to 0 by 15%, removed at 15%",
                              "ghost_channels": "linear from 1 to 0 by 15%, removed at 15%"}
    assert s["distill"] == "from 60% of training (when ghost_neurons' anneal begins), alpha 0.9, T 4"
    text = to_text(inspect_graph(gm), width=400)
    assert "ghost_neurons 1 until 60%, linear to 0 by 80%" in text and "distill: from 60% of training" in text
    fxsparse.remove_ghosts(gm)  # no ghost left: nothing to schedule
    assert inspect_graph(gm).summary["schedules"] == {}


# --------------------------------------------------------------------------- drawings
def _check_box_graph(gm, bg):
    drawn = [n for b in bg.boxes.values() for n in b.nodes]
    assert sorted(drawn) == sorted(n.name for n in gm.graph.nodes)  # every node in exactly one box
    assert all(a in bg.boxes and b in bg.boxes and a != b for a, b in bg.edges)


def test_collapse_by_module_depth():
    gm = fxsparse.trace(fxsparse.models.create("resnet50", device="meta"))
    by_depth = {d: render.collapse(gm, d) for d in (1, 2, 3)}
    for bg in by_depth.values():
        _check_box_graph(gm, bg)
    assert len(by_depth[1].boxes) < len(by_depth[2].boxes) < len(by_depth[3].boxes)
    assert "mod:layer1" in by_depth[1].boxes
    block = by_depth[2].boxes["mod:layer1.0"]
    assert (block.label, block.detail.split(" ")[0], block.shape) == ("layer1.0", "Bottleneck", [2, 256, 56, 56])
    # one box per node beyond the deepest module
    assert len(render.collapse(gm, render.max_depth(gm) + 1).boxes) == len(gm.graph.nodes)


@pytest.mark.parametrize("spec", ["tv:densenet121", "swin_tiny_patch4_window7_224"])
def test_auto_depth_keeps_large_graphs_readable(spec):
    gm = fxsparse.trace(fxsparse.models.create(spec, device="meta"))
    assert len(gm.graph.nodes) > 150
    bg = render.collapse(gm)  # auto depth
    assert 10 < len(bg.boxes) <= 150
    assert len(render.collapse(gm, bg.depth + 1).boxes) > 150  # the deepest depth that fits
    _check_box_graph(gm, bg)


def test_svg_dot_and_html_outputs(resnet18):
    _, gm, mgm = resnet18
    report = inspect_graph(mgm, before=gm)
    bg = render.collapse(mgm, 3, before=gm)

    svg = ET.fromstring(render.to_svg(bg, title="resnet18"))
    ns = "{http://www.w3.org/2000/svg}"
    boxes = [g for g in svg.iter(f"{ns}g") if g.find(f"{ns}rect") is not None and g.find(f"{ns}title") is not None]
    assert len(boxes) == len(bg.boxes)
    assert len(list(svg.iter(f"{ns}path"))) >= len(bg.edges)

    dot = render.to_dot(bg, name="resnet18")
    assert dot.startswith('digraph "resnet18" {') and dot.rstrip().endswith("}")
    assert dot.count(" -> ") == len(bg.edges)
    assert sum(1 for line in dot.splitlines() if line.strip().startswith('"') and "->" not in line) == len(bg.boxes)

    page = render.to_html(report, bg)

    class Counter(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags: dict[str, int] = {}

        def handle_starttag(self, tag, attrs):
            self.tags[tag] = self.tags.get(tag, 0) + 1

    counter = Counter()
    counter.feed(page)
    assert counter.tags["svg"] == 1 and counter.tags["table"] == 1
    assert counter.tags["tr"] == len(report.rows) + 1
    assert "Diff against the traced original" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")


# --------------------------------------------------------------------------- any GraphModule
def test_plain_symbolic_trace_without_shapes_or_meta():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    gm = torch.fx.symbolic_trace(model)
    report = inspect_graph(gm)
    assert report.summary["model"] == "Sequential" and report.summary["traced_mode"] is None
    assert all(r.shape is None for r in report.rows) and shape_of(next(iter(gm.graph.nodes))) is None
    assert "?" in to_text(report)
    bg = render.collapse(gm)
    _check_box_graph(gm, bg)
    ET.fromstring(render.to_svg(bg))


def test_a_masked_graph_on_random_masks_of_any_density():
    model, gm, x = build("tv:resnet18")
    masks = random_masks(gm, sparsity=0.5)
    from fxsparse.passes.mask import MaskPass

    MaskPass(masks)(gm)
    rows = [r for r in inspect_graph(gm).rows if r.kind == "layer"]
    assert len(rows) == 21 and all(0.4 < r.density < 0.6 for r in rows if r.params > 1000)


def test_shapes_of_the_nodes_passes_added_are_filled_in():
    from fxsparse.trace import complete_shapes, propagate_shapes

    model, gm, x = build("resnet18")
    recipe = fxsparse.load_recipe("tost", overrides={"rescale.enabled": False})
    gm = fxsparse.transform(gm, recipe, example_inputs=x, copy=True)
    new = [n for n in gm.graph.nodes if n.op != "output" and "tensor_meta" not in n.meta]
    assert any(n.meta["fxsparse"]["group"] == "ghost_channels" for n in new)  # ghost channels have none
    state = {k: v.clone() for k, v in gm.state_dict().items()}

    report = inspect_graph(gm)
    assert not [r for r in report.rows if r.tag and r.shape is None]
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())  # ran on meta copies
    assert complete_shapes(gm) is False  # nothing left to do
    # the same shapes as a full propagation from the example input
    filled = {n.name: shape_of(n) for n in new}
    propagate_shapes(gm, (x,))
    assert filled == {n.name: shape_of(n) for n in new}


def test_inspect_rejects_a_plain_module():
    with pytest.raises(FxSparseError, match="expects a torch.fx.GraphModule"):
        inspect_graph(nn.Linear(2, 2))
