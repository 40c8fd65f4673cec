"""FSDP2 (``fully_shard``) through the ghost removals, on 2 CPU processes (gloo) launched by torchrun.

``ranks`` runs this file as the worker script (``torchrun --nproc-per-node 2 tests/test_fsdp.py
OUT``); each rank writes what it saw to ``OUT/rank<r>.pt``. The scenarios are those of
tests/test_distributed.py: A (no BatchNorm; ghost neurons removed at step 4, ghost channels at
step 5) trained under DDP and under FSDP with one unit per layer, from the same start, must end
at the same weights; B (the whole recipe with BatchNorm, ghost skips included) trains under FSDP
with a block as one unit and the ranks must agree. Errors for bad units are checked in the
worker too (they need a process group).
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import distributed as fxdist
from fxsparse.scheduler import RecipeScheduler

sys.path.insert(0, str(Path(__file__).parent))
from conftest import torchrun_ranks  # noqa: E402
from test_distributed import STEPS, PlainNet, batches, recipe_a, recipe_b, train_loader  # noqa: E402


class BlockNet(nn.Module):
    """BNNet's layers with the residual pair in a submodule: a block to shard as one unit."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

        def forward(self, x):
            h = F.relu(self.b2(self.c2(x)))
            return F.relu(self.b3(self.c3(h)) + x)

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block = self.Block()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block(F.relu(self.b1(self.c1(x))))
        return self.fc(x.mean((2, 3)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x):
        return self.fc(x)


def _train(model, gm, sched, opt, loader, on_step=None):
    for x, y in batches(loader, 0, STEPS):
        loss = sched.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model = fxdist.step(sched, model)
        if on_step is not None:
            on_step(sched)
    return model


def run_a(fsdp: bool) -> dict:
    """Scenario A under DDP or under FSDP with one unit per layer, from the same start."""
    from fxsparse import fsdp as fxfsdp

    fxdist.seed(0)
    gm = fxsparse.transform(PlainNet(), recipe_a(), example_inputs=torch.zeros(2, 1, 8, 8))
    loader = fxdist.shard(train_loader())
    out: dict = {}
    if fsdp:
        before = {k: v.clone() for k, v in gm.state_dict().items()}
        model = fxdist.fully_shard(gm, units="layers")
        out["units"] = dict(gm.meta[fxfsdp.META_KEY])
        out["same_keys"] = sorted(gm.state_dict()) == sorted(before)
        out["unit_types"] = {u: type(gm.get_submodule(u)).__name__ for u in out["units"]}
    sched = RecipeScheduler(gm, total_steps=STEPS)
    opt = sched.build_optimizer()
    if not fsdp:
        model = fxdist.wrap(gm, scheduler=sched)
    fxdist.seed(0, per_rank=True)
    shard_bytes: list[tuple[int, int, int]] = []  # (step, local shard bytes, optimizer tensors)

    def record(s):
        if fsdp:
            shard_bytes.append((s.step_count, fxfsdp.local_shard_bytes(gm), len(s.optimizer.state)))

    if fsdp:
        shard_bytes.append((0, fxfsdp.local_shard_bytes(gm), 0))
        ghost_params = [weakref.ref(p) for g in fxsparse.ghosts.present(gm) for p in fxsparse.ghosts.parameters(gm, g)]
    model = _train(model, gm, sched, opt, loader, record)
    if fsdp:
        gc.collect()
        out["ghost_params"] = (len(ghost_params), sum(r() is not None for r in ghost_params))
    out["events"] = sched.events
    out["shard_bytes"] = shard_bytes
    out["export"] = fxdist.export(model)
    out["masks"] = {k: v.clone() for k, v in gm.state_dict().items() if k.startswith("fxsparse.masks.")}
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        out["state"] = get_model_state_dict(gm, options=StateDictOptions(full_state_dict=True))
        out["fsdp_params"] = sum(len(g.fsdp_params) for _, g in fxfsdp._param_groups(gm))
        out["module_params"] = len(list(gm.parameters()))
        out["local_state_is_dtensor"] = type(gm.state_dict()["c2.weight"]).__name__
    else:
        out["state"] = {k: v.clone() for k, v in gm.state_dict().items()}
    return out


def run_b() -> dict:
    """The whole recipe with BatchNorm and ghost skips, the block as one unit, c1 and fc as layers."""
    fxdist.seed(1)
    calib = list(batches(train_loader(), 0, 2))
    gm = fxsparse.transform(BlockNet(), recipe_b(), data=calib)
    ghosts = fxsparse.ghosts.present(gm)
    model = fxdist.fully_shard(gm, units=["c1", "block", "fc"])
    sched = RecipeScheduler(gm, total_steps=STEPS)
    opt = sched.build_optimizer()
    fxdist.seed(1, per_rank=True)
    model = _train(model, gm, sched, opt, fxdist.shard(train_loader(crop_padding=1)))
    fxdist.sync_buffers(gm)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return {"ghosts": ghosts, "events": sched.events, "units": dict(gm.meta["fxsparse.fsdp"]),
            "state": get_model_state_dict(gm, options=StateDictOptions(full_state_dict=True)),
            "export": fxdist.export(model)}


def bad_units() -> dict:
    """The errors for units FSDP cannot have, each message as the user sees it."""
    errors = {}
    cases = {
        "tiny_model": (Tiny, "layers", torch.zeros(2, 3)),
        "ghost_unit": (PlainNet, ["fxsparse.ghost_channels"], None),
        "no_such": (PlainNet, ["c9"], None),
        "overlap": (BlockNet, ["block", "block.c2"], None),
    }
    for name, (cls, units, example) in cases.items():
        fxdist.seed(0)
        model = cls()
        recipe = recipe_a() if cls is not Tiny else fxsparse.load_recipe("baseline", overrides={"masks.sparsity": 0.5})
        gm = fxsparse.transform(model, recipe, example_inputs=example if example is not None else torch.zeros(2, 1, 8, 8))
        try:
            fxdist.fully_shard(gm, units=units)
            errors[name] = None
        except fxdist.DistributedError as e:
            errors[name] = f"{type(e).__name__}: {e}"
    # a ghost node reading a layer's weight outside the layer's call: the unit would split them
    fxdist.seed(0)
    gm = fxsparse.transform(PlainNet(), recipe_a(), example_inputs=torch.zeros(2, 1, 8, 8))
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        w = graph.get_attr("c2.weight")
        extra = graph.call_function(torch.sum, (w,))
        extra.meta["fxsparse"] = {"pass": "GhostChannelPass", "group": "ghost_channels", "role": "branch"}
        total = graph.call_function(torch.add, (out.args[0], extra))
    out.args = (total,)
    gm.recompile()
    code = gm.code
    try:
        fxdist.fully_shard(gm, units=["c2"])
        errors["split"] = None
    except fxdist.DistributedError as e:
        errors["split"] = f"{type(e).__name__}: {e}"
    errors["split_untouched"] = gm.code == code and not fxsparse.fsdp.is_sharded(gm)
    return errors


# --------------------------------------------------------------------------- the worker (one rank)
def worker(out: Path) -> None:
    torch.set_num_threads(1)
    env = fxdist.init(timeout=timedelta(seconds=90))
    result: dict = {"rank": env.rank, "world": env.world_size}
    result["ddp"] = run_a(fsdp=False)
    result["fsdp"] = run_a(fsdp=True)
    result["b"] = run_b()
    result["errors"] = bad_units()
    torch.save(result, out / f"rank{env.rank}.pt")
    fxdist.destroy()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return torchrun_ranks(__file__, out)


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    worst = 0.0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].is_floating_point():
            worst = max(worst, (a[k] - b[k]).abs().max().item() if a[k].numel() else 0.0)
        else:
            assert torch.equal(a[k], b[k]), k
    return worst


