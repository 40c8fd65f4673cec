"""Checkpoints that survive a crash: atomic writes, a checksum manifest, the last few kept.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, and then
renamed over its final name with ``os.replace`` (atomic on POSIX), so a kill at any moment leaves
either the old file or the new one, never half of one. The file's size and SHA-256 go into a
manifest (``checkpoints.json``, itself replaced atomically) *after* the file is in place; loading
checks both, so a checkpoint truncated or damaged afterwards (a full disk, a copy cut short) is
detected and the previous one is used, with a warning.

    manager = CheckpointManager("runs/x", keep=2)
    manager.save(state, epoch=3, step=84)
    state, entry = manager.load_latest(map_location="cpu")   # (None, None) when there is none

States are loaded with ``torch.load(weights_only=True)``: tensors, containers and plain values
only, no code runs. ``rng_state()`` / ``set_rng_state()`` capture every random generator in that
form.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import FxSparseError

log = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "CheckpointError", "Entry", "atomic_write", "rng_state", "set_rng_state", "MANIFEST"]

MANIFEST = "checkpoints.json"
_FORMAT = "fxsparse-checkpoints"


class CheckpointError(FxSparseError):
    """No usable checkpoint could be found or written."""


@dataclass(frozen=True)
class Entry:
    """One checkpoint in the manifest."""

    file: str
    epoch: int
    step: int
    size: int
    sha256: str


# --------------------------------------------------------------------------- atomic files
class _HashingWriter:
    """A write-only file wrapper that counts and hashes what goes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.size, self.hash = f, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(directory: Path) -> None:
    # the rename itself must reach the disk, or a power cut can undo it
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> tuple[int, str]:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same directory,
    which is flushed, fsynced and renamed over ``path``. Returns ``(size, sha256 hex)``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            write(w)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return w.size, w.hash.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- manager
class CheckpointManager:
    """Numbered checkpoints in ``directory``, the newest ``keep`` of them listed in a manifest."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2, prefix: str = "checkpoint"):
        if keep < 1:
            raise ValueError(f"keep must be >= 1; got {keep}")
        self.directory, self.keep, self.prefix = Path(directory), keep, prefix
        self.manifest = self.directory / MANIFEST

    def entries(self) -> list[Entry]:
        """The checkpoints the manifest lists, oldest first ([] without a readable manifest)."""
        try:
            data = json.loads(self.manifest.read_text())
            return [Entry(**e) for e in data["checkpoints"]]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s is unreadable (%s); looking at the checkpoint files themselves", self.manifest, e)
            return self._scan()

    def _scan(self) -> list[Entry]:
        """Checkpoint files without a manifest: unverifiable, ordered by step."""
        found = []
        for p in self.directory.glob(f"{self.prefix}-*.pt"):
            try:
                epoch, step = (int(part[1:]) for part in p.stem.split("-")[1:3])
            except ValueError:
                continue
            found.append(Entry(p.name, epoch, step, -1, ""))
        return sorted(found, key=lambda e: e.step)

    def save(self, state: dict[str, Any], *, epoch: int, step: int) -> Path:
        """Write ``state`` as the newest checkpoint, then forget (and delete) all but the newest ``keep``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{self.prefix}-e{epoch:04d}-s{step:08d}.pt"
        size, digest = atomic_write(self.directory / name, lambda f: torch.save(state, f))
        kept = [e for e in self.entries() if e.file != name] + [Entry(name, epoch, step, size, digest)]
        kept = kept[-self.keep:]
        doc = {"format": _FORMAT, "checkpoints": [asdict(e) for e in kept]}
        atomic_write(self.manifest, lambda f: f.write(json.dumps(doc, indent=1).encode()))
        self._delete_unlisted({e.file for e in kept})
        return self.directory / name

    def _delete_unlisted(self, listed: set[str]) -> None:
        for p in self.directory.glob(f"{self.prefix}-*.pt"):
            if p.name not in listed:
                p.unlink(missing_ok=True)
        for p in self.directory.glob(f".{self.prefix}-*.pt.tmp-*"):  # left by a killed writer
            p.unlink(missing_ok=True)

    def problem(self, entry: Entry) -> str | None:
        """Why ``entry``'s file cannot be trusted, or ``None`` when its size and checksum match."""
        path = self.directory / entry.file
        if not path.is_file():
            return "missing"
        if entry.size < 0:
            return None  # found without a manifest: torch.load's own checks are all there is
        size = path.stat().st_size
        if size != entry.size:
            return f"{size} bytes instead of {entry.size} (truncated or overwritten)"
        if _sha256(path) != entry.sha256:
            return "damaged (its SHA-256 does not match the manifest)"
        return None

    def load_latest(self, map_location: Any = None) -> tuple[dict[str, Any] | None, Entry | None]:
        """The newest checkpoint that passes its checks, as ``(state, entry)``; ``(None, None)`` when
        there is no checkpoint. A damaged newer one is skipped with a warning."""
        entries = self.entries()
        for entry in reversed(entries):
            reason = self.problem(entry)
            if reason is None:
                try:
                    return torch.load(self.directory / entry.file, map_location=map_location, weights_only=True), entry
                except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
                    reason = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            log.warning("checkpoint %s is %s; using the previous one", self.directory / entry.file, reason)
        if entries:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: all {len(entries)} listed in {MANIFEST} "
                                  f"failed their checks (see the warnings above). Start a new run with another --out.")
        return None, None


# --------------------------------------------------------------------------- random state
def rng_state() -> dict[str, Any]:
    """Every random generator a training loop may draw from, in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.cpu().numpy().astype(np.uint32), *rest))  # loaded to a GPU maybe
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
