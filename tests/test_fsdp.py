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
import shutil
import signal
import subprocess
import sys
import time
import warnings
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
from test_distributed import CHECKPOINT_AT, STEPS, PlainNet, batches, recipe_a, recipe_b, train_loader  # noqa: E402


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


def _full(gm) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return {k: v.clone() for k, v in get_model_state_dict(gm, options=StateDictOptions(full_state_dict=True)).items()}


def run_a(fsdp: bool, checkpoints: Path | None = None) -> dict:
    """Scenario A under DDP or under FSDP with one unit per layer, from the same start. Under FSDP
    with ``checkpoints``, a sharded checkpoint is written there after step ``CHECKPOINT_AT``
    (after the ghost neurons' removal, before the ghost channels')."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from fxsparse import fsdp as fxfsdp
    from fxsparse.tools.checkpoint import CheckpointManager

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
        if fsdp and checkpoints is not None and s.step_count == CHECKPOINT_AT:
            CheckpointManager(checkpoints).save_sharded(lambda d: fxfsdp.save_sharded(gm, s.optimizer, d),
                                                        {"scheduler": s.state_dict()}, epoch=0, step=s.step_count)
            full_optim = get_optimizer_state_dict(gm, s.optimizer, options=StateDictOptions(full_state_dict=True))
            out["at_checkpoint"] = {"model": _full(gm), "momentum": {
                k: v["momentum_buffer"].clone() for k, v in full_optim["state"].items()}, "dir": str(checkpoints)}

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
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        out["state"] = get_model_state_dict(gm, options=StateDictOptions(full_state_dict=True))
        out["fsdp_params"] = sum(len(g.fsdp_params) for _, g in fxfsdp._param_groups(gm))
        out["module_params"] = len(list(gm.parameters()))
        out["local_state_is_dtensor"] = type(gm.state_dict()["c2.weight"]).__name__
    else:
        out["state"] = {k: v.clone() for k, v in gm.state_dict().items()}
    return out


def run_resume(checkpoints: Path) -> dict:
    """Scenario A under FSDP resumed from the checkpoint ``run_a`` wrote at step ``CHECKPOINT_AT``:
    what ``fxsparse train --resume`` does, through the library."""
    from fxsparse import fsdp as fxfsdp
    from fxsparse.tools.checkpoint import CheckpointManager
    from fxsparse.scheduler import restore

    ckpt, entry = CheckpointManager(checkpoints).load_latest()
    weights = fxfsdp.read_sharded(ckpt["sharded"])  # whole, each rank by itself: masks and weights
    sched = restore(PlainNet(), {**ckpt, "model": weights}, example_inputs=torch.zeros(2, 1, 8, 8), make_optimizer=None)
    out = {"entry": entry, "removed_at_restore": list(sched.removed), "step_at_restore": sched.step_count}
    model = fxdist.fully_shard(sched.gm, units="layers", scheduler=sched)  # checks the ranks agree
    opt = sched.build_optimizer()
    fxfsdp.load_sharded(sched.gm, opt, ckpt["sharded"])
    fxdist.seed(0, per_rank=True)
    loader = fxdist.shard(train_loader())
    for x, y in batches(loader, CHECKPOINT_AT, STEPS):
        loss = sched.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model = fxdist.step(sched, model)
    out.update(events=sched.events, state=_full(sched.gm), export=fxdist.export(model),
               masks={k: v.clone() for k, v in sched.gm.state_dict().items() if k.startswith("fxsparse.masks.")})
    return out


def fsdp_resume_of_a_plain_checkpoint(out: Path) -> str | None:
    """``fxsparse train --fsdp --resume`` on a checkpoint written without --fsdp: the error."""
    from fxsparse.tools.train import TrainConfig, TrainError, Trainer

    try:
        Trainer(TrainConfig("fxsparse.nets:resnet8", out=str(out), fsdp="layers", resume=True))._resume({"scheduler": {}})
    except TrainError as e:
        return str(e)
    return None


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
    result["fsdp"] = run_a(fsdp=True, checkpoints=out / "checkpoints")
    result["resume"] = run_resume(out / "checkpoints")
    result["plain_checkpoint_error"] = fsdp_resume_of_a_plain_checkpoint(out / "plain")
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


def test_resume_from_a_sharded_checkpoint_is_bitwise(ranks):
    """Resumed on 2 ranks from the sharded checkpoint of step 4 (ghost neurons removed, ghost
    channels not yet): the removal is replayed before sharding, the channels go at step 5 as
    scheduled, and step 16 is bitwise the uninterrupted run's; masks identical on both ranks."""
    for r in ranks:
        res, ref = r["resume"], r["fsdp"]
        assert res["entry"].file == f"checkpoint-e0000-s{CHECKPOINT_AT:08d}.dcp"
        assert sorted(res["entry"].files) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
        assert res["removed_at_restore"] == ["ghost_neurons"] and res["step_at_restore"] == CHECKPOINT_AT
        assert res["events"] == ref["events"]
        assert _max_diff(ref["state"], res["state"]) == 0.0
        assert _max_diff(ref["export"], res["export"]) == 0.0
        PlainNet().load_state_dict(res["export"], strict=True)
    assert _max_diff(ranks[0]["resume"]["masks"], ranks[1]["resume"]["masks"]) == 0.0
    assert _max_diff(ranks[0]["resume"]["masks"], ranks[0]["fsdp"]["masks"]) == 0.0


