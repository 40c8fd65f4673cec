"""GhostNeuronPass / RemoveGhostNeuronsPass: every zoo model, hand-built models for each call
style (module, function, method, inplace variants, leaf submodules), exactness at gate 0 down to
the bit, the soft activation at gate 1, removal, parameters, and torch.compile."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import ghosts, pass_infra
from conftest import build, masked, random_masks
from fxsparse.errors import PassError
from fxsparse.graph import activation_sites
from fxsparse.passes.ghost_neurons import (
    GROUP, GhostActivation, GhostNeuronPass, RemoveGhostNeuronsPass, ghost_blend, parametric_swish,
    remove_ghost_neurons,
)
from fxsparse.passes.mask import MaskPass, masked_parameters
from fxsparse.testing import assert_same_structure, compare

KINDS = ("relu", "relu6")

# Zoo models without a single ReLU/ReLU6 (they use GELU, SiLU, LeakyReLU or Hardswish): the pass
# finds nothing there and must leave the graph untouched. Every other zoo model must get ghosts.
NO_RELU = {
    "cspresnet50",  # LeakyReLU
    "efficientnet_b0", "tf_efficientnet_b0", "efficientnet_cc_b0_4e", "tv:efficientnet_b0",  # SiLU
    "mobilevit_xxs",  # SiLU
    "convnext_atto", "tv:convnext_tiny", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "tv:vit_b_16", "swin_tiny_patch4_window7_224", "tv:swin_t", "edgenext_xx_small",
    "poolformer_s12",  # GELU
    "torchvision.models.vision_transformer:VisionTransformer(image_size=64, patch_size=16, num_layers=2, "
    "num_heads=4, hidden_dim=64, mlp_dim=128)",  # GELU
    "swin_tiny_patch4_window7_224(img_size=64, window_size=2, embed_dim=32, num_heads=(1, 2, 4, 8))",  # GELU
}

SOFT_REFERENCE = {  # independent eager definitions of the soft activations
    "swish": lambda x: x * torch.sigmoid(x),
    "mish": lambda x: x * torch.tanh(F.softplus(x)),
    "pswish": lambda x: x * torch.sigmoid(2.0 * x),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _assert_exact(a, b, x, **kwargs):
    mismatches = compare(a, b, x, exact=True, **kwargs)
    assert not mismatches, "\n".join(map(str, mismatches))


def _eval_out(gm, x):
    was = gm.training
    gm.eval()
    with torch.no_grad():
        y = gm(x)
    gm.train(was)
    return y


# --------------------------------------------------------------------------- the zoo
def test_zoo(zoo_entry):
    spec, size = zoo_entry
    _, gm, x = masked(spec, size)
    before = copy.deepcopy(gm)
    expected = len(activation_sites(gm, KINDS))
    p = GhostNeuronPass(kinds=KINDS)
    p(gm)
    assert p.stats["sites"] == expected
    if spec in NO_RELU:
        assert expected == 0
        assert fxsparse.gates.get(gm) == {} and not ghosts.present(gm)
        assert_same_structure(before, gm)
        return
    assert expected > 0
    assert sum(p.stats[s] for s in ("module", "function", "method", "leaf")) == expected
    assert ghosts.present(gm) == [GROUP]
    # nothing but the gate joins the state_dict; leaf modules keep their keys
    keys = list(gm.state_dict())
    assert keys == list(before.state_dict()) + ["fxsparse.gates.ghost_neurons"]
    assert ghosts.parameters(gm, GROUP) == []

    fxsparse.gates.set_identity(gm)
    _assert_exact(before, gm, x)  # outputs and original-parameter gradients, train and eval
    ghost_at_identity = copy.deepcopy(gm)

    # gate 1: the rewrite does something. Outputs *or* gradients: at init some zoo models are
    # blind to it in the output (NF-RegNet's SE sits in residual branches whose last conv starts
    # at zero gain; LCNet's eval output is ~1e-23) while every gradient upstream still moves.
    fxsparse.gates.set(gm, GROUP, 1.0)
    assert compare(before, gm, x, exact=True, modes=("train",)), "the ghost changes nothing at gate 1"

    fxsparse.gates.set_identity(gm)
    remove_ghost_neurons(gm)
    assert_same_structure(before, gm)
    assert list(gm.state_dict()) == list(before.state_dict())
    assert not any(isinstance(m, GhostActivation) for m in gm.modules())
    _assert_exact(ghost_at_identity, gm, x, grads=False)


# --------------------------------------------------------------------------- hand-built models
class Styles(nn.Module):
    """One ReLU in each graph style; ``act`` replaces all of them for the eager reference."""

    def __init__(self, act=None):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        self.act = act

    def forward(self, x):
        a = self.act or self.relu1
        x = a(self.bn1(self.conv1(x)))  # module
        x = self.conv2(x)
        x = self.act(x) if self.act else F.relu(x)  # function
        x = self.fc(x.mean((2, 3)))
        return self.act(x) if self.act else x.relu()  # method


def _styles(act=None):
    torch.manual_seed(0)
    return Styles(act)


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("soft", ["swish", "mish", "pswish"])
def test_styles_identity_soft_and_removal(soft):
    model = _styles()
    gm = fxsparse.trace(model, X)
    MaskPass(random_masks(gm, 0.5))(gm)
    before = copy.deepcopy(gm)
    p = GhostNeuronPass(soft=soft)
    p(gm)
    assert (p.stats["sites"], p.stats["module"], p.stats["function"], p.stats["method"]) == (3, 1, 1, 1)
    roles = sorted(n.meta["fxsparse"]["role"] for n in pass_infra.tagged_nodes(gm, group=GROUP))
    # swish and mish: one fused blend node per site (fxsparse.fused.ghost_relu_blend); pswish: soft + blend
    assert roles == ["blend"] * 3 + ["gate"] * 3 + ["soft"] * 3 * (soft == "pswish")
    assert p.stats["fused"] == 3 * (soft != "pswish")

    fxsparse.gates.set_identity(gm)
    _assert_exact(before, gm, X)

    # gate 1: the same masked network with every ReLU replaced by the soft activation, eagerly
    fxsparse.gates.set(gm, GROUP, 1.0)
    reference = _styles(SOFT_REFERENCE[soft])
    masks = masked_parameters(gm)
    with torch.no_grad():
        for name, mask in masks.items():
            reference.get_parameter(name).mul_(mask)
    # (outputs only: the eager reference's pruned weights would get gradients; test_inplace
    # compares gradients at gate 1 on an unmasked model)
    mismatches = compare(reference, gm, X, rtol=1e-5, atol=1e-6, grads=False)
    assert not mismatches, "\n".join(map(str, mismatches))

    remove_ghost_neurons(gm)
    assert_same_structure(before, gm)
    _assert_exact(before, gm, X)


class Inplace(nn.Module):
    """conv -> one inplace activation in the style ``how`` -> conv."""

    def __init__(self, how: str, act=None):
        super().__init__()
        self.how, self.act = how, act
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.relu = nn.ReLU6(inplace=True) if how == "ReLU6(inplace=True)" else nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv1(x)
        if self.act is not None:
            y = self.act(y)
        elif self.how in ("ReLU(inplace=True)", "ReLU6(inplace=True)"):
            y = self.relu(y)
        elif self.how == "F.relu(inplace=True)":
            y = F.relu(y, inplace=True)
        elif self.how == "F.relu6(inplace=True)":
            y = F.relu6(y, inplace=True)
        elif self.how == "torch.relu_":
            y = torch.relu_(y)
        elif self.how == "x.relu_()":
            y = y.relu_()
        elif self.how == "x.relu_() discarded":
            y.relu_()  # y itself is activated: later readers of y read the activation
        return self.conv2(y) + y.mean()


INPLACE = ["ReLU(inplace=True)", "ReLU6(inplace=True)", "F.relu(inplace=True)", "F.relu6(inplace=True)",
           "torch.relu_", "x.relu_()", "x.relu_() discarded"]


@pytest.mark.parametrize("how", INPLACE)
def test_inplace(how):
    torch.manual_seed(0)
    model = Inplace(how)
    gm = fxsparse.trace(model, X)
    before = copy.deepcopy(gm)
    (site,) = activation_sites(gm, KINDS)
    assert site.inplace
    p = GhostNeuronPass(kinds=KINDS)
    p(gm)
    assert p.stats["inplace"] == 1
    assert p.stats.get("readers_rewired", 0) == (2 if how == "x.relu_() discarded" else 0)
    assert not activation_sites(gm, KINDS)[0].inplace, "the activation must not write into the soft branch's input"

    fxsparse.gates.set_identity(gm)
    _assert_exact(before, gm, X)

    fxsparse.gates.set(gm, GROUP, 1.0)
    torch.manual_seed(0)
    reference = Inplace(how, act=SOFT_REFERENCE["swish"])
    mismatches = compare(reference, gm, X, rtol=1e-5, atol=1e-6)
    assert not mismatches, "\n".join(map(str, mismatches))

    remove_ghost_neurons(gm)
    assert_same_structure(before, gm)  # targets, inplace arguments and edges as traced
    assert activation_sites(gm, KINDS)[0].inplace
    assert gm.relu.inplace, "the module's inplace flag is restored"
    _assert_exact(before, gm, X)


def test_positional_inplace_argument():
    """``F.relu(x, True)`` (as a hand-written graph would have it) is made out of place and restored."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(F.relu, (graph.call_function(torch.mul, (x, 2.0)), True)))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    before = copy.deepcopy(gm)
    GhostNeuronPass()(gm)
    relu = next(n for n in gm.graph.nodes if n.target is F.relu)
    assert relu.args[1] is False
    fxsparse.gates.set_identity(gm)
    v = torch.randn(5)
    assert torch.equal(_bits(gm(v)), _bits(before(v)))
    remove_ghost_neurons(gm)
    assert_same_structure(before, gm)


