"""Training a transformed GraphModule with ``DistributedDataParallel``, launched by ``torchrun``.

What is different from plain DDP is the ghost removal: ``sched.step()`` deletes a ghost's
parameters from the module in place, and DDP registers its parameters (gradient buckets,
autograd hooks) when it is constructed, so the wrapper must be rebuilt after every removal.
The scheduler is a pure function of the step count, so every rank removes at the same step;
``step`` checks that and rebuilds the wrapper. Everything here is a no-op in a single process
(not launched by torchrun), so one code path serves both.

The integration in a training loop (docs/distributed.md has the whole story)::

    from fxsparse import distributed as fxdist

    env = fxdist.init()                                  # process group from torchrun's env
    fxdist.seed(seed)                                    # same on every rank: identical model and masks
    calib = list(itertools.islice(train, 8))             # from the *unsharded* loader: the same everywhere
    gm = fxsparse.transform(model.to(env.device), recipe, data=calib)
    train = fxdist.shard(train)                          # this rank's share; same global batch, same len
    sched = fxsparse.RecipeScheduler(gm, total_steps=epochs * len(train))
    opt, lr_sched = sched.build_optimizer(), sched.build_lr_scheduler()
    model = fxdist.wrap(gm, scheduler=sched)             # DDP (checks masks, graph, schedule agree)
    fxdist.seed(seed, per_rank=True)                     # dropout etc. differ per rank from here
    for x, y in train:
        loss = sched.loss(model(x), y); opt.zero_grad(); loss.backward(); opt.step(); lr_sched.step()
        model = fxdist.step(sched, model)                # sched.step(); rebuilds DDP after a removal
    fxdist.save_checkpoint(sched, "ckpt.pt")             # rank 0 writes, every rank waits
    totals = fxdist.all_reduce_metrics({"correct": c, "count": n})   # sums over ranks
    state = fxsparse.export(fxdist.unwrap(model))

FSDP2 instead of DDP: ``fully_shard(gm, units=...)`` (fxsparse/fsdp.py; docs/distributed.md, "FSDP2").

Buffers: ``wrap`` keeps DDP's default of broadcasting buffers from rank 0 at every forward
(BatchNorm running statistics, so every rank evaluates with rank 0's), except masks and gates:
masks never change and gates are set by the deterministic scheduler on every rank, so
``wrap`` checks them once instead of sending them at every step.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .errors import FxSparseError
from .pass_infra import CONTAINER

log = logging.getLogger(__name__)

__all__ = [
    "DistributedError", "Env", "init", "destroy", "is_distributed", "rank", "world_size",
    "is_main", "barrier", "all_gather_object", "seed", "shard", "wrap", "rewrap", "unwrap", "step", "broadcast_masks",
    "check_identical", "sync_buffers", "all_reduce_metrics", "all_reduce_tensors", "save_checkpoint", "fully_shard", "export",
]

# state the DDP wrapper need not sync at every forward: masks change only in [dynamic] updates, which
# rank 0 decides and broadcasts (fxsparse.masks.dynamic), gates are set by the deterministic scheduler on
# every rank (wrap checks both are identical instead); [dynamic]'s gradient probes are zeros, their
# gradients averaged at each mask update only
_NOT_SYNCED = (f"{CONTAINER}.masks.", f"{CONTAINER}.gates.", f"{CONTAINER}.dynamic.")
_WRAP_OPTIONS = "_fxsparse_ddp_options"  # attribute of a DDP made by wrap(): its options, for rewrap()
_GRAPH = "<graph code>"  # pseudo-entry of check_identical: the module's generated code


class DistributedError(FxSparseError):
    """Ranks disagree on something they must share (weights, masks, graph, schedule)."""


# --------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class Env:
    """Where this process sits: its rank, the number of ranks, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group (a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(backend: str | None = None, *, device: torch.device | str | None = None,
         timeout: timedelta | None = None) -> Env:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and pick this rank's device.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default nccl when the device is CUDA, gloo otherwise.
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. A CUDA device
            becomes the current device (NCCL and ``all_gather_object`` need that).
        timeout: for collectives (torch's default when ``None``).

    Without torchrun's environment (a plain ``python`` run) no process group is made and the
    ``Env`` says rank 0 of 1; every function of this module then does the single-process thing.
    Calling ``init`` again returns the same ``Env``.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_available() or ("WORLD_SIZE" not in os.environ and not dist.is_initialized()):
        return Env(0, 1, 0, device, None)
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"backend": backend}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator to this GPU up front
        dist.init_process_group(**kwargs)
        log.info("rank %d of %d on %s (%s)", dist.get_rank(), dist.get_world_size(), device, backend)
    return Env(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def destroy() -> None:
    """Leave the process group (at the end of a run; harmless without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (the rank that writes files and logs)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under NCCL, the CPU under gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed(value: int, *, per_rank: bool = False) -> int:
    """Seed Python's, NumPy's and torch's global generators; returns the seed used.

    Build the model, compute masks and transform with the same seed on every rank
    (``per_rank=False``), so everything starts identical; then ``per_rank=True`` (``value +
    rank``) so that dropout and any other randomness of the training steps differ between ranks.
    ``fxsparse.data.TensorLoader`` does not use these generators: a sharded loader already draws
    its augmentation from a per-rank stream of its own.
    """
    value = value + rank() if per_rank else value
    random.seed(value)
    torch.manual_seed(value)  # every CUDA device too
    try:
        import numpy as np

        np.random.seed(value % 2**32)
    except ImportError:  # numpy is optional for this
        pass
    return value


# --------------------------------------------------------------------------- data
def shard(loader, *, global_batch: bool = True):
    """This rank's share of an ``fxsparse.data.TensorLoader`` (what ``DistributedSampler`` is to a
    ``DataLoader``); the loader itself when not distributed.

    With ``global_batch=True`` (default) the loader's ``batch_size`` is the *global* batch: each
    rank gets ``batch_size / world_size`` of it, batch ``i`` of all ranks together is batch ``i``
    of the unsharded loader, and ``len`` does not change, so the recipe's lr, its schedule and the
    scheduler's ``total_steps`` mean the same with any number of GPUs. With ``False`` the batch
    size is per rank (the global batch grows with the number of ranks).
    """
    n = world_size()
    if n == 1:
        return loader
    if not hasattr(loader, "shard"):
        raise TypeError(f"shard() takes an fxsparse.data.TensorLoader; got {type(loader).__name__} (for a torch "
                        f"DataLoader, give it a torch.utils.data.DistributedSampler)")
    out = loader.shard(rank(), n)
    if global_batch:
        if loader.batch_size % n:
            raise DistributedError(
                f"a global batch of {loader.batch_size} does not split over {n} ranks: choose a batch size "
                f"divisible by the number of processes, or shard(..., global_batch=False) for {loader.batch_size} per rank")
        out.batch_size = loader.batch_size // n
    return out


# --------------------------------------------------------------------------- DDP
def wrap(module: nn.Module, *, scheduler=None, check: bool = True, **ddp_options: Any) -> nn.Module:
    """``DistributedDataParallel(module, **ddp_options)``, or ``module`` itself in a single process.

    Args:
        module: the transformed GraphModule, already on this rank's device.
        scheduler: its ``RecipeScheduler``; checked to have the same step, ``total_steps`` and
            removals on every rank (removals happen at a step count, so the ranks must agree on it).
        check: check that every rank holds the same masks, gates and graph (a checksum each,
            gathered once). DDP itself broadcasts rank 0's parameters and buffers here.
        ddp_options: for ``DistributedDataParallel``; ``device_ids`` defaults to the module's
            GPU. Kept on the wrapper, so ``rewrap`` and ``step`` build the next one alike.

    Masks and gates are left out of DDP's per-forward buffer broadcast (see the module docstring).
    """
    if not is_distributed():
        return module
    if isinstance(module, DDP):
        raise DistributedError("wrap() got a DistributedDataParallel: pass the module itself (ddp.module), "
                               "or rewrap(ddp) after a removal")
    if scheduler is not None:
        _check_same({"step": scheduler.step_count, "total_steps": scheduler.total_steps,
                     "removed": list(scheduler.removed)}, "the ghost schedule")
    if check:
        check_identical(module, prefixes=_NOT_SYNCED, graph=True)
    options = dict(ddp_options)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        options.setdefault("device_ids", [device.index])
    # DDP's hook for leaving tensors out of its syncs (a static method documented in its docstring; no
    # public API yet, pytorch#43690); keep whatever the user had set besides ours
    ignored = [n for n in getattr(module, "_ddp_params_and_buffers_to_ignore", ()) if not n.startswith(_NOT_SYNCED)]
    ignored += [n for n, _ in module.named_buffers() if n.startswith(_NOT_SYNCED)]
    DDP._set_params_and_buffers_to_ignore_for_model(module, ignored)
    ddp = DDP(module, **options)
    setattr(ddp, _WRAP_OPTIONS, options)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (what to export, checkpoint or evaluate), else ``model``."""
    return model.module if isinstance(model, DDP) else model


def rewrap(model: nn.Module, *, scheduler=None) -> nn.Module:
    """A new DDP wrapper around ``model.module``, with the options of the old one.

    Call it on every rank after the module's parameters changed (a ghost removal): the old
    wrapper's buckets and autograd hooks still expect the removed parameters, and its next
    forward fails with "Expected to have finished reduction in the prior iteration ...
    Parameter indices which did not receive grad". ``step`` does this for you.
    """
    if not isinstance(model, DDP):
        return model
    if hasattr(model, "_remove_autograd_hooks"):
        # unhook the old reducer now rather than whenever the old wrapper is garbage-collected
        model._remove_autograd_hooks()
    options = getattr(model, _WRAP_OPTIONS, None)
    if options is None:
        log.warning("rewrap: this DDP was not made by fxsparse.distributed.wrap; its options are not known, "
                    "the new one gets wrap()'s defaults")
        options = {}
    return wrap(model.module, scheduler=scheduler, **options)


def step(scheduler, model: nn.Module, loss: torch.Tensor | float | None = None) -> nn.Module:
    """``scheduler.step()``, then rebuild ``model``'s DDP wrapper if a ghost was removed.

    ``loss``: this rank's training loss of the step (default: ``scheduler.step_loss``, what
    ``sched.loss`` computed), passed on as the mean over ranks (one scalar all-reduce) while
    ``scheduler.waits_for_learning``: a ghost schedule that starts when the loss falls must start
    at the same step on every rank.

    Returns the model to use from now on (the same object unless a removal happened)::

        model = fxdist.step(sched, model)

    At a removal, first checks that every rank removed the same ghosts at the same step (one
    small all-gather, only at removals; a rank that did not remove would otherwise leave the
    others waiting in a collective that never matches).
    """
    removed = len(scheduler.removed)
    if is_distributed() and scheduler.due():
        # a removal may read BatchNorm statistics (GhostSkipPass(fold=True) folds with them), which
        # each rank updated from its own batch since the last forward: use rank 0's on every rank
        sync_buffers(model)
    if loss is None:
        loss = scheduler.step_loss  # what sched.loss computed this step (None unless a schedule waits)
    if scheduler.waits_for_learning and loss is not None:
        scheduler.step(all_reduce_metrics({"loss": loss}, op="mean")["loss"])
    else:
        scheduler.step()
    if len(scheduler.removed) == removed:
        return model
    if is_distributed() and _is_fsdp(model):
        # the same module stays in use; FSDP's groups must let go of the removed parameters
        from .fsdp import forget_removed

        _check_same({"step": scheduler.step_count, "removed": list(scheduler.removed)}, "the ghost removals")
        info = forget_removed(model)
        for event in scheduler.events[len(scheduler.events) - (len(scheduler.removed) - removed):]:
            event["fsdp_shard_bytes_freed_at_step"] = info["bytes"]  # all of this step's removals together
        log.info("fsdp: %d removed parameters left FSDP's groups (%d bytes of this rank's shards)",
                 info["parameters"], info["bytes"])
        return model
    if not isinstance(model, DDP):
        return model
    return rewrap(model, scheduler=scheduler)


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def fully_shard(gm: nn.Module, units="layers", **options: Any) -> nn.Module:
    """FSDP2 for a transformed GraphModule: ``fxsparse.fsdp.shard`` (see there and docs/distributed.md)."""
    from .fsdp import shard as _shard

    return _shard(gm, units, **options)


def export(model: nn.Module):
    """``fxsparse.export`` of a DDP-wrapped, FSDP-sharded or plain module. Under FSDP it gathers the
    full state dict, so every rank must call it (every rank gets the state)."""
    from .fsdp import export as _export

    return _export(unwrap(model))


# --------------------------------------------------------------------------- agreement checks
def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _check_same(value: Any, what: str) -> None:
    """Raise on every rank if ``value`` (picklable, comparable) differs between ranks."""
    values = all_gather_object(value)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        raise DistributedError(f"ranks disagree on {what}: rank 0 has {values[0]!r}, "
                               + ", ".join(f"rank {r} has {values[r]!r}" for r in bad[:3]))


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22  # elements per step of the checksum: bounds its temporary int64 copy (32 MiB)


def _checksums(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Per tensor, two integer sums of its bit pattern: a plain one and one weighted by position.

    Bitwise-equal tensors give equal sums (integer addition mod 2**64 is exact in any order);
    a changed bit changes the plain sum, moved values change the weighted one. Computed where the
    tensor lives (no copy of the model to the host), read back with one synchronization.
    """
    pairs = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        bits = flat.view(_INT_OF_SIZE[flat.element_size()])
        plain = torch.zeros((), dtype=torch.int64, device=t.device)
        weighted = torch.zeros((), dtype=torch.int64, device=t.device)
        for start in range(0, bits.numel(), _CHUNK):
            chunk = bits[start:start + _CHUNK].to(torch.int64)
            pos = torch.arange(start, start + chunk.numel(), device=t.device) % 65_521 + 1
            plain += chunk.sum()
            weighted += (chunk * pos).sum()
        pairs.append(torch.stack([plain, weighted]))
    out: list[tuple[int, int]] = [(0, 0)] * len(pairs)
    by_device: dict[torch.device, list[int]] = {}
    for i, pair in enumerate(pairs):
        by_device.setdefault(pair.device, []).append(i)
    for index in by_device.values():  # one transfer per device
        for i, pair in zip(index, torch.stack([pairs[i] for i in index]).tolist()):
            out[i] = tuple(pair)
    return out


def _fingerprint(obj: nn.Module | Mapping[str, torch.Tensor], prefixes, graph: bool) -> list[tuple]:
    if isinstance(obj, nn.Module):
        named = [(f"{n} (parameter)", t) for n, t in obj.named_parameters(remove_duplicate=False)]
        named += [(f"{n} (buffer)", t) for n, t in obj.named_buffers(remove_duplicate=False)]
    else:
        named = list(obj.items())
    if prefixes is not None:
        named = [(n, t) for n, t in named if n.startswith(tuple(prefixes))]
    for name, t in named:
        if type(t).__name__ == "DTensor":
            raise DistributedError(f"check_identical compares replicated tensors (DDP); {name} is a sharded "
                                   f"DTensor (FSDP), whose shards differ between ranks by design")
    sums = _checksums([t for _, t in named])
    rows = [(n, str(t.dtype), tuple(t.shape), s) for (n, t), s in zip(named, sums)]
    if graph and isinstance(obj, nn.Module) and hasattr(obj, "code"):
        rows.insert(0, (_GRAPH, "", (), hashlib.sha256(obj.code.encode()).hexdigest()))
    return rows


def check_identical(obj: nn.Module | Mapping[str, torch.Tensor], *, prefixes=None, graph: bool = True) -> int:
    """Check that every rank holds bitwise the same tensors; raise ``DistributedError`` if not.

    ``obj`` is a module (its parameters and buffers: weights, masks, gates, BatchNorm statistics;
    and for a GraphModule with ``graph=True``, its generated code, i.e. the graph) or a mapping
    of tensors (e.g. masks). ``prefixes`` limits the check to names starting with one of them.
    Each rank sends one checksum per tensor (an all-gather of small objects), so this is cheap
    enough to run after every removal or epoch. The error, raised on every rank, names the first
    differing tensor in rank 0's order, which ranks differ, and how many tensors differ in all.
    Returns the number of entries compared (0 in a single process).
    """
    if not is_distributed():
        return 0
    mine = _fingerprint(obj, prefixes, graph)
    everyone = all_gather_object(mine)
    ref = {row[0]: row[1:] for row in everyone[0]}
    differing: dict[str, list[int]] = {}  # name -> ranks that differ from rank 0, in rank 0's order
    for r, rows in enumerate(everyone[1:], start=1):
        theirs = {row[0]: row[1:] for row in rows}
        for name in list(ref) + [n for n in theirs if n not in ref]:
            if ref.get(name) != theirs.get(name):
                differing.setdefault(name, []).append(r)
    if not differing:
        return len(mine)
    name, ranks = next(iter(differing.items()))

    def describe(r: int) -> str:
        row = {x[0]: x[1:] for x in everyone[r]}.get(name)
        return "missing" if row is None else ("graph " + row[2][:12] if name == _GRAPH else f"{row[0]} {row[1]} checksum {row[2]}")

    what = "the graph (generated code)" if name == _GRAPH else repr(name)
    raise DistributedError(
        f"ranks hold different state: {len(differing)} of {len(ref)} entries differ; the first is {what}: rank 0 "
        f"has {describe(0)}, " + ", ".join(f"rank {r} has {describe(r)}" for r in ranks[:3]) + ". " + _hint(name))


def _hint(name: str) -> str:
    """What to do about the first difference check_identical found."""
    if name == _GRAPH or name.startswith(_NOT_SYNCED):
        return ("Build the model, masks and transform with the same seed and data on every rank "
                "(fxsparse.distributed.seed(s), calibration batches from the unsharded loader), or compute masks "
                "on rank 0 and broadcast_masks() them; step every rank's scheduler alike (fxsparse.distributed.step).")
    if name.endswith("(buffer)"):
        return ("Each rank updates buffers such as BatchNorm statistics from its own batch; "
                "fxsparse.distributed.sync_buffers(module) makes them agree.")
    return ("Parameters differ: DDP broadcasts rank 0's at construction and all-reduces gradients after, so "
            "something changed them on some ranks only (a step outside DDP, init_sync=False, a load on one rank).")


def broadcast_masks(masks: Mapping[str, torch.Tensor] | None, src: int = 0) -> dict[str, torch.Tensor]:
    """Rank ``src``'s masks on every rank, e.g. a data-driven mask computed once::

        masks = fxsparse.masks.compute(model, "snip", 0.95, data=batches) if fxdist.is_main() else None
        masks = fxdist.broadcast_masks(masks)
        gm = fxsparse.transform(model, recipe, masks=masks)

    Other ranks may pass ``None``. Names and shapes go as one small object, the masks as one
    packed ``uint8`` tensor. The result lies on the collective device (the GPU under NCCL).
    """
    if not is_distributed():
        if masks is None:
            raise ValueError("broadcast_masks in a single process needs the masks")
        return dict(masks)
    device = _comm_device()
    header = [None]
    if rank() == src:
        if masks is None:
            raise ValueError(f"broadcast_masks: rank {src} (the source) passed no masks")
        header = [[(n, tuple(m.shape)) for n, m in masks.items()]]
    dist.broadcast_object_list(header, src=src)
    names_shapes = header[0]
    total = sum(torch.Size(s).numel() for _, s in names_shapes)
    if rank() == src:
        packed = torch.cat([m.detach().reshape(-1).to(device=device, dtype=torch.uint8) for m in masks.values()]) \
            if masks else torch.empty(0, dtype=torch.uint8, device=device)
    else:
        packed = torch.empty(total, dtype=torch.uint8, device=device)
    dist.broadcast(packed, src=src)
    out, start = {}, 0
    for name, shape in names_shapes:
        n = torch.Size(shape).numel()
        out[name] = packed[start:start + n].view(shape).bool()
        start += n
    return out


def sync_buffers(module: nn.Module, *, op: str = "broadcast", src: int = 0) -> None:
    """Make ``module``'s floating-point buffers (BatchNorm running statistics) agree across ranks.

    Under DDP every rank updates its BatchNorm statistics from its own batch, and DDP overwrites
    them with rank 0's at the next forward; right after training they differ. Call this before
    evaluating on every rank or checking with ``check_identical``. ``op="broadcast"`` takes rank
    ``src``'s (what DDP does); ``op="mean"`` averages them (timm's ``distribute_bn(reduce=True)``).
    Integer buffers (``num_batches_tracked``) and masks are the same on every rank anyway.
    """
    if op not in ("broadcast", "mean"):
        raise ValueError(f"op must be 'broadcast' or 'mean'; got {op!r}")
    if not is_distributed():
        return
    device = _comm_device()
    for name, buf in unwrap(module).named_buffers():
        if not buf.is_floating_point() or name.startswith(_NOT_SYNCED):
            continue
        t = buf.detach().to(device)
        if op == "broadcast":
            dist.broadcast(t, src=src)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= dist.get_world_size()
        with torch.no_grad():
            buf.copy_(t)


_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce_tensors(tensors: list[torch.Tensor], op: str = "mean") -> list[torch.Tensor]:
    """Reduce each tensor over the ranks in place (``"sum"``, ``"mean"``, ``"max"``, ``"min"``);
    every rank gets the result. Nothing happens in a single process. Used for [dynamic]'s RigL
    gradients at a mask update: one flat collective for all of them."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}; got {op!r}")
    if not is_distributed() or not tensors:
        return tensors
    device = _comm_device()
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float32) for t in tensors])
    dist.all_reduce(flat, op=getattr(dist.ReduceOp, _OPS[op]))
    if op == "mean":
        flat /= dist.get_world_size()
    start = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[start:start + n].view(t.shape).to(t.dtype))  # view(shape): logical order, any strides
            start += n
    return tensors


