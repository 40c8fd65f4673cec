"""MaskPass, strip_masks and export: the rewrite fires on every layer of every zoo model, and the
masked graph computes exactly what the original model computes with its weights times the masks."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from conftest import build, random_masks
from fxsparse.errors import MaskError
from fxsparse.export import ExportError, zero_masked_weights
from fxsparse.fused import apply_mask
from fxsparse.pass_infra import tagged_nodes
from fxsparse.passes.mask import MaskPass, StripMasksPass, mask_buffer_name, masked_parameters
from zoo_models import zoo_params

RTOL, ATOL = 1e-4, 1e-5


# --------------------------------------------------------------------------- helpers
def _reference(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The original model, computed in eager with every masked weight multiplied by its mask."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return ref


def _run(module: nn.Module, x: torch.Tensor, mode: str, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Output and parameter gradients of a fixed random projection of the output."""
    module.train(mode == "train")
    module.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = module(x)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    (out * proj).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = max(b.abs().max().item(), 1e-3)
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape and diff <= ATOL * scale + RTOL * scale, f"{what}: max |diff| {diff:.3e} (scale {scale:.3e})"


def _feeds_masked_weight(layer) -> bool:
    """Does the layer's node read its weight through a masked_weight multiply?"""
    node = layer.node
    if node.target is torch.func.functional_call:
        swapped = node.args[1]
        rel = layer.weight[len(layer.leaf) + 1:]
        return _role(swapped.get(rel)) == "masked_weight"
    # functional conv/linear: walk back from the weight argument to the multiply
    stack, seen = [node.args[1]], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if _role(n) == "masked_weight" and n.meta["fxsparse"]["param"] == layer.weight:
            return True
        stack.extend(n.all_input_nodes)
    return False


def _role(node) -> str | None:
    return (node.meta.get("fxsparse") or {}).get("role") if isinstance(node, torch.fx.Node) else None


_cache: dict[str, tuple] = {}


@pytest.fixture(scope="module", params=zoo_params())
def zoo_masked(request):
    """(spec, model, masked gm, x, masks, pass) for each zoo model, built once for this module's tests."""
    spec, size = request.param
    model, gm, x = build(spec, size)
    if size[-1] >= 224:
        x = x[:1]  # transformers at their native size: one image is enough and halves the time
    layers_before = fxsparse.graph.parameterized_layers(gm)
    masks = random_masks(gm, sparsity=0.8)
    p = MaskPass(masks)
    p(gm)
    yield spec, size, model, gm, x, masks, p, layers_before


# --------------------------------------------------------------------------- the zoo
def test_rewrite_fires_on_every_layer(zoo_masked):
    spec, _, model, gm, x, masks, p, layers_before = zoo_masked
    assert p.stats["masked_weights"] == len(masks) == len(layers_before)
    assert set(masked_parameters(gm)) == set(masks)
    for name, buf in masked_parameters(gm).items():
        assert buf.dtype == torch.bool and torch.equal(buf, masks[name])
    mask_nodes = tagged_nodes(gm, group="masks", role="mask")
    assert {n.target for n in mask_nodes} == {mask_buffer_name(m) for m in masks}
    muls = tagged_nodes(gm, group="masks", role="masked_weight")
    assert {n.meta["fxsparse"]["param"] for n in muls} == set(masks)
    assert all(n.target is apply_mask for n in muls)  # w * mask (fxsparse.fused)
    # the graph queries still see every layer (leaf-held ones included), each reading w * mask
    after = fxsparse.graph.parameterized_layers(gm)
    assert {l.weight for l in after} == {l.weight for l in layers_before}
    unmasked = [l.weight for l in after if not _feeds_masked_weight(l)]
    assert not unmasked, f"layers not reading their masked weight: {unmasked[:10]}"
    # no call_module of a conv/linear with a masked weight is left
    for node in gm.graph.nodes:
        if node.op == "call_module":
            found = fxsparse.graph.layer_of(gm, node)
            assert not found, f"{node.format_node()} still calls masked layer(s) {found}"
    assert gm.meta["fxsparse.passes"][-1]["pass"] == "MaskPass"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_numbers_match_masked_reference(zoo_masked, mode):
    spec, _, model, gm, x, masks, p, _ = zoo_masked
    ref = _reference(model, masks)  # shares no state with gm from here on
    gm_ = copy.deepcopy(gm)
    out_ref, g_ref = _run(ref, x, mode)
    out, g = _run(gm_, x, mode)
    _assert_close(out, out_ref, f"{spec} {mode} output")
    for name, grad in g_ref.items():
        expected = grad * masks[name] if name in masks else grad
        assert name in g, f"{spec}: no gradient for {name}"
        _assert_close(g[name], expected, f"{spec} {mode} grad {name}")
        if name in masks:  # pruned weights get exactly zero gradient
            assert not g[name][~masks[name]].any(), f"{spec}: pruned entries of {name} have gradient"


