"""N:M masks (fxsparse.masks.compute(..., "nm", pattern="N:M")): pattern, dimension, scores, misfits,
files, recipes, training."""
from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.errors import MaskError, MaskOptionError, RecipeError
from fxsparse.masks import MaskReport, compute, is_nm, load, parse_pattern, save, score
from fxsparse.recipe import from_dict, load_recipe

ROOT = Path(__file__).resolve().parent.parent


class Net(nn.Module):
    """Every kind of layer N:M meets: a 3-channel stem, a depthwise conv, a grouped conv, a conv1d,
    a transposed conv and linears (one inside nn.MultiheadAttention)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 1, groups=2)  # 8 input channels per group
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.up(self.grouped(self.conv(self.dw(self.stem(x)))))
        h = self.seq(x.flatten(2)[:, :, :8]).transpose(1, 2)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.fc(h.mean(1))


class Plain(nn.Module):
    """Only layers whose input dimension is a multiple of 8."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))))


MISFITS = {"stem.weight", "dw.weight"}  # 3 input channels; 1 per group


def seeded(cls):
    torch.manual_seed(0)
    return cls()


def asp_groups(t: torch.Tensor, m: int, dim: int = 1) -> torch.Tensor:
    """Rows of M as NVIDIA ASP cuts them: conv (K, C, R, S) permuted to (K, R, S, C), C innermost."""
    return t.movedim(dim, -1).reshape(-1, m)


def reference_keep(scores: torch.Tensor, n: int, m: int, dim: int = 1) -> torch.Tensor:
    """The n highest of each group, ties to the lower index, back in the weight's shape."""
    rows = asp_groups(scores, m, dim)
    keep = torch.zeros_like(rows, dtype=torch.bool)
    for i, row in enumerate(rows.tolist()):
        for j in sorted(range(m), key=lambda j: (-row[j], j))[:n]:
            keep[i, j] = True
    moved = list(scores.movedim(dim, -1).shape)
    return keep.reshape(moved).movedim(-1, dim)


# --------------------------------------------------------------------------- pattern and geometry
def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(" 1 : 8 ") == (1, 8) and parse_pattern((4, 8)) == (4, 8)
    for bad in ("4:2", "2-4", "0:4", "4:4", "a:b", "2:4:8", 2.5, (2, 4.0), None):
        with pytest.raises(MaskOptionError, match=r"pattern = .* 'N:M' with integers 0 < N < M") as e:
            parse_pattern(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "1:2"])
def test_every_group_keeps_exactly_n_of_the_largest_magnitudes(pattern):
    n, m = parse_pattern(pattern)
    model = seeded(Net)
    masks = compute(model, "nm", pattern=pattern, incompatible="dense")
    params = dict(model.named_parameters())
    assert list(masks) == ["stem.weight", "dw.weight", "conv.weight", "grouped.weight", "up.weight", "seq.weight",
                           "attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"]
    for name, mask in masks.items():
        if name in MISFITS:
            assert mask.all()
            continue
        dim = 0 if name == "up.weight" else 1  # a transposed conv reduces over its dim 0
        assert is_nm(mask, n, m, dim=dim), name
        assert torch.equal(mask, reference_keep(params[name].detach().abs(), n, m, dim)), name
    report = MaskReport.from_masks(masks, pattern=pattern)
    assert set(report.dense) == MISFITS


def test_conv_groups_run_along_input_channels_at_each_kernel_position():
    # one output channel, 4 input channels, 1x2 kernel; input channels 0 and 1 are the largest at
    # both kernel positions. Grouped along input channels that keeps channels 0, 1 everywhere; the
    # flattened (in, kh, kw) rows of PyTorch's KCRS order, (9, 7, 8, 6) and (1, 3, 2, 4), would keep
    # 9, 8 and 3, 4 instead, and our mask has 4 and 0 in those rows.
    conv = nn.Conv2d(4, 1, (1, 2), bias=False)
    w = torch.tensor([[9.0, 7.0], [8.0, 6.0], [1.0, 3.0], [2.0, 4.0]]).reshape(1, 4, 1, 2)
    with torch.no_grad():
        conv.weight.copy_(w)
    mask = compute(nn.Sequential(conv), "nm", pattern="2:4")["0.weight"]
    assert torch.equal(mask, w >= 6) and is_nm(mask, 2, 4)
    assert not is_nm(mask.reshape(1, -1), 2, 4)


