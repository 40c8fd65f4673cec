"""fxsparse.trace: every zoo model traces to an equivalent GraphModule, and bad input gets a clear error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsparse
from conftest import build
from fxsparse.errors import ExampleInputError, FxSparseError, TraceError
from fxsparse.testing import compare
from zoo_models import MODE_DEPENDENT

# torchvision's ViT-B/16 at 224x224 takes ~40 s to compare on 2 CPU cores; the same architecture at
# 64x64 (16 patches) exercises exactly the same graph.
_SMALLER = {"tv:vit_b_16": ((3, 64, 64), {"image_size": 64})}


def _call_nodes_without_shapes(gm: torch.fx.GraphModule) -> list[str]:
    """Call nodes shape propagation did not reach, or whose tensor output has no tensor_meta.

    (Nodes computing Python values -- ``x.shape``, ``==`` -- get a ``type`` but no tensor_meta.)
    """
    missing = []
    for n in gm.graph.nodes:
        if not n.op.startswith("call_"):
            continue
        out_type = n.meta.get("type")
        is_tensor = isinstance(out_type, type) and issubclass(out_type, torch.Tensor)
        if out_type is None or (is_tensor and "tensor_meta" not in n.meta):
            missing.append(n.name)
    return missing


def _assert_one_paragraph(err: BaseException) -> str:
    msg = str(err)
    assert "Traceback" not in msg
    assert "\n" not in msg.strip(), f"expected one paragraph, got:\n{msg}"
    return msg


# --------------------------------------------------------------------------- the zoo
def test_zoo_model_traces_equivalent(zoo_entry):
    spec, size = zoo_entry
    size, kwargs = _SMALLER.get(spec, (size, {}))
    model, gm, x = build(spec, size, fresh=True, **kwargs)  # the tracer's own output, not a cached copy

    info = gm.meta["fxsparse"]
    assert not info.mode_dependent, f"{spec} unexpectedly mode dependent: {info.mode_diff}"
    mismatches = compare(model, gm, x, modes=("train", "eval"), rtol=1e-4, atol=1e-5)
    assert not mismatches, "\n".join(map(str, mismatches))
    assert set(gm.state_dict()) == set(model.state_dict())
    assert _call_nodes_without_shapes(gm) == []


@pytest.mark.parametrize("spec,size", MODE_DEPENDENT, ids=[s for s, _ in MODE_DEPENDENT])
def test_mode_dependent_model_is_guarded(spec, size):
    model, gm, x = build(spec, size, fresh=True)  # traced in train mode
    assert gm.meta["fxsparse"].mode_dependent
    assert compare(model, gm, x, modes=("train",), rtol=1e-4, atol=1e-5) == []
    gm.eval()
    with pytest.raises(TraceError, match="traced in train mode") as err:
        gm(x)
    assert "eval" in _assert_one_paragraph(err.value)


def test_mode_dependent_model_traced_in_eval_refuses_train():
    spec, size = MODE_DEPENDENT[0]
    model, gm, x = build(spec, size, eval_mode=True, fresh=True)
    assert compare(model, gm, x, modes=("eval",), rtol=1e-4, atol=1e-5) == []
    gm.train()
    with pytest.raises(TraceError, match="traced in eval mode"):
        gm(x)


@pytest.mark.parametrize("spec,size", [
    ("resnet50", (3, 224, 224)),
    ("tv:vit_b_16", (3, 224, 224)),
    ("swin_tiny_patch4_window7_224", (3, 224, 224)),
    ("efficientnet_cc_b0_4e", (3, 224, 224)),
    ("vit_large_patch16_224", (3, 224, 224)),  # 300M parameters: no memory, no compute on meta
])
def test_trace_on_meta_device(spec, size):
    model = fxsparse.models.create(spec, device="meta")
    gm = fxsparse.trace(model)  # default example input, on the model's (meta) device
    assert all(p.is_meta for p in gm.parameters())
    assert _call_nodes_without_shapes(gm) == []
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert list(out.meta["tensor_meta"].shape) == [2, 1000]
    assert gm.meta["fxsparse"].input_shapes == [(2, *size)]


# --------------------------------------------------------------------------- bad input
class DataDependent(nn.Module):
    """Branches on tensor values, which symbolic tracing cannot follow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent branch
            return self.bn(self.conv(x))
        return -self.conv(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.body = nn.Sequential(nn.ReLU(), DataDependent())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


class TopLevelBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        while y.abs().max() > 1:  # data-dependent loop in the model's own forward
            y = y / 2
        return y


def test_data_dependent_submodule_names_module_line_and_fix():
    with pytest.raises(TraceError) as err:
        fxsparse.trace(Net(), torch.randn(2, 3, 8, 8))
    msg = _assert_one_paragraph(err.value)
    assert "'body.1'" in msg and "DataDependent" in msg
    assert "if x.mean() > 0:" in msg and "test_trace.py" in msg
    assert "leaf_modules" in msg and "--leaf" in msg
    assert err.value.cause is not None  # the torch.fx error stays available for debugging


def test_data_dependent_top_level_forward():
    with pytest.raises(TraceError) as err:
        fxsparse.trace(TopLevelBranch(), torch.randn(2, 3, 8, 8))
    msg = _assert_one_paragraph(err.value)
    assert "top-level forward of TopLevelBranch" in msg
    assert "while y.abs().max() > 1:" in msg
    assert "autowrap_functions" in msg


@pytest.mark.parametrize("not_a_module", [lambda x: x, "resnet18", torch.randn(3)], ids=["function", "str", "tensor"])
def test_non_module_is_rejected(not_a_module):
    with pytest.raises(TraceError, match="expects a torch.nn.Module") as err:
        fxsparse.trace(not_a_module)
    _assert_one_paragraph(err.value)


def test_traced_graph_module_is_not_traced_again():
    gm = fxsparse.trace(nn.Sequential(nn.Conv2d(3, 4, 1)), torch.randn(1, 3, 4, 4))
    with pytest.raises(TraceError, match="already an fxsparse GraphModule"):
        fxsparse.trace(gm)


def test_wrong_example_input_shape_names_node():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    with pytest.raises(ExampleInputError) as err:
        fxsparse.trace(model, torch.randn(2, 5, 8, 8))  # 5 channels, the conv wants 3
    msg = _assert_one_paragraph(err.value)
    assert "node '_0'" in msg and "Conv2d" in msg
    assert "(2, 5, 8, 8)" in msg and "example_inputs" in msg
    assert isinstance(err.value, FxSparseError)


@pytest.mark.parametrize("leaf", ["type", "instance", "name"])
def test_declaring_the_failing_module_a_leaf_makes_it_trace(leaf):
    torch.manual_seed(0)
    model = Net()
    leaves = {"type": DataDependent, "instance": model.body[1], "name": "body.1"}[leaf]
    x = torch.randn(2, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxsparse.trace(model, x, leaf_modules=[leaves])
    # shapes of a value-branching leaf are computed for real; BatchNorm statistics stay untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert _call_nodes_without_shapes(gm) == []
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["stem", "body.0", "body.1", "head"]
    # the leaf runs eagerly, so both branches stay right
    assert compare(model, gm, x) == []
    assert compare(model, gm, -x.abs() - 1) == []


def test_bad_leaf_entry_is_a_clear_type_error():
    with pytest.raises(TypeError, match="leaf_modules entries must be"):
        fxsparse.trace(Net(), torch.randn(1, 3, 8, 8), leaf_modules=[42])


# --------------------------------------------------------------------------- what a trace keeps
def test_unused_modules_keep_their_state_dict_keys():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(3, 4, 1)
            self.spare = nn.BatchNorm2d(4)  # never called in forward

        def forward(self, x):
            return self.used(x)

    model = WithSpare()
    gm = fxsparse.trace(model, torch.randn(1, 3, 4, 4))
    assert set(gm.state_dict()) == set(model.state_dict())
    assert gm.spare is model.spare


def test_keyword_defaults_are_pinned_not_inputs():
    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, mask=None, scale: float = 2.0):
            y = self.fc(x) * scale
            return y if mask is None else y * mask

    gm = fxsparse.trace(WithMask(), torch.randn(2, 4))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"][:1] == ["x"]
    assert gm.meta["fxsparse"].concrete_args == {"mask": None, "scale": 2.0}


def test_functional_dropout_follows_the_runtime_mode():
    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return nn.functional.dropout(self.fc(x), 0.5, self.training)

    model = FunctionalDropout()
    x = torch.randn(4, 8)
    gm = fxsparse.trace(model, x)  # traced in train mode
    assert not gm.meta["fxsparse"].mode_dependent
    assert compare(model, gm, x, modes=("train", "eval")) == []
    gm.eval()
    assert torch.equal(gm(x), model.eval()(x))


@pytest.mark.parametrize("spec, size", [
    ("tv:resnet18", (3, 64, 64)), ("convnext_atto", (3, 64, 64)), ("vit_tiny_patch16_224", (3, 224, 224)),
    ("torchvision.models.densenet:DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2)",
     (3, 32, 32)),
])
@pytest.mark.parametrize("training", [True, False])
def test_shapes_are_torchs_shapeprop_without_a_fake_copy_of_the_module(spec, size, training):
    """trace's shape propagation reads each parameter and buffer as a fake tensor where it is used
    instead of deep-copying the module onto fake tensors: the same metadata as torch's ShapeProp
    (strides and memory formats included: conv and attention kernels choose them per device), and
    the real module's state untouched."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    torch.manual_seed(0)
    model = fxsparse.models.create(spec).train(training)
    x = torch.randn(2, *size)
    gm = fxsparse.trace(model, x)
    ours = {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    ShapeProp(gm, fake_mode=mode).propagate(mode.from_tensor(x))
    assert ours == {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}
    fxsparse.trace(model, x)  # train-mode BatchNorm ran on fake running statistics, not on these
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


class _ReshapedInPlaceAfterNorm(nn.Module):
    """A norm's output changed in shape in place while its input is still used, and a norm's input
    changed in shape in place while its output is still used: shape propagation may not stand the
    input in for the skipped norm's output here."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv(x)
        y = self.act(self.bn(h))
        y.unsqueeze_(0)
        z = self.bn2(h)
        h.unsqueeze_(0)
        return y.sum() + z


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_skipped_norms_and_activations_keep_torchs_shapes_under_in_place_reshapes(device):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    model, x = _ReshapedInPlaceAfterNorm(), torch.randn(2, 3, 8, 8)
    gm = fxsparse.trace(model.to(device), x.to(device))
    ours = {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    assert tuple(ours["add"].shape) == (2, 4, 6, 6)
    assert tuple(ours["unsqueeze_"].shape) == tuple(ours["unsqueeze__1"].shape) == (1, 2, 4, 6, 6)
    if device == "cpu":
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        ShapeProp(gm, fake_mode=mode).propagate(mode.from_tensor(x))
        assert ours == {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
