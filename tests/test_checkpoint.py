"""Checkpoints: atomic writes, the last N kept, damaged files detected and the previous one used."""
from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from fxsparse.checkpoint import MANIFEST, CheckpointError, CheckpointManager, atomic_write, rng_state, set_rng_state


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
    with caplog.at_level(logging.WARNING, logger="fxsparse.checkpoint"):
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
    with caplog.at_level(logging.WARNING, logger="fxsparse.checkpoint"):
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
