"""Checkpoints: atomic writes, the last N kept, damaged files detected and the previous one used."""
from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from fxsparse.tools.checkpoint import MANIFEST, CheckpointError, CheckpointManager, atomic_write, rng_state, set_rng_state


def _state(i: int) -> dict:
    return {"model": {"w": torch.full((64,), float(i))}, "epoch": i, "notes": [f"n{i}"], "rng": rng_state()}


def test_save_keeps_last_two_and_loads_newest(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    for epoch in (1, 2, 3):
        m.save(_state(epoch), epoch=epoch, step=10 * epoch)
    files = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))
    assert files == ["checkpoint-e0002-s00000020.pt", "checkpoint-e0003-s00000030.pt"]
    assert [e.epoch for e in m.entries()] == [2, 3]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [c["size"] for c in manifest["checkpoints"]] == [(tmp_path / f).stat().st_size for f in files]
    state, entry = m.load_latest()
    assert entry.epoch == 3 and state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.full((64,), 3.0))


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "missing"])
def test_damaged_newest_is_detected_and_previous_used(tmp_path, caplog, damage):
    m = CheckpointManager(tmp_path, keep=2)
    m.save(_state(1), epoch=1, step=10)
    newest = m.save(_state(2), epoch=2, step=20)
    data = newest.read_bytes()
    if damage == "truncated":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":  # same size: only the checksum can tell
        newest.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        newest.unlink()
    with caplog.at_level(logging.WARNING, logger="fxsparse.tools.checkpoint"):
        state, entry = m.load_latest()
    assert entry.epoch == 1 and state["epoch"] == 1
    expected = {"truncated": "truncated", "flipped byte": "SHA-256", "missing": "missing"}[damage]
    assert any(expected in r.message and newest.name in r.message for r in caplog.records), caplog.text


