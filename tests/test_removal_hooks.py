"""Around a ghost removal: the scheduler's hooks, BatchNorm re-estimation (``[training]
bn_recalibrate``) and validation right before and after each removal (``eval_at_removal``)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.errors import RecipeError
from fxsparse.tools.metrics import read_metrics
from fxsparse.nets import resnet8
from fxsparse.tools.train import TrainConfig, Trainer, recalibrate_batchnorm

GHOSTS = ["ghost_neurons", "ghost_skips", "ghost_channels"]
DIGITS = {"training.epochs": 2, "training.batch_size": 64, "training.crop_padding": 1, "masks.sparsity": 0.8,
          "rescale.enabled": False, "training.precise_bn": 0}


def test_scheduler_hooks_fire_around_each_removal_and_not_on_replay():
    x = torch.randn(2, 3, 16, 16)
    gm = fxsparse.transform(resnet8(), "tost", example_inputs=x, skip=["rescale"])
    calls = []
    sched = fxsparse.RecipeScheduler(
        gm, total_steps=20,
        before_removal=lambda g: calls.append(("before", g, sched.step_count, g in fxsparse.ghosts.present(gm))),
        on_removal=lambda e: calls.append(("after", e["group"], e["step"], e["group"] in fxsparse.ghosts.present(gm))))
    dues = []
    for _ in range(10):
        dues.append(sched.due())
        sched.step()
    assert dues[2] == GHOSTS and all(d == [] for i, d in enumerate(dues) if i != 2)  # removed at step 3 = 0.15 * 20
    assert calls == [c for g in GHOSTS for c in (("before", g, 3, True), ("after", g, 3, False))]
    # resuming replays the removals without calling the hooks
    state = sched.state_dict()
    gm2 = fxsparse.transform(resnet8(), "tost", example_inputs=x, skip=["rescale"])
    replayed = []
    s2 = fxsparse.RecipeScheduler(gm2, total_steps=20, before_removal=replayed.append, on_removal=replayed.append)
    s2.load_state_dict(state)
    assert replayed == [] and s2.removed == GHOSTS


def test_recalibrate_batchnorm_is_the_cumulative_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).eval()
    batches = [(torch.randn(5, 3, 6, 6) * (i + 1) + i, None) for i in range(3)]
    with torch.no_grad():
        feats = [model[0](b[0]) for b in batches]
    want_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert recalibrate_batchnorm(model, batches) == 3
    bn = model[1]
    assert torch.allclose(bn.running_mean, want_mean, atol=1e-5) and torch.allclose(bn.running_var, want_var, atol=1e-4)
    assert bn.momentum == 0.3 and model[4].momentum == 0.1 and not model.training
    assert int(bn.num_batches_tracked) == 3
    assert all(p.grad is None for p in model.parameters())
    before = copy.deepcopy(model.state_dict())
    assert recalibrate_batchnorm(model, []) == 0  # nothing to estimate from: nothing changes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_keys_are_validated():
    with pytest.raises(RecipeError, match="bn_recalibrate"):
        fxsparse.load_recipe("tost", overrides={"training.bn_recalibrate": -1})
    with pytest.raises(RecipeError, match="eval_at_removal"):
        fxsparse.load_recipe("tost", overrides={"training.eval_at_removal": 1})
    t = fxsparse.load_recipe("tost").training
    assert t.bn_recalibrate == 0 and t.eval_at_removal is False  # off by default


class Recording(Trainer):
    """Keeps every BatchNorm's state right after each re-estimation."""

    def recalibrate_batchnorm(self, batches, step):
        n = super().recalibrate_batchnorm(batches, step)
        self.seen = getattr(self, "seen", [])
        self.seen.append({name: (int(m.num_batches_tracked), m.momentum) for name, m in self.gm.named_modules()
                          if isinstance(m, nn.BatchNorm2d)})
        return n


def _run(tmp_path, name, cls=Trainer, **extra):
    t = cls(TrainConfig("fxsparse.nets:resnet8", out=str(tmp_path / name), data="digits",
                        overrides={**DIGITS, **extra}, progress=False, quiet=True))
    threads = torch.get_num_threads()
    try:
        t.run()
    finally:
        torch.set_num_threads(threads)
    return t, read_metrics(tmp_path / name / "metrics.jsonl")


