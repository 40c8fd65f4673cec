"""GhostChannelPass / RemoveGhostChannelsPass: sites, identity exactness, extra-width semantics,
masking, removal and torch.compile behaviour."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import gates, ghosts
from fxsparse.errors import PassError
from fxsparse.graph import channel_chains, same_structure
from fxsparse.pass_infra import tagged_nodes
from fxsparse.passes.ghost_channels import GROUP, GhostChannelPass, RemoveGhostChannelsPass, remove_ghost_channels
from fxsparse.passes.mask import MaskPass, get_mask
from fxsparse.testing import assert_same_structure, compare

from conftest import masked, random_masks

# Sites per zoo model on the masked graph (ratio 0.25). Producers whose only consumer is grouped
# (depthwise) are skipped; the rest of each model's producers reach a residual add, a concat, a
# pooling or the output. Zero sites:
#   tv:squeezenet1_1  every conv feeds a fire module's concat, pooling or the output;
#   repvgg_a0         every conv's BN output goes into a multi-branch add;
#   nf_resnet26, nf_regnet_b0  the blocks' convs are inside NormFreeBlock leaves (not traced
#                     through), and the stem/final convs reach adds and pooling.
EXPECTED_SITES = {
    "resnet18": 8, "resnet50": 32, "tv:resnet18": 8, "tv:resnet50": 32, "tv:densenet121": 58,
    "tv:mobilenet_v2": 19, "tv:squeezenet1_1": 0, "resnet26d": 18, "cspresnet50": 32, "repvgg_a0": 0,
    "dla34": 14, "seresnet18": 16, "mobilenetv2_100": 19, "mobilenetv3_small_100": 12,
    "tv:mobilenet_v3_small": 13, "tv:shufflenet_v2_x0_5": 19, "tv:mnasnet0_5": 19, "ghostnet_100": 14,
    "lcnet_050": 13, "efficientnet_b0": 18, "tf_efficientnet_b0": 18, "efficientnet_cc_b0_4e": 17,
    "mixnet_s": 14, "tv:efficientnet_b0": 18, "regnetx_002": 13, "regnety_002": 13,
    "tv:regnet_y_400mf": 16, "nf_resnet26": 0, "nf_regnet_b0": 0, "convnext_atto": 12,
    "tv:convnext_tiny": 18, "vit_tiny_patch16_224": 12, "deit_tiny_patch16_224": 12, "tv:vit_b_16": 12,
    "swin_tiny_patch4_window7_224": 12, "tv:swin_t": 12, "mobilevit_xxs": 7, "edgenext_xx_small": 12,
    "poolformer_s12": 12,
    # one MLP pair (linear, GELU, linear) per transformer block: 2 blocks; Swin's 2+2+6+2
    "torchvision.models.vision_transformer:VisionTransformer(image_size=64, patch_size=16, num_layers=2, "
    "num_heads=4, hidden_dim=64, mlp_dim=128)": 2,
    "swin_tiny_patch4_window7_224(img_size=64, window_size=2, embed_dim=32, num_heads=(1, 2, 4, 8))": 12,
    # one 1x1 -> 3x3 pair inside each dense layer: 4 blocks of 2
    "torchvision.models.densenet:DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, "
    "bn_size=2)": 8,
    # conv pairs inside a stage (a max-pool in between is not channel-wise): VGG-16 1+1+2+2+2,
    # VGG-11 0+0+1+1+1; one per BasicBlock; MobileNetV2 as torchvision's
    "fxsparse.nets:vgg16(width=0.25)": 8, "fxsparse.nets:vgg11(width=0.25)": 3, "fxsparse.nets:resnet32": 15,
    "fxsparse.nets:mobilenetv2(width=0.5)": 19,
}


def _set_gate(gm, value):
    gates.set(gm, GROUP, value)
    return gm


# --------------------------------------------------------------------------- the zoo
def test_zoo(zoo_entry):
    spec, size = zoo_entry
    # one image for the 224x224 transformers (no BatchNorm there) keeps the suite fast
    _, gm, x = masked(spec, size, batch=1 if size[-1] >= 224 else 2)
    before = copy.deepcopy(gm)
    state_before = {k: v.clone() for k, v in gm.state_dict().items()}

    single = {c.producer.name for c in channel_chains(gm) if c.single_consumer is not None}
    p = GhostChannelPass()
    gm = p(gm).graph_module
    assert p.stats["sites"] == EXPECTED_SITES[spec], (p.sites, p.skipped)
    # every single-consumer chain is a site or skipped with a reason
    assert {s["producer"] for s in p.sites} | set(p.skipped) == single
    assert p.stats["channels"] == sum(s["channels"] for s in p.sites)
    assert len(tagged_nodes(gm, group=GROUP, role="merge")) == p.stats["sites"]
    if not p.stats["sites"]:
        assert same_structure(before, gm) and GROUP not in gates.get(gm)
        return
    # the original state is untouched: same keys (plus the ghost container and gate), same values
    state = gm.state_dict()
    assert all(torch.equal(state[k], v) for k, v in state_before.items())
    assert all(k.startswith(("fxsparse.ghost_channels.", "fxsparse.gates.")) for k in set(state) - set(state_before))

    # gate 0: outputs and original-parameter gradients bit-identical, train and eval. Run in
    # place (no copies: the big transformers are expensive to copy), so afterwards both modules
    # have seen the same train-mode forward...
    _set_gate(gm, 0.0)
    assert compare(before, gm, x, exact=True, copy_modules=False) == []
    # ...and the original BN statistics moved exactly alike (ghost BNs only update their own)
    bufs = dict(gm.named_buffers())
    assert all(torch.equal(bufs[k], v) for k, v in before.named_buffers())

    # gate 1: the ghost is on. Models whose consumers feed a zero-initialized BN (timm's
    # zero_init_last) keep their outputs, but then their gradients change.
    _set_gate(gm, 1.0)
    changed = compare(before, gm, x, exact=True, modes=("train",), grads=False, copy_modules=False)
    assert changed or compare(before, gm, x, exact=True, modes=("train",), copy_modules=False)

    # removal: the graph before the pass, computing what the ghosted graph computed at gate 0
    _set_gate(gm, 0.0)
    at_zero = copy.deepcopy(gm)
    remove_ghost_channels(gm)
    assert_same_structure(before, gm)
    assert set(gm.state_dict()) == set(state_before)
    assert compare(gm, at_zero, x, exact=True, grads=False, copy_modules=False) == []


# --------------------------------------------------------------------------- extra width
class ConvBnConv(nn.Module):
    def __init__(self, groups: int = 1, c_in: int = 4, mid: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 3, padding=1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(mid)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, 6, 3, stride=2, padding=2, dilation=2)

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


def _ghosted(model, x, sparsity=0.5, **kw):
    torch.manual_seed(0)
    gm = fxsparse.trace(model, x)
    if sparsity:
        MaskPass(random_masks(gm, sparsity))(gm)
    before = copy.deepcopy(gm)
    p = GhostChannelPass(**kw)
    p(gm)
    return before, gm, p


def _effective(gm, param):
    w = gm.get_parameter(param)
    mask = get_mask(gm, param)
    return w * mask if mask is not None else w


def _ghost(gm, site, name):
    """A ghost tensor with its mask applied, if it has one."""
    branch = gm.get_submodule(f"fxsparse.{GROUP}.{site}")
    w = getattr(branch, name)
    mask = getattr(branch, {"weight": "weight_mask", "slice_weight": "slice_mask"}[name], None)
    return w * mask if mask is not None else w


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_ghost_channels_are_extra_width(train):
    """At gate 1 the ghosted graph equals the model with P, its BN and C widened by k channels."""
    torch.manual_seed(0)
    model = ConvBnConv()
    x = torch.randn(3, 4, 11, 11)
    before, gm, p = _ghosted(model, x, ratio=0.25)
    assert p.sites == [{"site": "conv1", "producer": "conv1", "consumer": "conv2", "channels": 2}]
    ghost_bn = gm.get_submodule(f"fxsparse.{GROUP}.conv1.ops.0")
    with torch.no_grad():  # give the ghost BN non-default affine parameters
        ghost_bn.weight.uniform_(0.5, 1.5)
        ghost_bn.bias.uniform_(-0.5, 0.5)
    gm.train(train)
    if not train:
        ghost_bn.running_mean.uniform_(-0.1, 0.1)
        ghost_bn.running_var.uniform_(0.5, 2.0)
        gm.bn.running_mean.uniform_(-0.1, 0.1)

    # the reference: one wider conv -> bn -> relu -> conv, built from the same tensors
    with torch.no_grad():
        w1 = torch.cat([_effective(gm, "conv1.weight"), _ghost(gm, "conv1", "weight")])
        w2 = torch.cat([_effective(gm, "conv2.weight"), _ghost(gm, "conv1", "slice_weight")], dim=1)
        cat = lambda a, b: torch.cat([a, b])  # noqa: E731
        rm, rv = cat(gm.bn.running_mean, ghost_bn.running_mean), cat(gm.bn.running_var, ghost_bn.running_var)
        h = F.conv2d(x, w1, None, 1, 1)
        h = F.batch_norm(h, rm, rv, cat(gm.bn.weight, ghost_bn.weight), cat(gm.bn.bias, ghost_bn.bias),
                         train, gm.bn.momentum, gm.bn.eps)
        ref = F.conv2d(F.relu(h), w2, gm.conv2.bias, 2, 2, 2)
        out = gm(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if train:  # each BN tracked the statistics of its own channels
        torch.testing.assert_close(torch.cat([gm.bn.running_mean, ghost_bn.running_mean]), rm)
        torch.testing.assert_close(torch.cat([gm.bn.running_var, ghost_bn.running_var]), rv)

    if not train:  # any gate value blends linearly between the original and the wider model
        with torch.no_grad():
            orig = _set_gate(gm, 0.0)(x)
            torch.testing.assert_close(_set_gate(gm, 0.5)(x), orig + 0.5 * (ref - orig), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [8, 2], ids=["depthwise", "grouped"])
def test_grouped_producer(groups):
    """Ghost channel j is one more filter of the producer's group j % groups."""
    torch.manual_seed(0)
    model = ConvBnConv(groups=groups, c_in=8, mid=8)
    x = torch.randn(2, 8, 9, 9)
    _, gm, p = _ghosted(model, x, ratio=0.5)
    assert p.stats["sites"] == 1 and p.sites[0]["channels"] == 4
    gm.eval()
    w = _ghost(gm, "conv1", "weight")
    per_group = 8 // groups
    assert w.shape == (4, per_group, 3, 3)
    with torch.no_grad():
        ghost = torch.cat([
            F.conv2d(x[:, (j % groups) * per_group:(j % groups + 1) * per_group], w[j:j + 1], None, 1, 1)
            for j in range(4)
        ], dim=1)
        bn = gm.get_submodule(f"fxsparse.{GROUP}.conv1.ops.0")
        ghost = F.relu(bn(ghost))
        contribution = F.conv2d(ghost, _ghost(gm, "conv1", "slice_weight"), None, 2, 2, 2)
        _set_gate(gm, 0.0)
        base = gm(x)
        _set_gate(gm, 1.0)
        torch.testing.assert_close(gm(x), base + contribution, rtol=1e-5, atol=1e-5)


