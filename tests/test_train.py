"""``fxsparse train``: the CIFAR nets, the whole tost recipe on real data, resume after SIGKILL, the CLI.

Real data throughout: scikit-learn's 8x8 digits (1,295 training images) keeps every run to a few
seconds. Random crops pad by 1 pixel there (the recipe's CIFAR padding of 4 is half a digit).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fxsparse
import fxsparse.masks
from fxsparse import nets
from fxsparse.tools.checkpoint import CheckpointManager
from fxsparse.cli import main
from fxsparse.cli.common import parse_value
from fxsparse.cli.train import overrides_from_args
from fxsparse.errors import RecipeError
from fxsparse.tools.metrics import read_metrics
from fxsparse.pass_infra import tagged_nodes
from fxsparse.passes.mask import masked_parameters
from fxsparse.tools.train import TrainConfig, Trainer

GHOSTS = ["ghost_neurons", "ghost_skips", "ghost_channels"]
DIGITS = {"training.epochs": 2, "training.batch_size": 64, "training.crop_padding": 1, "masks.sparsity": 0.8}
# the same run on the command line
DIGITS_ARGS = ["--data", "digits", "--epochs", "2", "--batch-size", "64", "--set", "training.crop_padding=1",
               "--sparsity", "0.8", "--lrsi-iters", "2", "--set", "rescale.enabled=true", "--no-progress"]


@pytest.fixture
def torch_globals():
    """The trainer sets process-wide torch settings (--workers, --deterministic): put them back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


# --------------------------------------------------------------------------- nets
@pytest.mark.parametrize("name, params", [("resnet8", 75_290), ("resnet20", 269_722), ("resnet32", 464_154),
                                          ("resnet56", 853_018), ("resnet18", 11_173_962),
                                          # CIFAR VGG-BN as ToST's models/VGG.py (conv bias, Linear(512))
                                          ("vgg11", 9_231_114), ("vgg16", 14_728_266), ("mobilenetv2", 2_236_682)])
def test_nets_have_the_published_sizes(name, params):
    model = getattr(nets, name)()
    assert sum(p.numel() for p in model.parameters()) == params
    gray = getattr(nets, name)(num_classes=100, in_chans=1)
    first = next(m for m in gray.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.weight.shape[1] == 1


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vgg16", "mobilenetv2"])
def test_nets_width_scales_every_hidden_layer(name):
    full, half = getattr(nets, name)(), getattr(nets, name)(width=0.5)
    convs = lambda m: [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    assert len(convs(full)) == len(convs(half))
    narrower = [h.out_channels < f.out_channels for f, h in zip(convs(full), convs(half))]
    assert sum(narrower) >= len(narrower) - 1  # MobileNetV2's 1280-channel head never narrows
    with pytest.raises(ValueError, match="width"):
        getattr(nets, name)(width=0)


@pytest.mark.parametrize("build, sizes", [
    (lambda: nets.resnet8(in_chans=1), (16,)), (lambda: nets.resnet8(shortcut="B"), (16,)),
    (lambda: nets.resnet18(num_classes=7), (16,)), (lambda: nets.resnet20(width=0.5, in_chans=1), (28,)),
    # VGG's four max-pools: 2x2 before the average pool at CIFAR's 32, 1x1 at Fashion-MNIST's 28
    (lambda: nets.vgg11(in_chans=1, width=0.25), (28, 32)), (lambda: nets.vgg16(width=0.25), (28, 32)),
    (lambda: nets.mobilenetv2(width=0.25), (28,)), (lambda: nets.mobilenetv2(width=0.25, stem_stride=2), (28,)),
], ids=["resnet8-A-gray", "resnet8-B", "resnet18", "resnet20-w0.5", "vgg11", "vgg16", "mobilenetv2", "mobilenetv2-stem2"])
def test_nets_trace_exactly(build, sizes):
    torch.manual_seed(0)
    model = build()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    for size in sizes:
        x = torch.randn(4, first.in_channels, size, size)
        gm = fxsparse.trace(model, x)
        fxsparse.testing.assert_equivalent(model, gm, x)


def test_model_spec_passes_constructor_keywords():
    from fxsparse.errors import ModelSpecError
    from fxsparse.models import create, parse_spec

    assert parse_spec("fxsparse.nets:vgg16(width=0.25)") == ("fxsparse.nets:vgg16", {"width": 0.25})
    assert parse_spec("resnet50") == ("resnet50", {})
    model = create("fxsparse.nets:resnet20(width=0.5, shortcut='B')", num_classes=3)
    assert model.fc.out_features == 3 and model.conv1.out_channels == 8 and model.layer2[0].pad == 0
    for bad in ("fxsparse.nets:vgg16(0.25)", "fxsparse.nets:vgg16(width=w)", "fxsparse.nets:vgg16(width=1)(depth=2)"):
        with pytest.raises(ModelSpecError, match="keywords with literal values"):
            create(bad)


def test_nets_option_a_has_no_shortcut_parameters():
    a, b = nets.resnet20(), nets.resnet20(shortcut="B")
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in a.modules())
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in b.modules()) == 2
    with pytest.raises(ValueError, match="6n\\+2"):
        nets.CifarResNet(depth=10)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """fxsparse.nets:resnet8 through the whole tost recipe, LRsI on, on digits: 2 epochs, 40 steps."""
    out = tmp_path_factory.mktemp("e2e")
    threads = torch.get_num_threads()
    trainer = Trainer(TrainConfig("fxsparse.nets:resnet8", out=str(out), data="digits",
                                  overrides={**DIGITS, "rescale.enabled": True},
                                  lrsi_iters=2, progress=False, quiet=True))
    trainer.run()
    torch.set_num_threads(threads)
    return trainer, out