def test_ties_go_to_the_lower_input_index_and_nan_ranks_lowest():
    lin = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.weight[1, 0] = float("nan")
    mask = compute(nn.Sequential(lin), "nm", pattern="2:4")["0.weight"]
    assert mask[0].tolist() == [True, True, False, False] * 2
    assert mask[1].tolist() == [False, True, True, False, True, True, False, False]


def test_is_nm_exact_and_at_most():
    mask = torch.tensor([[True, True, False, False, True, False, True, False]])
    assert is_nm(mask, 2, 4) and is_nm(mask, 2, 4, exact=False) and not is_nm(mask, 1, 4)
    weight = mask.float() * torch.tensor([[1.0, 0.0, 0, 0, 1, 0, 1, 0]])  # a kept weight trained to 0
    assert not is_nm(weight != 0, 2, 4) and is_nm(weight != 0, 2, 4, exact=False)
    assert not is_nm(torch.ones(2, 6, dtype=torch.bool), 2, 4)  # 6 is not a multiple of 4


# --------------------------------------------------------------------------- scores, misfits, requests
def test_score_option_reuses_the_one_shot_scorers():
    model = seeded(Plain)
    data = [(torch.randn(4, 8, 6, 6), torch.randint(0, 3, (4,))) for _ in range(2)]
    masks = compute(model, "nm", pattern="2:4", score="snip", data=data)
    snip = score(model, "snip", data)
    for name, mask in masks.items():
        assert torch.equal(mask, reference_keep(snip[name], 2, 4)), name
    assert not torch.equal(masks["conv.weight"], compute(model, "nm", pattern="2:4")["conv.weight"])
    a, b = (compute(model, "nm", pattern="2:4", score="random", seed=s)["fc.weight"] for s in (1, 1))
    assert torch.equal(a, b) and is_nm(a, 2, 4)


def test_incompatible_layers_error_names_each_layer_and_shape_or_stay_dense(caplog):
    model = seeded(Net)
    with pytest.raises(MaskError) as e:
        compute(model, "nm", pattern="2:4")
    msg = str(e.value)
    assert "2 layer(s)" in msg and "stem.weight (8, 3, 3, 3): 3 input channel(s)" in msg
    assert "dw.weight (8, 1, 3, 3): 1 input channel(s) per group (groups=8)" in msg
    assert "incompatible='dense'" in msg and "\n" not in msg
    with caplog.at_level("INFO", logger="fxsparse.masks.compute"):
        masks = compute(model, "nm", pattern="2:4", incompatible="dense")
    assert "2 left dense: stem.weight, dw.weight" in caplog.text
    report = MaskReport.from_masks(masks, method="nm", pattern="2:4")
    assert report.dense == ["stem.weight", "dw.weight"]
    assert "<- left dense (not 2:4)" in str(report) and report.to_dict()["left_dense"] == report.dense
    # the grouped conv (8 input channels per group) fits 2:4 and 4:8, not 1:16
    with pytest.raises(MaskError, match=r"grouped.weight \(16, 8, 1, 1\): 8 input channel\(s\) per group"):
        compute(model, "nm", pattern="1:16", layers=["grouped.weight"])


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, MaskOptionError, "pattern = None .*required for method 'nm'"),
    ({"pattern": "4:2"}, MaskOptionError, "pattern = '4:2'"),
    ({"pattern": "2:4", "incompatible": "skip"}, MaskOptionError, "incompatible = 'skip' .*'error' | 'dense'"),
    ({"pattern": "2:4", "score": "imp"}, MaskOptionError, "score = 'imp' .*'magnitude'"),
    ({"pattern": "2:4", "sparsity": 0.9}, MaskError, "leave sparsity out or set it to 0.5"),
    ({"pattern": "2:4", "distribution": "erk"}, MaskError, "no distribution"),
    ({"pattern": "2:4", "min_per_layer": 2}, MaskError, "no min_per_layer"),
    ({"pattern": "2:4", "temperature": 3.0}, MaskError, r"takes no option\(s\) temperature"),
    ({"pattern": "2:4", "score": "snip"}, MaskError, "needs data"),
])
def test_impossible_nm_requests_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        compute(seeded(Plain), "nm", **kwargs)


