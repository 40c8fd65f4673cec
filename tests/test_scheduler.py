"""RecipeScheduler: gate schedules, removal (graph + optimizer), label smoothing, exact resume.

Most tests run on a toy ghost group (a gated side branch added to a tiny CNN's logits) installed
in place of ``ghost_skips``, so they depend only on the scheduler's contract with the ghost
conventions (gate buffer, tagged nodes, ``fxsparse.<group>`` container, removal pass), not on
any real ghost pass. ``test_tost_end_to_end`` runs the real passes once they are installed.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

import fxsparse
import fxsparse.ghosts
from fxsparse import gates
from fxsparse.pass_infra import FxSparsePass, container, delete_container, tagged_nodes
from fxsparse.passes import GHOST_GROUPS
from fxsparse.errors import RecipeError
from fxsparse.scheduler import (RecipeScheduler, distillation_loss, drop_parameters, lr_factor, restore,
                                 smoothed_cross_entropy)

GROUP = "ghost_skips"


# --------------------------------------------------------------------------- a toy ghost group
class ToySkipPass(FxSparsePass):
    """logits += gate * Linear(mean of the input image): a gated branch with parameters."""

    group = GROUP

    def __init__(self, *, init: float = 1e-4, masked_branch: bool = False, where: str = "all"):  # tost.toml's ghost_skips options
        super().__init__()

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        logits, x = out.args[0], next(n for n in gm.graph.nodes if n.op == "placeholder")
        channels = x.meta["tensor_meta"].shape[1]
        classes = logits.meta["tensor_meta"].shape[-1]
        container(gm, GROUP).add_module("head", nn.Linear(channels, classes))
        gate_target = gates.register(gm, GROUP)
        with gm.graph.inserting_before(out):
            gate = self.tag(gm.graph.get_attr(gate_target), "gate")
            pooled = self.tag(gm.graph.call_method("mean", (x, (2, 3))), "branch")
            branch = self.tag(gm.graph.call_module(f"fxsparse.{GROUP}.head", (pooled,)), "branch")
            scaled = self.tag(gm.graph.call_function(torch.mul, (gate, branch)), "scaled")
            merged = self.tag(gm.graph.call_function(torch.add, (logits, scaled)), "merge")
        out.args = (merged,)
        self.stats["branches"] += 1
        return PassResult(gm, True)


class RemoveToySkipPass(FxSparsePass):
    group = GROUP

    def call(self, gm):
        for merge in tagged_nodes(gm, group=GROUP, role="merge"):
            merge.replace_all_uses_with(merge.args[0])
        for node in reversed(tagged_nodes(gm, group=GROUP)):
            gm.graph.erase_node(node)
        delete_container(gm, GROUP)
        gates.unregister(gm, GROUP)
        self.stats["removed"] += 1
        return PassResult(gm, True)


@pytest.fixture
def toy_ghost(monkeypatch):
    mod = types.ModuleType("fxsparse.passes._toy_ghost")
    mod.ToySkipPass, mod.RemoveToySkipPass = ToySkipPass, RemoveToySkipPass
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(GHOST_GROUPS, GROUP, ("_toy_ghost:ToySkipPass", "_toy_ghost:RemoveToySkipPass"))


class Tiny(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _masks(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) > 0.5 for n, p in model.named_parameters() if n.endswith("weight")}


# The toy group keeps a schedule of its own (tost's before 2026-11-29: hold 0.1, cosine to 0.3,
# removal at 0.3), so that these tests check the scheduler, not tost's current default
TOY = {"rescale.enabled": False, "ghost_neurons.enabled": False, "ghost_channels.enabled": False,
       "ghost_skips.enabled": True, **{f"{GROUP}.schedule.{k}": v for k, v in
                                       {"hold_until": 0.1, "anneal_until": 0.3, "shape": "cosine",
                                        "remove_at": 0.3}.items()}}


def _toy_recipe(**overrides):
    return fxsparse.load_recipe("tost", overrides={**TOY, **overrides})


def _transformed(recipe=None, seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    x = torch.randn(4, 3, 8, 8)
    gm = fxsparse.transform(model, recipe or _toy_recipe(), masks=_masks(model), example_inputs=x)
    return model, gm


def _batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(n)]


# --------------------------------------------------------------------------- schedules
def test_schedule_linear_values_at_hold_anneal_remove(toy_ghost):
    sched_cfg = {"ghost_skips.schedule.hold_until": 0.1, "ghost_skips.schedule.anneal_until": 0.3,
                 "ghost_skips.schedule.shape": "linear", "ghost_skips.schedule.remove_at": 0.5}
    _, gm = _transformed(_toy_recipe(**sched_cfg))
    sched = RecipeScheduler(gm, total_steps=100)
    seen = {}
    for step in range(0, 60):
        seen[step] = sched.gates.get(GROUP)
        sched.step()
    assert all(seen[s] == 1.0 for s in range(0, 11))  # held through hold_until*T
    assert seen[15] == pytest.approx(0.75)
    assert seen[20] == pytest.approx(0.5)
    assert seen[29] == pytest.approx(0.05)
    assert all(seen[s] == 0.0 for s in range(30, 50))  # annealed, still present until remove_at
    assert all(seen[s] is None for s in range(50, 60))  # removed at remove_at*T
    assert sched.events == [{"event": "remove", "group": GROUP, "step": 50, "fraction": 0.5, "parameters": 20,
                             "tensors": 2, "dropped_from_optimizer": 0}]


def test_schedule_cosine_values(toy_ghost):
    _, gm = _transformed()  # TOY's schedule: hold 0.1, cosine to 0.3, remove at 0.3
    sched = RecipeScheduler(gm, total_steps=200)
    values = []
    for _ in range(80):
        values.append(sched.gates.get(GROUP))
        sched.step()
    assert values[20] == 1.0
    assert values[30] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert values[40] == pytest.approx(0.5)
    assert values[50] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert values[59] == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert values[60] is None and sched.removed == [GROUP] and sched.events[0]["step"] == 60
    assert all(a >= b for a, b in zip(values[:60], values[1:60]))  # never goes back up


# --------------------------------------------------------------------------- start = "learning"
LEARNING = {"ghost_skips.schedule.hold_until": 0.0, "ghost_skips.schedule.anneal_until": 0.2,
            "ghost_skips.schedule.shape": "linear", "ghost_skips.schedule.remove_at": 0.2,
            "ghost_skips.schedule.start": "learning"}


def test_learning_start_holds_the_gate_until_the_loss_falls(toy_ghost):
    """Flat losses for 24 steps, then lower: the loss has begun to fall at the first step whose
    last 5 losses average 2% below the first 5 (step 27 here: three of its last five are 2.20);
    the gate is 1 until then and the schedule's fractions count from there: linear to 0 over
    0.2 * T, removal at 27 + 20."""
    _, gm = _transformed(_toy_recipe(**LEARNING))
    sched = RecipeScheduler(gm, total_steps=100)
    assert sched.waits_for_learning and sched.removal_step(GROUP) is None
    losses = [2.30] * 24 + [2.20] * 76  # the last 5's mean <= 0.98 * 2.30 = 2.254 once 3 of them are 2.20
    gates_seen = {}
    for step, loss in enumerate(losses, start=1):
        sched.step(loss)
        gates_seen[step] = sched.gates.get(GROUP)
    assert sched.learning_step == 27 and not sched.onset.forced
    assert all(gates_seen[s] == 1.0 for s in range(1, 28))
    assert gates_seen[37] == pytest.approx(0.5)  # (37 - 27) / 100 of a 0.2 anneal
    assert sched.removal_step(GROUP) == 47 and sched.events[0]["step"] == 47
    assert gates_seen[46] == pytest.approx(0.05) and gates_seen[47] is None


def test_learning_start_needs_the_loss_and_meets_its_deadline(toy_ghost):
    _, gm = _transformed(_toy_recipe(**LEARNING))
    sched = RecipeScheduler(gm, total_steps=50)
    with pytest.raises(ValueError, match=r"or pass it, sched.step\(loss\)"):
        sched.step()
    assert sched.step_count == 0  # the refused step did not count
    # a loss that never falls: the schedule starts at the last step that still removes the ghost
    # by the end (50 - 0.2 * 50 = 40), so the trained network is the original one all the same
    _, gm = _transformed(_toy_recipe(**LEARNING))
    sched = RecipeScheduler(gm, total_steps=50)
    for _ in range(50):
        sched.step(2.3)
    assert sched.learning_step == 40 and sched.onset.forced
    assert sched.removed == [GROUP] and sched.events[0]["step"] == 50
    # a schedule that counts from step 0 needs no loss: the default, as before
    _, gm = _transformed()
    plain = RecipeScheduler(gm, total_steps=50)
    assert not plain.waits_for_learning and plain.onset is None
    plain.step()


def _logits_with_loss(loss: float, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (requiring grad) and targets whose cross-entropy is ``loss``: the target's logit
    ``a`` above nine zeros gives ``log(9 + e^a) - a``, solved for ``a``."""
    a = math.log((classes - 1) * math.exp(-loss) / (1 - math.exp(-loss)))
    logits = torch.zeros(2, classes)
    logits[:, 0] = a
    return logits.requires_grad_(), torch.zeros(2, dtype=torch.long)


