"""No mask drift: pruned weights stay exactly zero through training, whatever the optimizer.

The semantic (docs/masks-in-graph.md): the graph computes with the *effective* weight
``w * mask``. Pruned entries of the effective weight are exactly zero and their gradient is
exactly zero at every step. The *stored* ``w`` at a pruned position is never read by the
forward; an optimizer with decoupled or L2 weight decay shrinks it toward zero (it never grows),
one without weight decay leaves it untouched. ``fxsparse.export`` and
``fxsparse.export.zero_masked_weights`` fold the mask in, so saved weights are exactly zero there.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from conftest import random_masks
from fxsparse.export import zero_masked_weights
from fxsparse.passes.mask import MaskPass, masked_parameters

STEPS = 1000


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, weight_decay=1e-4),
}
# How the stored (never read) pruned values move: decoupled decay / SGD's L2 shrink them toward zero
# monotonically; L2 decay through an adaptive step (Adam(weight_decay=...), RMSprop) takes steps of
# about lr whatever the gradient's size, so they reach zero and then hover around it within ~lr.
SHRINK = {"sgd_momentum_wd", "adamw"}
HOVER = {"adam_l2": 1e-2, "rmsprop": 1e-3}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_pruned_weights_stay_zero(opt_name):
    torch.manual_seed(0)
    model = TinyCNN()
    x = torch.randn(16, 3, 8, 8)
    y = torch.randint(0, 10, (16,))
    gm = fxsparse.trace(model, x)
    masks = random_masks(gm, sparsity=0.7)
    MaskPass(masks)(gm)
    params = dict(gm.named_parameters())
    stored0 = {n: params[n].detach().clone() for n in masks}
    opt = OPTIMIZERS[opt_name](gm.parameters())
    losses = []
    for step in range(STEPS):
        xb = x + 0.1 * torch.randn_like(x)  # a fresh batch each step keeps the gradients non-trivial
        loss = F.cross_entropy(gm(xb), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, mask in masks.items():
            assert not params[name].grad[~mask].any(), f"step {step}: pruned entries of {name} got gradient"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], "the masked network did not train"
    for name, mask in masks.items():
        w = params[name].detach()
        effective = w * masked_parameters(gm)[name]
        assert torch.isfinite(w).all()
        assert not effective[~mask].any(), f"{name}: effective pruned weights drifted"
        assert not torch.equal(w[mask], stored0[name][mask]), f"{name}: kept weights did not train"
        pruned, pruned0 = w[~mask], stored0[name][~mask]
        if opt_name in SHRINK:
            assert (pruned.abs() <= pruned0.abs()).all() and (pruned * pruned0 >= 0).all()
        elif opt_name in HOVER:
            assert (pruned.abs() <= torch.maximum(pruned0.abs(), torch.tensor(2 * HOVER[opt_name]))).all()
        else:
            assert torch.equal(pruned, pruned0), f"{name}: stored pruned weights moved without weight decay"
    # what leaves fxsparse is exactly zero at pruned positions and computes what the graph computes
    state = fxsparse.export(gm)
    for name, mask in masks.items():
        assert not state[name][~mask].any()
    plain = TinyCNN()
    plain.load_state_dict(state, strict=True)
    gm.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), gm(x), rtol=1e-5, atol=1e-6)
        before = gm(x)
        zero_masked_weights(gm)
        assert torch.equal(gm(x), before)
    for name, mask in masks.items():
        assert not params[name][~mask].any()