def test_sparsity_of_the_pattern_is_accepted():
    masks = compute(seeded(Plain), "nm", sparsity=0.5, pattern="2:4")
    assert MaskReport.from_masks(masks).achieved_sparsity == 0.5


# --------------------------------------------------------------------------- files
def test_save_load_round_trip_and_a_broken_pattern_is_refused(tmp_path):
    model = seeded(Net)
    masks = compute(model, "nm", pattern="2:4", incompatible="dense")
    path = tmp_path / "nm.safetensors"
    save(masks, path, method="nm", pattern="2:4")
    loaded = load(path, model)
    assert list(loaded) == list(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert fxsparse.masks.read_metadata(path)["pattern"] == "2:4"
    assert all(torch.equal(v, masks[k]) for k, v in compute(model, "file", path=str(path)).items())
    broken = dict(masks, **{"fc.weight": ~masks["fc.weight"] | torch.eye(4, 8, dtype=torch.bool)})
    save(broken, path, method="nm", pattern="2:4")
    with pytest.raises(MaskError, match=r"not 2:4: 'fc.weight' \(4, 8\)"):
        load(path, model)
    load(path)  # without a model there is no layout to check the pattern against


# --------------------------------------------------------------------------- recipes
def _recipe(masks: dict):
    return from_dict({"masks": masks}, source="r.toml")


@pytest.mark.parametrize("pattern", ["4:2", "2-4", "0:4"])
def test_recipe_refuses_a_malformed_pattern_in_one_line(pattern):
    with pytest.raises(RecipeError) as e:
        _recipe({"method": "nm", "pattern": pattern})
    assert str(e.value).startswith(f"r.toml: masks.pattern = '{pattern}' is not allowed; allowed: 'N:M' with integers 0 < N < M")
    assert "\n" not in str(e.value)


def test_recipe_nm_options_and_inherited_sparsity(caplog):
    r = _recipe({"method": "nm", "pattern": "2:4", "incompatible": "dense", "score": "snip", "train_mode": False})
    assert r.masks.options == {"method": "nm", "sparsity": None, "distribution": None, "pattern": "2:4",
                               "incompatible": "dense", "score": "snip", "train_mode": False}
    with pytest.raises(RecipeError, match="masks.incompatible = 'skip' is not allowed; allowed: 'error' | 'dense'"):
        _recipe({"method": "nm", "pattern": "2:4", "incompatible": "skip"})
    with pytest.raises(RecipeError, match="unknown key 'masks.temperature'.*: .*pattern, score, incompatible$"):
        _recipe({"method": "nm", "pattern": "2:4", "temperature": 2.0})
    # tost's sparsity 0.95 and erk cannot be unset by a child: they are ignored, with a warning
    with caplog.at_level("WARNING", logger="fxsparse.recipe"):
        r = load_recipe("baseline", overrides={"masks.method": "nm", "masks.pattern": "2:4"})
    assert r.masks.options["sparsity"] is None and r.masks.options["distribution"] is None
    assert "sparsity = 0.95, distribution = 'erk' do not apply" in caplog.text


def test_recipe_mask_keys_come_from_compute_and_the_method():
    # issue 12: extra [masks] keys were passed to compute unchecked
    keywords = [p.name for p in inspect.signature(compute).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert fxsparse.masks.compute_keywords() == tuple(keywords) == ("seed", "min_per_layer", "layers")
    r = _recipe({"method": "snip", "train_mode": False, "seed": 3, "min_per_layer": 1})
    assert r.masks.options["train_mode"] is False and r.masks.options["seed"] == 3
    with pytest.raises(RecipeError) as e:
        _recipe({"method": "random", "seeed": 1})
    assert "unknown key 'masks.seeed' = 1; allowed keys in [masks] with method = 'random': " in str(e.value)
    assert str(e.value).endswith("enabled, method, sparsity, distribution, path, seed, min_per_layer, layers")
    with pytest.raises(RecipeError, match="unknown key 'masks.rounds'"):
        _recipe({"method": "random", "rounds": 3})  # synflow's and imp's, not random's
    assert _recipe({"method": "synflow", "rounds": 3}).masks.options["rounds"] == 3
    with pytest.raises(RecipeError, match=r"method = 'random': .*takes no option\(s\) path"):
        _recipe({"method": "random", "path": "m.safetensors"})
    with pytest.raises(RecipeError, match="min_per_layer must be a non-negative int"):
        _recipe({"method": "random", "min_per_layer": -1})


# --------------------------------------------------------------------------- training, real models
def test_transform_and_training_steps_keep_the_pattern():
    model = seeded(Plain)
    x, y = torch.randn(4, 8, 6, 6), torch.randint(0, 3, (4,))
    recipe = load_recipe("baseline", overrides={"masks.method": "nm", "masks.pattern": "4:8"})
    gm = fxsparse.transform(model, recipe, example_inputs=x)
    buffers = {k[len("fxsparse.masks."):]: v for k, v in gm.named_buffers() if k.startswith("fxsparse.masks.")}
    assert set(buffers) == {"conv.weight", "fc.weight", "head.weight"} and all(is_nm(b, 4, 8) for b in buffers.values())
    opt = torch.optim.SGD(gm.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
    state = fxsparse.export(gm)
    for name in buffers:
        assert is_nm(state[name] != 0, 4, 8, exact=False), name
        assert (state[name][buffers[name]] != 0).any()  # and the kept weights did train
    # explicit masks go through transform too
    masks = compute(model, "nm", pattern="2:4")
    gm2 = fxsparse.transform(model, "baseline", masks=masks, example_inputs=x)
    assert all(torch.equal(gm2.get_buffer(f"fxsparse.masks.{k}"), v) for k, v in masks.items())


def test_timm_and_torchvision_models():
    timm = pytest.importorskip("timm")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    models = {
        "timm resnet18": (timm.create_model("resnet18", pretrained=False, num_classes=10), ["conv1.weight"]),
        "timm vit": (timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                                       depth=2), ["patch_embed.proj.weight"]),
        "tv mobilenet_v3_small": (torchvision.models.mobilenet_v3_small(num_classes=10), None),
    }
    for what, (model, dense) in models.items():
        masks = compute(model, "nm", pattern="2:4", incompatible="dense")
        report = MaskReport.from_masks(masks, pattern="2:4")
        if dense is not None:
            assert report.dense == dense, what
        else:  # the stem and every depthwise conv (one input channel per group)
            convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
            depthwise = [f"{n}.weight" for n, m in convs.items() if m.in_channels // m.groups % 4]
            assert report.dense == depthwise and len(depthwise) == 12, what
        assert all(is_nm(masks[n], 2, 4) for n in masks if n not in report.dense), what
        assert 0.4 < report.achieved_sparsity <= 0.5, what


# --------------------------------------------------------------------------- the GPU benchmark
def test_semi_structured_benchmark_prepares_on_cpu_and_exits_cleanly(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("nm_semi_structured", ROOT / "benchmarks" / "nm_semi_structured.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    model = bench.mlp_stack(dim=64, hidden=128, depth=1)
    layers = bench.prepare(model, dtype=torch.float32)
    assert [l.name for l in layers] == ["0.fc1", "0.fc2"]
    for layer in layers:
        assert is_nm(layer.weight != 0, 2, 4, exact=False) and bench.fits_semi_structured(layer.weight)
    assert not bench.fits_semi_structured(torch.zeros(24, 64))  # rows: a multiple of 32 (fp16)
    if not torch.cuda.is_available():
        assert bench.main(["--model", "mlp"]) == 0
        assert "needs a CUDA GPU" in capsys.readouterr().out