def test_learning_start_reads_the_loss_sched_loss_computed(toy_ghost):
    """The five-line loop needs no change: ``sched.step()`` reads the training losses that
    ``sched.loss`` computed since the last step (their mean under gradient accumulation), never an
    evaluation's (no graph), and finds the same onset as when each loss is passed."""
    losses = [2.30] * 24 + [2.20] * 76
    _, gm = _transformed(_toy_recipe(**LEARNING))
    passed = RecipeScheduler(gm, total_steps=100)
    for loss in losses:
        passed.step(loss)
    _, gm = _transformed(_toy_recipe(**LEARNING))
    sched = RecipeScheduler(gm, total_steps=100)
    for loss in losses:
        with torch.no_grad():  # an evaluation between steps: not a training loss
            sched.loss(*_logits_with_loss(9.0))
        for micro in (loss - 0.05, loss + 0.05):  # two micro-batches of one optimizer step
            sched.loss(*_logits_with_loss(micro))
        if sched.waits_for_learning:
            assert sched.step_loss.item() == pytest.approx(loss, abs=1e-5)
        sched.step()
    assert sched.learning_step == passed.learning_step == 27
    assert sched.events == passed.events and sched.step_loss is None  # nothing recorded once found
    # an evaluation's loss alone is no step's loss: still refused
    _, gm = _transformed(_toy_recipe(**LEARNING))
    sched = RecipeScheduler(gm, total_steps=100)
    with torch.no_grad():
        sched.loss(*_logits_with_loss(2.3))
    with pytest.raises(ValueError, match=r"compute the training loss with sched.loss"):
        sched.step()


