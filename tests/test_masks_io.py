"""fxsparse.masks save / load / validate."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.errors import MaskError
from fxsparse.masks import MaskReport, compute, load, read_metadata, save, select_layers, validate


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)  # in_proj_weight inside a leaf

    def forward(self, x):
        h = self.fc(self.bn(self.conv(x)).mean((2, 3)))[:, None]
        return self.attn(h, h, h, need_weights=False)[0][:, 0]


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def masks(net):
    return compute(net, "magnitude", 0.7)


def test_save_load_round_trip_with_metadata(tmp_path, net, masks):
    path = tmp_path / "mask.safetensors"
    save(masks, path, method="magnitude", requested_sparsity=0.7, model="Net", note={"seed": 0})
    loaded = load(path)
    assert list(loaded) == list(masks)
    for n in masks:
        assert loaded[n].dtype == torch.bool and torch.equal(loaded[n], masks[n])
    meta = read_metadata(path)
    report = MaskReport.from_masks(masks)
    assert meta["format"] == "fxsparse-masks"
    assert meta["fxsparse_version"] == fxsparse.__version__
    assert meta["method"] == "magnitude" and meta["model"] == "Net" and meta["note"] == {"seed": 0}
    assert meta["requested_sparsity"] == 0.7
    assert meta["achieved_sparsity"] == pytest.approx(report.achieved_sparsity)
    assert meta["layer_density"] == pytest.approx(report.density)
    assert (meta["kept"], meta["total"]) == (report.kept, report.total)
    assert set(meta["layer_density"]) == {"conv.weight", "fc.weight", "attn.in_proj_weight", "attn.out_proj.weight"}
    # with a model: validated, and the same masks come back
    again = load(path, net)
    assert all(torch.equal(again[n], masks[n]) for n in masks)


def test_metadata_is_plain_json_in_the_safetensors_header(tmp_path, masks):
    path = tmp_path / "m.safetensors"
    save(masks, path, method="snip")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert json.loads(raw["layer_density"])["fc.weight"] == pytest.approx(MaskReport.from_masks(masks).density["fc.weight"])
    with pytest.raises(MaskError, match="written by fxsparse"):
        save(masks, path, achieved_sparsity=0.5)
    with pytest.raises(MaskError, match="JSON"):
        save(masks, path, method=object())


def test_load_torch_saved_dict(tmp_path, net, masks):
    path = tmp_path / "mask.pt"
    torch.save(masks, path)
    loaded = load(path, net)
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert read_metadata(path) == {}


def test_load_tost_style_prune_masks(tmp_path, net, masks):
    """ToST's extract_mask / torch.nn.utils.prune: keys `<module>.weight_mask`, 0/1 floats."""
    path = tmp_path / "0-mask.pt"
    torch.save({n + "_mask": m.float() for n, m in masks.items()}, path)
    loaded = load(path, net)
    assert set(loaded) == set(masks)
    assert all(loaded[n].dtype == torch.bool and torch.equal(loaded[n], masks[n]) for n in masks)
    torch.save({"fc.weight_mask": torch.full((4, 8), 0.5)}, path)
    with pytest.raises(MaskError, match="other than 0 and 1"):
        load(path)


def test_torch_load_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": Evil()}, path)
    with pytest.raises(MaskError, match="weights_only"):
        load(path)


