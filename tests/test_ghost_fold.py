"""GhostSkipPass(fold=True): at removal the ghost skip branch is added into the main conv (its
centre tap) and the BatchNorm after it, so the eval-mode output does not move."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxsparse
from conftest import random_masks
from fxsparse import gates
from fxsparse.graph import same_structure
from fxsparse.nets import resnet8
from fxsparse.passes.ghost_skips import GROUP, GhostSkipBranch, GhostSkipPass, RemoveGhostSkipsPass
from fxsparse.passes.mask import MaskPass, masked_parameters


class ConvBNReLU(nn.Module):
    """A plain chain: two conv-BN-ReLU, a dilated one, a 'same'-string-padded one, a head."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(c), nn.Dropout(0.1), nn.ReLU(),
            nn.Conv2d(c, c, 5, padding="same", bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        )
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Depthwise(nn.Module):
    """MobileNet-style: pointwise, depthwise 3x3 (groups = channels) + BN + ReLU6, pointwise."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.pw1 = nn.Conv2d(3, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.pw2 = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.pw1(x)))
        return self.pw2(nn.functional.relu6(self.bn2(self.dw(x)))).mean((2, 3))


class BiasNoNorm(nn.Module):
    """conv (with bias) -> ReLU: the shift goes into the conv's bias; a bias-free one cannot fold."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3))


def ghosted(model: nn.Module, x, *, sparsity=0.7, seed=0, **options):
    """Trace, mask, add foldable ghost skips, give every BatchNorm and branch non-trivial values."""
    torch.manual_seed(seed)
    gm = fxsparse.trace(model, x)
    MaskPass(random_masks(gm, sparsity, seed))(gm)
    p = GhostSkipPass(fold=True, **options)
    p(gm)
    gm.train()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for _ in range(4):  # running statistics away from (0, 1)
            gm(torch.randn(x.shape, generator=gen) * 1.7 + 0.3)
        for m in gm.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
            if isinstance(m, GhostSkipBranch):
                m.weight.normal_(0.0, 0.3, generator=gen)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    return gm, p


def check_fold(gm, x, alpha: float) -> RemoveGhostSkipsPass:
    """Removal at ``alpha`` keeps the eval output; masked zeros stay zero; returns the removal pass."""
    gates.set(gm, GROUP, alpha)
    gm.eval()
    with torch.no_grad():
        before = gm(x)
    r = RemoveGhostSkipsPass()
    r(gm)
    with torch.no_grad():
        after = gm(x)
    scale = before.abs().max().item()
    assert torch.allclose(after, before, rtol=0, atol=1e-5 * max(scale, 1.0)), (after - before).abs().max()
    for name, mask in masked_parameters(gm).items():
        w = gm.get_parameter(name)
        assert ((w * mask)[~mask] == 0).all()
    return r


def test_branch_is_masked_to_the_centre_tap():
    x = torch.randn(4, 3, 16, 16)
    gm, p = ghosted(resnet8(num_classes=10), x)
    masks = masked_parameters(gm)
    for site, info in p.sites.items():
        assert info["fold"]
        branch = gm.get_submodule(f"fxsparse.ghost_skips.{site}")
        main = masks[info["weight"]]
        assert torch.equal(branch.mask[:, :, 0, 0], main[:, :, 1, 1])
        assert branch.fold_into["weight"] == info["weight"] and branch.fold_into["centre"] == (1, 1)


@pytest.mark.parametrize("alpha", [1.0, 0.37])
def test_resnet8_fold_is_exact_in_eval(alpha):
    x = torch.randn(4, 3, 16, 16)
    model = resnet8(num_classes=10)
    original = copy.deepcopy(model)
    gm, p = ghosted(model, x)
    # stem + two convs in each of the 3 blocks; the second conv's merge lies after the residual add
    assert p.stats["foldable"] == p.stats["edges"] == 7 and not p.not_foldable
    assert any(len(b.fold_into["norms"]) == 1 for b in gm.fxsparse.ghost_skips.children())
    r = check_fold(gm, x, alpha)
    assert r.stats["folded_branches"] == 7 and not r.fold_refused
    assert same_structure(fxsparse.trace(original, x), fxsparse.strip_masks(copy.deepcopy(gm)))
    original.load_state_dict(fxsparse.export(gm), strict=True)
    original.eval()
    with torch.no_grad():
        assert torch.allclose(original(x), gm(x), atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.37])
