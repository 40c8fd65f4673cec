"""fxsparse.graph: layer, activation and chain queries with known answers; structural equality."""
from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import graph


def _trace(model: nn.Module, *shape: int) -> torch.fx.GraphModule:
    return fxsparse.trace(model, torch.randn(*shape))


class ConvBnRelu(nn.Module):
    """conv-bn-relu -> conv-bn-relu -> pool -> linear: 3 layers, 2 activations."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Residual(nn.Module):
    """x + conv-bn(relu(conv-bn(x))), then relu: the conv1 chain reaches conv2 only."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


# --------------------------------------------------------------------------- layers
def test_layer_counts_on_a_plain_chain():
    gm = _trace(ConvBnRelu(), 2, 3, 8, 8)
    layers = graph.parameterized_layers(gm)
    assert [(l.name, l.weight, l.kind, l.style) for l in layers] == [
        ("conv1", "conv1.weight", "conv", "module"),
        ("conv2", "conv2.weight", "conv", "module"),
        ("fc", "fc.weight", "linear", "module"),
    ]
    assert [l.name for l in graph.parameterized_layers(gm, kinds=("linear",))] == ["fc"]
    assert graph.layer_of(gm, next(n for n in gm.graph.nodes if n.target == "bn1")) is None


def test_functional_layers_and_weight_source():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.proj = nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            y = F.conv2d(x, self.w * 2.0, padding=1)  # weight after an elementwise op
            return F.linear(y.mean((2, 3)), self.proj)

    gm = _trace(Functional(), 1, 3, 6, 6)
    layers = graph.parameterized_layers(gm)
    assert [(l.weight, l.kind, l.style) for l in layers] == [("w", "conv", "function"), ("proj", "linear", "function")]