def all_reduce_metrics(metrics: Mapping[str, float | int | torch.Tensor], op: str = "sum") -> dict[str, float]:
    """Reduce a dict of numbers over ranks (one collective); returns plain floats.

    Sum counts and totals (``{"correct": c, "count": n, "loss_sum": s}``) and divide afterwards:
    that is exact when ranks saw different numbers of examples, a mean of means is not.
    ``op`` is ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``. Every rank gets the result.
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}; got {op!r}")
    names = list(metrics)
    try:
        values = [float(v.item() if isinstance(v, torch.Tensor) else v) for v in metrics.values()]
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"all_reduce_metrics takes numbers or one-element tensors; got {dict(metrics)!r}") from e
    if not is_distributed():
        return dict(zip(names, values))
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]))
    if op == "mean":
        t /= dist.get_world_size()
    return dict(zip(names, t.tolist()))


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(scheduler, path: str | os.PathLike, **extra: Any) -> Path:
    """Rank 0 writes ``scheduler.checkpoint()`` (plus ``extra`` entries) to ``path``; every rank
    waits until the file is complete.

    Every rank holds the same weights and optimizer state under DDP, so one copy is the whole
    state. The file is written next to ``path`` and renamed, so a crash never leaves half a
    checkpoint. Resume on every rank (the model on its device first: ``restore`` builds the
    optimizer and loads its state onto the parameters' device), then wrap again::

        sched = fxsparse.scheduler.restore(make_model().to(env.device), torch.load(path, map_location=env.device))
        model = fxdist.wrap(sched.gm, scheduler=sched)
    """
    path = Path(path)
    if is_main():
        ckpt = scheduler.checkpoint()
        ckpt.update(extra)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    barrier()
    return path
