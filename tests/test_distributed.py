"""fxsparse.distributed: DDP through ghost removals, on 2 CPU processes (gloo) launched by torchrun.

``test_ddp_two_ranks`` runs this file as the worker script (``torchrun --nproc-per-node 2
tests/test_distributed.py OUT``); each rank writes what it saw to ``OUT/rank<r>.pt`` and the
test compares the ranks with each other and with a single-process run of the same code.

Scenario A (the equality check) uses a network without BatchNorm and a recipe whose ghosts add
no BatchNorm (ghost neurons, ghost channels): under DDP each rank normalizes with its own
half-batch's statistics, so with BatchNorm the two runs compute different things by design.
Without it, DDP's gradient (mean over ranks of each rank's mean loss gradient) is the
single-process gradient of the same global batch, up to float rounding. Scenario B runs the
whole recipe (LRsI, all three ghosts, with BatchNorm in the network and in the ghost skip
branches) and checks the ranks agree. Scenario C is A with ghost schedules that wait for the
training loss to fall (``start = "learning"``): the scheduler reads the mean of the ranks' losses,
so every rank, and the single process, finds the same step.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import distributed as fxdist
from fxsparse.data import ImageDataset, TensorLoader
from fxsparse.ghosts import present
from fxsparse.recipe import schedule_overrides
from fxsparse.scheduler import RecipeScheduler, restore

from conftest import torchrun_ranks

STEPS = 16  # two epochs of 8 global batches
GLOBAL_BATCH = 8
CHECKPOINT_AT = 4  # after the ghost neurons' removal (step 4), before the ghost channels' (step 5)
LEARNING_STEPS = 32  # scenario C: four epochs, room for the loss to start falling and the ghosts to leave
SHORT = {"hold_until": 0.1, "anneal_until": 0.2, "remove_at": 0.2}  # remove at ceil(0.2 * 16) = 4
LONGER = {"hold_until": 0.1, "anneal_until": 0.3, "remove_at": 0.3}  # remove at ceil(0.3 * 16) = 5


# --------------------------------------------------------------------------- models, data, recipes
class PlainNet(nn.Module):
    """No BatchNorm: a DDP step equals a single-process step on the same global batch."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