def test_tost_end_to_end_removes_every_ghost(e2e):
    trainer, out = e2e
    gm, s = trainer.gm, trainer.summary
    ran = [h["pass"] for h in gm.meta["fxsparse.passes"]]
    assert ran[:5] == ["MaskPass", "RescaleInitPass", "GhostNeuronPass", "GhostSkipPass", "GhostChannelPass"]
    # all three ghosts removed at 15% of the 40 steps; nothing of them is left in the graph
    assert [(e["group"], e["step"]) for e in s["removals"]] == [(g, 6) for g in GHOSTS]
    assert {n.meta["fxsparse"]["group"] for n in tagged_nodes(gm)} == {"masks"}
    assert fxsparse.ghosts.present(gm) == [] and fxsparse.gates.get(gm) == {}
    assert set(gm.fxsparse._modules) | set(gm.fxsparse._buffers) | set(gm.fxsparse._parameters) <= {"masks"}
    # the graph is the traced original again
    original = fxsparse.trace(nets.resnet8(in_chans=1), torch.zeros(2, 1, 8, 8))
    assert fxsparse.graph.same_structure(fxsparse.strip_masks(gm), original)
    assert s["test_accuracy"] > 0.5, s  # it learned (digits: ~90% after 3 epochs at this sparsity)


def test_exported_weights_load_strict_and_compute_what_the_graph_computes(e2e):
    trainer, out = e2e
    state = load_file(out / "model.safetensors")
    model = nets.resnet8(num_classes=10, in_chans=1)
    model.load_state_dict(state, strict=True)
    x, _ = next(iter(trainer.test_loader))
    model.eval(), trainer.gm.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), trainer.gm(x), rtol=0, atol=1e-6)
    trainer.gm.train()
    masks = fxsparse.masks.load(out / "masks.safetensors", model)
    assert masks.keys() == masked_parameters(trainer.gm).keys()
    for name, mask in masks.items():
        assert torch.equal(mask, masked_parameters(trainer.gm)[name].cpu())
        assert not state[name][~mask].any()  # pruned weights are exactly zero in the export
    meta = fxsparse.masks.read_metadata(out / "masks.safetensors")
    assert meta["method"] == "random" and meta["requested_sparsity"] == 0.8 and meta["recipe"] == "tost"
    assert abs(meta["achieved_sparsity"] - 0.8) < 1e-3