# --------------------------------------------------------------------------- leaf modules
class NormActNet(nn.Module):
    """timm's BatchNormAct2d (a leaf: its ReLU is invisible to the graph) between convs."""

    def __init__(self, act=None):
        from timm.layers import BatchNormAct2d

        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.ReLU, inplace=True)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.bn2 = BatchNormAct2d(4, act_layer=nn.ReLU6)
        if act is not None:  # the eager reference: the leaves' activations replaced by ``act``
            self.bn1.act = self.bn2.act = act

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _leaf_keys(module):
    return {name: list(m.state_dict()) for name, m in module.named_modules() if name in ("bn1", "bn2")}


@pytest.mark.parametrize("soft", ["swish", "mish", "pswish"])
def test_batchnormact_leaf(soft):
    torch.manual_seed(0)
    model = NormActNet()
    gm = fxsparse.trace(model, X)
    MaskPass(random_masks(gm, 0.5))(gm)
    sites = activation_sites(gm, KINDS)
    assert [s.style for s in sites] == ["leaf", "leaf"] and [s.kind for s in sites] == ["relu", "relu6"]
    before = copy.deepcopy(gm)
    keys = _leaf_keys(gm)
    acts = gm.bn1.act, gm.bn2.act
    p = GhostNeuronPass(soft=soft, kinds=KINDS)
    p(gm)
    assert p.stats["leaf"] == 2 and p.stats["sites"] == 2
    assert isinstance(gm.bn1.act, GhostActivation) and gm.bn1.act.act is acts[0]
    assert _leaf_keys(gm) == keys

    fxsparse.gates.set_identity(gm)
    _assert_exact(before, gm, X)

    fxsparse.gates.set(gm, GROUP, 1.0)
    torch.manual_seed(0)
    reference = NormActNet(Lambda(SOFT_REFERENCE[soft]))
    with torch.no_grad():
        for name, mask in masked_parameters(gm).items():
            reference.get_parameter(name).mul_(mask)
    mismatches = compare(reference, gm, X, rtol=1e-5, atol=1e-6, grads=False)
    assert not mismatches, "\n".join(map(str, mismatches))

    # the ghost moves with the module: deepcopy and .to() keep reading the (copied, moved) gate
    dup = copy.deepcopy(gm)
    fxsparse.gates.set_identity(dup)
    _assert_exact(before, dup, X, modes=("eval",), grads=False)
    dup.to(torch.float64)
    assert dup(X.double()).dtype == torch.float64

    fxsparse.gates.set_identity(gm)
    fxsparse.remove_ghosts(gm)  # the generic path finds the group with no tagged node in the graph
    assert (gm.bn1.act, gm.bn2.act) == acts and model.bn1.act is acts[0]
    assert_same_structure(before, gm)
    assert _leaf_keys(gm) == keys
    _assert_exact(before, gm, X)