def test_every_checkpoint_damaged_is_an_error(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    for epoch in (1, 2):
        m.save(_state(epoch), epoch=epoch, step=epoch).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        m.load_latest()


def test_no_checkpoint_yet(tmp_path):
    assert CheckpointManager(tmp_path).load_latest() == (None, None)


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write(path, lambda f: f.write(b"old"))

    def killed_halfway(f):
        f.write(b"new, but ")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed_halfway)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_leftovers_of_a_killed_writer_are_ignored_and_cleaned(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    m.save(_state(1), epoch=1, step=10)
    # a writer killed mid-way leaves its temporary file, and a checkpoint the manifest never listed
    (tmp_path / ".checkpoint-e0002-s00000020.pt.tmp-999").write_bytes(b"partial")
    (tmp_path / "checkpoint-e0002-s00000020.pt").write_bytes(b"renamed, manifest not yet written")
    state, entry = m.load_latest()
    assert entry.epoch == 1
    m.save(_state(2), epoch=2, step=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-e0001-s00000010.pt", "checkpoint-e0002-s00000020.pt", MANIFEST]
    assert m.load_latest()[0]["epoch"] == 2


def test_unreadable_manifest_falls_back_to_the_files(tmp_path, caplog):
    m = CheckpointManager(tmp_path, keep=2)
    m.save(_state(1), epoch=1, step=10)
    m.save(_state(2), epoch=2, step=20)
    (tmp_path / MANIFEST).write_text("{ cut sho")
    with caplog.at_level(logging.WARNING, logger="fxsparse.tools.checkpoint"):
        state, entry = m.load_latest()
    assert entry.epoch == 2 and state["epoch"] == 2 and "unreadable" in caplog.text


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    m = CheckpointManager(tmp_path)
    m.save({"rng": rng_state()}, epoch=1, step=1)
    first = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(m.load_latest()[0]["rng"])  # torch.load(weights_only=True) inside
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


# --------------------------------------------------------------------------- sharded (DCP) checkpoints
def _module_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD([{"params": list(model.parameters())}, {"params": []}], lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()  # momentum buffers exist
    return model, opt


def _save_sharded(m: CheckpointManager, seed: int, epoch: int):
    from fxsparse.fsdp import save_sharded

    model, opt = _module_and_optimizer(seed)
    return m.save_sharded(lambda d: save_sharded(model, opt, d), {"epoch": epoch, "rng": rng_state()},
                          epoch=epoch, step=10 * epoch), model, opt


def test_sharded_checkpoint_round_trip_in_one_process(tmp_path):
    """A DCP checkpoint (a directory) in the same manifest: listed with every file's size and
    SHA-256, the newest ``keep`` kept, loaded back into a module and optimizer."""
    from fxsparse.fsdp import load_sharded, read_sharded

    m = CheckpointManager(tmp_path, keep=2)
    for epoch in (1, 2, 3):
        path, model, opt = _save_sharded(m, epoch, epoch)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-e0002-s00000020.dcp", "checkpoint-e0003-s00000030.dcp", MANIFEST]
    entry = m.entries()[-1]
    assert entry.sharded and sorted(entry.files) == [".metadata", "__0_0.distcp", "state.pt"]
    assert entry.size == sum(p.stat().st_size for p in path.iterdir())
    state, entry = m.load_latest()
    assert entry.epoch == 3 and state["epoch"] == 3 and state["sharded"] == str(path)
    fresh, fresh_opt = _module_and_optimizer(99)
    load_sharded(fresh, fresh_opt, state["sharded"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], fresh_opt.state[q]["momentum_buffer"])
               for p, q in zip(model.parameters(), fresh.parameters()))
    assert len(fresh_opt.param_groups) == 2 and fresh_opt.param_groups[1]["momentum"] == 0.9  # the empty group kept
    assert torch.equal(read_sharded(state["sharded"], "1.")["1.weight"], model[1].weight)


@pytest.mark.parametrize("damage", ["truncated shard", "flipped byte", "missing metadata", "missing directory"])
def test_damaged_sharded_checkpoint_falls_back(tmp_path, caplog, damage):
    m = CheckpointManager(tmp_path, keep=2)
    _save_sharded(m, 1, 1)
    newest, _, _ = _save_sharded(m, 2, 2)
    shard = newest / "__0_0.distcp"
    data = shard.read_bytes()
    if damage == "truncated shard":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "missing metadata":
        (newest / ".metadata").unlink()
    else:
        import shutil

        shutil.rmtree(newest)
    with caplog.at_level(logging.WARNING, logger="fxsparse.tools.checkpoint"):
        state, entry = m.load_latest()
    assert entry.epoch == 1 and state["epoch"] == 1
    expected = {"truncated shard": "__0_0.distcp has", "flipped byte": "__0_0.distcp's SHA-256",
                "missing metadata": ".metadata is missing", "missing directory": "missing"}[damage]
    assert any(expected in r.message and newest.name in r.message for r in caplog.records), caplog.text


def test_killed_sharded_writer_leaves_no_checkpoint(tmp_path):
    """A writer killed mid-way leaves only its temporary directory: never listed, never loaded,
    deleted by the next save. An existing checkpoint of the same step is replaced whole."""
    from fxsparse.fsdp import save_sharded

    m = CheckpointManager(tmp_path, keep=3)
    _save_sharded(m, 1, 1)
    model, opt = _module_and_optimizer(2)

    def killed_halfway(d):
        save_sharded(model, opt, d)
        (d / "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        m.save_sharded(killed_halfway, {"epoch": 2}, epoch=2, step=20)
    assert (tmp_path / ".checkpoint-e0002-s00000020.dcp.tmp").is_dir()
    assert not (tmp_path / "checkpoint-e0002-s00000020.dcp").exists()
    assert m.load_latest()[1].epoch == 1 and [e.epoch for e in m.entries()] == [1]
    _save_sharded(m, 2, 2)
    _save_sharded(m, 3, 2)  # the same step again (a run resumed from an older checkpoint): replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-e0001-s00000010.dcp", "checkpoint-e0002-s00000020.dcp", MANIFEST]
    assert [e.epoch for e in m.entries()] == [1, 2] and m.load_latest()[0]["epoch"] == 2


def test_sharded_checkpoints_found_with_an_unreadable_manifest(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    _save_sharded(m, 1, 1)
    _save_sharded(m, 2, 2)
    (tmp_path / MANIFEST).write_text("{ cut sho")
    state, entry = m.load_latest()
    assert entry.epoch == 2 and entry.size == -1 and state["epoch"] == 2