def test_metrics_plots_and_summary(e2e):
    trainer, out = e2e
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert {"epoch", "loss", "train_acc", "lr", "gates", "label_smoothing", "step_time"} <= set(steps[0])
    assert set(steps[0]["gates"]) == set(GHOSTS) and steps[0]["gates"]["ghost_skips"] == 1.0
    # the 6th step runs with the gate of 5/40 of training (linear from 1 at 0 to 0 at 15%), then the ghosts go
    assert steps[5]["gates"]["ghost_channels"] == pytest.approx(1 - (5 / 40) / 0.15)
    assert all(r["gates"] == {} for r in steps[6:])
    assert [r["group"] for r in records if r["type"] == "event"] == GHOSTS
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("val_acc" in r for r in epochs)
    assert [r["type"] for r in records].count("test") == 1 and records[-1]["test_acc"] == trainer.summary["test_accuracy"]
    for png in ("training_curves.png", "gates.png", "mask_density.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == trainer.summary["test_accuracy"] and summary["steps"] == 40
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3) and summary["model"] == "fxsparse.nets:resnet8"
    assert any("in_chans=1" in n for n in summary["notes"])
    assert [c.epoch for c in CheckpointManager(out).entries()] == [1, 2]


def test_distillation_from_the_network_with_its_ghosts(tmp_path, monkeypatch):
    """[distill]: the trainer feeds the teacher's logits to the loss from distill.at on, and the
    run still ends as the original network."""
    from fxsparse.scheduler import RecipeScheduler

    used = []
    teacher_logits = RecipeScheduler.teacher_logits

    def counting(self, *args, **kwargs):
        out = teacher_logits(self, *args, **kwargs)
        used.append((self.step_count, out is not None))
        return out

    monkeypatch.setattr(RecipeScheduler, "teacher_logits", counting)
    late = {f"ghost_neurons.schedule.{k}": v for k, v in {"hold_until": 0.5, "anneal_until": 0.75, "remove_at": 0.75}.items()}
    t = Trainer(TrainConfig("fxsparse.nets:resnet8", out=str(tmp_path), data="digits", progress=False, quiet=True,
                            overrides={**DIGITS, **late, "distill.enabled": True}))
    summary = t.run()
    assert summary["distill"] == {"teacher_step": 20, "alpha": 0.9, "temperature": 4.0}
    assert [s for s, on in used if on] == list(range(20, 40))  # steps 21..40 (step_count before the step)
    assert [(e["group"], e["step"]) for e in summary["removals"]] == [("ghost_skips", 6), ("ghost_channels", 6),
                                                                     ("ghost_neurons", 30)]
    assert t.sched.teacher is None  # let go before precise BN and export
    model = nets.resnet8(num_classes=10, in_chans=1)
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert summary["test_accuracy"] > 0.5


