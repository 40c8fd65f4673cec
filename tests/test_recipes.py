"""Recipes: the shipped ones load, malformed ones fail naming key, value and what is allowed."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

import fxsparse
from fxsparse.errors import RecipeError
from fxsparse.recipe import Recipe, Schedule, from_dict, load_recipe, schedule_overrides
from fxsparse.recipes import available
from fxsparse.transform import pass_names, register_pass, unregister_pass

SHIPPED = ("tost", "baseline", "ghost_neurons", "ghost_skips", "ghost_channels", "lrsi", "label_smoothing")
TECHNIQUES = {"ghost_neurons": "ghost_neurons", "ghost_skips": "ghost_skips", "ghost_channels": "ghost_channels",
              "lrsi": "rescale"}


def test_shipped_recipes_all_load():
    assert set(SHIPPED) <= set(available())
    for name in available():
        r = load_recipe(name)
        assert isinstance(r, Recipe) and r.name == name and r.description
        assert r.masks.enabled and r.masks.options["sparsity"] == 0.95


def test_tost_enables_the_ghosts_with_spec_defaults():
    # LRsI is off by default (chosen on validation, docs/results.md "C6 and C7"); its options are ToST's
    r = fxsparse.load_recipe("tost")
    assert [p.name for p in r.enabled_passes()] == ["masks", "ghost_neurons", "ghost_skips", "ghost_channels"]
    assert not r.passes["rescale"].enabled
    with_lrsi = fxsparse.load_recipe("tost", overrides={"rescale.enabled": True})
    assert [p.name for p in with_lrsi.enabled_passes()] == ["masks", "rescale", "ghost_neurons", "ghost_skips",
                                                            "ghost_channels"]
    assert r.passes["rescale"].options == {"iters": 180, "eta": 0.1, "gamma": 1.0, "lr": 0.01, "min_scale": 0.01,
                                           "grad_clip": 1.0, "normalize_grad": True}
    for group in ("ghost_neurons", "ghost_skips", "ghost_channels"):
        assert r.ghosts[group].schedule == Schedule(hold_until=0.0, anneal_until=0.15, shape="linear", remove_at=0.15)
    # label smoothing is off by default too (docs/results.md "N"); its options are ToST's
    ls = r.label_smoothing
    assert (ls.enabled, ls.eps, ls.form, ls.schedule.shape) == (False, 0.1, "tost", "constant")
    ls = fxsparse.load_recipe("tost", overrides={"label_smoothing.enabled": True}).label_smoothing
    assert ls.enabled and ls.eps_at(0.0) == ls.eps_at(0.99) == 0.1
    t = r.training
    assert (t.optimizer, t.momentum, t.weight_decay, t.lr, t.epochs, t.batch_size) == ("sgd", 0.9, 2e-4, 0.1, 182, 128)
    assert t.lr_schedule == "step" and t.lr_gamma == 0.1
    assert [round(m * 182) for m in t.lr_milestones] == [90, 135]


def test_baseline_and_ablations_differ_by_one_technique():
    base = load_recipe("baseline")
    assert [p.name for p in base.enabled_passes()] == ["masks"] and not base.label_smoothing.enabled
    for name, technique in TECHNIQUES.items():
        r = load_recipe(name)
        assert [p.name for p in r.enabled_passes()] == ["masks", technique], name
        assert r.training == base.training and not r.label_smoothing.enabled
        # inherited from tost through baseline: the same options and schedule as in the full recipe
        assert r.passes[technique].options == load_recipe("tost").passes[technique].options
    ls = load_recipe("label_smoothing")
    assert [p.name for p in ls.enabled_passes()] == ["masks"] and ls.label_smoothing.enabled


def test_schedule_factor_linear_and_cosine():
    lin = Schedule(0.2, 0.6, "linear", 0.6)
    cos = Schedule(0.2, 0.6, "cosine", 0.6)
    assert lin.factor(0.0) == lin.factor(0.2) == cos.factor(0.2) == 1.0
    assert lin.factor(0.4) == pytest.approx(0.5) and cos.factor(0.4) == pytest.approx(0.5)
    assert lin.factor(0.3) == pytest.approx(0.75)
    assert cos.factor(0.3) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lin.factor(0.6) == cos.factor(0.6) == cos.factor(1.0) == 0.0
    assert Schedule(0.3, 0.3, "cosine").factor(0.3) == 0.0  # a step: on, then off
    assert Schedule(shape="constant").factor(0.7) == 1.0


def test_extends_overrides_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "parent.toml").write_text('extends = "tost"\n[masks]\nsparsity = 0.8\n')
    (tmp_path / "child.toml").write_text(textwrap.dedent("""
        extends = "sub/parent.toml"
        [ghost_skips.schedule]
        anneal_until = 0.5
        remove_at = 0.6
    """))
    r = load_recipe(tmp_path / "child.toml")
    assert r.name == "child" and r.masks.options["sparsity"] == 0.8 and r.masks.options["method"] == "random"
    assert r.ghosts["ghost_skips"].schedule == Schedule(0.0, 0.5, "linear", 0.6)
    assert r.ghosts["ghost_neurons"].schedule.anneal_until == 0.15  # untouched tables stay


def test_a_restated_schedule_drops_the_inherited_schedule_plain(tmp_path, caplog):
    """A layer that sets a ghost's ``schedule`` and not its ``schedule_plain`` means that schedule on
    every network: ``--set ghost_neurons.schedule.*`` on tost, or a child's ``[ghost_neurons.schedule]``,
    reaches a plain network too (said in the log); a layer that sets both keeps both, and other
    ghosts' tables are untouched."""
    tost = load_recipe("tost").ghosts["ghost_neurons"]
    assert tost.schedule_plain == Schedule(0.6, 0.8, "linear", 0.8)
    with caplog.at_level("INFO", logger="fxsparse.recipe"):
        r = load_recipe("tost", {"ghost_neurons.schedule.anneal_until": 0.3, "ghost_neurons.schedule.remove_at": 0.3})
    g = r.ghosts["ghost_neurons"]
    assert g.schedule == Schedule(0.0, 0.3, "linear", 0.3) and g.schedule_plain is None
    assert g.schedule_for(plain=True) == g.schedule
    assert r.reads_plain  # still: plain_mask_methods reads the graph
    assert not r.replace({"ghost_neurons.plain_mask_methods": "any"}).reads_plain
    assert "the overrides set [ghost_neurons.schedule] without [ghost_neurons.schedule_plain]" in caplog.text
    # both tables in one layer: both kept (schedule_overrides writes both)
    both = load_recipe("tost", schedule_overrides("ghost_neurons", hold_until=0.0, anneal_until=0.3, remove_at=0.3))
    assert both.ghosts["ghost_neurons"].schedule_plain == Schedule(0.0, 0.3, "linear", 0.3)
    plain_only = load_recipe("tost", {"ghost_neurons.schedule_plain.hold_until": 0.5})
    assert plain_only.ghosts["ghost_neurons"].schedule_plain == Schedule(0.5, 0.8, "linear", 0.8)
    other = load_recipe("tost", {"ghost_skips.schedule.anneal_until": 0.3, "ghost_skips.schedule.remove_at": 0.3})
    assert other.ghosts["ghost_neurons"].schedule_plain == tost.schedule_plain
    # a child recipe, the same way; its own child that says nothing of schedules inherits the result
    (tmp_path / "child.toml").write_text('extends = "tost"\n[ghost_neurons.schedule]\nanneal_until = 0.3\nremove_at = 0.3\n')
    (tmp_path / "keeps.toml").write_text(textwrap.dedent("""
        extends = "tost"
        [ghost_neurons.schedule]
        anneal_until = 0.3
        remove_at = 0.3
        [ghost_neurons.schedule_plain]
        hold_until = 0.5
    """))
    (tmp_path / "grandchild.toml").write_text('extends = "child.toml"\n[masks]\nsparsity = 0.9\n')
    assert load_recipe(tmp_path / "child.toml").ghosts["ghost_neurons"].schedule_plain is None
    assert load_recipe(tmp_path / "grandchild.toml").ghosts["ghost_neurons"].schedule_plain is None
    assert load_recipe(tmp_path / "keeps.toml").ghosts["ghost_neurons"].schedule_plain == Schedule(0.5, 0.8, "linear", 0.8)


