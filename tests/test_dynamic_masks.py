"""Masks that move ([dynamic]: RigL, SET, gmp): the recipe keys, the update semantics of the papers,
torch.compile, DDP on 2 gloo processes (this file is also the torchrun worker), resume, inspect.

Tiny networks (a few thousand weights) and a handful of steps keep the whole file well under a minute.
"""
from __future__ import annotations

import copy
import math
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import distributed as fxdist
from fxsparse import nets
from fxsparse.errors import FxSparseError, RecipeError
from fxsparse.masks.dynamic import DynamicSchedule, drop_and_grow, probes
from fxsparse.passes.mask import masked_parameters
from fxsparse.scheduler import RecipeScheduler, restore

from conftest import torchrun_ranks

STEPS = 24


class Net(nn.Module):
    """No BatchNorm, no dropout: a forward is a pure function of weights and batch."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


def batches(n: int = STEPS, seed: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def recipe(method: str, **over):
    o = {"dynamic.enabled": True, "dynamic.method": method, "dynamic.update_every": 3, "masks.sparsity": 0.8,
         "training.lr": 0.05, "training.weight_decay": 5e-4}
    if method == "gmp":
        o.update({"dynamic.start": 0.1, "dynamic.end": 0.6})
    o.update(over)
    return fxsparse.load_recipe("baseline", overrides=o)


def build(method: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    gm = fxsparse.transform(Net(), recipe(method, **over), example_inputs=torch.zeros(2, 1, 8, 8))
    sched = RecipeScheduler(gm, total_steps=STEPS)
    sched.build_optimizer()
    return gm, sched


def train_step(sched, model, x, y):
    loss = sched.loss(model(x), y)
    sched.optimizer.zero_grad()
    loss.backward()
    sched.optimizer.step()


def snapshot(gm, opt):
    return ({k: v.detach().clone() for k, v in gm.named_parameters()},
            {k: m.clone() for k, m in masked_parameters(gm).items()},
            {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in opt.state.items()})


def counts(gm):
    return {k: int(m.sum()) for k, m in masked_parameters(gm).items()}


# --------------------------------------------------------------------------- the recipe section
@pytest.mark.parametrize("recipe_name, over, key, allowed", [
    ("rigl", {"dynamic.update_every": 0}, "dynamic.update_every = 0", "integer >= 1"),
    ("rigl", {"dynamic.start": 0.6, "dynamic.end": 0.3}, "end = 0.3 is not after start = 0.6", "start < end"),
    ("rigl", {"dynamic.method": "lottery"}, "dynamic.method = 'lottery'", "'rigl' | 'set' | 'gmp'"),
    ("rigl", {"dynamic.drop_fraction_decay": "cubic"}, "dynamic.drop_fraction_decay = 'cubic'", "'cosine'"),
    ("rigl", {"dynamic.drop_fraction": 0.0}, "dynamic.drop_fraction = 0.0", "(0, 1)"),
    ("rigl", {"dynamic.initial_sparsity": 0.5}, "initial_sparsity is a setting of method = 'gmp'", "remove it"),
    ("rigl", {"dynamic.every": 5}, "unknown key 'dynamic.every'", "update_every"),
    ("rigl", {"masks.enabled": False}, "dynamic.enabled = True", "masks.enabled = false"),
    ("set", {"masks.method": "nm", "masks.pattern": "2:4"}, "dynamic.enabled = True", "masks.method = 'nm'"),
    ("gmp", {"dynamic.initial_sparsity": 0.5, "dynamic.final_sparsity": 0.3}, "final_sparsity = 0.3 is below "
     "initial_sparsity = 0.5", "final_sparsity >= initial_sparsity"),
    ("gmp", {"dynamic.initial_sparsity": 0.6, "masks.sparsity": 0.5}, "masks.sparsity = 0.5", ">= dynamic.initial"),
])
def test_bad_dynamic_section_is_a_one_line_error_naming_key_and_allowed(recipe_name, over, key, allowed):
    with pytest.raises(RecipeError) as info:
        fxsparse.load_recipe(recipe_name, overrides=over)
    msg = str(info.value)
    assert key in msg and allowed in msg and "\n" not in msg, msg


def test_shipped_dynamic_recipes():
    for name, method in (("rigl", "rigl"), ("set", "set"), ("gmp", "gmp"), ("tost_rigl", "rigl")):
        r = fxsparse.load_recipe(name)
        assert r.passes["dynamic"].enabled and r.passes["dynamic"].options["method"] == method
    assert set(fxsparse.load_recipe("tost_rigl").ghosts) == {"ghost_neurons", "ghost_skips", "ghost_channels"}
    assert not fxsparse.load_recipe("tost").passes["dynamic"].enabled
    # gmp ends at masks.sparsity; dynamic.final_sparsity, when given, is that sparsity
    assert fxsparse.load_recipe("gmp", overrides={"dynamic.final_sparsity": 0.9}).masks.options["sparsity"] == 0.9


def test_no_maskable_layer_is_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.LayerNorm(64))
    with pytest.raises(FxSparseError) as info:
        fxsparse.transform(model, recipe("rigl"), example_inputs=torch.zeros(2, 1, 8, 8))
    msg = str(info.value)
    assert "[dynamic] (method = 'rigl')" in msg and "masks.enabled = false and dynamic.enabled = false" in msg
    assert "\n" not in msg, msg
    # with [masks] off, the dynamic pass itself refuses (nothing it could move)
    with pytest.raises(FxSparseError, match=r"\[dynamic\] method = 'rigl' moves masks, but the model has none"):
        fxsparse.transform(model, recipe("rigl"), example_inputs=torch.zeros(2, 1, 8, 8), skip=["masks"])


def test_schedules():
    s = DynamicSchedule.create(method="rigl", update_every=4, start=0.0, end=0.5, drop_fraction=0.3)
    assert s.update_steps(40) == [4, 8, 12, 16]  # start <= s < end (step 20)
    assert s.drop_fraction_at(0, 40) == pytest.approx(0.3)
    assert s.drop_fraction_at(10, 40) == pytest.approx(0.15)  # half way: cosine at 1/2
    assert s.drop_fraction_at(20, 40) == pytest.approx(0.0, abs=1e-12)
    g = DynamicSchedule.create(method="gmp", update_every=4, start=0.1, end=0.5)
    assert g.update_steps(40) == [8, 12, 16, 20]  # (start, end] on the grid, and always at end
    assert g.update_steps(42) == [9, 13, 17, 21]
    assert g.sparsity_at(0.5, 0.0, 0.8) == pytest.approx(0.8 - 0.8 * 0.125)


# --------------------------------------------------------------------------- one layer
def test_drop_and_grow_never_regrows_an_active_weight_and_keeps_the_count():
    w = torch.tensor([5.0, 0.1, 4.0, 0.2, 3.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([True, True, True, True, True, False, False, False])
    # the highest grow scores sit on active weights: they must not be picked
    score = torch.tensor([9.0, 8.0, 9.0, 0.5, 9.0, 1.0, 2.0, 0.0])
    new = drop_and_grow(w, mask, score, 0.4)  # floor(0.4 * 5) = 2 dropped: the two smallest |w|
    assert int(new.sum()) == 5
    # dropped 0.1 and 0.2; grown at the two best non-kept scores: position 1 (just dropped, 8.0) and 6 (2.0)
    assert new.tolist() == [True, True, True, False, True, False, True, False]
    assert torch.equal(drop_and_grow(w, mask, score, 0.1), mask)  # floor(0.5) = 0: nothing moves


# --------------------------------------------------------------------------- update semantics
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_per_layer_counts_constant_and_masks_move(method):
    gm, sched = build(method)  # random ERK mask at 0.8
    start = counts(gm)
    assert len(set(start.values())) == 3  # ERK: every layer its own density
    for x, y in batches():
        train_step(sched, gm, x, y)
        sched.step()
        assert counts(gm) == start
    assert [u["step"] for u in sched.mask_updates] == [3, 6, 9, 12, 15]
    assert all(u["dropped"] == u["grown"] for u in sched.mask_updates)
    assert sum(u["grown"] for u in sched.mask_updates) > 20
    assert all(r["dropped"] == r["grown"] for u in sched.mask_updates for r in u["layers"].values())


class TiedNet(Net):
    """Net with one more linear layer that shares its weight with another (tied)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.b.weight = self.a.weight

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3))
        return self.fc(F.relu(self.b(F.relu(self.a(x)))))