def test_validate_lists_every_mismatch(net, masks):
    bad = dict(masks)
    bad["fc.weight"] = torch.ones(3, 3, dtype=torch.bool)           # wrong shape
    bad["conv.weight"] = masks["conv.weight"].float()               # non-boolean
    bad["fc.bias"] = torch.ones(4, dtype=torch.bool)                # a parameter, but a bias
    bad["bn.weight"] = torch.ones(8, dtype=torch.bool)              # a parameter, but a norm's
    bad["nowhere.weight"] = torch.ones(2, dtype=torch.bool)         # not a parameter
    del bad["attn.in_proj_weight"]                                  # missing (required below)
    required = select_layers(net)
    with pytest.raises(MaskError) as err:
        validate(bad, net, required=required)
    msg = str(err.value)
    for expected in (
        "wrong shape: 'fc.weight' mask (3, 3) vs weight (4, 8)",
        "non-boolean: 'conv.weight' has dtype torch.float32",
        "unexpected: 'fc.bias' is a parameter but not the weight of a conv/linear layer",
        "unexpected: 'bn.weight' is a parameter but not the weight of a conv/linear layer",
        "unexpected: 'nowhere.weight' is not a parameter of the model",
        "missing: no mask for 'attn.in_proj_weight'",
    ):
        assert expected in msg, expected
    assert "6 problem(s)" in msg and "nothing was applied" in msg
    validate(masks, net, required=required)  # the good masks pass
    partial = {n: m for n, m in masks.items() if n != "conv.weight"}
    validate(partial, net)  # a layer left dense is fine unless required
    with pytest.raises(MaskError, match="missing: no mask for 'conv.weight'"):
        validate(partial, net, required=["conv.weight"])


def test_load_with_model_rejects_a_file_that_does_not_fit(tmp_path, net, masks):
    path = tmp_path / "mask.safetensors"
    save(masks, path)
    with pytest.raises(MaskError) as err:
        load(path, nn.Sequential(nn.Conv2d(3, 8, 5), nn.Linear(8, 4)))
    msg = str(err.value)
    assert msg.count("unexpected:") == 4 and "nothing was applied" in msg


def test_load_errors(tmp_path):
    with pytest.raises(MaskError, match="does not exist"):
        load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a mask file at all")
    with pytest.raises(MaskError, match="could not read"):
        load(junk)
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(2, dtype=torch.bool)], listed)
    with pytest.raises(MaskError, match="not a dict"):
        load(listed)
    floats = tmp_path / "floats.pt"
    torch.save({"fc.weight": torch.ones(4, 8)}, floats)
    with pytest.raises(MaskError, match="torch.bool"):
        load(floats)


def test_save_rejects_non_boolean(tmp_path, masks):
    with pytest.raises(MaskError, match="torch.bool"):
        save({**masks, "fc.weight": masks["fc.weight"].float()}, tmp_path / "m.safetensors")


def test_compute_file_method(tmp_path, net, masks):
    path = tmp_path / "mask.safetensors"
    save(masks, path, method="magnitude")
    got = compute(net, "file", path=path)
    assert all(torch.equal(got[n], masks[n]) for n in masks)
    compute(net, "file", 0.7, path=path)  # the requested sparsity matches the file's
    with pytest.raises(MaskError, match="not the requested"):
        compute(net, "file", 0.5, path=path)
    with pytest.raises(MaskError, match="method='file' reads the masks from a file: pass path="):
        compute(net, "file", 0.7)  # not a TypeError from deep inside


def test_round_trip_on_a_zoo_model_with_leaf_layers(tmp_path):
    torch.manual_seed(0)
    model = fxsparse.models.create("efficientnet_cc_b0_4e")
    masks = compute(model, "random", 0.9, "erk")
    assert any(n.startswith("blocks.4.0.conv_pw") for n in masks)  # CondConv2d inside a leaf
    path = tmp_path / "cc.safetensors"
    save(masks, path, method="random", requested_sparsity=0.9, model="efficientnet_cc_b0_4e")
    loaded = load(path, model, required=select_layers(model))
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert read_metadata(path)["achieved_sparsity"] == pytest.approx(0.9, abs=1e-6)


def test_validate_refuses_two_masks_for_one_tied_weight():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Tied()
    one = torch.rand(8, 8) > 0.5
    validate({"a.weight": one, "b.weight": one.clone()}, model)  # one mask, under both names: fine
    with pytest.raises(MaskError, match=r"tied: 'a.weight' and 'b.weight' are one weight .* two different masks"):
        validate({"a.weight": one, "b.weight": ~one}, model)