@pytest.mark.parametrize("stop", [8, 30], ids=["still-waiting", "after-onset"])
def test_learning_start_resumes_exactly(toy_ghost, stop):
    losses = [2.30] * 24 + [2.20] * 76
    _, gm = _transformed(_toy_recipe(**LEARNING))
    sched = RecipeScheduler(gm, total_steps=100)
    for loss in losses[:stop]:
        sched.step(loss)
    state = copy.deepcopy(sched.state_dict())
    _, gm2 = _transformed(_toy_recipe(**LEARNING))
    resumed = RecipeScheduler(gm2, total_steps=100)
    resumed.load_state_dict(state)
    assert resumed.waits_for_learning == (stop < 27) and resumed.gates == sched.gates
    for loss in losses[stop:]:
        sched.step(loss)
        resumed.step(loss)
        assert resumed.gates == sched.gates
    assert resumed.learning_step == sched.learning_step == 27 and resumed.events == sched.events


def test_learning_start_is_a_ghost_schedule_key():
    r = fxsparse.load_recipe("tost", overrides={"ghost_channels.schedule.start": "learning"})
    assert r.ghosts["ghost_channels"].schedule.start == "learning"
    assert "counted from the step the training loss starts to fall" in r.ghosts["ghost_channels"].schedule.describe()
    assert fxsparse.load_recipe("tost").ghosts["ghost_channels"].schedule.start == "step"
    with pytest.raises(RecipeError, match="ghost_channels.schedule.start"):
        fxsparse.load_recipe("tost", overrides={"ghost_channels.schedule.start": "loss"})
    with pytest.raises(RecipeError, match="label_smoothing.schedule"):
        fxsparse.load_recipe("tost", overrides={"label_smoothing.schedule.start": "learning"})