def test_conv_bn_relu_chain_and_dilated_and_same_padding(alpha):
    x = torch.randn(4, 3, 12, 12)
    gm, p = ghosted(ConvBNReLU(), x)
    assert p.stats["foldable"] == 4 and not p.not_foldable
    r = check_fold(gm, x, alpha)
    assert r.stats["folded_branches"] == 4


@pytest.mark.parametrize("alpha", [1.0, 0.37])
def test_depthwise(alpha):
    x = torch.randn(4, 3, 12, 12)
    gm, p = ghosted(Depthwise(), x)
    assert p.stats["foldable"] == 1
    branch = gm.fxsparse.ghost_skips.dw
    assert branch.groups == 8 and tuple(branch.weight.shape) == (8, 1, 1, 1)
    r = check_fold(gm, x, alpha)
    assert r.stats["folded_branches"] == 1


def test_dense_branch_next_to_depthwise_is_not_foldable():
    x = torch.randn(4, 3, 12, 12)
    gm, p = ghosted(Depthwise(), x, match_groups=False)
    assert p.stats["not_foldable"] == 1 and "groups" in p.not_foldable["dw"]
    r = RemoveGhostSkipsPass()
    r(gm)
    assert r.stats["folded_branches"] == 0


def test_no_norm_folds_into_the_conv_bias_and_a_bias_free_conv_is_refused():
    x = torch.randn(4, 3, 10, 10)
    gm, p = ghosted(BiasNoNorm(), x, masked_branch=True)
    assert p.stats["foldable"] == 1 and p.not_foldable["b"].startswith("no_bias")
    # the refused site keeps the plain (masked_branch: random) branch
    assert gm.fxsparse.ghost_skips.b.fold_into is None and gm.fxsparse.ghost_skips.b.mask is not None
    gates.set(gm, GROUP, 0.5)
    gm.eval()
    # with the refused branch at alpha 0.5 the output moves at removal; without it, it must not
    gm.fxsparse.ghost_skips.b.weight.data.zero_()
    gm.fxsparse.ghost_skips.b.norm.bias.data.zero_()
    gm.fxsparse.ghost_skips.b.norm.running_mean.zero_()
    r = check_fold(gm, x, 0.5)
    assert r.stats["folded_branches"] == 1


def test_alpha_zero_is_the_plain_removal_bit_for_bit():
    x = torch.randn(4, 3, 16, 16)
    gm, _ = ghosted(resnet8(num_classes=10), x)
    plain = copy.deepcopy(gm)
    for b in plain.fxsparse.ghost_skips.children():
        b.fold_into = None
    gates.set(gm, GROUP, 0.0)
    gates.set(plain, GROUP, 0.0)
    RemoveGhostSkipsPass()(gm)
    RemoveGhostSkipsPass()(plain)
    a, b = gm.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batchnormact_leaf_folds():
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.bn = BatchNormAct2d(6, act_layer=nn.ReLU)
            self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
            self.bn2 = BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=nn.Dropout)
            # RepVGG-style: a norm leaf without activation, then the sum and the activation
            self.conv3 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
            self.bn3 = BatchNormAct2d(6, apply_act=False)

        def forward(self, x):
            y = self.bn2(self.conv2(self.bn(self.conv(x))))
            return torch.relu(self.bn3(self.conv3(y)) + y).mean((2, 3))

    x = torch.randn(4, 3, 10, 10)
    gm, p = ghosted(Block(), x)
    assert p.stats["unfolded"] == 2 and p.stats["foldable"] == 3, p.not_foldable
    assert gm.fxsparse.ghost_skips.conv3.fold_into["norms"] == ["bn3"]
    r = check_fold(gm, x, 0.37)
    assert r.stats["folded_branches"] == 3 and r.stats["folded"] == 2  # the leaves are whole again


