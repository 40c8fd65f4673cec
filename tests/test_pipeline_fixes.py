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