def test_removal_at_first_step_past_fraction(toy_ghost):
    # 0.3 * 10 is 3.0000000000000004 in floating point; the removal is still due at step 3
    _, gm = _transformed()
    sched = RecipeScheduler(gm, total_steps=10)
    assert sched.removal_step(GROUP) == 3
    for _ in range(3):
        sched.step()
    assert sched.removed == [GROUP]


def test_removal_restores_original_graph(toy_ghost):
    model, gm = _transformed()
    before = fxsparse.transform(model, fxsparse.load_recipe("baseline"), masks=_masks(model),
                                example_inputs=torch.randn(4, 3, 8, 8))
    sched = RecipeScheduler(gm, total_steps=10)
    while not sched.removed:
        sched.step()
    assert not fxsparse.ghosts.present(gm)
    assert fxsparse.graph.same_structure(gm, before)
    assert not any(k.startswith(f"fxsparse.{GROUP}") for k in gm.state_dict())


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05),
], ids=["sgd", "adamw"])
def test_removal_drops_params_and_state_from_optimizer(toy_ghost, make_opt):
    _, gm = _transformed()
    ghost_params = fxsparse.ghosts.parameters(gm, GROUP)
    assert len(ghost_params) == 2
    opt = make_opt(gm.parameters())  # one plain group, ghosts mixed in
    sched = RecipeScheduler(gm, total_steps=10, optimizer=opt)
    for x, y in _batches(3):
        assert not sched.removed
        opt.zero_grad()
        sched.loss(gm(x), y).backward()
        opt.step()
        sched.step()
    assert sched.removed == [GROUP]
    ids = {id(p) for p in ghost_params}
    assert not any(id(p) in ids for g in opt.param_groups for p in g["params"])
    assert not any(id(p) in ids for p in opt.state)
    assert sched.events[0]["dropped_from_optimizer"] == 2
    n_main = len(list(gm.parameters()))
    assert len(opt.state) == n_main and len(opt.state_dict()["state"]) == n_main
    for x, y in _batches(2, seed=5):  # training goes on without the ghost
        opt.zero_grad()
        sched.loss(gm(x), y).backward()
        opt.step()


def test_build_optimizer_groups_and_empty_group_after_removal(toy_ghost):
    _, gm = _transformed()
    sched = RecipeScheduler(gm, total_steps=10)
    opt = sched.build_optimizer()
    assert [g["fxsparse_group"] for g in opt.param_groups] == ["main", GROUP]
    assert len(opt.param_groups[1]["params"]) == 2
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 2e-4
    lr = sched.build_lr_scheduler()
    for x, y in _batches(4):
        opt.zero_grad()
        sched.loss(gm(x), y).backward()
        opt.step()
        lr.step()
        sched.step()
    # the ghost group stays, empty, so that lr schedulers and load_state_dict keep lining up
    assert opt.param_groups[1]["params"] == [] and len(opt.param_groups) == 2
    assert sched.ghost_param_groups(lr=0.5) == [{"params": [], "fxsparse_group": GROUP, "lr": 0.5}]


def test_drop_parameters_keeps_others():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step()
    assert drop_parameters(opt, [b]) == 1
    assert opt.param_groups[0]["params"] == [a] and list(opt.state) == [a]


def test_lr_factor_step_and_cosine():
    r = fxsparse.load_recipe("tost")
    t = r.training
    assert lr_factor(0, 182, t) == 1.0 and lr_factor(89, 182, t) == 1.0
    assert lr_factor(90, 182, t) == pytest.approx(0.1) and lr_factor(135, 182, t) == pytest.approx(0.01)
    c = r.replace({"training.lr_schedule": "cosine", "training.warmup": 0.1}).training
    assert lr_factor(0, 100, c) == pytest.approx(0.1) and lr_factor(9, 100, c) == pytest.approx(1.0)
    assert lr_factor(55, 100, c) == pytest.approx(0.5) and lr_factor(100, 100, c) == pytest.approx(0.0)


def test_scheduler_errors(toy_ghost):
    _, gm = _transformed()
    with pytest.raises(ValueError, match="total_steps"):
        RecipeScheduler(gm, total_steps=0)
    plain = fxsparse.trace(Tiny(), torch.randn(2, 3, 8, 8))
    with pytest.raises(fxsparse.RecipeError, match="recipe"):
        RecipeScheduler(plain, total_steps=10)