@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
def test_a_tied_weight_moves_as_one_mask_and_exports_as_trained(method):
    """Both layers of a tied weight hold one mask through every update (the export holds one
    tensor); RigL grows it by the sum of both layers' dense gradients; it counts once."""
    torch.manual_seed(0)
    gm = fxsparse.transform(TiedNet(), recipe(method), example_inputs=torch.zeros(2, 1, 8, 8))
    sched = RecipeScheduler(gm, total_steps=STEPS)
    sched.build_optimizer()
    masks = masked_parameters(gm)
    assert {"a.weight", "b.weight"} <= set(masks) and gm.get_parameter("a.weight") is gm.get_parameter("b.weight")
    distinct = sum(m.numel() for n, m in masks.items() if n != "b.weight")
    moved = 0
    for i, (x, y) in enumerate(batches()):
        due = method == "rigl" and sched.dynamic.schedule.is_update(i + 1, STEPS)
        train_step(sched, gm, x, y)
        if due:
            before = masks["a.weight"].clone()
            weight = gm.get_parameter("a.weight").detach().clone()
            summed = (probes(gm)["a.weight"].grad + probes(gm)["b.weight"].grad).abs()
        sched.step()
        assert torch.equal(masks["a.weight"], masks["b.weight"]), f"step {i + 1}: the tied masks came apart"
        if due:
            f = sched.mask_updates[-1]["drop_fraction"]
            assert torch.equal(masks["a.weight"], drop_and_grow(weight, before, summed, f))
    for u in sched.mask_updates:
        assert u["total"] == distinct and u["layers"]["b.weight"]["tied_to"] == "a.weight"
        moved += u["layers"]["a.weight"]["dropped"]
    assert moved > 0 and len(sched.mask_updates) >= 3
    fxsparse.masks.dynamic.finish(gm)
    model = TiedNet()
    model.load_state_dict(fxsparse.export(gm))
    x = batches(1, seed=5)[0][0]
    torch.testing.assert_close(model(x), gm(x), rtol=0, atol=0)