class TinyPlain(torch.nn.Module):
    """A plain network (no path around any layer) for the trainer."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.c1 = torch.nn.Conv2d(in_chans, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def test_a_plain_network_follows_schedule_plain_and_says_so(tmp_path):
    t = Trainer(TrainConfig("test_train:TinyPlain", out=str(tmp_path), data="digits", progress=False, quiet=True,
                            overrides={**DIGITS, "training.epochs": 1}))
    summary = t.run()  # 20 steps: tost's schedule_plain removes the ghost neurons at 80%, step 16
    assert ("ghost_neurons", 16) in [(e["group"], e["step"]) for e in summary["removals"]]
    assert any("plain network" in n and "ghost_neurons.schedule_plain" in n for n in summary["notes"]), summary["notes"]


def test_a_plain_network_with_a_scored_mask_gets_no_ghost_neurons_and_says_so(tmp_path):
    t = Trainer(TrainConfig("test_train:TinyPlain", out=str(tmp_path), data="digits", progress=False, quiet=True,
                            overrides={**DIGITS, "training.epochs": 1, "masks.method": "snip"}))
    summary = t.run()
    assert "ghost_neurons" not in {e["group"] for e in summary["removals"]}
    assert "no ghost_neurons on test_train:TinyPlain: a plain network with a 'snip' mask" in " ".join(summary["notes"])


@pytest.mark.parametrize("lr, epochs, noted", [(1e-9, 5, True), (0.5, 15, False)])
def test_ghosts_that_leave_before_the_loss_moves_get_a_note(tmp_path, lr, epochs, noted):
    """A ghost phase that ends before the network has learned anything is said aloud (the cells
    where `tost` loses on the map); one where the loss has fallen is not."""
    t = Trainer(TrainConfig("test_train:TinyPlain", out=str(tmp_path), data="digits", progress=False, quiet=True,
                            overrides={**DIGITS, "training.epochs": epochs, "training.lr": lr, "masks.sparsity": 0.5}))
    summary = t.run()
    steps = [r for r in t.metrics.records if r.get("type") == "step"]
    removal = min(e["step"] for e in summary["removals"])
    losses = [r["loss"] for r in steps if r["step"] <= removal]
    assert len(losses) >= 10
    start, now = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert (now > 0.98 * start) is noted  # what the note reads
    said = [n for n in summary["notes"] if "before the network learned anything" in n]
    assert bool(said) is noted
    if noted:
        assert len(said) == 1 and f"ghosts left at step {removal} of {t.total_steps}" in said[0]


@pytest.mark.parametrize("lr, learns", [(0.5, True), (1e-9, False)])
def test_ghost_schedules_that_start_when_the_loss_falls(tmp_path, lr, learns):
    """start = "learning": the scheduler reads each step's loss (what sched.loss computed); the
    ghosts leave 0.15 * T after the step the logged losses say the loss began to fall (the last 5
    steps' mean 2% below the first 5's), or, if it never does, by the end of training all the same."""
    from fxsparse.scheduler import LearningOnset

    starts = {f"{g}.schedule.start": "learning" for g in ("ghost_skips", "ghost_channels")}
    t = Trainer(TrainConfig("test_train:TinyPlain", out=str(tmp_path), data="digits", progress=False, quiet=True,
                            overrides={**DIGITS, **starts, "training.epochs": 6, "training.lr": lr,
                                       "masks.sparsity": 0.5, "ghost_neurons.enabled": False}))
    summary = t.run()
    losses = [r["loss"] for r in t.metrics.records if r.get("type") == "step"]
    onset = LearningOnset()
    found = next((step for step, loss in enumerate(losses, start=1) if onset.observe(step, loss)), None)
    assert (found is not None) is learns
    T, remove = t.total_steps, math.ceil(0.15 * t.total_steps - 1e-6)
    removals = {e["group"]: e["step"] for e in summary["removals"]}
    assert set(removals) == {"ghost_skips", "ghost_channels"}  # gone either way: the original network
    expected = found + remove if learns else T  # the deadline: the latest start that ends by step T
    assert set(removals.values()) == {expected}
    gates = [r["gates"].get("ghost_skips") for r in t.metrics.records if r.get("type") == "step"]
    assert all(g == 1.0 for g in gates[:(found if learns else T - remove)])  # held while waiting


def test_cli_guards_an_existing_run(e2e, capsys, torch_globals):
    _, out = e2e
    args = ["train", "fxsparse.nets:resnet8", *DIGITS_ARGS, "--out", str(out)]
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume", "--seed", "5"]) == 2
    assert "other settings (seed: 0 then, 5 now)" in capsys.readouterr().err
    before = json.loads((out / "summary.json").read_text())
    assert main([*args, "--resume"]) == 0  # every epoch done: evaluates and exports again
    assert "all 2 epochs were done already" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == before["test_accuracy"]


def test_mask_file_is_used_as_is(e2e, tmp_path):
    _, e2e_out = e2e
    t = Trainer(TrainConfig("fxsparse.nets:resnet8", out=str(tmp_path), data="digits", recipe="baseline",
                            overrides={**DIGITS, "training.epochs": 1, "masks.method": "file",
                                       "masks.path": str(e2e_out / "masks.safetensors")}, progress=False, quiet=True))
    t.run()
    want = fxsparse.masks.load(e2e_out / "masks.safetensors")
    got = masked_parameters(t.gm)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# --------------------------------------------------------------------------- resume
_CLI = "import sys; from fxsparse.cli import main; sys.exit(main())"
_ALL_STEPS = 60  # 3 epochs of 20 steps


def _resume_args(out) -> list[str]:
    # ghosts live until 50% (step 30), so the run resumes from epoch 1 (step 20) with ghosts in it
    # and must replay their removal; deterministic kernels on one thread make reruns bit-identical.
    # tost_rigl: the mask moves too (RigL every 7 steps until 75% = step 45): the resumed run replays
    # the updates at steps 21..42 and the end of the phase; masks, weights and momentum must agree
    sched = [f"--set={g}.schedule.{k}=0.5" for g in GHOSTS for k in ("anneal_until", "remove_at")]
    return ["train", "fxsparse.nets:resnet8", *DIGITS_ARGS, "--epochs", "3", *sched, "--deterministic",
            "--recipe", "tost_rigl", "--set", "dynamic.update_every=7",
            "--workers", "1", "--seed", "1", "--out", str(out)]


def _kill_during_epoch(args: list[str], out: Path, epoch: int, log: Path) -> None:
    """Run the CLI in a subprocess and SIGKILL it once it logged the first step of ``epoch``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", _CLI, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                metrics = out / "metrics.jsonl"
                if metrics.exists() and any(r["type"] == "step" and r["epoch"] == epoch for r in read_metrics(metrics)):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    pytest.fail(f"the run ended (status {proc.returncode}) before epoch {epoch} began:\n{log.read_text()[-3000:]}")


