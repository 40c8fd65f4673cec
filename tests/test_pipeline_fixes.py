"""Regression tests for failures the tost pipeline sweep (``fxsparse zoo --pipeline``) found on
real zoo models, each on a tiny model with the same trait."""
from __future__ import annotations

import torch
from torch import nn

import fxsparse


class _SharedMlp(nn.Module):
    """A module registered under two names, as CoaT's parallel blocks share ``mlp2`` as ``mlp3``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.mlp2 = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.mlp3 = self.mlp2
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.fc(self.mlp3(self.mlp2(h)))


def test_export_writes_a_shared_module_under_each_of_its_names():
    # coat_tiny: "export: RuntimeError: Error(s) in loading state_dict for CoaT" (missing keys:
    # the graph holds each shared module under one name)
    torch.manual_seed(0)
    model = _SharedMlp()
    x = torch.randn(2, 3, 8, 8)
    gm = fxsparse.trace(model, x)
    masks = fxsparse.masks.compute(gm, method="magnitude", sparsity=0.5)
    sgm = fxsparse.transform(model, "tost", masks=masks, data=[(x, torch.tensor([0, 1]))],
                             skip=["rescale", "ghost_neurons", "ghost_skips", "ghost_channels"])
    state = fxsparse.export(sgm)
    assert "mlp3.0.weight" in state and torch.equal(state["mlp3.0.weight"], state["mlp2.0.weight"])
    assert (state["mlp2.0.weight"] == 0).sum() > 0  # the alias is the folded weight too
    fresh = _SharedMlp()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), sgm.eval()(x))


class _CosineAttention(nn.Module):
    """Swin V2's cosine attention on a zero-padded sequence: the padded tokens' keys are exactly 0
    (zero input, no key bias), and F.normalize meets zero vectors."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
        self.embed, self.fc = nn.Linear(3, 8), nn.Linear(8, 4)

    def forward(self, x):  # x: (batch, tokens, 3)
        h = torch.nn.functional.pad(self.embed(x), (0, 0, 0, 2))  # two padded tokens
        q = torch.nn.functional.normalize(self.q(h), dim=-1)
        k = torch.nn.functional.normalize(self.k(h), dim=-1)
        return self.fc((q @ k.transpose(1, 2)).softmax(-1) @ h).mean(1)


def test_lrsi_through_normalize_of_a_zero_vector_stays_finite():
    # tv:swin_v2_t: "train@gate=1: the loss is nan at step 1": GradInit's double backward through
    # F.normalize is NaN at a zero vector, and made every LRsI scale NaN
    torch.manual_seed(0)
    model = _CosineAttention()
    data = [(torch.randn(2, 5, 3), torch.tensor([0, 3]))]
    # a tiny gradient-norm bound: every iteration is a constraint step, the one that differentiates twice
    recipe = fxsparse.load_recipe("tost", overrides={"rescale.enabled": True, "rescale.iters": 2, "rescale.gamma": 1e-6})
    sgm = fxsparse.transform(model, recipe, data=data,
                             skip=["ghost_neurons", "ghost_skips", "ghost_channels"])
    assert all(torch.isfinite(p).all() for p in sgm.parameters())
    assert torch.isfinite(sgm(data[0][0])).all()
