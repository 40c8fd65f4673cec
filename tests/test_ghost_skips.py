"""GhostSkipPass / RemoveGhostSkipsPass: where edges land (ToST's BasicBlock), identity exactness,
removal, the whole zoo, and torch.compile behaviour."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch import nn

import fxsparse
import fxsparse.ghosts
from conftest import masked, random_masks
from fxsparse import gates
from fxsparse.errors import PassError
from fxsparse.graph import same_structure
from fxsparse.pass_infra import tagged_nodes
from fxsparse.passes.ghost_skips import (
    GROUP, GhostSkipBranch, GhostSkipPass, remove_ghost_skips,
)
from fxsparse.passes.mask import MaskPass, masked_parameters
from fxsparse.testing import assert_same_structure, compare
from zoo_models import GHOST_BAR


# --------------------------------------------------------------------------- a CIFAR ResNet as in ToST
class BasicBlock(nn.Module):
    """The CIFAR ResNet BasicBlock ToST edits (3x3 convs, a 1x1 conv + BN shortcut when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tost_block_forward(block: BasicBlock, x, jump1: GhostSkipBranch, jump2: GhostSkipBranch, alpha: float):
    """ToST's BasicBlock with its two jump branches, written out from the paper's description."""
    out = block.relu(block.bn1(block.conv1(x)) + alpha * jump1(x))
    main = block.bn2(block.conv2(out)) + block.shortcut(x)
    return block.relu(main + alpha * jump2(out))


def tiny(seed: int = 0, size: int = 16, sparsity: float = 0.5):
    torch.manual_seed(seed)
    model = TinyResNet().train()
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    gm = fxsparse.trace(model, x)
    MaskPass(random_masks(gm, sparsity, seed))(gm)
    return model, gm, x


def branches(gm) -> list[GhostSkipBranch]:
    return [m for m in gm.fxsparse.ghost_skips.children() if isinstance(m, GhostSkipBranch)]


def merges_of(gm, site: str) -> list[torch.fx.Node]:
    return [n for n in tagged_nodes(gm, group=GROUP, role="merge") if n.meta["fxsparse"]["site"] == site]


def node_for(gm, target: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


# --------------------------------------------------------------------------- placement
def test_basic_block_edges_land_where_tost_puts_them():
    _, gm, x = tiny()
    p = GhostSkipPass()
    p(gm)
    # stem conv + two convs per block; the 1x1 shortcut conv is not spatial
    assert set(p.sites) == {"conv1", "layer1_conv1", "layer1_conv2", "layer2_conv1", "layer2_conv2"}
    assert p.stats["edges"] == 5
    for block in ("layer1", "layer2"):
        conv1_in = node_for(gm, f"{block}.bn1").args[0].args[0]  # the masked conv's data input
        # conv1: from conv1's input to after bn1, before the block's first relu
        (m1,) = merges_of(gm, f"{block}_conv1")
        assert m1.args[0] is node_for(gm, f"{block}.bn1")
        assert [u.target for u in m1.users] == [f"{block}.relu"]
        branch1 = m1.args[1].args[1]
        assert branch1.meta["fxsparse"]["role"] == "branch" and branch1.args == (conv1_in,)
        # conv2: from conv2's input (the first relu's output) to after the residual add, before the last relu
        (m2,) = merges_of(gm, f"{block}_conv2")
        add = m2.args[0]
        assert add.op == "call_function" and add.target is operator.add
        assert node_for(gm, f"{block}.bn2") in add.args
        assert [u.target for u in m2.users] == [f"{block}.relu"]
        branch2 = m2.args[1].args[1]
        (relu1,) = m1.users
        assert branch2.args == (relu1,)  # conv2's input: the first relu's output
    # the downsampling block's conv1 has stride 2: so does its branch, without padding
    b = gm.fxsparse.ghost_skips.layer2_conv1
    assert b.stride == (2, 2) and b.padding == (0, 0) and tuple(b.weight.shape) == (16, 8, 1, 1)
    assert gm.fxsparse.ghost_skips.layer2_conv2.stride == (1, 1)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_basic_block_matches_tost_equations(alpha):
    model, gm, x = tiny()
    GhostSkipPass(initial_gate=alpha)(gm)
    skips = gm.fxsparse.ghost_skips
    with torch.no_grad():  # non-trivial branch weights so that the comparison means something
        for b in skips.children():
            b.weight.normal_()
    gm.train()
    # the masked weights, folded into a copy of the model for the reference computation
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masked_parameters(gm).items():
            ref.get_parameter(name).mul_(mask)
    jumps = copy.deepcopy(skips)
    h = ref.relu(ref.bn1(ref.conv1(x)) + alpha * jumps.conv1(x))
    h = tost_block_forward(ref.layer1, h, jumps.layer1_conv1, jumps.layer1_conv2, alpha)
    h = tost_block_forward(ref.layer2, h, jumps.layer2_conv1, jumps.layer2_conv2, alpha)
    expected = ref.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-6)


def test_branch_init_is_tost():
    _, gm, _ = tiny()
    GhostSkipPass()(gm)
    for b in branches(gm):
        assert torch.equal(b.weight, torch.full_like(b.weight, 1e-4))
        assert b.mask is None
        assert isinstance(b.norm, nn.BatchNorm2d)
        assert torch.equal(b.norm.weight, torch.ones_like(b.norm.weight)) and not b.norm.bias.any()
        assert not b.norm.running_mean.any() and torch.equal(b.norm.running_var, torch.ones_like(b.norm.running_var))
    assert gates.get(gm) == {GROUP: 1.0}


def test_exact_at_identity_and_removal_restores_structure():
    _, gm, x = tiny()
    before = copy.deepcopy(gm)
    GhostSkipPass()(gm)
    gates.set(gm, GROUP, 1.0)
    assert compare(before, gm, x, exact=True, modes=("train",), grads=False), "gate 1 must change the output"
    gates.set_identity(gm)
    assert compare(before, gm, x, exact=True) == []
    remove_ghost_skips(gm)
    assert_same_structure(before, gm)
    assert compare(before, gm, x, exact=True) == []
    assert "fxsparse.ghost_skips" not in dict(gm.named_modules()) and GROUP not in gates.get(gm)
    assert set(gm.state_dict()) == set(before.state_dict())


@pytest.mark.parametrize("build, plain, bypassed", [
    # VGG: no shortcut anywhere; ResNet-20: the stem alone is not inside a residual block;
    # MobileNetV2: the 3x3 convs of the stem and of the 6 blocks without a residual add are plain
    (lambda: fxsparse.nets.vgg16(width=0.25), 13, 0),
    (lambda: fxsparse.nets.resnet20(width=0.5), 1, 18),
    (lambda: fxsparse.nets.mobilenetv2(width=0.25), 6, 12),
], ids=["vgg16", "resnet20", "mobilenetv2"])
def test_where_reads_residual_bypasses_from_the_graph(build, plain, bypassed):
    import fxsparse.nets  # noqa: F401
    from fxsparse.graph import articulation_nodes, stem_layer

    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 32)
    gm = fxsparse.trace(model, x)
    counts, sites = {}, {}
    for where in ("all", "plain", "bypassed", "stem", "bypassed+stem"):
        g = copy.deepcopy(gm)
        p = GhostSkipPass(where=where)
        p(g)
        counts[where] = p.stats["conv_edges"]
        sites[where] = {n.meta["fxsparse"]["site"] for n in tagged_nodes(g, group=GROUP, role="merge")}
        if where != "all":
            assert p.stats["skipped"] == counts["all"] - counts[where]
            assert all(f"where='{where}'" in why for why in p.skipped.values())
        gates.set_identity(g)
        assert compare(gm, g, x, exact=True) == []  # still exact at gate 0
        assert len(sites[where]) == counts[where]
    assert (counts["plain"], counts["bypassed"]) == (plain, bypassed)
    assert counts["all"] == plain + bypassed
    # the stem conv is on every path; a conv inside a residual block is not
    first_conv = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d))
    assert first_conv in articulation_nodes(gm) and stem_layer(gm) is first_conv
    # "stem" is that conv alone; "+" is the union, and the stem is plain, so it adds one site
    assert counts["stem"] == 1 and sites["stem"] <= sites["plain"]
    assert sites["bypassed+stem"] == sites["bypassed"] | sites["stem"]
    assert counts["bypassed+stem"] == bypassed + 1