def test_a_fixed_filter_in_a_buffer_is_not_a_layer():
    """timm's BlurPool2d convolves with a registered buffer: nothing to mask (zoo: resnetblur50)."""

    class Blur(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("filt", torch.ones(4, 1, 3, 3) / 9)

        def forward(self, x):
            return F.conv2d(self.conv(x), self.filt, padding=1, groups=4)

    gm = _trace(Blur(), 1, 3, 6, 6)
    assert [l.weight for l in graph.parameterized_layers(gm)] == ["conv.weight"]
    masks = fxsparse.masks.compute(gm, "random", 0.5)
    assert set(masks) == {"conv.weight"}
    with torch.device("meta"):
        blur = fxsparse.models.create("resnetblur18", device="meta")
    layers = graph.parameterized_layers(fxsparse.trace(blur))
    assert layers and not any(l.weight.endswith("filt") for l in layers)


def test_shared_module_called_twice_is_one_layer():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    gm = _trace(Shared(), 1, 4, 4, 4)
    assert [l.weight for l in graph.parameterized_layers(gm)] == ["conv.weight"]


@pytest.mark.parametrize("spec,leaf_type,weights", [
    ("nf_resnet26", "NormFreeBlock", 28),  # 8 blocks of 3 ScaledStdConv2d, 4 downsample convs
    ("efficientnet_cc_b0_4e", "CondConv2d", 24),
    ("tv:vit_b_16", "MultiheadAttention", 24),  # 12 blocks: in_proj_weight + out_proj.weight
])
def test_layers_inside_leaf_modules(spec, leaf_type, weights):
    gm = fxsparse.trace(fxsparse.models.create(spec, device="meta"))
    in_leaves = [l for l in graph.parameterized_layers(gm) if l.inside_leaf
                 and type(gm.get_submodule(l.leaf)).__name__ == leaf_type]
    assert len(in_leaves) == weights
    params = dict(gm.named_parameters())
    for layer in in_leaves:
        assert layer.weight in params and layer.weight.startswith(layer.leaf + ".")
        assert layer.node.op == "call_module" and layer.node.target == layer.leaf
    if leaf_type == "MultiheadAttention":
        assert Counter(l.weight.rpartition(".")[2] for l in in_leaves) == {"in_proj_weight": 12, "weight": 12}
        assert {l.kind for l in in_leaves} == {"linear"}


# --------------------------------------------------------------------------- activations
class ReluStyles(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        a = F.relu(x)
        b = x.relu()
        c = torch.relu(x)
        d = F.relu(x, inplace=True)
        e = F.relu_(x.clone())
        f = x.clone().relu_()
        g = self.act(x.clone())
        h = F.gelu(x)
        return a + b + c + d + e + f + g + h


def test_activation_styles_and_inplace():
    gm = _trace(ReluStyles(), 1, 3, 4, 4)
    found = [(s.kind, s.style, s.inplace) for s in graph.activation_sites(gm)]
    assert found == [
        ("relu", "function", False),
        ("relu", "method", False),
        ("relu", "function", False),
        ("relu", "function", True),
        ("relu", "function", True),
        ("relu", "method", True),
        ("relu", "module", True),
        ("gelu", "function", False),
    ]
    assert [s.module for s in graph.activation_sites(gm) if s.style == "module"] == ["act"]
    assert len(graph.activation_sites(gm, kinds=("gelu",))) == 1


def test_activations_inside_timm_batchnormact_leaves():
    from timm.layers import BatchNormAct2d

    class WithBnAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = BatchNormAct2d(8, act_layer=nn.ReLU)

        def forward(self, x):
            return self.bn(self.conv(x))

    gm = _trace(WithBnAct(), 2, 3, 8, 8)
    (site,) = graph.activation_sites(gm)
    assert (site.kind, site.style, site.module, site.node.target) == ("relu", "leaf", "bn.act", "bn")
    assert graph.is_channelwise(gm, site.node)


def test_activation_sites_of_a_timm_model():
    gm = fxsparse.trace(fxsparse.models.create("efficientnet_b0", device="meta"))
    sites = graph.activation_sites(gm)
    leaf_sites = [s for s in sites if s.style == "leaf"]
    assert leaf_sites and all(s.kind == "silu" and s.module.endswith(".act") for s in leaf_sites)


# --------------------------------------------------------------------------- chains
def test_conv_bn_relu_conv_has_a_single_consumer():
    gm = _trace(Residual(), 2, 8, 6, 6)
    chains = {c.producer.name: c for c in graph.channel_chains(gm)}
    first = chains["conv1"]
    assert first.single_consumer is not None and first.single_consumer.name == "conv2"
    assert [n.target if isinstance(n.target, str) else n.target.__name__ for n in first.ops] == ["bn1", "relu"]
    # conv2's output meets the residual add: no single consumer
    second = chains["conv2"]
    assert second.single_consumer is None
    assert [n.target for n in second.others] == [operator.add]


def test_chain_with_two_consumers():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.left, self.right = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.left(y) + self.right(y)

    gm = _trace(Fork(), 2, 3, 4, 4)
    chain = graph.channel_chains(gm)[0]
    assert [l.name for l in chain.consumers] == ["left", "right"]
    assert chain.single_consumer is None


# --------------------------------------------------------------------------- structure
def _rename_all(gm: torch.fx.GraphModule, seed: int = 0) -> None:
    """Give every node a fresh, shuffled name (names carry no structure)."""
    nodes = list(gm.graph.nodes)
    order = torch.randperm(len(nodes), generator=torch.Generator().manual_seed(seed)).tolist()
    for i, node in zip(order, nodes):
        node._rename(f"tmp_{i}")
    for i, node in zip(order, nodes):
        node._rename(f"n{i}")
    gm.recompile()


def test_two_traces_have_the_same_structure_even_with_other_names():
    model = fxsparse.models.create("resnet18", device="meta")
    a, b = fxsparse.trace(model), fxsparse.trace(model)
    _rename_all(b)
    assert {n.name for n in a.graph.nodes}.isdisjoint({n.name for n in b.graph.nodes} - {"x", "output"})
    assert graph.same_structure(a, b)
    assert graph.structure_diff(a, b) == []
    fxsparse.testing.assert_same_structure(a, b)


def test_a_one_node_edit_changes_the_structure():
    model = ConvBnRelu()
    a, b = _trace(model, 2, 3, 8, 8), _trace(model, 2, 3, 8, 8)
    act2 = next(n for n in b.graph.nodes if n.target == "act2")
    with b.graph.inserting_after(act2):
        gelu = b.graph.call_function(F.gelu, (act2,))
    act2.replace_all_uses_with(gelu, delete_user_cb=lambda user: user is not gelu)
    b.recompile()

    assert not graph.same_structure(a, b)
    diff = graph.structure_diff(a, b)
    # only the roots of the difference: the new gelu, and in the original the first node after act2
    assert any(line.startswith("+ %gelu") and "gelu" in line for line in diff)
    assert any(line.startswith("- ") for line in diff)
    assert len(diff) == 2


def test_changed_constant_argument_changes_the_structure():
    class Scale(nn.Module):
        def __init__(self, k: float):
            super().__init__()
            self.k = k
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * self.k

    a, b = _trace(Scale(2.0), 1, 4), _trace(Scale(3.0), 1, 4)
    b.load_state_dict(a.state_dict())
    assert not graph.same_structure(a, b)
    assert graph.same_structure(a, _trace(Scale(2.0), 1, 4))


# --------------------------------------------------------------------------- networkx view
@pytest.mark.parametrize("model,shape", [(ConvBnRelu(), (2, 3, 8, 8)), (Residual(), (2, 8, 6, 6))])
def test_to_networkx_mirrors_the_fx_graph(model, shape):
    gm = _trace(model, *shape)
    g = graph.to_networkx(gm)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert g.number_of_edges() == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
    conv1 = g.nodes["conv1"]
    assert (conv1["op"], conv1["type"], conv1["tag"]) == ("call_module", "Conv2d", None)


def test_to_networkx_on_a_zoo_model():
    gm = fxsparse.trace(fxsparse.models.create("tv:densenet121", device="meta"))
    g = graph.to_networkx(gm)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert g.number_of_edges() == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
