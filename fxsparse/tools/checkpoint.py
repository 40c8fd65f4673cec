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

A *sharded* checkpoint (FSDP2: each rank holds only its shards) is a directory instead of a file,
written by every rank at once with ``torch.distributed.checkpoint`` (DCP)::

    manager.save_sharded(lambda d: fxsparse.fsdp.save_sharded(gm, opt, d), state, epoch=3, step=84)

It is written the same way: into a temporary directory ``.checkpoint-e0003-s00000084.dcp.tmp``
(DCP's per-rank ``__<rank>_0.distcp`` files and ``.metadata``, then rank 0's ``state.pt`` with
the small non-tensor ``state``), every file fsynced, and renamed to
``checkpoint-e0003-s00000084.dcp`` by rank 0 once every rank has written; then the manifest lists
it with every file's size and SHA-256 (hashed in parallel, each rank a share of the files). A
crash before the rename leaves only the temporary directory, which no manifest lists and the next
save deletes. ``load_latest`` returns ``state.pt``'s dict with ``"sharded"``: the directory, for
``fxsparse.fsdp.load_sharded``; under a process group every rank checks a share of the files and
all ranks take the same decision. The directory must be on a filesystem every rank sees.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .. import distributed as fxdist
from ..errors import FxSparseError

log = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "CheckpointError", "Entry", "atomic_write", "rng_state", "set_rng_state", "MANIFEST",
           "SHARDED_STATE"]