class SharedActBlock(nn.Module):
    """A leaf whose activation sits mid-block, registered under two names, around a conv."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.alias = self.act

    def forward(self, x):
        return self.conv(self.act(x)) + self.alias(-x)


def test_leaf_with_conv_and_aliased_activation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), SharedActBlock())
    gm = fxsparse.trace(model, X, leaf_modules=[SharedActBlock])
    MaskPass(random_masks(gm, 0.5))(gm)  # the leaf now runs through torch.func.functional_call
    before = copy.deepcopy(gm)
    GhostNeuronPass()(gm)
    block = gm.get_submodule("1")
    assert isinstance(block.act, GhostActivation) and block.alias is block.act
    fxsparse.gates.set_identity(gm)
    _assert_exact(before, gm, X)
    fxsparse.gates.set(gm, GROUP, 1.0)
    assert not torch.equal(_eval_out(gm, X), _eval_out(before, X))
    remove_ghost_neurons(gm)
    assert isinstance(block.act, nn.ReLU) and block.alias is block.act
    assert_same_structure(before, gm)


class LinearAttention(nn.Module):
    """ReLU linear attention (timm's EfficientViT LiteMLA): relu(q) @ (relu(k)^T v), divided by a
    sum the ReLUs keep positive; then an MLP whose ReLU is a neuron. ``soft_mlp`` is the expected
    network at gate 1: only the MLP's ReLU soft."""

    def __init__(self, soft_mlp: bool = False):
        super().__init__()
        self.qkv, self.fc1, self.fc2 = nn.Linear(8, 24), nn.Linear(8, 16), nn.Linear(16, 8)
        self.soft_mlp = soft_mlp

    def forward(self, x):  # (batch, tokens, 8)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = F.relu(q), torch.relu(k)
        kv = k.transpose(-1, -2) @ F.pad(v, (0, 1), value=1.0)
        out = q @ kv
        x = x + out[..., :-1] / (out[..., -1:] + 1e-15)
        h = self.fc1(x)
        return x + self.fc2(F.silu(h) if self.soft_mlp else F.relu(h))


class KernelLeaf(nn.Module):
    """The same attention as a leaf module (as timm traces LiteMLA): its ReLU is ``kernel_func``."""

    def __init__(self):
        super().__init__()
        self.qkv, self.kernel_func = nn.Linear(8, 24), nn.ReLU()

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.kernel_func(q), self.kernel_func(k)
        out = q @ (k.transpose(-1, -2) @ F.pad(v, (0, 1), value=1.0))
        return x + out[..., :-1] / (out[..., -1:] + 1e-15)


def test_linear_attention_feature_maps_get_no_ghost():
    # a soft activation there makes the denominator cross zero (efficientvit_b0: loss NaN at step 2)
    torch.manual_seed(0)
    model = LinearAttention()
    x = torch.randn(2, 5, 8)
    gm = fxsparse.trace(model, x)
    before = copy.deepcopy(gm)
    p = GhostNeuronPass()
    p(gm)
    assert p.stats["sites"] == 1 and p.stats["skipped"] == 2  # the MLP's ReLU only
    assert set(p.skipped) == {"relu", "relu_1"} and "linear attention" in p.skipped["relu"]
    fxsparse.gates.set_identity(gm)
    _assert_exact(before, gm, x)
    fxsparse.gates.set(gm, GROUP, 1.0)
    expected = LinearAttention(soft_mlp=True)
    expected.load_state_dict(model.state_dict())
    torch.testing.assert_close(gm(x), expected(x), rtol=0, atol=0)

    leaf = fxsparse.trace(nn.Sequential(KernelLeaf(), nn.Linear(8, 8), nn.ReLU()), x, leaf_modules=[KernelLeaf])
    p = GhostNeuronPass()
    p(leaf)
    assert p.stats["sites"] == 1 and list(p.skipped) == ["0.kernel_func"]
    assert isinstance(leaf.get_submodule("0").kernel_func, nn.ReLU)


# --------------------------------------------------------------------------- exactness of the blend
SPECIAL = torch.tensor([-0.0, 0.0, -1e-45, 1e-45, -1e-38, 1e-38, -1.0, 1.0, -1.5, 5.9, 6.0, 7.0,
                        88.0, -88.0, 1e30, -1e30, 3.4e38, -3.4e38])
VALUES = torch.cat([SPECIAL, torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 10])
SOFTS = {"swish": F.silu, "mish": F.mish, "pswish": lambda t: parametric_swish(t, 2.0)}


@pytest.mark.parametrize("soft", sorted(SOFTS))
@pytest.mark.parametrize("act", [torch.relu, F.relu6], ids=["relu", "relu6"])
@pytest.mark.parametrize("grad", ["-0.0", "+0.0", "randn"])
def test_blend_bit_exact_at_gate_0(soft, act, grad):
    """Outputs and input gradients at gate 0 equal the activation's bit for bit, signed zeros,
    denormals and values near the float32 limit included (sign bits compared, not just values)."""
    g = {"-0.0": torch.full_like(VALUES, -0.0), "+0.0": torch.zeros_like(VALUES),
         "randn": torch.randn(VALUES.shape, generator=torch.Generator().manual_seed(1))}[grad]
    x = VALUES.clone().requires_grad_()
    y = ghost_blend(act(x), SOFTS[soft](x), torch.tensor(0.0))
    (gx,) = torch.autograd.grad(y, x, g)
    x0 = VALUES.clone().requires_grad_()
    y0 = act(x0)
    (gx0,) = torch.autograd.grad(y0, x0, g)
    assert torch.equal(_bits(y), _bits(y0))
    assert torch.equal(_bits(gx), _bits(gx0))


@pytest.mark.parametrize("soft", sorted(SOFTS))
def test_blend_nonfinite_inputs(soft):
    """Documented behaviour at non-finite pre-activations: nan stays nan; at +-inf the soft branch
    is inf or nan and ``0 * soft`` is nan, so the blend is nan where ReLU gives inf / 0 (a network
    with infinite pre-activations has diverged either way)."""
    x = torch.tensor([float("nan"), float("inf"), float("-inf")])
    y = ghost_blend(torch.relu(x), SOFTS[soft](x), torch.tensor(0.0))
    assert torch.isnan(y).all()
    # the soft activations themselves at large finite inputs: finite, no overflow
    big = torch.tensor([3.4e38, -3.4e38, 1e30, -1e30])
    assert torch.isfinite(SOFTS[soft](big)).all()


def test_gate_one_is_the_soft_activation():
    x = VALUES
    for soft, fn in SOFTS.items():
        torch.testing.assert_close(ghost_blend(torch.relu(x), fn(x), torch.tensor(1.0)), SOFT_REFERENCE[soft](x))


# --------------------------------------------------------------------------- parameters, options, errors
def test_learnable_beta():
    torch.manual_seed(0)
    model = NormActNet()
    gm = fxsparse.trace(model, X)
    before = copy.deepcopy(gm)
    GhostNeuronPass(soft="pswish", beta=1.5, learn_beta=True, kinds=KINDS)(gm)
    params = dict(pass_infra.group_named_parameters(gm, GROUP))
    assert sorted(params) == ["fxsparse.ghost_neurons.bn1_act.beta", "fxsparse.ghost_neurons.bn2_act.beta"]
    assert ghosts.parameters(gm, GROUP) == list(params.values())
    assert all(float(b.detach()) == 1.5 for b in params.values())
    # the leaves' own state_dict keys do not change; the betas live in the container
    assert set(gm.state_dict()) - set(before.state_dict()) == {"fxsparse.gates.ghost_neurons", *params}

    fxsparse.gates.set_identity(gm)
    _assert_exact(before, gm, X)
    gm(X).sum().backward()
    assert all(float(b.grad) == 0 for b in params.values())  # gate 0: beta has no effect
    fxsparse.gates.set(gm, GROUP, 1.0)
    gm.zero_grad()
    gm(X).square().sum().backward()
    assert all(float(b.grad) != 0 for b in params.values())

    graph_model = _styles()
    ggm = fxsparse.trace(graph_model, X)
    GhostNeuronPass(soft="pswish", learn_beta=True)(ggm)
    assert len(ghosts.parameters(ggm, GROUP)) == 3
    betas = [n for n in pass_infra.tagged_nodes(ggm, group=GROUP) if n.meta["fxsparse"].get("param") == "beta"]
    assert len(betas) == 3

    remove_ghost_neurons(gm)
    assert ghosts.parameters(gm, GROUP) == [] and list(gm.state_dict()) == list(before.state_dict())


def test_relu6_only_when_asked():
    torch.manual_seed(0)
    gm = fxsparse.trace(Inplace("ReLU6(inplace=True)"), X)
    p = GhostNeuronPass()  # default kinds: ReLU only
    p(gm)
    assert p.stats["sites"] == 0 and fxsparse.gates.get(gm) == {}
    GhostNeuronPass(kinds=("relu", "relu6"))(gm)
    assert fxsparse.gates.get(gm) == {GROUP: 1.0}


def test_initial_gate_and_log(caplog):
    gm = fxsparse.trace(_styles(), X)
    with caplog.at_level(logging.INFO, logger="fxsparse.passes"):
        GhostNeuronPass(initial_gate=0.25)(gm)
    assert fxsparse.gates.get(gm) == {GROUP: 0.25}
    assert "GhostNeuronPass: sites=3, module=1, function=1, method=1, inplace=0, nodes=6, fused=3" in caplog.text
    with caplog.at_level(logging.INFO, logger="fxsparse.passes"):
        remove_ghost_neurons(gm)
    assert "RemoveGhostNeuronsPass: sites=3" in caplog.text
    assert fxsparse.gates.get(gm) == {} and not hasattr(gm, "fxsparse")


def test_errors():
    with pytest.raises(PassError, match="soft must be one of"):
        GhostNeuronPass(soft="gelu")
    with pytest.raises(PassError, match="kinds must be"):
        GhostNeuronPass(kinds=("gelu",))
    with pytest.raises(PassError, match="needs soft='pswish'"):
        GhostNeuronPass(learn_beta=True)
    with pytest.raises(PassError, match="initial_gate"):
        GhostNeuronPass(initial_gate=2.0)
    gm = fxsparse.trace(_styles(), X)
    GhostNeuronPass()(gm)
    with pytest.raises(PassError, match="already has ghost neurons"):
        GhostNeuronPass()(gm)
    with pytest.raises(PassError, match="runs on a torch.fx.GraphModule"):
        GhostNeuronPass()(_styles())


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_gate_moves_without_recompiling(backend):
    """Moving the gate recompiles nothing; removal + GraphModule.recompile() compiles exactly once
    more; no graph breaks. ``eager`` checks dynamo's guards cheaply, ``inductor`` the real thing."""
    from torch._dynamo.utils import counters

    _, gm, x = masked("resnet18", (3, 32, 32))
    GhostNeuronPass()(gm)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(gm, backend=backend)

    def step():
        out = compiled(x)
        out.sum().backward()
        return out.detach()

    y1 = step()
    frames = counters["frames"]["ok"]
    assert frames == 1
    fxsparse.gates.set(gm, GROUP, 0.0)
    y0 = step()
    assert counters["frames"]["ok"] == frames, "moving the gate recompiled"
    assert not torch.equal(y0, y1), "the compiled graph did not see the gate move"
    remove_ghost_neurons(gm)
    y2 = step()
    assert counters["frames"]["ok"] == frames + 1, "removal should compile exactly once more"
    step()
    assert counters["frames"]["ok"] == frames + 1
    torch.testing.assert_close(y2, gm(x).detach(), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_compile_leaf_ghosts():
    """GhostActivation (leaf sites, read through plain references) compiles without graph breaks
    and without recompiling when the gate moves."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(NormActNet(), SharedActBlock(4))
    gm = fxsparse.trace(model, X, leaf_modules=[SharedActBlock])
    MaskPass(random_masks(gm, 0.5))(gm)
    GhostNeuronPass(soft="pswish", learn_beta=True, kinds=KINDS)(gm)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(X)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(gm, backend="eager")
    y1 = compiled(X)
    fxsparse.gates.set(gm, GROUP, 0.0)
    y0 = compiled(X)
    assert counters["frames"]["ok"] == 1
    assert torch.equal(y0, gm(X)) and not torch.equal(y0, y1)
    torch._dynamo.reset()


def test_removal_refuses_untagged_ghost_nodes():
    """torch.save(gm) drops node.meta (a torch.fx behaviour): removal says so instead of failing
    later with a lint error."""
    import io

    gm = fxsparse.trace(_styles(), X)
    GhostNeuronPass()(gm)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with pytest.raises(PassError, match="do not survive pickling"):
        remove_ghost_neurons(loaded)


@pytest.mark.parametrize("net, method, neurons", [
    ("vgg11", "snip", False), ("vgg11", "random", True), ("resnet20", "snip", True),
], ids=["plain-snip", "plain-random", "residual-snip"])
def test_tost_reads_the_graph_and_the_mask_method_for_ghost_neurons(net, method, neurons):
    """tost's ``ghost_neurons.plain_mask_methods = ["random"]``: no ghost neurons on a plain network
    (no path around any layer) whose mask is not random; everywhere else they are added. Where left
    out, the network is exactly tost with ``ghost_neurons.enabled = false``, and inspection says why."""
    from fxsparse import nets
    from fxsparse.inspect import inspect_graph, summary_lines
    from fxsparse.transform import GHOSTS_OFF_KEY

    torch.manual_seed(0)
    model = getattr(nets, net)(width=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
    overrides = {"masks.method": method}
    gm = fxsparse.transform(model, fxsparse.load_recipe("tost", overrides), data=data, example_inputs=x, skip=("rescale",))
    blends = [n for n in gm.graph.nodes if n.meta.get("fxsparse", {}).get("group") == GROUP]
    assert bool(blends) is neurons and (GROUP in fxsparse.gates.get(gm)) is neurons
    assert (GROUP in gm.meta.get(GHOSTS_OFF_KEY, {})) is not neurons
    if neurons:
        return
    off = fxsparse.transform(model, fxsparse.load_recipe("tost", {**overrides, "ghost_neurons.enabled": False}),
                             data=data, example_inputs=x, skip=("rescale",))
    assert gm.code == off.code
    assert all(torch.equal(a, b) for a, b in zip(gm.state_dict().values(), off.state_dict().values()))
    assert torch.equal(gm.eval()(x), off.eval()(x))
    lines = summary_lines(inspect_graph(gm))
    assert "ghost_neurons: not added here: a plain network with a 'snip' mask (ghost_neurons.plain_mask_methods = ['random'])" in lines