# --------------------------------------------------------------------------- label smoothing
def _direct_tost(logits, targets, eps):
    c = logits.shape[-1]
    q = torch.full_like(logits, eps / (c - 1))
    q.scatter_(1, targets[:, None], 1 - eps)
    return -(q * logits.log_softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_tost_form_matches_direct_formula(eps):
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(16, 10, generator=gen, dtype=torch.float64), torch.randint(0, 10, (16,), generator=gen)
    assert torch.allclose(smoothed_cross_entropy(logits, targets, eps), _direct_tost(logits, targets, eps))
    torch_form = smoothed_cross_entropy(logits, targets, eps, form="torch")
    assert torch.allclose(torch_form, F.cross_entropy(logits, targets, label_smoothing=eps))
    if eps:
        assert not torch.allclose(torch_form, _direct_tost(logits, targets, eps))  # the forms really differ
    per_sample = smoothed_cross_entropy(logits, targets, eps, reduction="none")
    assert per_sample.shape == (16,) and torch.allclose(per_sample.mean(), _direct_tost(logits, targets, eps))


def test_scheduler_loss_follows_recipe(toy_ghost):
    logits, targets = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
    _, gm = _transformed(_toy_recipe(**{"label_smoothing.enabled": True, "label_smoothing.schedule.shape": "linear",
                                        "label_smoothing.schedule.hold_until": 0.0,
                                        "label_smoothing.schedule.anneal_until": 1.0}))
    sched = RecipeScheduler(gm, total_steps=10)
    assert sched.label_smoothing == pytest.approx(0.1)
    assert torch.allclose(sched.loss(logits, targets), _direct_tost(logits, targets, 0.1))
    for _ in range(5):
        sched.step()
    assert sched.label_smoothing == pytest.approx(0.05)
    assert torch.allclose(sched.loss(logits, targets), _direct_tost(logits, targets, 0.05))
    _, gm = _transformed(fxsparse.load_recipe("baseline"))
    off = RecipeScheduler(gm, total_steps=10)
    assert off.label_smoothing == 0.0
    assert torch.allclose(off.loss(logits, targets), F.cross_entropy(logits, targets))


# --------------------------------------------------------------------------- resume
def _train(sched, batches):
    opt, lr = sched.optimizer, sched.lr_scheduler
    for x, y in batches:
        opt.zero_grad()
        sched.loss(sched.gm(x), y).backward()
        opt.step()
        lr.step()
        sched.step()


@pytest.mark.parametrize("stop", [2, 7], ids=["before-removal", "after-removal"])
def test_resume_gives_identical_continuation(toy_ghost, stop):
    total = 12
    batches = _batches(total)
    _, gm = _transformed()
    sched = RecipeScheduler(gm, total_steps=total)
    sched.build_optimizer()
    sched.build_lr_scheduler()
    _train(sched, batches[:stop])
    ckpt = copy.deepcopy(sched.checkpoint())
    assert (GROUP in ckpt["scheduler"]["removed"]) == (stop >= 4)
    _train(sched, batches[stop:])
    assert sched.removed == [GROUP]

    torch.manual_seed(123)  # a fresh, differently initialised instance of the original model
    resumed = restore(Tiny(), ckpt, example_inputs=torch.randn(4, 3, 8, 8))
    assert resumed.step_count == stop and resumed.events == ckpt["scheduler"]["events"]
    _train(resumed, batches[stop:])

    final, again = sched.gm.state_dict(), resumed.gm.state_dict()
    assert final.keys() == again.keys()
    for k in final:
        assert torch.equal(final[k], again[k]), k
    assert resumed.events == sched.events
    assert resumed.optimizer.param_groups[0]["lr"] == sched.optimizer.param_groups[0]["lr"]


def test_load_state_dict_replays_removal_before_weights(toy_ghost):
    _, gm = _transformed()
    sched = RecipeScheduler(gm, total_steps=10)
    for _ in range(5):
        sched.step()
    state, weights = sched.state_dict(), gm.state_dict()
    _, fresh = _transformed(seed=3)
    with pytest.raises(RuntimeError):  # weights first: the ghost's keys are missing
        fresh.load_state_dict(weights)
    other = RecipeScheduler(fresh, total_steps=10)
    other.load_state_dict(state)
    fresh.load_state_dict(weights)  # strict, after the removal replay
    assert other.removed == [GROUP] and other.step_count == 5
    with pytest.raises(ValueError, match="total_steps"):
        RecipeScheduler(_transformed()[1], total_steps=20).load_state_dict(state)


# --------------------------------------------------------------------------- distillation
DISTILL = {"distill.enabled": True, "distill.at": GROUP, "distill.alpha": 0.7, "distill.temperature": 3.0}


def test_distillation_loss_is_the_tempered_kl():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen, dtype=torch.float64)
    expected = F.kl_div(F.log_softmax(s / 3, 1), F.softmax(t / 3, 1), reduction="batchmean") * 9
    assert torch.allclose(distillation_loss(s, t, 3.0), expected)
    assert torch.allclose(distillation_loss(s, t, 3.0, "none").sum(), distillation_loss(s, t, 3.0, "sum"))
    assert distillation_loss(s, s, 3.0).abs() < 1e-12  # no pull when the student already agrees
    s.requires_grad_(True)
    distillation_loss(s, t.requires_grad_(True), 3.0).backward()
    assert t.grad is None  # the teacher's side is a target, never trained