@pytest.mark.parametrize("method, optimizer", [("rigl", "sgd"), ("set", "adamw"), ("gmp", "sgd")])
def test_update_zeroes_changed_weights_and_their_optimizer_state_and_nothing_else(method, optimizer):
    gm, sched = build(method, **{"training.optimizer": optimizer, "training.lr": 0.01 if optimizer == "adamw" else 0.05})
    opt = sched.optimizer
    params = dict(gm.named_parameters())
    checked = 0
    for x, y in batches():
        train_step(sched, gm, x, y)
        before_p, before_m, before_s = snapshot(gm, opt)
        n = len(sched.mask_updates)
        sched.step()
        after_m = masked_parameters(gm)
        if len(sched.mask_updates) == n:
            continue
        checked += 1
        for name, p in params.items():
            if name not in after_m:  # biases: untouched
                assert torch.equal(p, before_p[name]), name
                continue
            changed = before_m[name] ^ after_m[name]
            assert torch.all(p[changed] == 0), f"{name}: a dropped or grown weight is not zero"
            assert torch.equal(p[~changed], before_p[name][~changed]), f"{name}: a weight that stayed moved"
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    assert torch.all(value[changed] == 0), f"{name}.{key} not zeroed where the mask changed"
                    assert torch.equal(value[~changed], before_s[id(p)][key][~changed]), f"{name}.{key} drifted"
        # the stored zeros stay zero while masked: no momentum or weight decay moves them afterwards
        gone = {k: before_m[k] & ~after_m[k] for k in after_m}
        x, y = batches(1, seed=99)[0]
        train_step(sched, gm, x, y)
        for k, g in gone.items():
            if bool(masked_parameters(gm)[k][g].any()):
                continue  # (never: no update in between)
            assert torch.all(params[k][g] == 0), f"{k}: a dropped weight drifted from zero"
    assert checked >= 3