def test_export_round_trip(zoo_masked):
    spec, size, model, gm, x, masks, p, _ = zoo_masked
    state = fxsparse.export(gm)
    assert not any(k.startswith("fxsparse.") for k in state)
    for name, mask in masks.items():
        assert not state[name][~mask].any(), f"{name}: mask not folded"
    fresh = fxsparse.models.create(spec)
    fresh.load_state_dict(state, strict=True)
    gm.eval(), fresh.eval()
    with torch.no_grad():
        _assert_close(fresh(x), gm(x), f"{spec} exported model vs masked graph")
    assert set(masked_parameters(gm)) == set(masks), "export must not modify the graph module"


def test_strip_masks_gives_original_structure(zoo_masked):
    spec, size, model, gm, x, masks, p, _ = zoo_masked
    plain = fxsparse.strip_masks(gm)
    _, fresh_gm, _ = build(spec, size)
    fxsparse.testing.assert_same_structure(plain, fresh_gm)
    assert not tagged_nodes(plain, group="masks") and not hasattr(plain, "fxsparse")
    assert set(plain.state_dict()) == set(fresh_gm.state_dict())
    gm.eval(), plain.eval()
    with torch.no_grad():
        _assert_close(plain(x), gm(x), f"{spec} stripped vs masked graph")
    assert tagged_nodes(gm, group="masks"), "strip_masks must not modify its input by default"


# --------------------------------------------------------------------------- layer forms
class _Layers(nn.Module):
    """Every module-style conv/linear form the functional replacement must reproduce."""

    def __init__(self):
        super().__init__()
        self.c_reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.c_circular = nn.Conv2d(4, 4, 3, padding=(1, 2), padding_mode="circular", bias=False)
        self.c_replicate_same = nn.Conv2d(4, 4, 3, padding="same", padding_mode="replicate", dilation=2)
        self.c_groups = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.ct = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
        self.ct_size = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)  # called with output_size
        self.c1 = nn.Conv1d(4, 4, 3, padding="valid")
        self.c3 = nn.Conv3d(1, 2, 3, padding=1, padding_mode="circular")
        self.lin = nn.Linear(16, 5, bias=False)

    def forward(self, x):
        y = self.c_replicate_same(self.c_circular(self.c_reflect(x)))
        y = self.ct(self.c_groups(y))
        y = self.ct_size(y, output_size=[2 * y.shape[2], 2 * y.shape[3]])
        z = self.c1(y.flatten(2)[..., :20])
        v = self.c3(y[:, :1].unsqueeze(2).expand(-1, -1, 3, -1, -1))
        return self.lin(z[..., :16]).sum() + v.sum() + y.mean()


def _check_model(model, x, sparsity=0.5, **trace_kwargs):
    torch.manual_seed(0)
    gm = fxsparse.trace(model, x, **trace_kwargs)
    masks = random_masks(gm, sparsity)
    p = MaskPass(masks)
    p(gm)
    ref = _reference(model, masks)
    for mode in ("train", "eval"):
        out_ref, g_ref = _run(ref, x, mode)
        out, g = _run(copy.deepcopy(gm), x, mode)
        _assert_close(out, out_ref, f"{mode} output")
        for name, grad in g_ref.items():
            _assert_close(g[name], grad * masks[name] if name in masks else grad, f"{mode} grad {name}")
    return gm, p


def test_module_forms_padding_modes_transposed_1d_3d():
    gm, p = _check_model(_Layers(), torch.randn(2, 3, 8, 8))
    assert p.stats["masked_weights"] == 9
    # ct_size is called with output_size, which the module turns into output_padding itself
    assert p.stats["module_layers"] == 8 and p.stats["leaf_calls"] == 1
    pads = tagged_nodes(gm, group="masks", role="pad")
    assert [n.kwargs["mode"] for n in pads] == ["reflect", "circular", "replicate", "circular"]
    plain = fxsparse.strip_masks(gm)
    fxsparse.testing.assert_same_structure(plain, fxsparse.trace(_Layers(), torch.randn(2, 3, 8, 8)))