def test_sharded_checkpoint_resumes_in_one_process(ranks):
    """DCP reshards: the checkpoint of 2 FSDP ranks loads into an unsharded module in one process
    (no process group): the weights and the momentum of step 4, whole."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from fxsparse import fsdp as fxfsdp
    from fxsparse.tools.checkpoint import CheckpointManager
    from fxsparse.scheduler import restore

    at = ranks[0]["fsdp"]["at_checkpoint"]
    ckpt, _ = CheckpointManager(at["dir"]).load_latest()
    sched = restore(PlainNet(), {**ckpt, "model": fxfsdp.read_sharded(ckpt["sharded"])},
                    example_inputs=torch.zeros(2, 1, 8, 8), make_optimizer=None)
    opt = sched.build_optimizer()
    fxfsdp.load_sharded(sched.gm, opt, ckpt["sharded"])
    assert _max_diff(at["model"], {k: v for k, v in sched.gm.state_dict().items()}) == 0.0
    momentum = {k: v["momentum_buffer"] for k, v in get_optimizer_state_dict(sched.gm, opt)["state"].items()}
    assert momentum.keys() == at["momentum"].keys() and _max_diff(at["momentum"], momentum) == 0.0
    # the empty param groups (ghost neurons hold no parameters) kept their own hyperparameters
    assert [g.get("fxsparse_group") for g in opt.param_groups if not g["params"]] == ["ghost_neurons"]
    assert all("weight_decay" in g and "momentum" in g for g in opt.param_groups)


def test_fsdp_resume_of_a_plain_checkpoint_is_refused(ranks):
    e = ranks[0]["plain_checkpoint_error"]
    assert e is not None and "written by a run without --fsdp" in e and "Resume it without --fsdp" in e, e


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


# --------------------------------------------------------------------------- fxsparse train --fsdp, killed and resumed
def _train_cmd(out: Path, *extra: str, torchrun: bool = True) -> list[str]:
    """resnet8, tost on digits: 2 epochs of 10 global batches. Ghost neurons go at step 6 (epoch 1),
    ghost skips and channels at step 16 (epoch 2): a run killed in epoch 2 resumes from epoch 1's
    checkpoint with one removal to replay and two still to come."""
    script = Path(sys.executable).with_name("fxsparse")
    if not script.exists():
        pytest.skip("the fxsparse console script is not installed next to this Python")
    sched = [f"--set={g}.schedule.{k}={at}" for g, at in (("ghost_neurons", 0.3), ("ghost_skips", 0.8),
                                                           ("ghost_channels", 0.8)) for k in ("anneal_until", "remove_at")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", "0"] if torchrun else [sys.executable]
    return [*launcher, str(script), "train", "fxsparse.nets:resnet8", "--recipe", "tost", "--data", "digits", "--epochs", "2",
            "--batch-size", "128", "--set", "training.crop_padding=1", "--sparsity", "0.8", "--lrsi-iters", "2",
            "--calib-batches", "2", "--device", "cpu", "--no-progress", "--no-val", "--deterministic", "--workers", "1",
            *sched, "--out", str(out), *extra]


_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_ENV)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (from /proc): torchrun starts each rank in a session
    of its own, so killing torchrun's process group would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_in_epoch(cmd: list[str], out: Path, epoch: int) -> None:
    """Start ``cmd`` and SIGKILL torchrun and both ranks at once (as a lost node would) once rank 0
    logged the first step of ``epoch``."""
    from fxsparse.tools.metrics import read_metrics

    if not Path("/proc/self/stat").exists():
        pytest.skip("finding torchrun's ranks needs /proc")
    log = open(out.parent / f"{out.name}.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_ENV)

    def kill_all() -> None:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and any(r["type"] == "step" and r["epoch"] == epoch for r in read_metrics(metrics)):
                kill_all()
                return
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            kill_all()
        log.seek(0)
        text = log.read()
        log.close()
    pytest.fail(f"the run ended (status {proc.returncode}) before epoch {epoch} began:\n{text[-3000:]}")


def _read_dcp(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model and optimizer), whole, read in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(directory))
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in reader.read_metadata().state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
    return state


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """(reference, killed-and-resumed, resume stdout, files the kill left): an uninterrupted
    ``fxsparse train --fsdp`` run under torchrun on 2 gloo processes, and the same run SIGKILLed in
    epoch 2 and resumed."""
    root = tmp_path_factory.mktemp("fsdp_train")
    reference, killed = root / "reference", root / "killed"
    stdout = _run(_train_cmd(reference, "--fsdp"))
    assert stdout.count("trained with recipe tost") == 1
    _kill_in_epoch(_train_cmd(killed, "--fsdp"), killed, epoch=2)
    time.sleep(1)  # nothing of the killed run may still be writing
    left = sorted(p.name for p in killed.iterdir())
    shutil.copytree(killed, root / "one_process")
    resumed = _run(_train_cmd(killed, "--fsdp", "--resume"))
    return reference, killed, resumed, left


def test_fsdp_checkpoint_resumes_in_one_process_without_fsdp(fsdp_runs):
    """The killed FSDP run's sharded checkpoint resumed by ``fxsparse train --resume`` in one plain
    process (no torchrun, no --fsdp): DCP loads the shards whole; the run finishes with the same
    removals and an export that loads strict. Not bitwise: one process normalizes each batch over
    all of it, two ranks over their halves."""
    from safetensors.torch import load_file

    from fxsparse import nets

    out = fsdp_runs[0].parent / "one_process"
    stdout = _run(_train_cmd(out, "--resume", torchrun=False))
    assert "resuming from checkpoint-e0001-s00000010.dcp (epoch 1, step 10)" in stdout
    assert "resumed a checkpoint sharded over 2 processes in one process" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [(e["group"], e["step"]) for e in summary["removals"]] == \
        [("ghost_neurons", 6), ("ghost_skips", 16), ("ghost_channels", 16)]
    assert summary["steps"] == 20 and summary["config"]["fsdp"] is None
    nets.resnet8(num_classes=10, in_chans=1).load_state_dict(load_file(out / "model.safetensors"), strict=True)
    a, b = load_file(out / "masks.safetensors"), load_file(fsdp_runs[0] / "masks.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fxsparse_train_fsdp_under_torchrun(fsdp_runs):
    """``fxsparse train --fsdp`` under ``torchrun --nproc-per-node 2`` (gloo, CPU): resnet8, tost on
    digits, three removals; rank 0 writes the files, the weights load strict; every epoch leaves a
    sharded checkpoint (a DCP directory, one shard file per rank)."""
    from safetensors.torch import load_file

    from fxsparse import nets
    from fxsparse.tools.checkpoint import CheckpointManager

    out = fsdp_runs[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["fsdp"] == "layers" and summary["steps"] == 20
    assert [(e["group"], e["step"]) for e in summary["removals"]] == \
        [("ghost_neurons", 6), ("ghost_skips", 16), ("ghost_channels", 16)]
    assert summary["removals"][-1]["fsdp_shard_bytes_freed_at_step"] > 0
    assert 0.0 < summary["test_accuracy"] <= 1.0 and summary["sparsity"] == pytest.approx(0.8, abs=0.01)
    model = nets.resnet8(num_classes=10, in_chans=1)
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    entries = CheckpointManager(out).entries()
    assert [(e.epoch, e.step, e.file) for e in entries] == \
        [(1, 10, "checkpoint-e0001-s00000010.dcp"), (2, 20, "checkpoint-e0002-s00000020.dcp")]
    assert sorted(entries[-1].files) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == \
        ["checkpoint-e0001-s00000010.dcp", "checkpoint-e0002-s00000020.dcp", "checkpoints.json"]


def test_fsdp_resume_after_sigkill_equals_uninterrupted(fsdp_runs):
    """Killed in epoch 2 (after the ghost neurons' removal at step 6, before the other two at
    step 16), resumed from epoch 1's sharded checkpoint: the removal replayed, the rest done as
    scheduled, and the end bitwise equal to the uninterrupted run: exported weights, masks, and
    the whole last checkpoint (weights, masks, momentum, lr schedule, scheduler)."""
    from safetensors.torch import load_file

    from fxsparse import nets
    from fxsparse.tools.checkpoint import CheckpointManager
    from fxsparse.tools.metrics import read_metrics

    reference, killed, stdout, left = fsdp_runs
    assert left == ["checkpoint-e0001-s00000010.dcp", "checkpoints.json", "config.json", "metrics.jsonl"], left
    assert "resuming from checkpoint-e0001-s00000010.dcp (epoch 1, step 10)" in stdout
    assert "resharded" not in stdout
    for name in ("model.safetensors", "masks.safetensors"):
        a, b = load_file(killed / name), load_file(reference / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    nets.resnet8(num_classes=10, in_chans=1).load_state_dict(load_file(killed / "model.safetensors"), strict=True)
    (sa, ea), (sb, eb) = CheckpointManager(killed).load_latest(), CheckpointManager(reference).load_latest()
    assert ea.step == eb.step == 20
    ta, tb = _read_dcp(Path(sa["sharded"])), _read_dcp(Path(sb["sharded"]))
    assert ta.keys() == tb.keys() and any(k.startswith("optim.state.") for k in ta)
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])][:5]
    assert sa["scheduler"] == sb["scheduler"] and sa["lr_scheduler"] == sb["lr_scheduler"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("step_time", "epoch_time", "elapsed")} for r in rs]  # noqa: E731
    ra, rb = read_metrics(killed / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in ra if r["type"] == "step"] == list(range(1, 21))
    assert strip(ra) == strip(rb)
    assert json.loads((killed / "summary.json").read_text())["removals"] == \
        json.loads((reference / "summary.json").read_text())["removals"]