def test_teacher_is_a_frozen_copy_taken_when_the_anneal_begins(toy_ghost):
    total = 12  # hold_until 0.1: the anneal begins at step 2; removal at 0.3: step 4
    batches = _batches(total)
    # label smoothing on: the distilled loss mixes the smoothed cross-entropy
    _, gm = _transformed(_toy_recipe(**DISTILL, **{"label_smoothing.enabled": True}))
    sched = RecipeScheduler(gm, total_steps=total)
    sched.build_optimizer()
    sched.build_lr_scheduler()
    assert sched.teacher_step == 2
    x, y = batches[0]
    assert sched.teacher_logits(x) is None
    _train_distilled(sched, batches[:2])
    assert sched.teacher is not None and gates.get(sched.teacher) == {GROUP: 1.0}
    # the copy was taken before this step moved the student's gate: the weights it trained at gate 1
    assert gates.get(gm)[GROUP] < 1.0
    snapshot = {k: v.clone() for k, v in gm.state_dict().items()}
    snapshot[gates.target(GROUP)] = torch.tensor(1.0)
    assert all(torch.equal(snapshot[k], v) for k, v in sched.teacher.state_dict().items())
    assert not any(p.requires_grad for p in sched.teacher.parameters())
    in_optimizer = {id(p) for g in sched.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in sched.teacher.parameters())
    # the loss mixes CE and the distillation term by alpha
    t = sched.teacher_logits(x)
    assert torch.equal(t, sched.teacher(x)) and not t.requires_grad
    logits = gm(x)
    ce = smoothed_cross_entropy(logits, y, 0.1, "tost")
    assert torch.allclose(sched.loss(logits, y, teacher_logits=t), 0.3 * ce + 0.7 * distillation_loss(logits, t, 3.0))

    _train_distilled(sched, batches[2:])
    assert sched.removed == [GROUP] and GROUP not in fxsparse.ghosts.present(gm)
    assert fxsparse.ghosts.present(sched.teacher) == [GROUP]  # the teacher keeps its ghost at gate 1
    assert gates.get(sched.teacher) == {GROUP: 1.0}
    assert all(torch.equal(snapshot[k], v) for k, v in sched.teacher.state_dict().items())
    assert not torch.equal(snapshot["fc.weight"], gm.state_dict()["fc.weight"])  # the student moved on


def _train_distilled(sched, batches):
    opt, lr = sched.optimizer, sched.lr_scheduler
    for x, y in batches:
        opt.zero_grad()
        sched.loss(sched.gm(x), y, teacher_logits=sched.teacher_logits(x)).backward()
        opt.step()
        lr.step()
        sched.step()


