"""fxsparse.testing: the equivalence harness catches real differences and stays quiet otherwise."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.testing import Mismatch, assert_equivalent, assert_same_structure, compare


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.mean((2, 3))))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Small()
    x = torch.randn(4, 3, 8, 8)
    return model, fxsparse.trace(model, x), x


def test_equivalent_graph_passes_in_both_modes_with_dropout(setup):
    model, gm, x = setup
    assert compare(model, gm, x) == []
    assert compare(model, gm, x, exact=True) == []  # same ops on the same RNG stream: bit-identical
    assert_equivalent(model, gm, x)


def test_compare_leaves_the_modules_untouched(setup):
    model, gm, x = setup
    state = copy.deepcopy(model.state_dict())
    compare(model, gm, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN stats too
    assert all(p.grad is None for p in model.parameters())


def test_perturbed_weight_raises_a_readable_table(setup):
    model, gm, x = setup
    other = copy.deepcopy(gm)  # gm shares parameters with model: perturb a copy
    with torch.no_grad():
        other.fc.weight[0, 0] += 0.5
    mismatches = compare(model, other, x)
    assert all(isinstance(m, Mismatch) for m in mismatches)
    whats = [m.what for m in mismatches]
    assert "train output[0]" in whats and "eval output[0]" in whats
    assert "train grad conv.weight" in whats  # the perturbation reaches every gradient upstream

    with pytest.raises(AssertionError) as err:
        assert_equivalent(model, other, x)
    msg = str(err.value)
    first, *rows = msg.splitlines()
    assert first.startswith("GraphModule is not equivalent to Small") and f"({len(mismatches)} mismatches)" in first
    assert all(row.startswith("  ") and ": " in row for row in rows)
    assert "max |diff|" in msg and "elements off" in msg and "rtol=" in msg


def test_tolerances_and_exact_mode(setup):
    model, gm, x = setup
    other = copy.deepcopy(gm)
    with torch.no_grad():
        other.fc.bias.add_(1e-7)
    assert compare(model, other, x, grads=False) == []  # within rtol/atol
    exact = compare(model, other, x, grads=False, exact=True)
    assert [m.what for m in exact] == ["train output[0]", "eval output[0]"]
    assert "(exact comparison)" in exact[0].detail


def test_missing_parameter_and_shape_mismatch_are_reported():
    torch.manual_seed(0)
    model = Small()
    smaller = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(2, 3, 8, 8)
    mismatches = compare(model, smaller, x, grads=False, modes=("eval",))
    assert mismatches[0].what == "parameters missing in the graph module"
    assert "conv.weight" in mismatches[0].detail
    assert mismatches[1].what == "eval output[0]" and mismatches[1].detail == "shape (2, 4) vs (2, 3)"


def test_bad_mode_is_rejected(setup):
    model, gm, x = setup
    with pytest.raises(ValueError, match="modes must be"):
        compare(model, gm, x, modes=("inference",))


def test_assert_same_structure(setup):
    model, gm, x = setup
    assert_same_structure(gm, fxsparse.trace(model, x))

    edited = fxsparse.trace(model, x)
    relu = next(n for n in edited.graph.nodes if n.target is F.relu)
    relu.target = F.gelu
    edited.recompile()
    with pytest.raises(AssertionError) as err:
        assert_same_structure(gm, edited)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("graphs differ in structure")
    assert any(line.strip().startswith("- %relu") for line in lines)
    assert any(line.strip().startswith("+ %relu") and "gelu" in line for line in lines)


def test_tensor_scaled_tolerance_accepts_rounding_near_zero_and_nothing_more():
    """An element that cancels to ~0 keeps the rounding of the terms it summed (cpubone_nano's
    stem gradient: 5.7e-6 off on elements of a tensor whose largest is 12): elementwise rtol
    rejects it, the tolerance scaled to the tensor's max |value| accepts it; a real error fails both."""
    from fxsparse.testing import _diff

    b = torch.tensor([12.0, -3.0, 1e-7, 0.5], dtype=torch.float32)
    rounding = b.clone()
    rounding[2] += 5.7e-6  # 4.7e-7 of the tensor's scale
    assert "1 of 4 elements off" in _diff(rounding, b, 1e-5, 1e-6, False, "element")
    assert "worst at flat index 2" in _diff(rounding, b, 1e-5, 1e-6, False, "element")
    assert _diff(rounding, b, 1e-5, 1e-6, False, "tensor") is None
    wrong = b.clone()
    wrong[2] += 1e-3  # 8e-5 of the scale: a real difference
    msg = _diff(wrong, b, 1e-5, 1e-6, False, "tensor")
    assert msg and "1 of 4 elements off" in msg and "scaled to the tensor's max |value|" in msg
    # NaN in the same place on both sides matches; inf matches inf
    nan = torch.tensor([float("nan"), float("inf"), 1.0])
    assert _diff(nan, nan.clone(), 1e-5, 1e-6, False, "tensor") is None
    assert _diff(nan, nan.clone(), 1e-5, 1e-6, False, "element") is None


def test_compare_scale_option(setup):
    model, gm, x = setup
    with pytest.raises(ValueError, match="scale must be"):
        compare(model, gm, x, scale="global")
    assert compare(model, gm, x, scale="tensor") == []