def test_fsdp_per_layer_matches_ddp_through_removals(ranks):
    """FSDP2 with one unit per layer trains through both removals to DDP's weights."""
    for r in ranks:
        ddp, fsdp = r["ddp"], r["fsdp"]
        steps = [(e["group"], e["step"]) for e in fsdp["events"]]
        assert steps == [("ghost_neurons", 4), ("ghost_channels", 5)] == [(e["group"], e["step"]) for e in ddp["events"]]
        worst = _max_diff(ddp["state"], fsdp["state"])
        assert worst <= 1e-6, worst
        assert _max_diff(ddp["export"], fsdp["export"]) <= 1e-6
    print(f"FSDP2 per layer vs DDP after {STEPS} steps, 2 removals: max abs diff {worst:.3g}")


def test_units_shard_at_rest_and_keep_keys(ranks):
    """Every conv/linear is its own unit, in a module that keeps the layer's state-dict keys; at
    rest each rank holds a DTensor shard."""
    for r in ranks:
        f = r["fsdp"]
        assert f["units"] == {"c1": ["c1"], "c2": ["c2"], "fc": ["fc"]}
        assert set(f["unit_types"].values()) == {"FSDPShardUnit"}
        assert f["same_keys"] and f["local_state_is_dtensor"] == "DTensor"