def _assert_equal_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_after_sigkill_gives_the_same_weights(tmp_path, caplog, capsys, torch_globals):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    _kill_during_epoch(_resume_args(killed), killed, epoch=3, log=tmp_path / "killed.log")
    manager = CheckpointManager(killed)
    assert [e.epoch for e in manager.entries()] == [1, 2]
    assert not (killed / "model.safetensors").exists()
    # damage the newest checkpoint on disk: the resumed run must notice and use epoch 1's
    newest = killed / manager.entries()[-1].file
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    assert main([*_resume_args(killed), "--resume"]) == 0
    assert "resuming from checkpoint-e0001-s00000020.pt" in capsys.readouterr().out
    assert any("truncated" in r.getMessage() and newest.name in r.getMessage() for r in caplog.records), caplog.text
    assert main(_resume_args(reference)) == 0

    final, expected = load_file(killed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert final.keys() == expected.keys()
    for k in expected:
        assert torch.equal(final[k], expected[k]), k
    # the whole training state too: weights, masks, optimizer momentum, lr schedule, scheduler
    a, b = CheckpointManager(killed).load_latest()[0], CheckpointManager(reference).load_latest()[0]
    for part in ("model", "optimizer", "lr_scheduler", "scheduler"):
        _assert_equal_tensors(a[part], b[part], part)
    # the metrics log holds each step once, the replayed ones as the uninterrupted run logged them
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("step_time", "epoch_time", "elapsed")} for r in rs]  # noqa: E731
    ra, rb = read_metrics(killed / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in ra if r["type"] == "step"] == list(range(1, _ALL_STEPS + 1))
    assert strip(ra) == strip(rb)
    updates = [r for r in ra if r["type"] == "mask_update"]  # the churn of every RigL update, logged once
    assert [r["step"] for r in updates] == [7, 14, 21, 28, 35, 42] and all(r["grown"] > 0 for r in updates[:3])
    assert (killed / "mask_churn.png").exists()
    assert json.loads((killed / "summary.json").read_text())["mask_updates"]["updates"] == 6
    assert json.loads((killed / "summary.json").read_text())["removals"] == \
        json.loads((reference / "summary.json").read_text())["removals"]