class _CustomForwards(nn.Module):
    """A conv subclass with its own forward, a hooked linear, a weight-standardized conv."""

    class HalfConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 0.5

    def __init__(self):
        super().__init__()
        import timm.layers

        self.std = timm.layers.StdConv2d(3, 4, 3, padding=1)  # traced through: get_attr -> batch_norm -> conv2d
        self.halved = self.HalfConv(4, 4, 1)
        self.hooked = nn.Linear(4, 3)
        self.hooked.register_forward_hook(lambda m, i, o: o * 2)

    def forward(self, x):
        return self.hooked(self.halved(self.std(x)).mean((2, 3)))


def test_custom_forward_hooks_and_standardized_weights():
    gm, p = _check_model(_CustomForwards(), torch.randn(2, 3, 8, 8), leaf_modules=[_CustomForwards.HalfConv])
    assert p.stats["function_layers"] == 1  # StdConv2d: multiply right after get_attr(weight)
    assert p.stats["leaf_calls"] == 2  # HalfConv keeps its forward, the hook keeps running
    (mul,) = [n for n in tagged_nodes(gm, role="masked_weight") if n.meta["fxsparse"]["param"] == "std.weight"]
    assert mul.args[0].op == "get_attr" and mul.args[0].target == "std.weight"


def test_multihead_attention_in_proj_is_masked():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    gm, p = _check_model(M(), torch.randn(2, 5, 8))
    (call,) = tagged_nodes(gm, group="masks", role="layer")
    assert call.target is torch.func.functional_call
    assert set(call.args[1]) == {"in_proj_weight", "out_proj.weight"}


# --------------------------------------------------------------------------- validation
def test_bad_masks_list_every_mismatch_and_change_nothing():
    model, gm, x = build("resnet18")
    code_before = gm.code
    good = random_masks(gm)
    bad = {
        "conv1.weight": good["conv1.weight"],
        "layer1.0.conv1.weight": torch.ones(3, 3, dtype=torch.bool),  # wrong shape
        "layer1.0.conv2.weight": good["layer1.0.conv2.weight"].float(),  # not bool
        "fc.bias": torch.ones(1000, dtype=torch.bool),  # a bias: never masked
        "bn1.weight": torch.ones(64, dtype=torch.bool),  # not a conv/linear weight
        "nope.weight": torch.ones(1, dtype=torch.bool),  # no such parameter
    }
    with pytest.raises(MaskError) as err:
        MaskPass(bad)(gm)
    msg = str(err.value)
    assert "5 of 6 masks" in msg
    for name in ("layer1.0.conv1.weight", "layer1.0.conv2.weight", "fc.bias", "bn1.weight", "nope.weight"):
        assert name in msg
    assert "(3, 3)" in msg and "torch.float32" in msg and "no such parameter" in msg
    assert gm.code == code_before and not hasattr(gm, "fxsparse")


def test_masking_twice_is_refused():
    model, gm, x = build("resnet18")
    masks = random_masks(gm)
    MaskPass({"conv1.weight": masks["conv1.weight"]})(gm)
    with pytest.raises(MaskError, match="already masked"):
        MaskPass(masks)(gm)
    MaskPass({k: v for k, v in masks.items() if k != "conv1.weight"})(gm)  # the others are fine
    assert len(masked_parameters(gm)) == len(masks)


def test_masks_are_copied_to_the_weight_device_and_owned_by_the_graph():
    model, gm, x = build("resnet18")
    masks = random_masks(gm)
    MaskPass(masks)(gm)
    buf = masked_parameters(gm)["conv1.weight"]
    assert buf.device == gm.conv1.weight.device and buf.data_ptr() != masks["conv1.weight"].data_ptr()


# --------------------------------------------------------------------------- export details
def test_export_refuses_while_ghosts_remain():
    model, gm, x = build("resnet18")
    MaskPass(random_masks(gm))(gm)
    fxsparse.gates.register(gm, "ghost_skips")  # what a ghost pass leaves until its removal
    with pytest.raises(ExportError, match="remove_ghosts"):
        fxsparse.export(gm)


def test_zero_masked_weights_keeps_the_function():
    model, gm, x = build("resnet18", eval_mode=True)
    masks = random_masks(gm)
    MaskPass(masks)(gm)
    with torch.no_grad():
        before = gm(x)
    assert zero_masked_weights(gm) == len(masks)
    assert not gm.conv1.weight[~masks["conv1.weight"]].any()
    with torch.no_grad():
        assert torch.equal(gm(x), before)