@pytest.mark.parametrize("stop", [1, 3, 7], ids=["before-teacher", "teacher-and-ghost", "after-removal"])
def test_resume_with_a_teacher_gives_identical_continuation(toy_ghost, stop, caplog):
    total = 12
    batches = _batches(total)
    recipe = _toy_recipe(**DISTILL)
    _, gm = _transformed(recipe)
    sched = RecipeScheduler(gm, total_steps=total)
    sched.build_optimizer()
    sched.build_lr_scheduler()
    _train_distilled(sched, batches[:stop])
    ckpt = copy.deepcopy(sched.checkpoint())
    assert ("teacher" in ckpt["scheduler"]) == (stop >= 2)
    _train_distilled(sched, batches[stop:])

    torch.manual_seed(123)
    with caplog.at_level("INFO", logger="fxsparse.scheduler"):
        resumed = restore(Tiny(), ckpt, example_inputs=torch.randn(4, 3, 8, 8))
    assert (resumed.teacher is not None) == (stop >= 2)
    # the log names the checkpoint's step, not the step 0 the rebuilt scheduler starts from
    assert (f"resumed at step {stop}: distilling" in caplog.text) == (stop >= 2)
    assert "distilling from here on" not in caplog.text
    if resumed.teacher is not None:  # the teacher's graph has the ghost, whatever the student lost since
        assert fxsparse.ghosts.present(resumed.teacher) == [GROUP]
    _train_distilled(resumed, batches[stop:])
    final, again = sched.gm.state_dict(), resumed.gm.state_dict()
    assert final.keys() == again.keys()
    for k in final:
        assert torch.equal(final[k], again[k]), k
    teacher, teacher_again = sched.teacher.state_dict(), resumed.teacher.state_dict()
    assert all(torch.equal(teacher[k], teacher_again[k]) for k in teacher)


def test_distill_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match="distill.at = 'ghost_neurons'.*hold_until = 0"):
        fxsparse.load_recipe("tost", {"distill.enabled": True})  # tost's ghosts leave from step 0
    with pytest.raises(RecipeError, match="distill.at = 'ghost_nerons'.*'ghost_neurons'"):
        fxsparse.load_recipe("tost", {"distill.enabled": True, "distill.at": "ghost_nerons"})
    with pytest.raises(RecipeError, match="distill.at = 1.0"):
        fxsparse.load_recipe("tost", {"distill.enabled": True, "distill.at": 1.0})
    with pytest.raises(RecipeError, match="distill.alpha"):
        fxsparse.load_recipe("tost", {"distill.alpha": 1.5})
    with pytest.raises(RecipeError, match="distill.temperature"):
        fxsparse.load_recipe("tost", {"distill.temperature": 0})
    with pytest.raises(RecipeError, match="unknown key 'distill.teacher'"):
        fxsparse.load_recipe("tost", {"distill.teacher": "ema"})
    r = fxsparse.load_recipe("tost", {"distill.enabled": True, "distill.at": 0.5})
    assert r.distill.at == 0.5 and not fxsparse.load_recipe("tost").distill.enabled


# --------------------------------------------------------------------------- schedule_plain
class TinyResidual(Tiny):
    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(x + self.conv2(x))  # a path around conv2
        return self.fc(x.mean((2, 3)))


PLAIN = {f"{GROUP}.schedule_plain.{k}": v for k, v in
         {"hold_until": 0.5, "anneal_until": 0.75, "shape": "linear", "remove_at": 0.75}.items()}