# --------------------------------------------------------------------------- options
def test_set_values_and_shortcuts_become_recipe_overrides(tmp_path):
    assert [parse_value(v) for v in ("0.4", "true", "[0.5, 0.75]", "snip", "1e-3", "7")] == \
        [0.4, True, [0.5, 0.75], "snip", 1e-3, 7]
    from fxsparse.cli import build_parser

    args = build_parser().parse_args(["train", "m:x", "--set", "training.lr=0.5", "--lr", "0.2", "--sparsity", "0.9",
                                      "--mask-file", "m.safetensors", "--set", "ghost_skips.enabled=false"])
    assert overrides_from_args(args) == {"training.lr": 0.2, "ghost_skips.enabled": False, "masks.sparsity": 0.9,
                                         "masks.method": "file", "masks.path": os.path.abspath("m.safetensors")}
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        overrides_from_args(build_parser().parse_args(["train", "m:x", "--set", "training.lr"]))


def test_gray_images_in_chans_or_repeated_channel(tmp_path):
    def built(model):
        t = Trainer(TrainConfig(model, out=str(tmp_path), data="digits", progress=False, quiet=True))
        t._runtime(), t._load_data()
        m, channels = t._build_model()
        return m, channels, t.notes

    m, channels, notes = built("fxsparse.nets:resnet8")
    assert channels == 1 and m.conv1.in_channels == 1 and "in_chans=1" in notes[0]
    m, channels, notes = built("tv:resnet18")  # torchvision constructors take no in_chans
    assert channels == 3 and m.conv1.in_channels == 3 and "repeated 3 times" in notes[0]


def test_imp_masks_from_short_training_rounds(tmp_path):
    t = Trainer(TrainConfig("fxsparse.nets:resnet8", out=str(tmp_path), data="digits", recipe="baseline",
                            overrides={**DIGITS, "training.epochs": 1, "masks.method": "imp", "masks.rounds": 2,
                                       "masks.sparsity": 0.5}, progress=False, quiet=True))
    s = t.run()
    assert s["mask_method"] == "imp" and s["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert s["test_accuracy"] > 0.3


def test_lrsi_iterations_capped_on_cpu_unless_chosen(tmp_path):
    def recipe(**kwargs):
        t = Trainer(TrainConfig("fxsparse.nets:resnet8", out=str(tmp_path), device="cpu", quiet=True, **kwargs))
        t._runtime()
        return t._recipe(), t.notes

    r, notes = recipe(recipe="lrsi")
    assert r.passes["rescale"].options["iters"] == 30 and "capped at 30" in notes[0]
    r, notes = recipe(overrides={"rescale.enabled": True})  # tost with LRsI
    assert r.passes["rescale"].options["iters"] == 30 and "capped at 30" in notes[0]
    r, notes = recipe(recipe="lrsi", lrsi_iters=180)
    assert r.passes["rescale"].options["iters"] == 180 and not notes
    r, notes = recipe(recipe="lrsi", overrides={"rescale.iters": 50})
    assert r.passes["rescale"].options["iters"] == 50 and not notes
    for name in ("baseline", "tost"):  # LRsI off: nothing to cap
        r, notes = recipe(recipe=name)
        assert not r.passes["rescale"].enabled and not notes


@pytest.mark.slow
def test_compiled_training_recompiles_through_the_removals(tmp_path, torch_globals):
    """--compile: the ghosts' removal changes the graph under torch.compile (minutes on a busy CPU)."""
    assert main(["train", "fxsparse.nets:resnet8", *DIGITS_ARGS, "--compile", "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["compile"] and [e["group"] for e in s["removals"]] == GHOSTS and s["test_accuracy"] > 0.5
    model = nets.resnet8(in_chans=1)
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