def test_rigl_grows_by_the_dense_gradient_of_the_same_backward():
    gm, sched = build("rigl")
    reference = Net()
    calls = []
    gm.register_forward_pre_hook(lambda *_: calls.append(1))
    checked = 0
    for i, (x, y) in enumerate(batches()):
        step = i + 1
        due = sched.dynamic.schedule.is_update(step, STEPS)
        if due:  # the dense gradient of the loss wrt the effective weights w * mask, computed apart
            eff = {k: (gm.get_parameter(k) * m).detach().requires_grad_(True) for k, m in masked_parameters(gm).items()}
            state = {**{k: v.detach() for k, v in gm.named_parameters()}, **eff}
            loss = F.cross_entropy(torch.func.functional_call(reference, state, (x,)), y)
            dense = dict(zip(eff, torch.autograd.grad(loss, list(eff.values()))))
        train_step(sched, gm, x, y)
        old = {k: m.clone() for k, m in masked_parameters(gm).items()}
        weights = {k: gm.get_parameter(k).detach().clone() for k in old}  # after the optimizer step
        sched.step()
        if not due:
            continue
        checked += 1
        f = sched.mask_updates[-1]["drop_fraction"]
        for k, m in masked_parameters(gm).items():
            got = probes(gm)[k].grad
            assert torch.allclose(got, dense[k], atol=1e-6, rtol=1e-5), k  # the probe holds the dense gradient
            assert bool((got[~old[k]] != 0).any()), "the gradient at pruned positions is not zero: it is dense"
            assert torch.equal(m, drop_and_grow(weights[k], old[k], dense[k].abs(), f)), k
    assert checked == 5
    assert len(calls) == STEPS  # one forward per step: no extra pass for the scores