def test_removed_parameters_leave_fsdp_and_are_freed(ranks):
    for r in ranks:
        f = r["fsdp"]
        by_step = {step: (nbytes, opt) for step, nbytes, opt in f["shard_bytes"]}
        # ghost neurons hold no parameters; the ghost channels' shards go at their removal (step 5)
        assert by_step[4][0] == by_step[0][0] > by_step[5][0] == by_step[STEPS][0]
        freed = by_step[4][0] - by_step[5][0]
        assert f["events"][1]["fsdp_shard_bytes_freed_at_step"] == freed > 0
        assert by_step[5][1] < by_step[4][1]  # and their optimizer state
        assert f["fsdp_params"] == f["module_params"]  # FSDP's groups hold exactly the module's parameters
        assert f["ghost_params"][0] > 0 and f["ghost_params"][1] == 0  # nothing keeps a removed parameter alive
    print(f"local shard bytes per rank: {by_step[0][0]} before, {by_step[5][0]} after the removal ({freed} freed)")


def test_masks_identical_on_both_ranks(ranks):
    r0, r1 = ranks
    assert r0["fsdp"]["masks"] and _max_diff(r0["fsdp"]["masks"], r1["fsdp"]["masks"]) == 0.0
    assert _max_diff(r0["fsdp"]["masks"], r0["ddp"]["masks"]) == 0.0


def test_export_loads_strict(ranks):
    for r in ranks:  # every rank gathers the whole state
        PlainNet().load_state_dict(r["fsdp"]["export"], strict=True)
        BlockNet().load_state_dict(r["b"]["export"], strict=True)
    assert _max_diff(ranks[0]["fsdp"]["export"], ranks[1]["fsdp"]["export"]) == 0.0


def test_block_unit_whole_recipe(ranks):
    """The whole recipe (LRsI, BatchNorm, ghost skips, all three removals at one step) with a block
    as one unit: its layers and BatchNorms share one FSDP group; the ranks agree."""
    r0, r1 = ranks
    assert r0["b"]["ghosts"] == ["ghost_neurons", "ghost_skips", "ghost_channels"]
    assert [(e["group"], e["step"]) for e in r0["b"]["events"]] == [(g, 5) for g in r0["b"]["ghosts"]]
    assert r0["b"]["events"][-1]["fsdp_shard_bytes_freed_at_step"] > 0
    assert r0["b"]["units"] == {"c1": ["c1"], "block": ["block.c2", "block.c3", "block.b2", "block.b3"], "fc": ["fc"]}
    assert _max_diff(r0["b"]["state"], r1["b"]["state"]) == 0.0


def test_bad_units_are_named(ranks):
    e = ranks[0]["errors"]
    assert e["tiny_model"].startswith("UnitError: the model is too small to shard over 2 ranks"), e["tiny_model"]
    assert "unit 'fxsparse.ghost_channels' is fxsparse state" in e["ghost_unit"]
    assert "unit 'c9': no such submodule" in e["no_such"]
    assert "unit 'block.c2' overlaps unit 'block'" in e["overlap"]
    assert "unit 'c2'" in e["split"] and "ghost_channels" in e["split"] and "splits the ghost branch from its layer" in e["split"], e["split"]
    assert e["split_untouched"]  # refused before anything changed
    assert ranks[1]["errors"] == e


def test_single_process_leaves_the_graph_alone():
    """Without a process group fully_shard is a no-op: the graph of a plain or DDP run never changes."""
    import fxsparse.fsdp

    gm = fxsparse.transform(PlainNet(), recipe_a(), example_inputs=torch.zeros(2, 1, 8, 8))
    code = gm.code
    assert fxdist.fully_shard(gm) is gm and gm.code == code and not fxsparse.fsdp.is_sharded(gm)
    assert all(type(m).__name__ != "ShardUnit" for m in gm.modules())


def test_fxsparse_train_fsdp_under_torchrun(tmp_path):
    """``fxsparse train --fsdp`` under ``torchrun --nproc-per-node 2`` (gloo, CPU): resnet8, tost on
    digits for one epoch, three removals; rank 0 writes the files, the weights load strict."""
    from safetensors.torch import load_file

    from fxsparse import nets

    script = Path(sys.executable).with_name("fxsparse")
    if not script.exists():
        pytest.skip("the fxsparse console script is not installed next to this Python")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0",
           str(script), "train", "fxsparse.nets:resnet8", "--recipe", "tost", "--data", "digits", "--epochs", "1",
           "--batch-size", "64", "--set", "training.crop_padding=1", "--sparsity", "0.8", "--lrsi-iters", "2",
           "--calib-batches", "2", "--device", "cpu", "--no-progress", "--fsdp", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("trained with recipe tost") == 1
    assert "no checkpoints under FSDP" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["fsdp"] == "layers" and summary["steps"] == 20
    assert [(e["group"], e["step"]) for e in summary["removals"]] == \
        [("ghost_neurons", 6), ("ghost_skips", 6), ("ghost_channels", 6)]
    assert summary["removals"][-1]["fsdp_shard_bytes_freed_at_step"] > 0
    assert 0.0 < summary["test_accuracy"] <= 1.0 and summary["sparsity"] == pytest.approx(0.8, abs=0.01)
    model = nets.resnet8(num_classes=10, in_chans=1)
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