class _TwoStems(nn.Module):
    """The input reaches two parallel convs first: no single stem."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.cat([torch.relu(self.bn_a(self.a(x))), torch.relu(self.bn_b(self.b(x)))], 1)
        return torch.relu(self.bn(self.head(y))).mean((2, 3))


def test_a_network_with_parallel_first_layers_has_no_stem():
    from fxsparse.graph import stem_layer

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = fxsparse.trace(_TwoStems(), x)
    assert stem_layer(gm) is None  # not `head`, the first layer every path goes through
    p = GhostSkipPass(where="stem")
    p(gm)
    assert p.stats["conv_edges"] == 0 and p.stats["skipped"] >= 2
    assert all("this layer is not the stem" in why for why in p.skipped.values())


def test_where_disconnected_reads_the_masks():
    """``disconnected``: a branch exactly where the mask cuts an output channel off (every weight
    into it pruned), counted by hand; the others are refused with the reason; still exact."""
    import fxsparse.nets  # noqa: F401
    from fxsparse.graph import disconnected_channels, layer_call

    torch.manual_seed(0)
    model = fxsparse.nets.vgg16(width=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = fxsparse.trace(model, x)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
             if p.dim() == 4}
    cut = sorted(masks)[1:6:2]  # three convs lose every weight into one (or two) output channels
    for i, name in enumerate(cut):
        masks[name][: 1 + i % 2] = False
    MaskPass(masks)(gm)
    ref = copy.deepcopy(gm)
    p = GhostSkipPass(where="disconnected")
    p(gm)
    branched = {n.meta["fxsparse"]["site"] for n in tagged_nodes(gm, group=GROUP, role="merge")}
    assert p.stats["conv_edges"] == len(cut) == len(branched)
    assert p.stats["skipped"] == 13 - len(cut)
    assert all("no mask cuts an output channel of this layer off" in why for why in p.skipped.values())
    calls = [layer_call(gm, n) for n in gm.graph.nodes]
    counted = {c.layer.weight: disconnected_channels(c, masks[c.layer.weight]) for c in calls
               if c is not None and c.layer.weight in masks}
    assert {w for w, k in counted.items() if k} == set(cut) and sum(counted.values()) == 1 + 2 + 1
    # the union with the stem adds the first conv (not among the cut ones)
    both = GhostSkipPass(where="stem+disconnected")
    both(copy.deepcopy(ref))
    assert both.stats["conv_edges"] == len(cut) + 1
    gates.set_identity(gm)
    assert compare(ref, gm, x, exact=True) == []


def test_where_disconnected_without_masks_cuts_nothing_off():
    # a dense graph (tost with [masks] off): no channel is cut off, so only the other kinds count
    import fxsparse.nets  # noqa: F401

    gm = fxsparse.trace(fxsparse.nets.resnet20(width=0.5).eval(), torch.randn(2, 3, 32, 32))
    p = GhostSkipPass(where="stem+disconnected")
    p(gm)
    assert p.stats["conv_edges"] == 1 and p.stats["skipped"] == 18


def test_where_intersection_keeps_the_plain_cut_convs_only():
    """``&`` binds first: ``stem+plain&disconnected`` is the stem and the plain convs the mask cuts.
    On VGG-16 every conv is plain, so it equals ``stem+disconnected``; on ResNet-20 only the stem
    is plain, so the cut convs inside residual blocks get no branch; still exact."""
    import fxsparse.nets  # noqa: F401

    def cut_masks(model):
        masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() == 4}
        for name in sorted(masks)[1:6:2]:  # three non-stem convs lose one output channel each
            masks[name][:1] = False
        return masks

    x = torch.randn(2, 3, 32, 32)
    counts = {}
    for net in ("vgg16", "resnet20"):
        torch.manual_seed(0)
        model = getattr(fxsparse.nets, net)(width=0.25).eval()
        masks = cut_masks(model)
        for where in ("stem+disconnected", "stem+plain&disconnected"):
            gm = fxsparse.trace(model, x)
            MaskPass(masks)(gm)
            ref = copy.deepcopy(gm)
            p = GhostSkipPass(where=where)
            p(gm)
            counts[net, where] = p.stats["conv_edges"]
            gates.set_identity(gm)
            assert compare(ref, gm, x, exact=True) == []
        if net == "resnet20":
            assert all(why == "where='stem+plain&disconnected': this layer is not the stem and another path "
                       "goes around this layer or no mask cuts an output channel of this layer off"
                       for why in p.skipped.values())
    assert counts["vgg16", "stem+disconnected"] == counts["vgg16", "stem+plain&disconnected"] == 4
    assert counts["resnet20", "stem+disconnected"] == 4 and counts["resnet20", "stem+plain&disconnected"] == 1


@pytest.mark.parametrize("where", ["plain&plain", "stem&", "&stem", "plain&disconnected+disconnected&plain",
                                   "all&stem", "residual&stem"])
def test_where_refuses_malformed_intersections(where):
    with pytest.raises(PassError, match="'&' \\(both\\)"):
        GhostSkipPass(where=where)


@pytest.mark.parametrize("where", ["residual", "stem+stem", "all+stem", "", "bypassed+"])
def test_where_refuses_unknown_kinds(where):
    with pytest.raises(PassError, match="where must be 'all', one of"):
        GhostSkipPass(where=where)


def test_where_is_checked_when_the_recipe_loads():
    from fxsparse.errors import RecipeError
    from fxsparse.recipe import load_recipe

    assert load_recipe("tost", overrides={"ghost_skips.where": "bypassed+stem"}) is not None
    with pytest.raises(RecipeError, match="ghost_skips.where"):
        load_recipe("tost", overrides={"ghost_skips.where": "stems"})


def test_train_mode_updates_only_branch_statistics():
    _, gm, x = tiny()
    before = copy.deepcopy(gm)
    GhostSkipPass(initial_gate=0.0)(gm)
    gm.train(), before.train()
    with torch.no_grad():
        before(x), gm(x)
    ours = dict(gm.named_buffers())
    for name, buf in before.named_buffers():
        assert torch.equal(ours[name], buf), name
    for b in branches(gm):
        assert int(b.norm.num_batches_tracked) == 1 and b.norm.running_mean.any()


def test_gradients_at_identity():
    """Original parameters get bit-identical gradients; branch parameters get exact zeros."""
    _, gm, x = tiny()
    before = copy.deepcopy(gm)
    GhostSkipPass(initial_gate=0.0)(gm)
    before(x).square().sum().backward()
    gm(x).square().sum().backward()
    ours = dict(gm.named_parameters())
    for name, p in before.named_parameters():
        assert torch.equal(ours[name].grad, p.grad), name
    for p in fxsparse.ghosts.parameters(gm, GROUP):
        assert p.grad is not None and not p.grad.any()
    gm.zero_grad()
    gates.set(gm, GROUP, 1.0)
    gm(x).square().sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in fxsparse.ghosts.parameters(gm, GROUP))


def test_parameter_group_is_every_branch_parameter():
    model, gm, _ = tiny()
    GhostSkipPass()(gm)
    group = fxsparse.ghosts.parameters(gm, GROUP)
    branch = [p for b in branches(gm) for p in b.parameters()]
    assert {id(p) for p in group} == {id(p) for p in branch} and len(group) == 3 * 5
    assert not {id(p) for p in group} & {id(p) for p in model.parameters()}


def test_masked_branch_density_follows_main_layer():
    _, gm, x = tiny(sparsity=0.75)
    before = copy.deepcopy(gm)
    p = GhostSkipPass(masked_branch=True)
    p(gm)
    masks = masked_parameters(gm)
    for site, info in p.sites.items():
        b = gm.fxsparse.ghost_skips.get_submodule(site)
        assert b.mask.dtype == torch.bool and b.mask.shape == b.weight.shape
        density = masks[f"{info['layer']}.weight"].float().mean().item()
        assert int(b.mask.sum()) == max(1, round(density * b.mask.numel()))
        assert f"fxsparse.ghost_skips.{site}.mask" in gm.state_dict()
    gates.set_identity(gm)
    assert compare(before, gm, x, exact=True) == []
    remove_ghost_skips(gm)
    assert_same_structure(before, gm)


# --------------------------------------------------------------------------- shapes
class Convs(nn.Module):
    """Depthwise, strided, dilated, 'valid' and odd-sized convs, each followed by BN + act."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.dil = nn.Conv2d(8, 12, 3, 1, padding=2, dilation=2)
        self.bn_dil = nn.BatchNorm2d(12)
        self.wide = nn.Conv2d(12, 12, (1, 5), 1, (0, 2))
        self.valid = nn.Conv2d(12, 6, 3, 1, 0)
        self.act = nn.SiLU()

    def forward(self, x):
        x = self.act(self.bn_dw(self.dw(x)))
        x = nn.functional.relu(self.bn_dil(self.dil(x)))
        x = nn.functional.gelu(self.wide(x))
        return self.act(self.valid(x))