def test_fold_writes_nothing_outside_the_mask():
    x = torch.randn(4, 3, 16, 16)
    gm, _ = ghosted(resnet8(num_classes=10), x, sparsity=0.9)
    masks = {k: v.clone() for k, v in masked_parameters(gm).items()}
    stored = {k: gm.get_parameter(k).detach().clone() for k in masks}
    gates.set(gm, GROUP, 1.0)
    RemoveGhostSkipsPass()(gm)
    changed = 0
    for k, mask in masks.items():
        w = gm.get_parameter(k).detach()
        assert torch.equal(w[~mask], stored[k][~mask])
        changed += int((w != stored[k]).sum())
    assert changed > 0


def test_recipe_option_and_scheduler_removal():
    x = torch.randn(4, 3, 16, 16)
    recipe = fxsparse.load_recipe("tost", overrides={
        "rescale.enabled": False, "ghost_channels.enabled": False, "ghost_neurons.enabled": False,
        "ghost_skips.fold": True, "masks.sparsity": 0.8})
    gm = fxsparse.transform(resnet8(num_classes=10), recipe, example_inputs=x)
    assert all(b.fold_into is not None for b in gm.fxsparse.ghost_skips.children())
    sched = fxsparse.RecipeScheduler(gm, total_steps=10)
    gm.eval()
    while "ghost_skips" not in sched.removed:
        with torch.no_grad():
            before = gm(x)
        sched.step()
    with torch.no_grad():
        after = gm(x)
    # removal came at gate 0 (the recipe anneals first): the output did not move
    assert torch.allclose(before, after, atol=1e-6)


def test_a_folding_recipe_may_remove_mid_anneal_and_the_output_does_not_move():
    from fxsparse.errors import RecipeError

    base = {"rescale.enabled": False, "ghost_channels.enabled": False, "ghost_neurons.enabled": False,
            "masks.sparsity": 0.8, "ghost_skips.schedule.shape": "linear",
            "ghost_skips.schedule.hold_until": 0.1, "ghost_skips.schedule.anneal_until": 0.9,
            "ghost_skips.schedule.remove_at": 0.5}
    with pytest.raises(RecipeError, match="remove_at"):  # without fold the gate must reach 0 first
        fxsparse.load_recipe("tost", overrides=base)
    recipe = fxsparse.load_recipe("tost", overrides={**base, "ghost_skips.fold": True})
    x = torch.randn(4, 3, 16, 16)
    gm = fxsparse.transform(resnet8(num_classes=10), recipe, example_inputs=x)
    gm.train()
    with torch.no_grad():
        for _ in range(3):
            gm(torch.randn(8, 3, 16, 16) * 2 + 0.5)
        for b in gm.fxsparse.ghost_skips.children():
            b.weight.normal_(0.0, 0.3)
    sched = fxsparse.RecipeScheduler(gm, total_steps=10)
    gm.eval()
    while "ghost_skips" not in sched.removed:
        alpha = sched.gates["ghost_skips"]
        with torch.no_grad():
            before = gm(x)
        sched.step()
    assert alpha == pytest.approx(0.625)  # linear, 1 at 10% to 0 at 90%: 0.625 at 40%, the last step before 50%
    with torch.no_grad():
        after = gm(x)
    assert torch.allclose(before, after, atol=1e-5 * before.abs().max().item())


def test_every_dropout_is_the_identity_a_fold_may_cross():
    """The fold is exact in eval mode, where every dropout (torch's, timm's DropPath and DropBlock2d,
    torchvision's StochasticDepth) and nn.Identity return their input; nothing else counts."""
    from timm.layers import DropBlock2d, DropPath
    from torchvision.ops import StochasticDepth

    from fxsparse.passes.ghost_skips import _identity_in_eval

    for m in (nn.Identity(), nn.Dropout(0.5), nn.Dropout2d(0.1), nn.AlphaDropout(0.2), DropPath(0.1),
              DropBlock2d(0.1), StochasticDepth(0.1, "row")):
        x = torch.randn(2, 3, 8, 8)
        assert _identity_in_eval(m) and torch.equal(m.eval()(x), x), type(m).__name__
    assert not any(_identity_in_eval(m) for m in (nn.ReLU(), nn.BatchNorm2d(3), nn.Sequential()))