def test_trainer_recalibrates_and_measures_and_training_is_otherwise_identical(tmp_path):
    _, plain = _run(tmp_path, "plain")
    t, hooked = _run(tmp_path, "hooked", Recording, **{"training.bn_recalibrate": 3, "training.eval_at_removal": True})
    steps = lambda records: [(r["step"], r["loss"], r["train_acc"]) for r in records if r["type"] == "step"]
    # the same losses bit for bit: re-estimation draws its own batches and puts the generators back,
    # and train-mode BatchNorm never reads running statistics
    assert steps(hooked) == steps(plain)
    assert not [r for r in plain if r["type"] == "removal"]
    removals = [r for r in hooked if r["type"] == "removal"]
    assert [(r["group"], r["step"]) for r in removals] == [(g, 6) for g in GHOSTS]  # 15% of 40 steps
    for r in removals:
        assert r["bn_recalibrated"] == 3
        for k in ("val_acc_before", "val_acc_after", "val_loss_before", "val_loss_after", "val_acc_removed"):
            assert isinstance(r[k], float), (k, r)
    # one group after the other in the same step: each starts where the previous one ended
    for a, b in zip(removals, removals[1:]):
        assert b["val_acc_before"] == a["val_acc_after"]
    # every BatchNorm was reset and re-estimated over 3 batches, its momentum put back
    assert len(t.seen) == 3 and all(v == (3, 0.1) for seen in t.seen for v in seen.values())
    # removal lines come after the step that removed
    i = next(i for i, r in enumerate(hooked) if r["type"] == "removal")
    assert hooked[i - 1]["type"] == "event" and any(r["type"] == "step" and r["step"] == 6 for r in hooked[:i])


def test_a_channel_constant_in_training_blows_up_in_eval_until_statistics_are_re_estimated():
    # Why precise_bn exists: a channel whose weights are all masked is constant (its bias) in every
    # batch; train-mode BatchNorm maps it to exactly beta, but its running variance decays towards 0
    # while the running mean only approaches the bias, so eval mode divides a small lag by
    # sqrt(eps) and every constant channel downstream multiplies the error again.
    torch.manual_seed(0)
    convs = [nn.Conv2d(2, 2, 1) for _ in range(4)]
    layers = [m for c in convs for m in (c, nn.BatchNorm2d(2))]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for i, c in enumerate(convs):
            c.weight[1].zero_()  # channel 1 of the first layer sees nothing: constant
            if i:
                c.weight[1, 1] = 1.0  # later ones carry channel 1 of the layer before: constant too
            c.bias.fill_(0.5)
    batches = [(torch.randn(8, 2, 4, 4),) for _ in range(60)]
    model.train()
    with torch.no_grad():
        for (x,) in batches:
            model(x)
        x = batches[0][0]
        want = model.train()(x)[:, 1]  # train mode: exactly beta = 0
        lagged = model.eval()(x)[:, 1]
        assert want.abs().max() == 0 and lagged.abs().max() > 1.0  # blown up through 4 constant channels
        recalibrate_batchnorm(model, batches[:4])
        assert model.eval()(x)[:, 1].abs().max() < 1e-3


def test_precise_bn_re_estimates_at_the_end_and_training_is_otherwise_identical(tmp_path):
    with pytest.raises(RecipeError, match="precise_bn"):
        fxsparse.load_recipe("tost", overrides={"training.precise_bn": -1})
    assert fxsparse.load_recipe("baseline").training.precise_bn == fxsparse.load_recipe("tost").training.precise_bn
    _, plain = _run(tmp_path, "plain")
    t, precise = _run(tmp_path, "precise", **{"training.precise_bn": 2})
    steps = lambda records: [(r["step"], r["loss"], r["train_acc"]) for r in records if r["type"] == "step"]
    assert steps(precise) == steps(plain)
    (before,) = [r for r in precise if r["type"] == "precise_bn"]
    (plain_test,) = [r for r in plain if r["type"] == "test"]
    # the metrics before re-estimation are the run without it
    assert (before["test_acc_before"], before["val_acc_before"]) == (plain_test["test_acc"], plain_test["val_acc"])
    assert before["batches"] == 2 and not [r for r in plain if r["type"] == "precise_bn"]
    norms = [m for m in t.gm.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 2 and m.momentum == 0.1 for m in norms)
    assert t.summary["precise_bn"]["batches"] == 2 and t.summary["precise_bn"]["test_acc_before"] == before["test_acc_before"]