MANIFEST = "checkpoints.json"
SHARDED_STATE = "state.pt"  # a sharded checkpoint's non-tensor state, beside DCP's files
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
    files: dict[str, list] | None = None  # a sharded checkpoint (a directory): {name: [size, sha256]}

    @property
    def sharded(self) -> bool:
        return self.files is not None or self.file.endswith(".dcp")


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
        for p in [*self.directory.glob(f"{self.prefix}-*.pt"), *self.directory.glob(f"{self.prefix}-*.dcp")]:
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
        self._list(Entry(name, epoch, step, size, digest))
        return self.directory / name

    def _list(self, entry: Entry) -> None:
        """Add ``entry`` to the manifest as the newest, keep the newest ``keep``, delete the rest."""
        kept = [e for e in self.entries() if e.file != entry.file] + [entry]
        kept = kept[-self.keep:]
        doc = {"format": _FORMAT, "checkpoints": [{k: v for k, v in asdict(e).items() if v is not None or k != "files"}
                                                  for e in kept]}
        atomic_write(self.manifest, lambda f: f.write(json.dumps(doc, indent=1).encode()))
        self._delete_unlisted({e.file for e in kept})

    def save_sharded(self, write, state: dict[str, Any], *, epoch: int, step: int) -> Path:
        """A sharded checkpoint: collective, every rank calls it with the same ``epoch`` and ``step``.

        ``write(directory)`` is called on every rank and writes this rank's shards there (with
        ``fxsparse.fsdp.save_sharded``); rank 0 adds ``state`` (small, non-tensor: scheduler, lr
        schedule, generators, ...) as ``state.pt``. All of it goes into a temporary directory that
        rank 0 renames once every rank is done, then the manifest lists it. Returns its path.
        """
        name = f"{self.prefix}-e{epoch:04d}-s{step:08d}.dcp"
        final, tmp = self.directory / name, self.directory / f".{name}.tmp"
        rank, world = fxdist.rank(), fxdist.world_size()
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a writer killed at this same step
            tmp.mkdir()
        fxdist.barrier()
        write(tmp)
        if rank == 0:
            atomic_write(tmp / SHARDED_STATE, lambda f: torch.save(state, f))
        fxdist.barrier()  # every file is in place (DCP's .metadata is written after every rank's shards)
        names = sorted(p.name for p in tmp.iterdir() if p.is_file() and not p.name.startswith(f".{SHARDED_STATE}"))
        mine = {n: [(tmp / n).stat().st_size, _sha256(tmp / n)] for n in names[rank::world]}
        files: dict[str, list] = {}
        for part in fxdist.all_gather_object(mine):
            files.update(part)
        if rank == 0:
            _fsync_dir(tmp)
            if final.exists():  # written before by a run that resumed from an older checkpoint
                old = self.directory / f".{name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            files = dict(sorted(files.items()))
            self._list(Entry(name, epoch, step, sum(v[0] for v in files.values()), _listing_digest(files), files))
        fxdist.barrier()
        return final

    def _delete_unlisted(self, listed: set[str]) -> None:
        for p in [*self.directory.glob(f"{self.prefix}-*.pt"), *self.directory.glob(f"{self.prefix}-*.dcp")]:
            if p.name not in listed:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        # left by a killed writer
        for p in [*self.directory.glob(f".{self.prefix}-*.pt.tmp-*"), *self.directory.glob(f".{self.prefix}-*.dcp.tmp"),
                  *self.directory.glob(f".{self.prefix}-*.dcp.old")]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def problem(self, entry: Entry, share: tuple[int, int] = (0, 1)) -> str | None:
        """Why ``entry``'s file cannot be trusted, or ``None`` when its size and checksum match.

        A sharded checkpoint: every listed file's size, and the checksums of ``share = (i, n)``:
        every n-th file from the i-th (each rank its share; ``(0, 1)`` for all)."""
        path = self.directory / entry.file
        if entry.sharded:
            return self._dir_problem(entry, path, share)
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

    def _dir_problem(self, entry: Entry, path: Path, share: tuple[int, int]) -> str | None:
        if not path.is_dir():
            return "missing"
        if entry.files is None:  # found without a manifest
            return None if (path / SHARDED_STATE).is_file() and (path / ".metadata").is_file() else \
                f"incomplete (no {SHARDED_STATE} or .metadata)"
        if _listing_digest(entry.files) != entry.sha256:
            return "listed wrongly (its file list does not match the manifest's checksum)"
        names = sorted(entry.files)
        for name in names:
            if not (path / name).is_file():
                return f"incomplete ({name} is missing)"
            size = (path / name).stat().st_size
            if size != entry.files[name][0]:
                return f"damaged ({name} has {size} bytes instead of {entry.files[name][0]}: truncated or overwritten)"
        i, n = share
        for name in names[i::n]:
            if _sha256(path / name) != entry.files[name][1]:
                return f"damaged ({name}'s SHA-256 does not match the manifest)"
        return None

    def load_latest(self, map_location: Any = None) -> tuple[dict[str, Any] | None, Entry | None]:
        """The newest checkpoint that passes its checks, as ``(state, entry)``; ``(None, None)`` when
        there is no checkpoint. A damaged newer one is skipped with a warning."""
        entries = self.entries()
        for entry in reversed(entries):
            share = (fxdist.rank(), fxdist.world_size()) if entry.sharded else (0, 1)
            reason, state = self.problem(entry, share), None
            if reason is None:
                path = self.directory / entry.file
                try:
                    state = torch.load(path / SHARDED_STATE if entry.sharded else path, map_location=map_location,
                                       weights_only=True)
                except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
                    reason = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            if entry.sharded:  # every rank checked a share: all must take the same checkpoint
                reason = next((r for r in fxdist.all_gather_object(reason) if r is not None), None)
            if reason is None:
                if entry.sharded:
                    state["sharded"] = str(path)
                return state, entry
            log.warning("checkpoint %s is %s; using the previous one", self.directory / entry.file, reason)
        if entries:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: all {len(entries)} listed in {MANIFEST} "
                                  f"failed their checks (see the warnings above). Start a new run with another --out.")
        return None, None


def _listing_digest(files: dict[str, list]) -> str:
    """One SHA-256 for a sharded checkpoint: over its files' names, sizes and checksums."""
    return hashlib.sha256("".join(f"{n} {v[0]} {v[1]}\n" for n, v in sorted(files.items())).encode()).hexdigest()


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