def test_gmp_reaches_final_sparsity_exactly_on_the_cubic_schedule():
    torch.manual_seed(0)
    r = recipe("gmp", **{"masks.distribution": "erk"})
    final = fxsparse.masks.compute(fxsparse.trace(Net(), torch.zeros(2, 1, 8, 8)), "magnitude", 0.8, "erk")
    torch.manual_seed(0)
    gm = fxsparse.transform(Net(), r, example_inputs=torch.zeros(2, 1, 8, 8))
    sched = RecipeScheduler(gm, total_steps=STEPS)
    sched.build_optimizer()
    assert all(bool(m.all()) for m in masked_parameters(gm).values())  # gmp starts dense
    a, b = math.ceil(0.1 * STEPS), math.ceil(0.6 * STEPS)  # 3, 15
    previous = {k: m.clone() for k, m in masked_parameters(gm).items()}
    for x, y in batches():
        train_step(sched, gm, x, y)
        sched.step()
        now = masked_parameters(gm)
        assert all(not bool((now[k] & ~previous[k]).any()) for k in now), "gmp regrew a weight"
        previous = {k: m.clone() for k, m in now.items()}
        if sched.mask_updates and sched.mask_updates[-1]["step"] == sched.step_count:
            p = min(1.0, (sched.step_count - a) / (b - a))
            for k, m in now.items():
                pruned_final = m.numel() - int(final[k].sum())
                want = m.numel() - round(pruned_final + (0 - pruned_final) * (1 - p) ** 3)  # s_f + (s_i - s_f)(1-p)^3
                assert int(m.sum()) == want, (sched.step_count, k)
    assert [u["step"] for u in sched.mask_updates] == [6, 9, 12, 15]
    assert counts(gm) == {k: int(v.sum()) for k, v in final.items()}  # the [masks] mask's per-layer counts
    assert sched.mask_updates[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert sched.dynamic.finished and "dynamic" not in dict(gm.named_children()).get("fxsparse")._modules


def test_probes_survive_a_conversion_after_the_transform():
    """``gm.double()`` (or ``.to(device)``) turns each probe buffer into a copy that is no leaf; the
    scheduler puts leaves back, so the next update still sees the dense gradient."""
    gm, sched = build("rigl")
    gm.double()
    assert not all(p.is_leaf for p in probes(gm).values())
    for x, y in batches(3):
        train_step(sched, gm, x.double(), y)
        sched.step()
    assert all(p.is_leaf and p.requires_grad for p in probes(gm).values())
    assert sched.mask_updates[-1]["grown"] > 0
    assert all(bool((p.grad[~m] != 0).any()) for p, m in zip(probes(gm).values(), masked_parameters(gm).values()))


# --------------------------------------------------------------------------- compile
@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
def test_compiled_updates_recompile_nothing(method):
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    eager, s_eager = build(method)
    gm, sched = build(method)
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    end = sched.dynamic.schedule.end_step(STEPS)
    for x, y in batches():
        train_step(sched, compiled, x, y)
        train_step(s_eager, eager, x, y)
        sched.step()
        s_eager.step()
        if sched.step_count < end:
            assert counter.frame_count == 1, f"step {sched.step_count}: recompiled"
    assert len(sched.mask_updates) == len(sched.dynamic.schedule.update_steps(STEPS)) >= 4
    assert not counters["graph_break"], dict(counters["graph_break"])
    # the end of the phase removes the probes (rigl) or the per-layer targets (gmp) from the graph:
    # one recompile, as a ghost removal; set added nothing to remove
    assert counter.frame_count == (1 if method == "set" else 2)
    for k, m in masked_parameters(eager).items():  # the compiled run moved the masks exactly as eager did
        assert torch.equal(masked_parameters(gm)[k], m), k
    torch._dynamo.reset()


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("method, at", [("rigl", 7), ("set", 16), ("gmp", 10)])
def test_resume_gives_the_same_masks_and_weights(method, at):
    data = batches()
    gm, sched = build(method)
    ckpt = None
    for i, (x, y) in enumerate(data):
        train_step(sched, gm, x, y)
        sched.step()
        if i + 1 == at:
            ckpt = copy.deepcopy(sched.checkpoint())
    torch.manual_seed(0)
    resumed = restore(Net(), ckpt, example_inputs=torch.zeros(2, 1, 8, 8))
    for x, y in data[at:]:
        train_step(resumed, resumed.gm, x, y)
        resumed.step()
    a, b = sched.checkpoint(), resumed.checkpoint()
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["scheduler"]["dynamic"] == b["scheduler"]["dynamic"]


# --------------------------------------------------------------------------- with ghosts
def test_tost_rigl_through_the_ghost_removals_to_export():
    over = {"dynamic.update_every": 2, "masks.sparsity": 0.8, "rescale.enabled": True, "rescale.iters": 2}
    for g in ("ghost_neurons", "ghost_skips", "ghost_channels"):
        over.update({f"{g}.schedule.hold_until": 0.1, f"{g}.schedule.anneal_until": 0.25,
                     f"{g}.schedule.remove_at": 0.25})
    r = fxsparse.load_recipe("tost_rigl", overrides=over)
    torch.manual_seed(0)
    model = nets.resnet8(in_chans=1, num_classes=10)
    data = batches(size=8)
    gm = fxsparse.transform(model, r, data=data[:2])
    assert fxsparse.ghosts.present(gm) and len(probes(gm)) == len(masked_parameters(gm))
    sched = RecipeScheduler(gm, total_steps=STEPS)
    sched.build_optimizer()
    start = counts(gm)
    for x, y in data:
        train_step(sched, gm, x, y)
        sched.step()
        assert counts(gm) == start
    assert [e["group"] for e in sched.events] == ["ghost_neurons", "ghost_skips", "ghost_channels"]
    assert sched.events[0]["step"] < sched.mask_updates[-1]["step"]  # updates went on after the removals
    assert sched.dynamic.finished and not probes(gm)
    fresh = nets.resnet8(in_chans=1, num_classes=10)
    fresh.load_state_dict(fxsparse.export(gm), strict=True)


# --------------------------------------------------------------------------- metrics, plots, inspect
def test_churn_plot_and_inspect(tmp_path):
    from fxsparse.inspect import inspect_graph, summary_lines
    from fxsparse.tools.plots import plot_run

    gm, sched = build("rigl")
    for x, y in batches(7):
        train_step(sched, gm, x, y)
        sched.step()
    records = [{"type": "mask_update", **u} for u in sched.mask_updates]
    paths = plot_run(records, tmp_path)
    assert (tmp_path / "mask_churn.png").stat().st_size > 0 and tmp_path / "mask_churn.png" in paths
    lines = summary_lines(inspect_graph(gm))
    assert any(line.startswith("dynamic masks: rigl, every 3 steps") for line in lines), lines
    assert any("cosine decay" in line for line in lines)
    # the probes do not hide the layers from the graph queries
    assert len(fxsparse.graph.parameterized_layers(gm)) == 3


# --------------------------------------------------------------------------- DDP (2 gloo processes)
def ddp_run(method: str) -> dict:
    fxdist.seed(0)
    gm = fxsparse.transform(Net(), recipe(method), example_inputs=torch.zeros(2, 1, 8, 8))
    sched = RecipeScheduler(gm, total_steps=STEPS)
    sched.build_optimizer()
    model = fxdist.wrap(gm, scheduler=sched)
    fxdist.seed(0, per_rank=True)
    local = []
    for i, (x, y) in enumerate(batches(seed=1)):
        x, y = x.chunk(2)[fxdist.rank()], y.chunk(2)[fxdist.rank()]  # each rank its half of the global batch
        train_step(sched, model, x, y)
        if method == "rigl" and sched.dynamic.schedule.is_update(i + 1, STEPS):
            # what this rank alone would decide from its own half-batch gradient (not what RigL does)
            local.append({k: drop_and_grow(gm.get_parameter(k), m, probes(gm)[k].grad.abs(),
                                           sched.dynamic.schedule.drop_fraction_at(i + 1, STEPS))
                          for k, m in masked_parameters(gm).items()})
        model = fxdist.step(sched, model)
    return {"masks": {k: m.clone() for k, m in masked_parameters(gm).items()},
            "state": {k: v.clone() for k, v in gm.state_dict().items()}, "updates": sched.mask_updates,
            "local": local}


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    env = fxdist.init(timeout=timedelta(seconds=60))
    result = {"world": env.world_size, **{method: ddp_run(method) for method in ("rigl", "set", "gmp")}}
    torch.save(result, out / f"rank{env.rank}.pt")
    fxdist.destroy()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))