class MLP(nn.Module):
    def __init__(self, p: float = 0.5, norm: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32) if norm else nn.Identity()
        self.act = nn.GELU()
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.norm(self.fc1(x)))))


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "batchnorm1d"])
def test_mlp(norm):
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    before, gm, p = _ghosted(MLP(norm=norm), x, ratio=0.25)
    assert p.sites == [{"site": "fc1", "producer": "fc1", "consumer": "fc2", "channels": 8}]
    branch = gm.get_submodule(f"fxsparse.{GROUP}.fc1")
    assert branch.weight.shape == (8, 16) and branch.bias.shape == (8,) and branch.slice_weight.shape == (10, 8)
    # the ghost dropout draws after the original one: train mode at gate 0 is still bit-identical
    _set_gate(gm, 0.0)
    assert compare(before, gm, x, exact=True) == []

    # at gate 1 (eval: no dropout) it is the MLP with fc1 widened to 40 features
    _set_gate(gm, 1.0)
    gm.eval()
    with torch.no_grad():
        w1 = torch.cat([_effective(gm, "fc1.weight"), _ghost(gm, "fc1", "weight")])
        b1 = torch.cat([gm.fc1.bias, branch.bias])
        w2 = torch.cat([_effective(gm, "fc2.weight"), _ghost(gm, "fc1", "slice_weight")], dim=1)
        h = F.linear(x, w1, b1)
        if norm:
            bn = branch.ops[0]
            cat = lambda a, b: torch.cat([a, b])  # noqa: E731
            h = F.batch_norm(h, cat(gm.norm.running_mean, bn.running_mean), cat(gm.norm.running_var, bn.running_var),
                             cat(gm.norm.weight, bn.weight), cat(gm.norm.bias, bn.bias), False, 0.1, gm.norm.eps)
        ref = F.linear(F.gelu(h), w2, gm.fc2.bias)
        torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)