@pytest.mark.parametrize("cls, plain", [(Tiny, True), (TinyResidual, False)], ids=["plain", "residual"])
def test_schedule_plain_is_chosen_from_the_traced_graph(toy_ghost, cls, plain):
    from fxsparse.inspect import inspect_graph
    from fxsparse.transform import PLAIN_KEY

    torch.manual_seed(0)
    model = cls()
    recipe = _toy_recipe(**PLAIN)
    gm = fxsparse.transform(model, recipe, masks=_masks(model), example_inputs=torch.randn(4, 3, 8, 8))
    assert gm.meta[PLAIN_KEY] is plain  # read before the ghost branch, itself a path around the layers
    sched = RecipeScheduler(gm, total_steps=20)
    expected = recipe.ghosts[GROUP].schedule_plain if plain else recipe.ghosts[GROUP].schedule
    assert sched.plain is plain and sched.schedules[GROUP] == expected
    assert sched.removal_step(GROUP) == (15 if plain else 6)
    summary = inspect_graph(gm).summary["schedules"][GROUP]
    assert summary.startswith("1 until 50%, linear to 0 by 75%" if plain else "1 until 10%, cosine to 0 by 30%")
    assert ("schedule_plain" in summary) is plain
    for _ in range(14):
        sched.step()
    assert (GROUP in sched.removed) is not plain and (sched.gates.get(GROUP, 0) > 0) is plain
    # a resumed run takes the same schedule: restore transforms the original model again
    resumed = restore(cls(), copy.deepcopy(sched.checkpoint()), example_inputs=torch.randn(4, 3, 8, 8))
    assert resumed.schedules == sched.schedules and resumed.removed == sched.removed
    # without a schedule_plain nothing is read from the graph, and every network follows schedule
    gm = fxsparse.transform(cls(), _toy_recipe(), masks=_masks(model), example_inputs=torch.randn(4, 3, 8, 8))
    assert PLAIN_KEY not in gm.meta and RecipeScheduler(gm, total_steps=20).removal_step(GROUP) == 6


def test_schedule_plain_is_validated_as_a_schedule():
    with pytest.raises(RecipeError, match="ghost_neurons.schedule_plain.remove_at = 0.5"):
        fxsparse.load_recipe("tost", {"ghost_neurons.schedule_plain.hold_until": 0.2,
                                      "ghost_neurons.schedule_plain.anneal_until": 0.6,
                                      "ghost_neurons.schedule_plain.remove_at": 0.5})
    with pytest.raises(RecipeError, match="rescale.schedule_plain .*not a ghost"):
        fxsparse.load_recipe("tost", {"rescale.schedule_plain.hold_until": 0.2})
    r = fxsparse.load_recipe("tost", {"distill.enabled": True, "distill.at": 0.5})
    with pytest.raises(RecipeError, match="ghost_neurons.schedule.hold_until = 0"):
        fxsparse.load_recipe("tost", {"distill.enabled": True, "ghost_neurons.schedule_plain.hold_until": 0.6,
                                      "ghost_neurons.schedule_plain.anneal_until": 0.8})
    assert r.distill.at == 0.5


# --------------------------------------------------------------------------- real passes
REAL = all(importlib.util.find_spec(f"fxsparse.passes.{GHOST_GROUPS[g][0].split(':')[0]}") for g in GHOST_GROUPS)


@pytest.mark.skipif(not REAL, reason="the ghost passes are not all installed yet")
def test_tost_end_to_end():
    """transform(tost) on a tiny CNN, train through every removal with a resume in the middle of
    the ghost phase, export into the original class."""
    torch.manual_seed(0)
    model = Tiny()
    recipe = fxsparse.load_recipe("tost", overrides={"rescale.enabled": True, "rescale.iters": 2})
    gm = fxsparse.transform(model, recipe, data=_batches(2))
    present = fxsparse.ghosts.present(gm)
    assert present and set(present) <= set(recipe.ghosts)
    # tost removes its ghosts at 15%, step 3; Tiny is a plain network (no path around a layer), so
    # its ghost neurons follow tost's schedule_plain and leave at 80%, step 16
    sched = RecipeScheduler(gm, total_steps=20)
    assert sched.plain and sched.removal_step("ghost_neurons") == 16
    sched.build_optimizer()
    sched.build_lr_scheduler()
    batches = _batches(20, seed=2)
    _train(sched, batches[:2])
    ckpt = copy.deepcopy(sched.checkpoint())
    _train(sched, batches[2:])
    assert not fxsparse.ghosts.present(gm) and not sched.gates
    expected = {g: 16 if g == "ghost_neurons" else 3 for g in present}
    assert {e["group"]: e["step"] for e in sched.events} == expected and len(sched.events) == len(present)

    resumed = restore(Tiny(), ckpt, example_inputs=batches[0][0])
    assert set(resumed.gates) == set(present)
    _train(resumed, batches[2:])
    for k, v in sched.gm.state_dict().items():
        assert torch.equal(v, resumed.gm.state_dict()[k]), k

    fresh = Tiny()
    fresh.load_state_dict(fxsparse.export(gm), strict=True)
    x = batches[0][0]
    assert torch.allclose(fresh(x), gm(x), atol=1e-6)