def test_ddp_ranks_make_the_identical_update(tmp_path):
    r0, r1 = torchrun_ranks(__file__, tmp_path)
    assert r0["world"] == 2
    for method in ("rigl", "set", "gmp"):
        a, b = r0[method], r1[method]
        assert len(a["updates"]) >= 4 and sum(u["dropped"] for u in a["updates"]) > 0
        assert (sum(u["grown"] for u in a["updates"]) > 0) == (method != "gmp")  # gmp only prunes
        assert a["updates"] == b["updates"]
        for k in a["masks"]:  # bitwise the same masks, weights and everything else on both ranks
            assert torch.equal(a["masks"][k], b["masks"][k]), (method, k)
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), (method, k)
    # the ranks' own half-batch gradients would have moved the masks differently
    differ = [k for lo, hi in zip(r0["rigl"]["local"], r1["rigl"]["local"]) for k in lo if not torch.equal(lo[k], hi[k])]
    assert differ, "the test cannot tell: both ranks saw the same gradients"


def test_an_update_without_the_optimizer_is_refused_not_left_half_done():
    # momentum kept at a regrown weight would move it off zero: the update needs the optimizer's state
    torch.manual_seed(0)
    gm = fxsparse.transform(Net(), recipe("set"), example_inputs=torch.zeros(2, 1, 8, 8))
    sched = RecipeScheduler(gm, total_steps=STEPS)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)  # the user's own, not attached
    before = {k: m.clone() for k, m in masked_parameters(gm).items()}
    with pytest.raises(FxSparseError, match=r"no optimizer whose state it must zero.*optimizer=opt") as info:
        for x, y in batches():
            loss = sched.loss(gm(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    assert "\n" not in str(info.value) and sched.dynamic.schedule.is_update(sched.step_count, STEPS)
    assert all(torch.equal(before[k], m) for k, m in masked_parameters(gm).items())  # nothing moved