def test_linear_norm_on_3d_input_is_skipped():
    """BatchNorm1d after a linear on (N, L, F) normalizes L, not the features: no site."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(self.bn(self.fc1(x)))

    _, gm, p = _ghosted(Seq(), torch.randn(2, 6, 6), sparsity=0)
    assert p.stats["sites"] == 0 and next(iter(p.skipped.values())).startswith("layout mismatch:")


def test_dropout_option():
    x = torch.randn(4, 16)
    _, gm, _ = _ghosted(MLP(p=0.5), x, dropout=False)
    copies = [n.meta["fxsparse"].get("copy_of") for n in tagged_nodes(gm, group=GROUP, role="branch")]
    assert "act" in copies and "drop" not in copies
    _, gm, _ = _ghosted(MLP(p=0.5), x)
    copies = [n.meta["fxsparse"].get("copy_of") for n in tagged_nodes(gm, group=GROUP, role="branch")]
    assert "drop" in copies
    (drop,) = [m for m in gm.get_submodule(f"fxsparse.{GROUP}.fc1.ops") if isinstance(m, nn.Dropout)]
    assert drop.p == 0.5


# --------------------------------------------------------------------------- masks, params, tags
def test_ghost_density_matches_layers():
    _, gm, x = masked("tv:mobilenet_v2", (3, 32, 32), sparsity=0.8)
    p = GhostChannelPass()
    p(gm)
    assert p.stats["sites"] == 19
    for site in p.sites:
        branch = gm.get_submodule(f"fxsparse.{GROUP}.{site['site']}")
        for mask, param in (("weight_mask", site["producer"]), ("slice_mask", site["consumer"])):
            m, layer_mask = getattr(branch, mask), get_mask(gm, param + ".weight")
            assert m.dtype == torch.bool
            density, want = m.float().mean().item(), layer_mask.float().mean().item()
            assert abs(density - want) <= 1 / m.numel(), (site, mask, density, want)
    # the graph applies the masks: pruned ghost weights get no gradient
    gm.train()
    gm(x).sum().backward()
    for site in p.sites:
        branch = gm.get_submodule(f"fxsparse.{GROUP}.{site['site']}")
        assert not branch.weight.grad[~branch.weight_mask].any()
        assert not branch.slice_weight.grad[~branch.slice_mask].any()
        assert branch.slice_weight.grad[branch.slice_mask].any()


def test_dense_ghosts():
    x = torch.randn(2, 4, 8, 8)
    _, gm, p = _ghosted(ConvBnConv(), x, masked=False)
    branch = gm.get_submodule(f"fxsparse.{GROUP}.conv1")
    assert not hasattr(branch, "weight_mask") and not hasattr(branch, "slice_mask")
    assert not [n for n in tagged_nodes(gm, group=GROUP) if n.meta["fxsparse"].get("part") == "mask"]


def test_pickles():
    import pickle

    x = torch.randn(2, 8, 8, 8)
    _, gm, _ = _ghosted(ConvBnConv(groups=4, c_in=8), x)
    gm.eval()
    with torch.no_grad():
        assert torch.equal(pickle.loads(pickle.dumps(gm))(x), gm(x))


def test_parameters_and_tags():
    _, gm, x = masked("resnet18", (3, 32, 32))
    original = {id(p) for p in gm.parameters()}
    GhostChannelPass()(gm)
    ghost = ghosts.parameters(gm, GROUP)
    added = [p for p in gm.parameters() if id(p) not in original]
    assert {id(p) for p in ghost} == {id(p) for p in added} and len(ghost) == 8 * 4  # weight, bn w/b, slice
    for node in tagged_nodes(gm, group=GROUP):
        t = node.meta["fxsparse"]
        assert t["pass"] == "GhostChannelPass" and t["role"] in {"gate", "branch", "slice", "scaled", "merge"}
        assert t["site"] in gm.get_submodule(f"fxsparse.{GROUP}")._modules
    assert gates.get(gm) == {GROUP: 1.0}


def test_inits():
    x = torch.randn(2, 4, 8, 8)
    _, gm, _ = _ghosted(ConvBnConv(), x, init="zero_slice")
    assert not gm.get_submodule(f"fxsparse.{GROUP}.conv1").slice_weight.any()
    _, a, _ = _ghosted(ConvBnConv(), x, seed=1)
    _, b, _ = _ghosted(ConvBnConv(), x, seed=1)
    assert torch.equal(a.fxsparse.ghost_channels.conv1.weight, b.fxsparse.ghost_channels.conv1.weight)
    with pytest.raises(PassError, match="init"):
        GhostChannelPass(init="xavier")
    with pytest.raises(PassError, match="ratio"):
        GhostChannelPass(ratio=0)


def test_errors_and_registry_removal():
    x = torch.randn(2, 4, 8, 8)
    before, gm, _ = _ghosted(ConvBnConv(), x)
    with pytest.raises(PassError, match="already has ghost channels"):
        GhostChannelPass()(gm)
    assert ghosts.present(gm) == [GROUP]
    fxsparse.remove_ghosts(gm)
    assert same_structure(before, gm) and ghosts.present(gm) == []
    assert gates.get(gm) == {} and not hasattr(gm.fxsparse, GROUP)
    assert not RemoveGhostChannelsPass()(gm).modified  # nothing left to remove


# --------------------------------------------------------------------------- where
def _producer_groups(gm, name):
    from fxsparse.graph import layer_call, parameterized_layers

    layer = next(l for l in parameterized_layers(gm) if l.name == name)
    return layer_call(gm, layer.node).groups


@pytest.mark.parametrize("build, sites, ungrouped", [
    # MobileNetV2: 17 depthwise producers feed a block's projection; the last projection feeds
    # the 1280-channel conv. VGG-16 and ResNet-20 have no grouped conv: "ungrouped" is "all"
    (lambda: fxsparse.nets.mobilenetv2(width=0.25, stem_stride=2), 18, 1),
    (lambda: fxsparse.nets.vgg16(width=0.25), 8, 8),
    (lambda: fxsparse.nets.resnet20(width=0.5), 9, 9),
], ids=["mobilenetv2", "vgg16", "resnet20"])
def test_where_grouped_and_ungrouped_split_the_producers(build, sites, ungrouped):
    import fxsparse.nets  # noqa: F401

    x = torch.randn(2, 3, 32, 32)
    found = {}
    for where in ("all", "ungrouped", "grouped"):
        before, gm, p = _ghosted(build(), x, where=where)
        found[where] = {s["producer"] for s in p.sites}
        if where != "all":
            # refused before any other check (an expand conv feeding a depthwise one is refused
            # here under "grouped", not as a grouped consumer): each for its groups, with the reason
            wanted = (lambda g: g == 1) if where == "ungrouped" else (lambda g: g > 1)
            refused = {n for n, why in p.skipped.items() if why.startswith(f"where={where!r}")}
            assert found["all"] - found[where] <= refused
            assert not any(wanted(_producer_groups(gm, n)) for n in refused)
            assert all(wanted(_producer_groups(gm, n)) for n in found[where])
            assert p.stats["skipped"] == len(p.skipped)
        if p.stats["sites"]:
            _set_gate(gm, 0.0)
            assert compare(before, gm, x, exact=True) == []  # exact at gate 0
            remove_ghost_channels(gm)
        assert same_structure(before, gm)
    assert len(found["all"]) == sites and len(found["ungrouped"]) == ungrouped
    assert found["ungrouped"] | found["grouped"] == found["all"] and not found["ungrouped"] & found["grouped"]


def test_where_reads_the_graph_as_it_was_before_the_ghost_skips():
    """A ghost skip branch is no path around a layer: after GhostSkipPass, VGG-16's convs are
    still plain (every site under where="plain") and none is bypassed."""
    import fxsparse.nets  # noqa: F401
    from fxsparse.graph import articulation_nodes, is_plain, parameterized_layers
    from fxsparse.passes.ghost_skips import GhostSkipPass

    x = torch.randn(2, 3, 32, 32)
    counts = {}
    for where in ("all", "plain", "bypassed"):
        torch.manual_seed(0)
        gm = fxsparse.trace(fxsparse.nets.vgg16(width=0.25), x)
        MaskPass(random_masks(gm, 0.5))(gm)
        skips = GhostSkipPass()
        skips(gm)
        assert skips.stats["conv_edges"] == 13  # every conv has a branch around it now
        assert is_plain(gm) and {l.node for l in parameterized_layers(gm)} <= articulation_nodes(gm)
        p = GhostChannelPass(where=where)
        p(gm)
        counts[where] = p.stats["sites"]
    assert counts == {"all": 8, "plain": 8, "bypassed": 0}


def test_where_is_checked_by_the_pass_and_the_recipe():
    from fxsparse.errors import RecipeError
    from fxsparse.recipe import load_recipe

    with pytest.raises(PassError, match="GhostChannelPass: where must be 'all', one of"):
        GhostChannelPass(where="depthwise")
    assert load_recipe("tost", overrides={"ghost_channels.where": "ungrouped"}) is not None
    with pytest.raises(RecipeError, match="ghost_channels.where"):
        load_recipe("tost", overrides={"ghost_channels.where": "depthwise"})


# --------------------------------------------------------------------------- torch.compile
def test_compile_gate_moves_without_recompiling():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    _, gm, x = masked("resnet18", (3, 32, 32))
    GhostChannelPass()(gm)
    gm.eval()
    counter = CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    with torch.no_grad():
        compiled(x)
        assert counter.frame_count == 1
        for value in (0.5, 0.0, 1.0):
            _set_gate(gm, value)
            torch.testing.assert_close(compiled(x), gm(x))
        assert counter.frame_count == 1  # no recompilation when the gate moves
        remove_ghost_channels(gm)
        compiled(x)
        assert counter.frame_count == 2  # exactly one when the removal changes the graph
        compiled(x)
        assert counter.frame_count == 2
    torch._dynamo.reset()
    _, gm, x = masked("resnet18", (3, 32, 32))
    GhostChannelPass()(gm)
    explanation = torch._dynamo.explain(gm)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# --------------------------------------------------------------------------- with the other ghosts
@pytest.mark.parametrize("spec", ["resnet18", "mobilenetv2_100", "regnetx_002", "vit_tiny_patch16_224"])
def test_after_ghost_neurons_and_skips(spec):
    """In PASS_ORDER ghost neurons and skips come first: the sites are the same, the branch copies
    the original ops, every gate at identity is exact and the ghosts come off in any order."""
    neurons = pytest.importorskip("fxsparse.passes.ghost_neurons")
    skips = pytest.importorskip("fxsparse.passes.ghost_skips")
    size = (3, 224, 224) if "vit" in spec else (3, 32, 32)
    _, original, x = masked(spec, size)
    gm = copy.deepcopy(original)
    neurons.GhostNeuronPass()(gm)
    skips.GhostSkipPass(include_linear=True)(gm)
    p = GhostChannelPass()
    p(gm)
    assert p.stats["sites"] == EXPECTED_SITES[spec]
    # the branch reads another group's node only as the producer's input, and holds no ghost neuron
    for node in tagged_nodes(gm, group=GROUP):
        if node.meta["fxsparse"].get("part") in ("producer", "select"):
            continue
        assert all((i.meta.get("fxsparse") or {}).get("group") in (None, "masks", GROUP)
                   for i in node.all_input_nodes), node
    assert not any(isinstance(m, neurons.GhostActivation) for m in gm.fxsparse.ghost_channels.modules())

    gates.set_identity(gm)
    assert compare(original, gm, x, exact=True) == []
    removals = [neurons.remove_ghost_neurons, skips.remove_ghost_skips, remove_ghost_channels]
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        g = copy.deepcopy(gm)
        for i in order:
            removals[i](g)
        assert_same_structure(original, g)
        assert compare(g, gm, x, exact=True, grads=False) == []


@pytest.mark.slow
def test_compile_inductor():
    """The same under inductor: gate moves reuse the compiled code, removal compiles once more."""
    from torch._inductor.compile_fx import compile_fx

    compiles = []

    def backend(graph, example_inputs):
        compiles.append(graph)
        return compile_fx(graph, example_inputs)

    torch._dynamo.reset()
    x = torch.randn(2, 4, 12, 12)
    _, gm, _ = _ghosted(ConvBnConv(), x)
    gm.eval()
    compiled = torch.compile(gm, backend=backend)
    with torch.no_grad():
        for value in (1.0, 0.3, 0.0):
            _set_gate(gm, value)
            torch.testing.assert_close(compiled(x), gm(x), rtol=1e-4, atol=1e-5)
        assert len(compiles) == 1
        remove_ghost_channels(gm)
        torch.testing.assert_close(compiled(x), gm(x), rtol=1e-4, atol=1e-5)
        assert len(compiles) == 2
    torch._dynamo.reset()