class BNNet(nn.Module):
    """Conv-BN-ReLU with a residual: sites for ghost skips (with their own BN) and ghost channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(x)))  # c2 -> c3: a ghost channel site
        x = F.relu(self.b3(self.c3(h)) + x)
        return self.fc(x.mean((2, 3)))


def dataset() -> ImageDataset:
    gen = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (68, 1, 8, 8), dtype=torch.uint8, generator=gen)  # 68: a ragged tail
    return ImageDataset(images, torch.randint(0, 10, (68,), generator=gen), tuple("0123456789"), "toy")


def train_loader(crop_padding: int = 0) -> TensorLoader:
    return TensorLoader(dataset(), GLOBAL_BATCH, shuffle=True, drop_last=True, crop_padding=crop_padding, seed=3)


def recipe_a():
    # PlainNet is a plain network, where tost's ghost neurons follow their schedule_plain:
    # schedule_overrides sets both tables, so that every network follows these fractions
    over = {"rescale.enabled": False, "ghost_skips.enabled": False, "masks.sparsity": 0.5}
    over.update(schedule_overrides("ghost_neurons", **SHORT))
    over.update(schedule_overrides("ghost_channels", **LONGER))
    return fxsparse.load_recipe("tost", overrides=over)


def learnable_loader() -> TensorLoader:
    """Two classes, dark and bright images: the loss falls within a few steps."""
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 10, (68,), generator=gen)
    images = (labels.view(-1, 1, 1, 1) * 25 + torch.randint(0, 30, (68, 1, 8, 8), generator=gen)).to(torch.uint8)
    return TensorLoader(ImageDataset(images, labels, ("dark", "bright"), "toy-brightness"), GLOBAL_BATCH,
                        shuffle=True, drop_last=True, seed=3)


def recipe_c():
    # a small learning rate, so that the loss begins to fall after the earliest step the test allows
    over = {"rescale.enabled": False, "ghost_skips.enabled": False, "masks.sparsity": 0.5, "training.lr": 0.015}
    over.update(schedule_overrides("ghost_neurons", start="learning", **SHORT))
    over.update(schedule_overrides("ghost_channels", start="learning", **LONGER))
    return fxsparse.load_recipe("tost", overrides=over)


def recipe_b():
    over = {"rescale.enabled": True, "rescale.iters": 3, "masks.sparsity": 0.5}
    for group in ("ghost_neurons", "ghost_skips", "ghost_channels"):
        over.update(schedule_overrides(group, **LONGER))
    return fxsparse.load_recipe("tost", overrides=over)


def batches(loader: TensorLoader, start: int, stop: int):
    """Global steps ``start..stop-1`` of a run over ``loader`` (epochs resumed with set_epoch)."""
    per_epoch = len(loader)
    s = start
    while s < stop:
        loader.set_epoch(s // per_epoch)
        for i, batch in enumerate(loader):
            if i < s % per_epoch:
                continue
            yield batch
            s += 1
            if s == stop:
                return


def train(model: nn.Module, sched: RecipeScheduler, steps, on_step=None) -> nn.Module:
    """The user's loop over ``steps`` (batches): ``fxdist.step`` reads the loss ``sched.loss``
    computed while a schedule waits for the loss to fall. ``on_step(model, loss)`` after each step.
    Returns the model to use at the end (DDP is rebuilt at removals)."""
    for x, y in steps:
        loss = sched.loss(model(x), y)
        sched.optimizer.zero_grad()
        loss.backward()
        sched.optimizer.step()
        model = fxdist.step(sched, model)
        if on_step is not None:
            on_step(model, loss)
    return model


def run_a(checkpoint: Path | None = None) -> dict:
    """Scenario A through the user's loop; the same code in one process and under torchrun."""
    fxdist.seed(0)
    gm = fxsparse.transform(PlainNet(), recipe_a(), example_inputs=torch.zeros(2, 1, 8, 8))
    loader = fxdist.shard(train_loader())
    sched = RecipeScheduler(gm, total_steps=STEPS)
    sched.build_optimizer()
    model = fxdist.wrap(gm, scheduler=sched)
    fxdist.seed(0, per_rank=True)
    wrappers = {id(model)}

    def on_step(model, loss):
        wrappers.add(id(model))
        if checkpoint is not None and sched.step_count == CHECKPOINT_AT:
            fxdist.save_checkpoint(sched, checkpoint)

    model = train(model, sched, batches(loader, 0, STEPS), on_step)
    return {"state": {k: v.clone() for k, v in gm.state_dict().items()}, "events": sched.events,
            "wrappers": len(wrappers), "steps_per_epoch": len(loader), "batch": loader.batch_size,
            "unwrapped_is_gm": fxdist.unwrap(model) is gm}


def run_c() -> dict:
    """Scenario C: A's loop; the scheduler reads the ranks' mean of what ``sched.loss`` computed."""
    fxdist.seed(0)
    gm = fxsparse.transform(PlainNet(), recipe_c(), example_inputs=torch.zeros(2, 1, 8, 8))
    sched = RecipeScheduler(gm, total_steps=LEARNING_STEPS)
    sched.build_optimizer()
    losses = []
    train(fxdist.wrap(gm, scheduler=sched), sched, batches(fxdist.shard(learnable_loader()), 0, LEARNING_STEPS),
          lambda model, loss: losses.append(loss.item()))
    return {"state": {k: v.clone() for k, v in gm.state_dict().items()}, "events": sched.events,
            "learning_step": sched.learning_step, "forced": sched.onset.forced, "losses": losses}


def resume_a(checkpoint: Path) -> dict:
    """Scenario A resumed from the checkpoint written at CHECKPOINT_AT, continued under DDP."""
    sched = restore(PlainNet(), torch.load(checkpoint), example_inputs=torch.zeros(2, 1, 8, 8))  # weights_only
    model = fxdist.wrap(sched.gm, scheduler=sched)
    train(model, sched, batches(fxdist.shard(train_loader()), sched.step_count, STEPS))
    return {"state": {k: v.clone() for k, v in sched.gm.state_dict().items()}, "events": sched.events}


