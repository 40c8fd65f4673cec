"""fxsparse.fused: the fast forms compute the plain expressions bit for bit, values and gradients."""
from __future__ import annotations

import operator

import pytest
import torch

from conftest import build, random_masks
from fxsparse.fused import apply_mask
from fxsparse.pass_infra import tagged_nodes
from fxsparse.passes.mask import MaskPass


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
def test_apply_mask_is_the_multiply(layout, weight_layout):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(8, 4, 3, 3, generator=g)
    w0[0, 0, 0, 0] = -0.0
    mask = torch.rand(8, 4, 3, 3, generator=g) < 0.3
    fmt = lambda t, how: t.contiguous(memory_format=torch.channels_last if how == "channels_last" else torch.contiguous_format)  # noqa: E731
    mask = fmt(mask, layout)
    w1, w2 = (fmt(w0, weight_layout).clone().requires_grad_() for _ in range(2))
    grad = torch.randn(8, 4, 3, 3, generator=g)
    y1, y2 = w1 * mask, apply_mask(w2, mask)
    assert torch.equal(_bits(y1), _bits(y2)) and y2.grad_fn is not None
    y1.backward(grad)
    y2.backward(grad)
    assert torch.equal(_bits(w1.grad), _bits(w2.grad))


def test_apply_mask_double_backward():
    """LRsI and GraSP differentiate a gradient through the masked weight."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 5, generator=g)
    mask = (torch.rand(6, 4, 3, 3, generator=g) < 0.5).contiguous(memory_format=torch.channels_last)
    grads = []
    for fn in (operator.mul, apply_mask):
        w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
        loss = torch.nn.functional.conv2d(x, fn(w, mask)).pow(2).sum()
        (gw,) = torch.autograd.grad(loss, w, create_graph=True)
        grads.append(torch.autograd.grad(gw.pow(2).sum(), w)[0])
    assert torch.equal(grads[0], grads[1])


def test_masked_graph_uses_it_and_compiles_to_the_multiply():
    _, gm, x = build("fxsparse.nets:resnet8", (3, 16, 16))
    MaskPass(random_masks(gm, 0.8))(gm)
    muls = tagged_nodes(gm, group="masks", role="masked_weight")
    assert muls and all(n.target is apply_mask for n in muls)
    # under torch.compile apply_mask is traced as w * mask (no graph break, no autograd.Function)
    from torch._dynamo.utils import counters

    counters.clear()
    explained = torch._dynamo.explain(gm)(x)
    assert explained.graph_break_count == 0


def test_eager_mask_copy_follows_the_mask_and_is_counted():
    from fxsparse import fused

    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    mask = (torch.rand(4, 3, 3, 3) < 0.5).contiguous(memory_format=torch.channels_last)
    assert torch.equal(apply_mask(w, mask), w * mask)
    assert fused.mask_cache_bytes(torch.nn.Module()) == 0
    holder = torch.nn.Module()
    holder.register_buffer("m", mask)
    assert fused.mask_cache_bytes(holder) == w.numel() * 4  # one float copy, in the weight's layout
    with torch.no_grad():
        mask.copy_(~mask)  # an in-place update (dynamic masks, load_state_dict): the copy is made again
    assert torch.equal(apply_mask(w, mask), w * mask)
    mask[0] = False
    assert torch.equal(apply_mask(w, mask), w * mask) and not apply_mask(w, mask)[0].any()
    fused.set_mask_cache("off")
    try:
        assert fused.mask_cache_bytes() == 0 and torch.equal(apply_mask(w, mask), w * mask)
    finally:
        fused.set_mask_cache("float")


SPECIAL = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1.0, -1.0, 20.0, -20.0, 88.0, -88.0, 1e30, -1e30,
                        3.4e38, -3.4e38])
VALUES = torch.cat([SPECIAL, torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 10])


@pytest.mark.parametrize("soft", ["swish", "mish"])
@pytest.mark.parametrize("gate", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("grad", ["-0.0", "+0.0", "randn"])
def test_ghost_relu_blend_is_the_blend(soft, gate, grad):
    """Values and input gradients equal the unfused blend's bit for bit (sign bits compared)."""
    from fxsparse.fused import ghost_relu_blend
    from fxsparse.passes.ghost_neurons import SOFT, ghost_blend

    g = {"-0.0": torch.full_like(VALUES, -0.0), "+0.0": torch.zeros_like(VALUES),
         "randn": torch.randn(VALUES.shape, generator=torch.Generator().manual_seed(1))}[grad]
    lam = torch.tensor(gate)
    x0, x1 = VALUES.clone().requires_grad_(), VALUES.clone().requires_grad_()
    y0 = ghost_blend(torch.relu(x0), SOFT[soft](x0), lam)
    y1 = ghost_relu_blend(torch.relu(x1), x1, lam, soft)
    (g0,), (g1,) = torch.autograd.grad(y0, x0, g), torch.autograd.grad(y1, x1, g)
    assert torch.equal(_bits(y0), _bits(y1)) and torch.equal(_bits(g0), _bits(g1))


def test_ghost_relu_blend_saves_only_its_input():
    from torch.autograd.graph import saved_tensors_hooks

    from fxsparse.fused import ghost_relu_blend
    from fxsparse.passes.ghost_neurons import ghost_blend

    saved = []
    x = torch.randn(4, 8, requires_grad=True)
    lam = torch.tensor(0.5)
    with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with torch.no_grad():
            act = torch.relu(x)  # the graph's act node; its own saved result dies with it there
        ghost_relu_blend(act, x, lam)
    fused, saved[:] = sorted(saved), []
    with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ghost_blend(torch.relu(x), torch.nn.functional.silu(x), lam)
    assert fused == [1, 32] and sorted(n for n in saved if n > 1) == [32, 32]  # x (+ the gate) vs relu(x) and x