def test_strip_without_fold_restores_the_stored_weights():
    model, gm, x = build("resnet18")
    w = gm.conv1.weight.detach().clone()
    MaskPass(random_masks(gm))(gm)
    plain = fxsparse.strip_masks(gm, fold=False)
    assert torch.equal(plain.conv1.weight, w)
    StripMasksPass()(gm)  # in place, folded
    assert not hasattr(gm, "fxsparse") and not torch.equal(gm.conv1.weight, w)


# --------------------------------------------------------------------------- torch.compile
class _LeafHeavy(nn.Module):
    """Module-, function- and leaf-held weights in one small model (timm's Conv2dSame, CondConv2d, MHA)."""

    def __init__(self):
        super().__init__()
        import timm.layers

        self.same = timm.layers.Conv2dSame(3, 8, 3, stride=2)  # a timm leaf: pads in its own forward
        self.cond = timm.layers.CondConv2d(8, 8, 3, padding="", num_experts=2)
        self.route = nn.Linear(8, 2)
        self.std = timm.layers.StdConv2d(8, 8, 1)  # traced through: function style
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.same(x))
        x = self.cond(x, torch.sigmoid(self.route(x.mean((2, 3)))))
        x = self.std(x).flatten(2).transpose(1, 2)
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.head(x.mean(1))


def _compiled_matches(gm, x, backend: str):
    """Compile with fullgraph=True (a graph break raises); outputs and grads equal eager's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = copy.deepcopy(gm)
    compiled_mod = copy.deepcopy(gm)
    compiled = torch.compile(compiled_mod, backend=backend, fullgraph=True)
    out_e, g_e = _run(eager, x, "train")
    out_c, g_c = _run(compiled, x, "train")
    g_c = {n.removeprefix("_orig_mod."): g for n, g in g_c.items()}
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    _assert_close(out_c, out_e, "compiled output")
    # inductor reorders reductions: a gradient that is a near-total cancellation (a BatchNorm bias
    # feeding another BatchNorm) differs in its rounding noise, so judge against the largest gradient
    scale = max(g.abs().max().item() for g in g_e.values())
    for name, grad in g_e.items():
        diff = (g_c[name] - grad).abs().max().item()
        assert diff <= 1e-4 * scale + 1e-3 * grad.abs().max().item(), f"compiled grad {name}: max |diff| {diff:.3e}"


def test_compile_traces_leaf_calls_without_graph_breaks():
    # aot_eager: dynamo + AOTAutograd (forward and backward graphs) without inductor's codegen,
    # so the graph-break check stays fast; inductor itself runs in the slow tests below
    torch.manual_seed(0)
    model = _LeafHeavy()
    x = torch.randn(2, 3, 16, 16)
    gm = fxsparse.trace(model, x)
    masks = random_masks(gm, 0.5)
    p = MaskPass(masks)
    p(gm)
    assert p.stats["leaf_calls"] == 3 and p.stats["function_layers"] == 1  # same, cond, attn; std
    _compiled_matches(gm, x, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["resnet18", "tf_efficientnet_b0", "mobilevit_xxs"])
def test_inductor_compiles_masked_zoo_models(spec):
    model, gm, x = build(spec)
    MaskPass(random_masks(gm))(gm)
    _compiled_matches(gm, x, "inductor")


def test_masking_a_leaf_in_two_passes_extends_its_call():
    model, gm, x = build("nf_resnet26", eval_mode=True)
    masks = random_masks(gm)
    first = {k: v for i, (k, v) in enumerate(masks.items()) if i % 2 == 0}
    MaskPass(first)(gm)
    MaskPass({k: v for k, v in masks.items() if k not in first})(gm)
    calls = [n for n in gm.graph.nodes if n.target is torch.func.functional_call]
    assert len(calls) == 8 and sum(len(n.args[1]) for n in calls) == 28
    ref = _reference(model, masks).eval()
    with torch.no_grad():
        _assert_close(gm(x), ref(x), "two passes vs reference")
    fxsparse.testing.assert_same_structure(fxsparse.strip_masks(gm), build("nf_resnet26", eval_mode=True)[1])


def test_conv_masks_are_bool_and_channels_last():
    # the layout inductor's CPU convolutions use: a contiguous bool mask made compiled training
    # 1.6x slower than dense (see _mask_memory_format); exported weights keep their own layout
    model, gm, x = build("resnet18")
    MaskPass(random_masks(gm))(gm)
    masks = masked_parameters(gm)
    assert masks["conv1.weight"].dtype == torch.bool
    assert masks["conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    assert masks["fc.weight"].is_contiguous()
    assert all(v.is_contiguous() for v in fxsparse.export(gm).values())