def fsdp2_probe(per_layer: bool) -> dict:
    """FSDP2 (``fully_shard``) on scenario A: how far it gets (docs/distributed.md, "FSDP2")."""
    from torch.distributed.fsdp import fully_shard

    fxdist.seed(0)
    gm = fxsparse.transform(PlainNet(), recipe_a(), example_inputs=torch.zeros(2, 1, 8, 8))
    if per_layer:
        fully_shard(gm.c2)
    fully_shard(gm)
    sched = RecipeScheduler(gm, total_steps=STEPS)
    opt = sched.build_optimizer()
    try:
        for x, y in batches(fxdist.shard(train_loader()), 0, STEPS):
            loss = sched.loss(gm(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    except (RuntimeError, RecursionError) as e:
        return {"failed_at": sched.step_count, "removed": list(sched.removed),
                "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    return {"failed_at": None, "removed": list(sched.removed), "error": None}


# --------------------------------------------------------------------------- the worker (one rank)
def worker(out: Path) -> None:
    torch.set_num_threads(1)
    env = fxdist.init(timeout=timedelta(seconds=90))  # a hung collective fails the test instead of stalling it
    result: dict = {"rank": env.rank, "world": env.world_size, "backend": env.backend}

    result["a"] = run_a(out / "a.pt")
    result["a_resumed"] = resume_a(out / "a.pt")
    result["c"] = run_c()

    # B: the whole recipe, BatchNorm included, LRsI on the same calibration batches on every rank
    fxdist.seed(1)
    calib = list(batches(train_loader(), 0, 2))
    gm = fxsparse.transform(BNNet(), recipe_b(), data=calib)
    result["b_ghosts"] = present(gm)
    loader = fxdist.shard(train_loader(crop_padding=1))
    sched = RecipeScheduler(gm, total_steps=STEPS)
    sched.build_optimizer()
    model = fxdist.wrap(gm, scheduler=sched)
    result["b_synced"] = sorted(model.named_module_buffers)  # what DDP broadcasts at every forward
    fxdist.seed(1, per_rank=True)
    model = train(model, sched, batches(loader, 0, STEPS))
    result["b_events"] = sched.events
    try:  # each rank's last forward updated its BatchNorm statistics from its own batch
        fxdist.check_identical(gm)
        result["b_before_sync"] = None
    except fxdist.DistributedError as e:
        result["b_before_sync"] = str(e)
    fxdist.sync_buffers(model)
    result["b_checked"] = fxdist.check_identical(gm)
    result["b_state"] = gm.state_dict()
    result["b_export"] = fxsparse.export(fxdist.unwrap(model))

    # a mask that differs on one rank is caught, and named, on every rank
    masks = {k: v.clone() for k, v in gm.state_dict().items() if k.startswith("fxsparse.masks.")}
    if env.rank == 1:
        flipped = masks["fxsparse.masks.c2.weight"]  # conv masks are channels-last: no view(-1)
        flipped[(0,) * flipped.dim()] ^= True
    try:
        fxdist.check_identical(masks)
        result["mask_error"] = None
    except fxdist.DistributedError as e:
        result["mask_error"] = str(e)

    # masks computed once on rank 0 reach every rank
    mine = {"a.weight": torch.rand(3, 5, generator=torch.Generator().manual_seed(env.rank)) > 0.5,
            "b.weight": torch.zeros(4, dtype=torch.bool)}
    result["broadcast"] = fxdist.broadcast_masks(mine if env.rank == 0 else None)
    result["rank0_masks"] = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    errors = []
    for bad in (lambda: fxdist.shard([(torch.zeros(1), torch.zeros(1))]),
                lambda: fxdist.shard(TensorLoader(dataset(), 7, drop_last=True))):
        try:
            bad()
        except (TypeError, fxdist.DistributedError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    result["shard_errors"] = errors
    result["metrics"] = fxdist.all_reduce_metrics({"correct": env.rank + 1, "count": torch.tensor(10)})
    result["metrics_max"] = fxdist.all_reduce_metrics({"r": env.rank}, op="max")

    result["fsdp2_root"] = fsdp2_probe(per_layer=False)
    result["fsdp2_layer"] = fsdp2_probe(per_layer=True)

    torch.save(result, out / f"rank{env.rank}.pt")
    fxdist.destroy()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))


# --------------------------------------------------------------------------- tests
def _assert_states_equal(a: dict, b: dict, *, atol: float = 0.0, what: str = "") -> float:
    assert list(a) == list(b), f"{what}: different keys"
    worst = 0.0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k}"
        if a[k].is_floating_point():
            diff = (a[k] - b[k]).abs().max().item() if a[k].numel() else 0.0
            worst = max(worst, diff)
            assert diff <= atol, f"{what}: {k} differs by {diff}"
        else:
            assert torch.equal(a[k], b[k]), f"{what}: {k}"
    return worst


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return torchrun_ranks(__file__, out)


def test_ranks_agree_through_removals(ranks):
    r0, r1 = ranks
    assert (r0["backend"], r0["world"], r1["rank"]) == ("gloo", 2, 1)
    for key in ("a", "a_resumed"):
        assert _assert_states_equal(r0[key]["state"], r1[key]["state"], what=key) == 0.0
    # both removals happened inside the run, at the same step on both ranks
    steps = [(e["group"], e["step"]) for e in r0["a"]["events"]]
    assert steps == [("ghost_neurons", 4), ("ghost_channels", 5)]
    assert steps == [(e["group"], e["step"]) for e in r1["a"]["events"]]
    assert r0["a"]["events"][1]["dropped_from_optimizer"] > 0
    assert r0["a"]["wrappers"] == 3  # the first DDP, then one rebuilt after each removal
    assert r0["a"]["unwrapped_is_gm"]
    assert not any(k.startswith(("fxsparse.ghost", "fxsparse.gates")) for k in r0["a"]["state"])


def test_ddp_equals_single_process(ranks):
    single = run_a()
    assert single["wrappers"] == 1 and single["batch"] == GLOBAL_BATCH
    assert ranks[0]["a"]["batch"] == GLOBAL_BATCH // 2
    assert ranks[0]["a"]["steps_per_epoch"] == single["steps_per_epoch"] == 68 // GLOBAL_BATCH
    assert [(e["group"], e["step"]) for e in single["events"]] == \
        [(e["group"], e["step"]) for e in ranks[0]["a"]["events"]]
    worst = _assert_states_equal(single["state"], ranks[0]["a"]["state"], atol=1e-5, what="single vs DDP")
    print(f"single process vs 2-rank DDP after {STEPS} steps: max abs diff {worst:.3g}")


def test_learning_start_under_ddp(ranks):
    """Ghosts that wait for the loss to fall leave at the same step on every rank and in one process:
    the scheduler reads the ranks' mean loss, the single process's loss of the same global batch."""
    single = run_c()
    r0, r1 = ranks[0]["c"], ranks[1]["c"]
    assert single["learning_step"] > 10 and not single["forced"]  # the loss did fall, after the first test
    assert r0["learning_step"] == r1["learning_step"] == single["learning_step"]
    removals = [(e["group"], e["step"]) for e in single["events"]]
    onset = single["learning_step"]  # the fractions count from the onset: 0.2 and 0.3 of 32 steps after it
    assert removals == [("ghost_neurons", onset + math.ceil(0.2 * LEARNING_STEPS)),
                        ("ghost_channels", onset + math.ceil(0.3 * LEARNING_STEPS))]
    assert removals == [(e["group"], e["step"]) for e in r0["events"]] == [(e["group"], e["step"]) for e in r1["events"]]
    assert r0["losses"] != r1["losses"]  # each rank saw its own half-batch ...
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean == pytest.approx(single["losses"], rel=1e-5)  # ... whose mean is the global batch's loss
    _assert_states_equal(r0["state"], r1["state"], what="C")
    _assert_states_equal(single["state"], r0["state"], atol=1e-5, what="C: single vs DDP")


def test_resume_under_ddp(ranks):
    """A run resumed from rank 0's checkpoint (between the two removals) ends where the unbroken one did."""
    r0 = ranks[0]
    _assert_states_equal(r0["a"]["state"], r0["a_resumed"]["state"], what="resumed vs unbroken")
    assert [e["step"] for e in r0["a_resumed"]["events"]] == [4, 5]


def test_whole_recipe_with_batchnorm(ranks):
    r0, r1 = ranks
    assert r0["b_ghosts"] == ["ghost_neurons", "ghost_skips", "ghost_channels"]
    assert [(e["group"], e["step"]) for e in r0["b_events"]] == [(g, 5) for g in r0["b_ghosts"]]
    # DDP broadcasts BatchNorm statistics (the network's and the ghost skips') but not masks and gates
    assert "b1.running_mean" in r0["b_synced"] and any(".ghost_skips." in n for n in r0["b_synced"])
    assert not [n for n in r0["b_synced"] if n.startswith(("fxsparse.masks.", "fxsparse.gates."))]
    # every rank's last forward updated its own BatchNorm statistics; sync_buffers settles them
    assert r0["b_before_sync"] is not None and "running_" in r0["b_before_sync"]
    assert "sync_buffers" in r0["b_before_sync"]
    assert r0["b_checked"] > 0
    _assert_states_equal(r0["b_state"], r1["b_state"], what="B")
    model = BNNet()
    model.load_state_dict(r0["b_export"], strict=True)


def test_check_identical_names_the_difference(ranks):
    for r in ranks:
        msg = r["mask_error"]
        assert msg is not None and "'fxsparse.masks.c2.weight'" in msg and "rank 1 has" in msg, msg
        assert "broadcast_masks" in msg


def test_broadcast_masks_and_metrics(ranks):
    for r in ranks:
        assert set(r["broadcast"]) == {"a.weight", "b.weight"}
        assert torch.equal(r["broadcast"]["a.weight"], r["rank0_masks"])
        assert r["broadcast"]["b.weight"].dtype == torch.bool and not r["broadcast"]["b.weight"].any()
        assert r["metrics"] == {"correct": 3.0, "count": 20.0}
        assert r["metrics_max"] == {"r": 1.0}
    shard_errors = ranks[0]["shard_errors"]
    assert len(shard_errors) == 2 and "TensorLoader" in shard_errors[0] and "divisible" in shard_errors[1]


# --------------------------------------------------------------------------- single process, no launcher
def test_shards_cover_the_global_batches():
    full = train_loader()
    shards = [full.shard(r, 2) for r in (0, 1)]
    for s in shards:
        s.batch_size = GLOBAL_BATCH // 2
    assert len(shards[0]) == len(shards[1]) == len(full) == 68 // GLOBAL_BATCH
    for epoch in (0, 1):
        for s in (full, *shards):
            s.set_epoch(epoch)
        for (_, y), (_, y0), (_, y1) in zip(full, *shards):
            assert sorted(y.tolist()) == sorted(torch.cat([y0, y1]).tolist())
    # evaluation shards (no drop_last) see every example exactly once, lengths may differ
    ev = TensorLoader(dataset(), 5, seed=3)
    parts = [ev.shard(r, 3) for r in range(3)]
    assert sum(len(torch.cat([y for _, y in p])) for p in parts) == 68
    with pytest.raises(ValueError, match="rank must lie"):
        ev.shard(3, 3)


def test_shards_augment_differently():
    """Ranks share the permutation but not the augmentation stream: same images, different crops."""
    same = ImageDataset(torch.zeros(16, 1, 8, 8, dtype=torch.uint8).index_put_((torch.arange(16), torch.tensor(0),
                        torch.tensor(4), torch.tensor(4)), torch.tensor(255, dtype=torch.uint8)), torch.zeros(16, dtype=torch.int64),
                        tuple("0123456789"))
    loader = TensorLoader(same, 4, shuffle=True, drop_last=True, crop_padding=2, seed=1)
    x0, x1 = (next(iter(loader.shard(r, 2)))[0] for r in (0, 1))
    assert not torch.equal(x0, x1)


def test_unsharded_loader_unchanged():
    """rank=0, world_size=1 draws exactly what the loader drew before sharding existed."""
    loader = train_loader(crop_padding=1)
    gen = torch.Generator().manual_seed(3 * 1_000_003 + 0)
    order = torch.randperm(68, generator=gen)
    x, y = next(iter(loader))
    assert torch.equal(y, dataset().labels[order[:GLOBAL_BATCH]])


def test_single_process_is_a_no_op():
    assert not fxdist.is_distributed() and fxdist.rank() == 0 and fxdist.world_size() == 1 and fxdist.is_main()
    env = fxdist.init()
    assert (env.rank, env.world_size, env.backend) == (0, 1, None)
    gm = fxsparse.transform(PlainNet(), recipe_a(), example_inputs=torch.zeros(2, 1, 8, 8))
    sched = RecipeScheduler(gm, total_steps=STEPS)
    assert fxdist.wrap(gm, scheduler=sched) is gm and fxdist.unwrap(gm) is gm
    assert fxdist.step(sched, gm) is gm and sched.step_count == 1
    assert fxdist.check_identical(gm) == 0
    loader = train_loader()
    assert fxdist.shard(loader) is loader
    assert fxdist.all_reduce_metrics({"a": 1, "b": torch.tensor(2.5)}) == {"a": 1.0, "b": 2.5}
    with pytest.raises(ValueError, match="op must be"):
        fxdist.all_reduce_metrics({"a": 1}, op="avg")
    assert fxdist.seed(5, per_rank=True) == 5


def test_fsdp2_status(ranks):
    """Plain ``torch.distributed.fsdp.fully_shard`` on a transformed GraphModule, without
    ``fxsparse.distributed.fully_shard`` (torch 2.14, gloo on CPU); docs/distributed.md, "FSDP2".

    * ``fully_shard(gm)`` alone trains through the removals: they recompile through
      ``fxsparse.pass_infra.recompile``, which no longer recurses on FSDP's dynamic subclass
      (FSDP's group keeps the removed parameters unless ``fxdist.step`` forgets them).
    * ``fully_shard`` on a layer of the masked graph still fails at once: the graph reads the
      layer's weight with a get_attr in the root's forward, never calling the layer, whose hook
      would unshard it. ``fxsparse.distributed.fully_shard`` puts the graph in unit form first
      (tests/test_fsdp.py).
    """
    for r in ranks:
        root, layer = r["fsdp2_root"], r["fsdp2_layer"]
        assert root["failed_at"] is None and root["removed"] == ["ghost_neurons", "ghost_channels"], root
        assert layer["failed_at"] == 0 and "mixed torch.Tensor and DTensor" in layer["error"], layer


def test_fxsparse_train_under_torchrun(tmp_path):
    """``fxsparse train`` itself under ``torchrun --nproc-per-node 2`` (gloo, CPU): resnet8, the
    whole tost recipe on digits for one epoch (20 global batches of 64, three removals at step 3, 15%);
    rank 0 alone writes the run's files and prints."""
    from safetensors.torch import load_file

    from fxsparse import nets
    from fxsparse.tools.metrics import read_metrics

    script = Path(sys.executable).with_name("fxsparse")  # the console script of this environment
    if not script.exists():
        pytest.skip("the fxsparse console script is not installed next to this Python")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0",
           str(script), "train", "fxsparse.nets:resnet8", "--recipe", "tost", "--data", "digits", "--epochs", "1",
           "--batch-size", "64", "--set", "training.crop_padding=1", "--sparsity", "0.8", "--lrsi-iters", "2",
           "--calib-batches", "2", "--device", "cpu", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    assert proc.stdout.count("trained with recipe tost") == 1  # the summary paragraph, from rank 0 only
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".jsonl", ".safetensors", ".json")) == \
        ["checkpoints.json", "config.json", "masks.safetensors", "metrics.jsonl", "model.safetensors", "summary.json"]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "step"]
    assert steps == list(range(1, 21))  # one writer: every step once; the global batch kept len() at 20

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20
    assert [(e["group"], e["step"]) for e in summary["removals"]] == \
        [("ghost_neurons", 3), ("ghost_skips", 3), ("ghost_channels", 3)]
    assert summary["removals"][1]["parameters"] > 0
    assert 0.0 < summary["test_accuracy"] <= 1.0 and summary["sparsity"] == pytest.approx(0.8, abs=0.01)

    model = nets.resnet8(num_classes=10, in_chans=1)
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)  # exported from the module, not DDP