def test_overrides_and_round_trip():
    r = load_recipe("tost", overrides={"masks.sparsity": 0.98, "ghost_neurons.enabled": False})
    assert r.masks.options["sparsity"] == 0.98 and "ghost_neurons" not in r.ghosts
    assert from_dict(r.to_dict(), name="tost") == r
    r2 = r.replace({"training.lr_schedule": "cosine"})
    assert r2.training.lr_schedule == "cosine" and r.training.lr_schedule == "step"
    assert load_recipe(r) is r


# --------------------------------------------------------------------------- malformed recipes
def _error(tmp_path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return str(info.value)


BAD = {
    "unknown top-level key": ('extends = "tost"\nmask_method = "snip"\n',
                              ["mask_method", "'snip'", "allowed keys", "masks", "ghost_skips", "training"]),
    "unknown training key": ('[training]\nepoch = 10\n', ["training.epoch", "10", "epochs", "batch_size"]),
    "unknown schedule key": ('extends = "tost"\n[ghost_neurons.schedule]\nhold = 0.1\n',
                             ["ghost_neurons.schedule.hold", "hold_until", "anneal_until", "remove_at"]),
    "unknown label smoothing key": ('[label_smoothing]\nepsilon = 0.1\n', ["label_smoothing.epsilon", "eps", "form"]),
    "unknown pass option": ('extends = "tost"\n[rescale]\niterations = 10\n',
                            ["'rescale.iterations'", "10", "iters", "eta", "min_scale"]),
    "bad mask method": ('[masks]\nmethod = "magic"\n', ["masks.method", "'magic'", "'random'", "'snip'", "'synflow'"]),
    "bad distribution": ('[masks]\ndistribution = "layerwise"\n', ["masks.distribution", "'layerwise'", "'erk'"]),
    "sparsity out of range": ('[masks]\nsparsity = 1.0\n', ["masks.sparsity", "1.0", "[0, 1)"]),
    "file without path": ('[masks]\nmethod = "file"\n', ["masks.path", "method = 'file'"]),
    "wrong type": ('[training]\nlr = "fast"\n', ["training.lr", "'fast'", "a number"]),
    "bool as number": ('[training]\nepochs = true\n', ["training.epochs", "True", "integer"]),
    "bad optimizer": ('[training]\noptimizer = "adam"\n', ["training.optimizer", "'adam'", "'sgd'", "'adamw'"]),
    "bad lr schedule": ('[training]\nlr_schedule = "poly"\n', ["training.lr_schedule", "'step'", "'cosine'"]),
    "milestones out of order": ('[training]\nlr_milestones = [0.7, 0.5]\n',
                                ["training.lr_milestones", "[0.7, 0.5]", "increasing fractions"]),
    "bad shape": ('extends = "tost"\n[ghost_skips.schedule]\nshape = "exp"\n',
                  ["ghost_skips.schedule.shape", "'exp'", "'linear'", "'cosine'"]),
    "anneal before hold": ('extends = "tost"\n[ghost_skips.schedule]\nhold_until = 0.5\nanneal_until = 0.2\n',
                           ["ghost_skips.schedule.anneal_until", "0.2", "hold_until", "in order"]),
    "removal before anneal ends": ('extends = "tost"\n[ghost_channels.schedule]\nremove_at = 0.1\n',
                                   ["ghost_channels.schedule.remove_at", "0.1", "anneal_until (0.15)"]),
    "fraction above 1": ('extends = "tost"\n[ghost_neurons.schedule]\nanneal_until = 1.5\n',
                         ["ghost_neurons.schedule.anneal_until", "1.5", "[0, 1]"]),
    "ghost without schedule": ('[ghost_skips]\nenabled = true\n', ["ghost_skips.schedule", "hold_until"]),
    "missing schedule key": ('[ghost_skips]\nenabled = true\n[ghost_skips.schedule]\nhold_until = 0.1\n',
                             ["ghost_skips.schedule.anneal_until", "required"]),
    "schedule on a non-ghost": ('[rescale]\nenabled = true\n[rescale.schedule]\nhold_until = 0.1\n',
                                ["rescale.schedule", "not a ghost"]),
    "enabled not bool": ('[ghost_neurons]\nenabled = "yes"\n', ["ghost_neurons.enabled", "'yes'", "true or false"]),
    "eps out of range": ('[label_smoothing]\neps = 1.5\n', ["label_smoothing.eps", "1.5"]),
    "bad smoothing form": ('[label_smoothing]\nform = "uniform"\n', ["label_smoothing.form", "'tost'", "'torch'"]),
    "table expected": ('training = 3\n', ["training", "3", "a table"]),
    "extends missing": ('extends = "nope"\n', ["'nope'", "tost", "baseline"]),
    # option values, checked against the pass's constructor, also in a disabled table
    "bad choice in a disabled pass": ('[ghost_neurons]\nenabled = false\nsoft = "tanhh"\n',
                                      ["ghost_neurons.soft", "'tanhh'", "'mish'", "'pswish'", "'swish'"]),
    "option out of range": ('extends = "tost"\n[ghost_channels]\nratio = -0.5\n',
                            ["ghost_channels.ratio", "-0.5", "must be > 0"]),
    "option of the wrong type": ('[ghost_skips]\nmasked_branch = "yes"\n',
                                 ["ghost_skips.masked_branch", "'yes'", "true or false"]),
    "float for an integer option": ('[rescale]\niters = 180.5\n', ["rescale.iters", "180.5", "an integer"]),
    "bad list element": ('[ghost_neurons]\nkinds = ["relu", "gelu"]\n',
                         ["ghost_neurons.kinds", "'gelu'", "('relu', 'relu6')"]),
    "options that need each other": ('[ghost_neurons]\nlearn_beta = true\n',
                                     ["ghost_neurons.learn_beta", "True", "soft='pswish'"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_recipe_names_key_value_and_allowed(tmp_path, case):
    text, needles = BAD[case]
    message = _error(tmp_path, text)
    for needle in needles:
        assert needle in message, f"{case}: {needle!r} not in {message!r}"
    assert "bad.toml" in message or "nope" in message


def test_option_values_that_fit_together_load():
    r = load_recipe("baseline", overrides={"ghost_neurons.soft": "pswish", "ghost_neurons.learn_beta": True,
                                           "ghost_neurons.kinds": ["relu", "relu6"], "rescale.iters": 3})
    assert r.passes["ghost_neurons"].options["learn_beta"] is True and not r.passes["ghost_neurons"].enabled


def test_registry_sits_below_recipe_and_transform():
    import ast
    import inspect as pyinspect

    import fxsparse.recipe
    import fxsparse.registry

    def imported(module) -> set[str]:
        tree = ast.parse(pyinspect.getsource(module))
        return {(n.module or "").lstrip(".") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert not imported(fxsparse.registry) & {"recipe", "transform", "fxsparse.recipe", "fxsparse.transform"}
    assert not imported(fxsparse.recipe) & {"transform", "fxsparse.transform"}
    # the public names stay where users import them from
    assert (register_pass, unregister_pass, pass_names) == (
        fxsparse.registry.register_pass, fxsparse.registry.unregister_pass, fxsparse.registry.pass_names)


def test_invalid_toml_and_inheritance_loop(tmp_path):
    assert "not valid TOML" in _error(tmp_path, "[masks\n")
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="loops"):
        load_recipe(tmp_path / "a.toml")
    with pytest.raises(RecipeError, match="no recipe"):
        load_recipe("definitely_not_a_recipe")


def test_bad_override_names_key():
    with pytest.raises(RecipeError, match=r"ghost_skips\.schedule\.shape = 'step'"):
        load_recipe("tost", overrides={"ghost_skips.schedule.shape": "step"})


# --------------------------------------------------------------------------- transform
class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_transform_baseline_masks_and_attaches_recipe():
    model = _Small()
    masks = {"conv.weight": torch.rand(4, 3, 3, 3) > 0.5, "fc.weight": torch.rand(2, 4) > 0.5}
    x = torch.randn(2, 3, 8, 8)
    gm = fxsparse.transform(model, "baseline", masks=masks, example_inputs=x)
    assert gm.meta["fxsparse.recipe"].name == "baseline"
    assert all(torch.equal(gm.get_buffer(f"fxsparse.masks.{k}"), v) for k, v in masks.items())
    assert model.conv.weight is not gm.conv.weight  # copy=True leaves the user's model alone
    assert gm(x).shape == (2, 2)


def test_transform_lrsi_needs_data():
    with pytest.raises(RecipeError, match="data="):
        fxsparse.transform(_Small(), "lrsi", masks={}, example_inputs=torch.randn(2, 3, 8, 8))


def test_transform_skip_and_registry():
    calls = []

    class Marker(fxsparse.pass_infra.FxSparsePass):
        group = "marker"

        def __init__(self, *, note: str = ""):
            super().__init__()
            self.note = note

        def call(self, gm):
            calls.append(self.note)
            return fxsparse.pass_infra.PassResult(gm, False)

    register_pass("marker", lambda options, ctx: Marker(**options), pass_class=Marker)
    try:
        assert pass_names()[-1] == "marker"
        with pytest.raises(RecipeError, match="'marker.nots'"):
            load_recipe("baseline", overrides={"marker.enabled": True, "marker.nots": "x"})
        r = load_recipe("baseline", overrides={"marker.enabled": True, "marker.note": "ran"})
        fxsparse.transform(_Small(), r, masks={}, example_inputs=torch.randn(2, 3, 8, 8))
        assert calls == ["ran"]
        fxsparse.transform(_Small(), r, masks={}, example_inputs=torch.randn(2, 3, 8, 8), skip=["marker"])
        assert calls == ["ran"]
        with pytest.raises(RecipeError, match="names no pass"):
            fxsparse.transform(_Small(), r, skip=["nothing"])
    finally:
        unregister_pass("marker")


def test_tost_masks_its_ghost_skip_branches():
    # chosen on the validation split (docs/results.md); the ghost_skips ablation inherits it
    for name in ("tost", "ghost_skips"):
        assert load_recipe(name).passes["ghost_skips"].options["masked_branch"] is True


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def test_ghost_weights_and_branch_masks_follow_the_mask_seed():
    x = torch.randn(2, 3, 8, 8)

    def ghosts(seed):
        r = load_recipe("tost", overrides={"rescale.enabled": False, "masks.seed": seed, "masks.sparsity": 0.5})
        torch.manual_seed(0)  # the same model each time: only the seed may differ
        gm = fxsparse.transform(_Block(), r, example_inputs=x)
        return {k: v.clone() for k, v in gm.state_dict().items()
                if k.startswith(("fxsparse.ghost_skips.", "fxsparse.ghost_channels."))}

    a, a2, b = ghosts(1), ghosts(1), ghosts(2)
    assert any(k.endswith(".mask") for k in a) and any(k.startswith("fxsparse.ghost_channels.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], a2[k]) for k in a)  # reproducible
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert any(k.startswith("fxsparse.ghost_skips.") and k.endswith(".mask") for k in changed)
    assert any(k.startswith("fxsparse.ghost_channels.") for k in changed)


def test_plain_mask_methods_is_validated():
    tost = load_recipe("tost")
    assert tost.ghosts["ghost_neurons"].plain_mask_methods == ("random",)
    assert tost.mask_method == "random" and load_recipe("tost", {"masks.enabled": False}).mask_method is None
    spec = tost.ghosts["ghost_neurons"]
    assert spec.off_because(plain=True, mask_method="snip").startswith("a plain network with a 'snip' mask")
    assert spec.off_because(plain=True, mask_method="random") is None
    assert spec.off_because(plain=False, mask_method="snip") is None
    assert spec.off_because(plain=True, mask_method=None) is None  # no mask: nothing to rule out
    assert load_recipe("tost", {"ghost_neurons.plain_mask_methods": "any"}).ghosts["ghost_neurons"].plain_mask_methods is None
    two = load_recipe("tost", {"ghost_neurons.plain_mask_methods": ["random", "magnitude"]})
    assert two.ghosts["ghost_neurons"].plain_mask_methods == ("random", "magnitude")
    for bad in (["rand"], [], "random", [1]):
        with pytest.raises(RecipeError, match=r"ghost_neurons\.plain_mask_methods = .* is not allowed; allowed: \"any\", or a non-empty list"):
            load_recipe("tost", {"ghost_neurons.plain_mask_methods": bad})
    with pytest.raises(RecipeError, match=r"rescale\.plain_mask_methods = .*nothing: \[rescale\] is not a ghost"):
        load_recipe("tost", {"rescale.plain_mask_methods": ["random"]})