def test_shapes_depthwise_strided_dilated_and_refused_valid_conv(caplog):
    torch.manual_seed(0)
    model = Convs()
    x = torch.randn(2, 8, 15, 15)
    gm = fxsparse.trace(model, x)
    before = copy.deepcopy(gm)
    p = GhostSkipPass()
    with caplog.at_level("INFO", logger="fxsparse.passes"):
        p(gm)
    assert set(p.sites) == {"dw", "dil", "wide"}
    dw = gm.fxsparse.ghost_skips.dw
    assert tuple(dw.weight.shape) == (8, 1, 1, 1) and dw.stride == (2, 2) and dw.groups == 8  # depthwise like dw
    assert gm.fxsparse.ghost_skips.wide.padding == (0, 0)
    # a 'valid' 3x3 conv shrinks the map: no 1x1 conv can match it, and the log says so
    assert p.skipped.keys() == {"valid"} and p.skipped["valid"].startswith("shape")
    assert "no edge at valid" in caplog.text
    gates.set(gm, GROUP, 1.0)
    assert copy.deepcopy(gm)(x).shape == copy.deepcopy(before)(x).shape  # copies: train mode moves running stats
    gates.set_identity(gm)
    assert compare(before, gm, x, exact=True) == []


def test_dense_branch_next_to_a_depthwise_conv_when_asked():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 15, 15)
    gm = fxsparse.trace(Convs(), x)
    before = copy.deepcopy(gm)
    GhostSkipPass(match_groups=False, masked_branch=True)(gm)
    dw = gm.fxsparse.ghost_skips.dw
    assert tuple(dw.weight.shape) == (8, 8, 1, 1) and dw.groups == 1 and dw.mask.shape == dw.weight.shape
    gates.set(gm, GROUP, 1.0)
    on = copy.deepcopy(gm)(x)  # copies: train mode moves running stats
    assert on.shape == (2, 6, 6, 6) and not torch.equal(on, copy.deepcopy(before)(x))  # the branch is live
    gates.set_identity(gm)
    assert compare(before, gm, x, exact=True) == []


