"""fxsparse.autograd.twice_differentiable: the ops without double backward, found by checking every
activation torch and timm have, run as equivalents of the same value that differentiate twice."""
from __future__ import annotations

import inspect

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn

from fxsparse.autograd import twice_differentiable


def _twice(fn, x: torch.Tensor) -> None:
    """Differentiate a gradient of ``fn`` at ``x``, as GradInit's constraint step does."""
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
    g.square().sum().backward()


def _activations() -> dict[str, nn.Module]:
    """Every activation module torch.nn and timm.layers have that builds without arguments."""
    found = {}
    for owner, prefix in ((nn.modules.activation, "nn"), (timm.layers.activations, "timm"),
                          (timm.layers.activations_me, "timm_me")):
        for name, cls in inspect.getmembers(owner, inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__ == owner.__name__:
                try:
                    found[f"{prefix}.{name}"] = cls()
                except TypeError:  # needs arguments (MultiheadAttention, Threshold, ...)
                    continue
    return found


ACTIVATIONS = _activations()


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")  # nn.Softmax() and friends
def test_hardsigmoid_is_the_only_activation_without_double_backward():
    # what twice_differentiable covers is measured, not guessed: hardswish, relu6, hardtanh,
    # silu, gelu, mish, timm's hard_* and *_me variants all differentiate twice
    assert len(ACTIVATIONS) > 40
    x = torch.randn(2, 4, 6, 6) * 4  # even sizes: GLU halves the last dimension
    failing = []
    for name, act in ACTIVATIONS.items():
        try:
            _twice(act, x)
        except RuntimeError as e:
            assert "is not implemented" in str(e), (name, e)
            failing.append(name)
    assert failing == ["nn.Hardsigmoid"]
    for name, act in ACTIVATIONS.items():
        with twice_differentiable():
            _twice(act, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_hardsigmoid_equivalent_has_the_same_values_bit_for_bit(dtype):
    edges = torch.tensor([-3.0, 3.0, -3.0 - 1e-6, 3.0 - 1e-6, -2.9999998, 0.0, float("inf"), -float("inf")])
    x = torch.cat([torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 5, edges]).to(dtype)
    expected = F.hardsigmoid(x)
    with twice_differentiable():
        assert torch.equal(F.hardsigmoid(x), expected)
        assert torch.equal(nn.Hardsigmoid()(x), expected)
        assert torch.equal(torch._C._nn.hardsigmoid(x), expected)
        y = x.clone()
        assert F.hardsigmoid(y, inplace=True) is y and torch.equal(y, expected)
    if dtype == torch.float32:  # and the same first derivative, zero at +-3 as aten's
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        F.hardsigmoid(a).sum().backward()
        with twice_differentiable():
            F.hardsigmoid(b).sum().backward()
        assert torch.equal(a.grad, b.grad)


def test_fused_attention_runs_on_the_math_backend():
    q, k, v = torch.randn(3, 2, 2, 7, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="is not implemented"):
        _twice(lambda q: F.scaled_dot_product_attention(q, k, v), q)
    expected = F.scaled_dot_product_attention(q, k, v)
    with twice_differentiable():
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), expected, rtol=1e-5, atol=1e-6)
        for causal in (False, True):
            _twice(lambda q: F.scaled_dot_product_attention(q, k, v, is_causal=causal), q)
        mha = nn.MultiheadAttention(8, 2, batch_first=True)
        _twice(lambda x: mha(x, x, x, need_weights=False)[0], q[0])


def test_nothing_stays_swapped_after_the_block():
    with twice_differentiable():
        pass
    with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):
        _twice(F.hardsigmoid, torch.randn(5))