class Mlp(nn.Module):
    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = x + self.fc2(self.act(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_linear_mlp_branch(norm):
    torch.manual_seed(0)
    model = Mlp()
    x = torch.randn(2, 5, 16)
    gm = fxsparse.trace(model, x)
    assert GhostSkipPass()(gm).modified is False  # linear layers only when asked
    before = copy.deepcopy(gm)
    p = GhostSkipPass(include_linear=True, linear_norm=norm)
    p(gm)
    assert set(p.sites) == {"fc1"} and p.stats["mlp_edges"] == 1
    b = gm.fxsparse.ghost_skips.fc1
    assert b.kind == "linear" and tuple(b.weight.shape) == (32, 16)
    assert type(b.norm) is {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": nn.Identity}[norm]
    (merge,) = tagged_nodes(gm, group=GROUP, role="merge")
    assert [u.target for u in merge.users] == ["act"]
    gates.set_identity(gm)
    assert compare(before, gm, x, exact=True) == []
    remove_ghost_skips(gm)
    assert_same_structure(before, gm)


class PreActNet(nn.Module):
    """Two pre-activation blocks (bn -> relu -> conv, + x): a residual sum feeds the next block's BN."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(3))
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, 1, 1) for _ in range(2))

    def forward(self, x):
        for bn, conv in zip(self.bns, self.convs):
            x = x + conv(torch.relu(bn(x)))
        return torch.relu(self.bns[2](x))


def test_edges_stop_at_the_end_of_a_residual_block():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    gm = fxsparse.trace(PreActNet(), x)
    reach = fxsparse.graph.activation_reach(gm, node_for(gm, "convs.0"), max_adds=2)
    # convs.0 -> add -> bns.1 -> relu: the next block's activation only, not the one after the next add
    assert [(r.value.target, [a.target for a in r.adds]) for r in reach] == [("bns.1", [operator.add])]
    p = GhostSkipPass()
    p(gm)
    assert p.stats["edges"] == 2


# --------------------------------------------------------------------------- errors and composition
def test_errors():
    _, gm, _ = tiny()
    GhostSkipPass()(gm)
    with pytest.raises(PassError, match="already has ghost skip"):
        GhostSkipPass()(gm)
    with pytest.raises(PassError, match="linear_norm"):
        GhostSkipPass(linear_norm="group")
    with pytest.raises(PassError, match="initial_gate"):
        GhostSkipPass(initial_gate=2.0)
    bare = fxsparse.trace(TinyResNet(), torch.randn(2, 3, 8, 8), propagate=False)
    with pytest.raises(PassError, match="tensor shapes"):
        GhostSkipPass()(bare)


@pytest.mark.parametrize("first_removed", ["ghost_skips", "ghost_neurons"])
def test_composes_with_ghost_neurons(first_removed):
    ghost_neurons = pytest.importorskip("fxsparse.passes.ghost_neurons")
    _, gm, x = masked("resnet18", (3, 32, 32))
    before = copy.deepcopy(gm)
    ghost_neurons.GhostNeuronPass()(gm)
    p = GhostSkipPass()
    p(gm)
    assert p.stats["edges"] == 17
    # the skip edge feeds the hard and the soft activation alike
    for merge in tagged_nodes(gm, group=GROUP, role="merge"):
        # (swish: the soft activation lives inside the fused blend node, fxsparse.fused.ghost_relu_blend)
        assert {(u.meta.get("fxsparse") or {}).get("role") for u in merge.users} == {None, "blend"}
    gates.set_identity(gm)
    assert compare(before, gm, x, exact=True) == []
    fxsparse.ghosts.remove_group(gm, first_removed)
    assert compare(before, gm, x, exact=True, modes=("eval",), grads=False) == []
    fxsparse.ghosts.remove_ghosts(gm)
    assert_same_structure(before, gm)


def test_ghosted_graph_pickles_with_unfolded_leaves():
    import io

    _, gm, x = masked("mobilenetv3_small_100", (3, 32, 32))
    p = GhostSkipPass()
    p(gm)
    assert p.stats["unfolded"] > 0
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    gm.eval(), loaded.eval()
    assert torch.equal(gm(x), loaded(x))
    # node tags do not survive pickling: removal says so instead of leaving a broken graph
    with pytest.raises(PassError, match="pickling"):
        remove_ghost_skips(loaded)


# --------------------------------------------------------------------------- the zoo
def test_zoo(zoo_entry):
    spec, size = zoo_entry
    _, gm, x = masked(spec, size)
    before = copy.deepcopy(gm)
    p = GhostSkipPass(include_linear=True)
    p(gm)
    edges = p.stats["edges"]
    print(f"\n{spec}: edges={edges} (conv {p.stats['conv_edges']}, mlp {p.stats['mlp_edges']}, "
          f"unfolded {p.stats['unfolded']}, skipped {p.stats['skipped']})")
    if spec in GHOST_BAR:
        assert edges > 0
    assert edges == len(tagged_nodes(gm, group=GROUP, role="merge"))
    if not edges:
        assert same_structure(before, gm)
        return
    for b in branches(gm):
        assert torch.equal(b.weight, torch.full_like(b.weight, 1e-4))

    # gate 0: outputs, original gradients and original running statistics bit-identical, train and eval
    # (copies made here and compared in place: the zoo's largest models must fit in memory twice only)
    gates.set_identity(gm)
    a, b = copy.deepcopy(before), copy.deepcopy(gm)
    assert compare(a, b, x, exact=True, copy_modules=False) == []
    ours = dict(b.named_buffers())
    assert all(torch.equal(ours[n], t) for n, t in a.named_buffers())
    assert all(not g.grad.any() for g in fxsparse.ghosts.parameters(b, GROUP) if g.grad is not None)
    del a, b

    # gate 1: the branches are live (finite, trainable) and conv edges change the output
    gates.set(gm, GROUP, 1.0)
    a, b = copy.deepcopy(before), copy.deepcopy(gm)
    finite = []
    for branch in branches(b):
        branch.register_forward_hook(lambda m, i, o: finite.append(bool(torch.isfinite(o).all())))
    changed = compare(a, b, x, exact=True, modes=("train",), copy_modules=False)
    assert finite and all(finite)
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in fxsparse.ghosts.parameters(b, GROUP))
    # every branch learns wherever its main layer does (not at all under torchvision ViT's zero head).
    # MLP branches read a LayerNorm'd input in every zoo transformer: with ToST's constant weights
    # they output ~0 at first (docs/ghost-skips.md), but they get gradients
    params = dict(b.named_parameters())
    for site, info in p.sites.items():
        main = params[info["weight"]].grad
        if main is not None and main.any():
            assert params[f"fxsparse.ghost_skips.{site}.weight"].grad.any(), site
    if p.stats["conv_edges"]:
        assert any("output" in m.what for m in changed)
    del a, b

    # removal: the masked graph again, bit for bit
    remove_ghost_skips(gm)
    assert_same_structure(before, gm)
    assert set(gm.state_dict()) == set(before.state_dict())
    assert compare(before, gm, x, exact=True, modes=("eval",), grads=False, copy_modules=False) == []


# --------------------------------------------------------------------------- torch.compile
def test_compile_gate_moves_without_recompiling_and_removal_recompiles_once():
    from torch._dynamo.testing import CompileCounter

    _, gm, x = tiny()
    GhostSkipPass()(gm)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    for alpha in (1.0, 0.5, 0.0, 0.75):
        gates.set(gm, GROUP, alpha)
        compiled(x).sum().backward()
    assert counter.frame_count == 1
    remove_ghost_skips(gm)
    for _ in range(2):
        compiled(x).sum().backward()
    assert counter.frame_count == 2


def test_compile_no_graph_breaks_resnet18():
    _, gm, x = masked("resnet18", (3, 32, 32))
    GhostSkipPass()(gm)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(gm)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
