"""The reference trainer behind ``fxsparse train``: a recipe, real data, checkpoints, resume, export.

    from fxsparse.tools.train import TrainConfig, Trainer
    summary = Trainer(TrainConfig("fxsparse.nets:resnet8", out="runs/x", overrides={"training.epochs": 6})).run()

What a run does, in order:

1. loads the data (``fxsparse.data``) and the recipe (with ``overrides``, dotted keys);
2. builds the model with the data's classes and channels (``in_chans=1`` for gray images when
   the constructor takes it, else the gray channel is repeated);
3. computes the mask once (data-driven methods and LRsI use ``calib_batches`` training batches;
   IMP trains short rounds here), runs ``fxsparse.transform`` and builds the recipe's optimizer
   and lr schedule through ``RecipeScheduler``;
4. trains, logging every step to ``metrics.jsonl`` and writing a checkpoint atomically after
   every epoch (``fxsparse.tools.checkpoint``);
5. evaluates on test (and validation), exports the weights (``model.safetensors``, loads strict
   into the original class) and the masks (``masks.safetensors``), writes ``summary.json`` and
   PNG plots.

Resuming (``resume=True``) continues from the newest valid checkpoint in ``out``: the removals
that had happened are replayed before the weights load (``fxsparse.scheduler.restore``), then
optimizer, lr schedule, random generators and the metrics log are put back; each epoch's batches
come from a generator seeded by (seed, epoch), so the interrupted epoch is replayed exactly.
docs/training.md documents every option and output.

Under ``torchrun --nproc-per-node N`` the run is DDP (``fxsparse.distributed``): every rank builds
the same model and masks, trains on its share of each global batch, and rank 0 alone writes files
and prints (docs/distributed.md). In a single process nothing changes. With ``fsdp`` the run is
FSDP2 instead, and its checkpoints are sharded: a ``torch.distributed.checkpoint`` directory per
epoch that every rank writes (``CheckpointManager.save_sharded``); resuming one rebuilds the graph
stage the same way, shards, then loads each rank's shards (``_resume_sharded``).
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as fxdist
from .checkpoint import CheckpointManager, atomic_write, rng_state, set_rng_state
from ..errors import FxSparseError
from ..scheduler import LEARNING_WINDOW, loss_has_fallen, loss_window_means
from ..transform import GHOSTS_OFF_KEY
from .metrics import MetricsLog

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "Trainer", "TrainError", "train", "CPU_LRSI_ITERS", "recalibrate_batchnorm"]

# LRsI costs a double backward per iteration: the authors' 180 iterations take minutes on a CPU,
# longer than a short run's whole training. On CPU the trainer caps them unless they are set.
CPU_LRSI_ITERS = 30
_IMP_EPOCH_BASE = 1_000_000  # data-order epochs used by IMP rounds, apart from training's
# ghosts that leave before the training loss has begun to fall (the scheduler's test,
# fxsparse.scheduler.loss_has_fallen) get a note: on the map's fresh seeds (docs/results.md, V) the
# MobileNetV2 short runs that `tost` loses sat at 0.99-1.00 of their start there, every other run
# at 0.49-0.97 but networks a mask cut apart
_NOTHING_LEARNED = "the ghost phase ended before the network learned anything"
_RECAL_EPOCH_BASE = 2_000_000  # data-order epochs of BatchNorm re-estimation after a removal (+ step)
_SHORT = {"ghost_neurons": "neu", "ghost_skips": "skip", "ghost_channels": "chan"}


class TrainError(FxSparseError):
    """A training run cannot start or continue as asked."""


@dataclass
class TrainConfig:
    """Everything ``fxsparse train`` takes; the recipe's ``[training]`` holds the protocol.

    ``overrides`` are dotted recipe keys (``{"training.epochs": 6, "masks.sparsity": 0.98}``).
    ``bf16`` / ``channels_last``: ``None`` means on for CUDA, off otherwise. ``lrsi_iters``:
    ``None`` takes the recipe's, capped at ``CPU_LRSI_ITERS`` on CPU.
    """

    model: str
    out: str = "runs/train"
    data: str = "mnist5k"
    data_root: str | None = None
    recipe: str = "tost"
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    bf16: bool | None = None
    channels_last: bool | None = None
    compile: bool = False
    deterministic: bool = False
    threads: int | None = None
    val: bool = True
    resume: bool = False
    calib_batches: int = 8
    lrsi_iters: int | None = None
    imp_epochs: int = 1
    keep_checkpoints: int = 2
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    quiet: bool = False
    fsdp: str | None = None  # under torchrun: FSDP2 units, "layers" or comma-separated module names; None: DDP

    # what defines a run: resuming with other values would continue a different run
    IDENTITY: ClassVar[tuple[str, ...]] = ("model", "data", "data_root", "recipe", "overrides", "seed",
                                           "calib_batches", "lrsi_iters", "imp_epochs")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available here; use --device cpu (or auto).")
    return device


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config`` to the end; returns the summary (also written to ``out/summary.json``)."""
    return Trainer(config).run()


class Trainer:
    """One training run. ``run()`` does it all; the attributes are there to inspect afterwards:
    ``gm`` (the trained GraphModule), ``sched``, ``metrics``, ``summary``."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.out = Path(config.out)
        self.notes: list[str] = []
        self.checkpoints = CheckpointManager(self.out, keep=config.keep_checkpoints)
        self.summary: dict[str, Any] = {}
        self._rank_rng: dict[str, Any] | None = None  # this rank's generators, from a sharded checkpoint

    # ------------------------------------------------------------------ entry
    def run(self) -> dict[str, Any]:
        wall = time.perf_counter()
        self._runtime()
        self._load_data()
        ckpt = self._existing_checkpoint()
        fxdist.barrier()  # every rank has looked for a run before rank 0 writes config.json
        if ckpt is None:
            self._start()
        else:
            self._resume(ckpt)
        if fxdist.is_distributed():  # identical setup done: dropout etc. differ per rank from here
            fxdist.seed(self.config.seed, per_rank=True)
            if self._rank_rng is not None:  # a sharded checkpoint holds every rank's generators
                set_rng_state(self._rank_rng)
        self._fit()
        summary = self._finish(time.perf_counter() - wall)
        fxdist.destroy()
        return summary

    # ------------------------------------------------------------------ setup
    def _runtime(self) -> None:
        c = self.config
        if c.calib_batches < 1:
            raise TrainError(f"calib_batches = {c.calib_batches}: masks and LRsI need at least one training batch.")
        if c.threads:
            torch.set_num_threads(c.threads)
        self.env = fxdist.init(device=resolve_device(c.device))  # a process group under torchrun
        self.device = self.env.device
        torch.manual_seed(c.seed)  # ghost branch inits and anything else drawing from the global streams
        random.seed(c.seed)
        np.random.seed(c.seed)
        cuda = self.device.type == "cuda"
        self.bf16 = cuda if c.bf16 is None else c.bf16
        if self.bf16 and cuda and not torch.cuda.is_bf16_supported():
            self._note("this GPU has no bfloat16: training in float32")
            self.bf16 = False
        self.channels_last = cuda if c.channels_last is None else c.channels_last
        if c.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif cuda:
            torch.backends.cudnn.benchmark = True
        self.progress = sys.stderr.isatty() if c.progress is None else c.progress
        self.sync_every = 1 if self.device.type == "cpu" else 25  # .item() stalls a GPU: read losses in batches

    def _load_data(self) -> None:
        from .. import data

        c = self.config
        name, root = c.data, c.data_root
        if name not in data.DATASETS and Path(name).is_dir():
            name, root = "imagefolder", name  # a directory of class folders
        try:
            self.splits = data.load(name, root=root, seed=c.seed)
        except data.DataError as e:
            raise TrainError(f"--data {c.data}: {e}") from None

    def _existing_checkpoint(self) -> dict[str, Any] | None:
        c = self.config
        started = (self.out / "config.json").exists() or bool(self.checkpoints.entries())
        if not c.resume:
            if started:
                raise TrainError(f"{self.out} already holds a run (config.json, checkpoints): pass --resume to "
                                 f"continue it, or choose another --out.")
            return None
        ckpt, entry = self.checkpoints.load_latest(map_location=self.device)
        if ckpt is None:
            self._note(f"--resume: no checkpoint in {self.out} yet, starting from the beginning")
            return None
        saved = ckpt["config"]
        differ = [k for k in TrainConfig.IDENTITY if saved.get(k) != getattr(c, k)]
        if differ:
            what = ", ".join(f"{k}: {saved.get(k)!r} then, {getattr(c, k)!r} now" for k in differ)
            raise TrainError(f"--resume: the run in {self.out} was started with other settings ({what}). Resume with "
                             f"the same arguments, or start a new run with another --out.")
        self._say(f"resuming from {entry.file} (epoch {entry.epoch}, step {entry.step})")
        return ckpt

    def _recipe(self):
        from ..recipe import load_recipe

        c = self.config
        overrides = dict(c.overrides)
        if c.lrsi_iters is not None:
            overrides["rescale.iters"] = c.lrsi_iters
        overrides.setdefault("masks.seed", c.seed)  # another seed, another random mask
        recipe = load_recipe(c.recipe, overrides=overrides)
        rescale = recipe.passes.get("rescale")
        iters = rescale.options.get("iters", 180) if rescale is not None and rescale.enabled else 0
        if self.device.type == "cpu" and "rescale.iters" not in overrides and iters > CPU_LRSI_ITERS:
            recipe = recipe.replace({"rescale.iters": CPU_LRSI_ITERS})
            self._note(f"LRsI capped at {CPU_LRSI_ITERS} iterations on CPU (the recipe says {iters}; "
                       f"--lrsi-iters N to choose)")
        return recipe

    def _build_model(self) -> tuple[nn.Module, int]:
        """(model on the device, input channels it takes); seeded, so a resume builds the same one."""
        from ..models import create

        spec, chans, n = self.config.model, self.splits.shape[0], self.splits.num_classes
        extra = {"in_chans": chans} if chans != 3 else {}

        def build(**kwargs) -> nn.Module:
            with torch.random.fork_rng(devices=[]):  # the init draws from its own seed, not the run's stream
                torch.manual_seed(self.config.seed)
                return create(spec, num_classes=n, **kwargs)

        try:
            model = build(**extra)
        except TypeError as e:
            if not extra or "in_chans" not in str(e):
                raise TrainError(f"cannot build {spec} with num_classes={n}: {e}") from None
            model, extra = build(), {}
        takes = _input_channels(model)
        if takes is None or takes == chans:
            if extra:
                self._note(f"{spec} built with in_chans={chans} for the {chans}-channel images of {self.splits.name}")
            return model.to(self.device), chans
        if chans != 1:
            raise TrainError(f"{spec} takes {takes}-channel inputs but {self.splits.name} has {chans} channels.")
        self._note(f"{spec} takes no in_chans argument: the gray channel of {self.splits.name} is repeated {takes} times")
        return model.to(self.device), takes

    def _loaders(self, channels: int) -> None:
        train, val, test = self.splits.loaders(
            recipe=self.recipe, device=self.device, channels=channels if channels != self.splits.shape[0] else None,
            seed=self.config.seed)
        self.full_train = train  # masks, LRsI and IMP: the same batches on every rank
        # this rank's share: the recipe's batch size stays the global one, len() does not change
        self.train_loader = fxdist.shard(train)
        self.val_loader = fxdist.shard(val, global_batch=False)
        self.test_loader = fxdist.shard(test, global_batch=False)
        pad, size = self.recipe.training.crop_padding, min(self.splits.shape[1:])
        if pad and 4 * pad > size:  # CIFAR's pad 4 on 32 px; on 8x8 digits it shifts by half the image
            self._note(f"random crops padded by {pad} on {size}-pixel images shift them by up to {pad / size:.0%}; "
                       f"consider --set training.crop_padding={max(1, size // 8)}")
        if len(self.train_loader) == 0:
            raise TrainError(f"batch size {self.recipe.training.batch_size} is larger than the training split "
                             f"({len(self.splits.train)} images): lower --batch-size.")
        self.total_steps = self.recipe.training.epochs * len(self.train_loader)

    def _start(self) -> None:
        import fxsparse
        from ..scheduler import RecipeScheduler

        c = self.config
        self.recipe = self._recipe()
        model, channels = self._build_model()
        self._loaders(channels)
        self.full_train.set_epoch(0)
        calib = list(itertools.islice(self.full_train, c.calib_batches))  # mask scoring and LRsI
        t0 = time.perf_counter()
        masks = self._explicit_masks(model, calib)
        gm = fxsparse.transform(model, self.recipe, masks=masks, data=calib)
        self.setup_time = time.perf_counter() - t0
        passes = ", ".join(h["pass"] for h in gm.meta.get("fxsparse.passes", []))
        self._say(f"transformed {c.model} with recipe {self.recipe.name} ({passes}) in {self.setup_time:.1f} s")
        self.sched = RecipeScheduler(gm, total_steps=self.total_steps)
        for group in self.sched.following_plain:  # said aloud: the recipe's other schedule is not this one
            self._note(f"{c.model} is a plain network (no path around any layer): {group} follows "
                       f"{group}.schedule_plain, {self.sched.schedules[group].describe()} "
                       f"(--set {group}.schedule.* alone replaces it)")
        for group, why in gm.meta.get(GHOSTS_OFF_KEY, {}).items():  # an enabled ghost the recipe left out here
            self._note(f"no {group} on {c.model}: {why}")
        self._prepare(gm)
        self.sched.build_optimizer()
        self.sched.build_lr_scheduler()
        self.start_epoch, self.elapsed = 0, 0.0
        if not fxdist.is_main():
            self.metrics = _Unlogged()
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        atomic_write(self.out / "config.json", lambda f: f.write(json.dumps(asdict(c), indent=1).encode()))

    def _resume(self, ckpt: dict[str, Any]) -> None:
        from ..recipe import from_dict
        from ..scheduler import restore

        if "sharded" not in ckpt and self.config.fsdp and fxdist.is_distributed():
            raise TrainError(
                f"--resume --fsdp: the newest checkpoint in {self.out} was written by a run without --fsdp (one file, "
                f"its optimizer state by position, not a sharded checkpoint). Resume it without --fsdp (DDP); "
                f"checkpoints written under --fsdp resume with or without it, on any number of processes.")
        state = ckpt["scheduler"]
        self.recipe = from_dict(state["recipe"], name=state.get("recipe_name", "recipe"))
        model, channels = self._build_model()
        self._loaders(channels)
        if state["total_steps"] != self.total_steps:
            raise TrainError(f"--resume: the checkpoint is for {state['total_steps']} steps, this data and batch size "
                             f"give {self.total_steps}.")
        example = torch.zeros(2, channels, *self.splits.shape[1:], device=self.device)  # shapes only
        if "sharded" in ckpt:
            self._resume_sharded(model, ckpt, example)
        else:
            self.sched = restore(model, ckpt, example_inputs=example)
            self._prepare(self.sched.gm)
        self.start_epoch, self.elapsed = int(ckpt["epoch"]), float(ckpt["elapsed"])
        self.setup_time = float(ckpt.get("setup_time", 0.0))
        self.notes = list(dict.fromkeys([*ckpt.get("notes", []), *self.notes]))
        self.metrics = MetricsLog(self.out / "metrics.jsonl", keep=int(ckpt["metrics_records"])) \
            if fxdist.is_main() else _Unlogged()
        set_rng_state(ckpt["rng"])  # last: restore() drew from the generators

    def _resume_sharded(self, model: nn.Module, ckpt: dict[str, Any], example: torch.Tensor) -> None:
        """Resume from a sharded (FSDP2, DCP) checkpoint: under --fsdp on any number of ranks (DCP
        reshards), or without it (DDP or one process: the shards are loaded whole).

        The graph stage is rebuilt the way ``restore`` rebuilds it for a plain checkpoint (transform
        with the checkpoint's masks, the removals replayed, the weights loaded: each rank reads the
        model's tensors from the DCP files by itself), then ``_prepare`` shards it, the optimizer
        is built over the sharded parameters and ``load_sharded`` puts back the parameters and the
        optimizer state, each rank its own shards."""
        import fxsparse.fsdp as fxfsdp
        from ..scheduler import restore

        path, c = ckpt["sharded"], self.config
        weights = {k: v.to(self.device) for k, v in fxfsdp.read_sharded(path).items()}
        self.sched = restore(model, {**ckpt, "model": weights}, example_inputs=example, make_optimizer=None)
        self._prepare(self.sched.gm)  # fully_shard under --fsdp: before the optimizer is built
        self.sched.build_optimizer()
        self.sched.build_lr_scheduler().load_state_dict(ckpt["lr_scheduler"])  # before the optimizer's state
        fxfsdp.load_sharded(self.sched.gm, self.sched.optimizer, path)
        then, now = int(ckpt.get("world_size", 0)), fxdist.world_size()
        sharded_now = bool(c.fsdp) and fxdist.is_distributed()
        if then != now or not sharded_now:
            how = f"under --fsdp on {now} processes" if sharded_now else \
                ("without --fsdp (DDP)" if fxdist.is_distributed() else "in one process")
            self._note(f"resumed a checkpoint sharded over {then} processes {how}: torch.distributed.checkpoint "
                       f"resharded it; the random generators continue from rank 0's, not each rank's")
        else:
            self._rank_rng = ckpt["rng_ranks"][fxdist.rank()]

    def _prepare(self, gm) -> None:
        self.gm = gm
        self.removal_records: list[dict[str, Any]] = []  # written to metrics.jsonl after the step's records
        t = self.recipe.training
        if t.eval_at_removal or t.bn_recalibrate:
            self.sched.before_removal, self.sched.on_removal = self._before_removal, self._after_removal
        if self.channels_last:
            gm.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its parameters
        if self.config.fsdp and fxdist.is_distributed():  # FSDP2, in place: gm is the sharded model
            if self.recipe.distill.enabled:
                raise TrainError("[distill] with --fsdp: the teacher is a full copy of the module, which a sharded "
                                 "module cannot give; train with DDP (no --fsdp) or set distill.enabled = false.")
            units = self.config.fsdp
            self.model = fxdist.fully_shard(gm, units if units == "layers" else units.split(","), scheduler=self.sched)
        else:
            if self.config.fsdp:
                self._note("--fsdp in a single process (not under torchrun): nothing to shard")
            self.model = fxdist.wrap(gm, scheduler=self.sched)  # DDP under torchrun, else gm itself
        self.forward = self._compiled(self.model)
        # evaluation runs the module itself: ranks evaluate different numbers of batches, and DDP's
        # forward would broadcast buffers at each one
        self.eval_forward = self.forward if self.model is gm else self._compiled(gm)

    def _compiled(self, model: nn.Module):
        return torch.compile(model) if self.config.compile else model

    def _explicit_masks(self, model: nn.Module, calib: list) -> dict[str, torch.Tensor] | None:
        """Masks transform cannot compute from the recipe alone: a file, or IMP (it trains)."""
        import fxsparse.masks

        options = dict(self.recipe.masks.options)
        method = options.pop("method")
        if not self.recipe.masks.enabled:
            return None
        if method == "file":
            return fxsparse.masks.load(options["path"], model)
        if method != "imp":
            return None
        return fxsparse.masks.compute(model, "imp", data=None, train_fn=self._imp_round(calib[0][0]), **options)

    def _imp_round(self, example: torch.Tensor):
        """IMP's ``train_fn``: ``imp_epochs`` epochs of the recipe's optimizer at its initial lr."""
        import fxsparse
        from ..passes.mask import MaskPass

        rounds = itertools.count()
        t = self.recipe.training

        def train_fn(work: nn.Module, masks: dict[str, torch.Tensor]) -> None:
            r = next(rounds)
            gm = fxsparse.trace(work, example)  # shares work's parameters: training gm trains work
            MaskPass(masks)(gm)
            params = [p for p in gm.parameters() if p.requires_grad]
            opt = (torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
                   if t.optimizer == "sgd" else torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay))
            for e in range(self.config.imp_epochs):
                self.full_train.set_epoch(_IMP_EPOCH_BASE + r * self.config.imp_epochs + e)
                for x, y in self.full_train:  # unsharded: every rank computes the same masks
                    loss = F.cross_entropy(gm(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
            self._say(f"IMP round {r + 1}: trained {self.config.imp_epochs} epoch(s) at density {density:.3f}")

        return train_fn

    # ------------------------------------------------------------------ training
    def _fit(self) -> None:
        epochs = self.recipe.training.epochs
        if self.start_epoch >= epochs:
            self._say(f"all {epochs} epochs were done already")
        for epoch in range(self.start_epoch, epochs):
            t0 = time.perf_counter()
            train_loss, train_acc = self._train_epoch(epoch)
            record = {"type": "epoch", "epoch": epoch + 1, "step": self.sched.step_count, "train_loss": train_loss,
                      "train_acc": train_acc, "lr": self.sched.optimizer.param_groups[0]["lr"]}
            val = self.evaluate(self.val_loader) if self.config.val else None
            if val is not None:
                record["val_loss"], record["val_acc"] = val
            epoch_time = time.perf_counter() - t0
            self.elapsed += epoch_time
            record.update(epoch_time=epoch_time, elapsed=self.elapsed)
            self.metrics.write(record)
            self._say(self._epoch_line(record, epochs))
            self._checkpoint(epoch + 1)

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        from tqdm import tqdm

        sched, loader = self.sched, self.train_loader
        loader.set_epoch(epoch)  # the batches of epoch e come from (seed, e): a replay is exact
        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{self.recipe.training.epochs}", leave=False,
                   disable=not self.progress, dynamic_ncols=True, file=sys.stderr)
        pending: list[tuple[dict, torch.Tensor, torch.Tensor]] = []  # steps whose loss is not read yet
        totals = {"loss": 0.0, "correct": 0, "seen": 0}
        n_events, last = len(sched.events), time.perf_counter()
        n_updates = len(sched.mask_updates)  # [dynamic] mask updates, logged as "mask_update" records
        for x, y in loader:
            record = {"type": "step", "epoch": epoch + 1, "lr": sched.optimizer.param_groups[0]["lr"],
                      "gates": {g: sched.gate_at(g, sched.step_count) for g in sched.schedules if g not in sched.removed},
                      "label_smoothing": sched.label_smoothing}
            loss, hits = self._step(x, y)
            now = time.perf_counter()
            record.update(step=sched.step_count, step_time=now - last, batch=len(y))
            last = now
            pending.append((record, loss, hits))
            removed = len(sched.events) > n_events
            moved = len(sched.mask_updates) > n_updates
            if len(pending) >= self.sync_every or removed or moved:
                self._write_steps(pending, totals)
                bar.update(len(pending))
                bar.set_postfix_str(self._postfix(pending[-1][0]), refresh=False)
                pending = []
            if moved:
                for update in sched.mask_updates[n_updates:]:
                    self.metrics.write({"type": "mask_update", **update})
                n_updates = len(sched.mask_updates)
            if removed:
                for event in sched.events[n_events:]:
                    self.metrics.write({"type": "event", **event})
                    self._say(f"step {event['step']}: removed {event['group']} ({event['parameters']:,} parameters)")
                    self._note_if_nothing_learned(event["step"])
                n_events = len(sched.events)
                for record in self.removal_records:
                    self.metrics.write(record)
                    if "val_acc_after" in record:
                        self._say(f"step {record['step']}: validation accuracy {100 * record['val_acc_before']:.2f}% "
                                  f"before removing {record['group']}, {100 * record['val_acc_after']:.2f}% after")
                self.removal_records = []
        self._write_steps(pending, totals)
        bar.close()
        totals = fxdist.all_reduce_metrics(totals)  # over all ranks' shares (step records are rank 0's)
        seen = max(totals["seen"], 1)
        return totals["loss"] / seen, totals["correct"] / seen

    def _write_steps(self, pending: list[tuple[dict, torch.Tensor, torch.Tensor]], totals: dict[str, float]) -> None:
        """Read the pending steps' loss and hits (one GPU sync for all) and log them."""
        for record, loss, hits in pending:
            n = record.pop("batch")
            record["loss"], record["train_acc"] = loss.item(), hits.item() / n
            totals["loss"] += record["loss"] * n
            totals["correct"] += hits.item()
            totals["seen"] += n
            self.metrics.write(record)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sched, opt = self.sched, self.sched.optimizer
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(x)
            teacher = sched.teacher_logits(x)  # [distill], from distill.at on; None otherwise
        loss = sched.loss(logits.float(), y, teacher_logits=None if teacher is None else teacher.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.lr_scheduler.step()
        model = self.model
        # moves the gates; removes a ghost whose time has come, and then rebuilds the DDP wrapper
        # (a schedule that waits for the loss to fall reads the one sched.loss computed above: a device
        # sync, only while it waits)
        self.model = fxdist.step(sched, model)
        if self.model is not model:
            self.forward = self._compiled(self.model)
        return loss.detach(), (logits.argmax(1) == y).sum()

    # ------------------------------------------------------------------ around a removal
    def _before_removal(self, group: str) -> None:
        """``RecipeScheduler.before_removal``: validation metrics of the network as it still is."""
        if self.recipe.training.eval_at_removal and getattr(self, "_removal_before", None) is None:
            self._removal_before = self._removal_eval()

    def _after_removal(self, event: dict[str, Any]) -> None:
        """``RecipeScheduler.on_removal``: re-estimate BatchNorm statistics (``bn_recalibrate``) and
        record a ``removal`` line (``eval_at_removal``)."""
        t = self.recipe.training
        record: dict[str, Any] = {"type": "removal", "group": event["group"], "step": event["step"]}
        before, self._removal_before = getattr(self, "_removal_before", None), None
        if before is not None:
            record["val_loss_before"], record["val_acc_before"] = before
        if t.bn_recalibrate:
            if t.eval_at_removal:
                raw = self._removal_eval()
                if raw is not None:  # removed, statistics not re-estimated yet
                    record["val_loss_removed"], record["val_acc_removed"] = raw
            record["bn_recalibrated"] = self.recalibrate_batchnorm(t.bn_recalibrate, event["step"])
        after = self._removal_eval() if t.eval_at_removal else None
        if after is not None:
            record["val_loss_after"], record["val_acc_after"] = after
            sched = self.sched
            if any(sched.removal_due(g) for g in sched.schedules):
                self._removal_before = after  # another group goes in this same step: it starts from here
        self.removal_records.append(record)

    def _note_if_nothing_learned(self, step: int) -> None:
        """A note when ghosts leave while the training loss is still where it started: the ghost
        phase then ended before the network learned anything, and on the map that is where `tost`
        loses (docs/results.md, V: MobileNetV2 at 138 steps, whose loss stays at ln 10 for 30-45
        steps; its start comes 12-26 steps after the baseline's)."""
        losses = [r["loss"] for r in self.metrics.records if r.get("type") == "step" and r["step"] <= step]
        means = loss_window_means(losses)
        # once a run; a diverged (NaN) loss is not "where it started"
        if means is None or any(math.isnan(m) for m in means) or any(_NOTHING_LEARNED in n for n in self.notes):
            return
        start, now = means
        if not loss_has_fallen(start, now):
            self._note(f"ghosts left at step {step} of {self.total_steps} with the training loss where it started "
                       f"({start:.3f} over the first {LEARNING_WINDOW} steps, {now:.3f} over the last "
                       f"{LEARNING_WINDOW}): "
                       f"{_NOTHING_LEARNED}. At such a budget `tost` "
                       f"can cost accuracy (docs/results.md, V); a longer run, or the baseline recipe, suits it.")

    def _removal_eval(self) -> tuple[float, float] | None:
        if not self.config.val:
            return None
        r = self.evaluate(self.val_loader)
        return None if r is None else (float(r[0]), float(r[1]))

    def recalibrate_batchnorm(self, batches: int, step: int) -> int:
        """Re-estimate every BatchNorm's running statistics over ``batches`` training batches.

        Running statistics are reset and re-accumulated as a cumulative average (``momentum =
        None``), in train mode, without gradients; momentum and the module's mode are restored.
        The batches come from their own epoch of the loader (seeded by the step), and the global
        random generators are put back, so training goes on exactly as it would have. Under
        torchrun every rank estimates from its shard and the statistics are averaged. Returns the
        number of batches used.
        """
        loader = copy.copy(self.train_loader)  # its own position: the epoch in progress is not disturbed
        loader.set_epoch(_RECAL_EPOCH_BASE + step)
        data = list(itertools.islice(loader, batches))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            n = recalibrate_batchnorm(self.gm, data, forward=self._recal_forward)
        fxdist.sync_buffers(self.gm, op="mean")
        return n

    def _precise_bn(self) -> dict[str, Any] | None:
        """``[training] precise_bn = N``: re-estimate BatchNorm statistics over N training batches
        once training is over, so the final evaluation and the exported weights use statistics of
        the final weights. The test and validation metrics before it are recorded (a ``precise_bn``
        line in metrics.jsonl); training itself is not affected."""
        batches = self.recipe.training.precise_bn
        if not batches:
            return None
        record: dict[str, Any] = {"type": "precise_bn", "step": self.sched.step_count}
        for split, loader in (("test", self.test_loader), ("val", self.val_loader if self.config.val else None)):
            r = self.evaluate(loader) if loader is not None else None
            if r is not None:
                record[f"{split}_loss_before"], record[f"{split}_acc_before"] = float(r[0]), float(r[1])
        record["batches"] = self.recalibrate_batchnorm(batches, self.sched.step_count)
        self.metrics.write(record)
        return {k: v for k, v in record.items() if k != "type"}

    def _recal_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.gm(x)

    @torch.no_grad()
    def evaluate(self, loader) -> tuple[float, float] | None:
        """(mean cross-entropy, accuracy) over ``loader`` in eval mode; ``None`` for an empty split.
        Under torchrun every rank evaluates its shard with rank 0's BatchNorm statistics."""
        import fxsparse.fsdp

        fxdist.sync_buffers(self.gm)
        runner = self._eval_runner()
        if runner is None or len(loader.dataset) == 0:
            return None
        forward, module = runner
        was_training = module.training
        module.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        hits = torch.zeros((), dtype=torch.int64, device=self.device)
        n = 0
        # under FSDP every forward of the sharded module is a collective: every rank runs as many
        # forwards as the rank with the most batches, the extra ones on a batch they do not count
        extra = int(fxdist.all_reduce_metrics({"b": len(loader)}, op="max")["b"]) - len(loader) \
            if fxdist.is_distributed() and fxsparse.fsdp.is_sharded(module) else 0
        try:
            for x, y in loader:
                n += len(y)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    logits = forward(x).float()
                total += F.cross_entropy(logits, y, reduction="sum")
                hits += (logits.argmax(1) == y).sum()
            for _ in range(extra):
                forward(next(iter(self.full_train))[0][:1].to(self.device))
        finally:
            module.train(was_training)
        r = fxdist.all_reduce_metrics({"loss": total, "hits": hits, "n": n})  # sums over the ranks' shards
        return r["loss"] / r["n"], r["hits"] / r["n"]

    def _eval_runner(self) -> tuple[Any, nn.Module] | None:
        """(forward, module to put in eval mode): the graph itself, unless its trace depends on the
        mode (then the original class with the exported weights, once the ghosts are gone)."""
        import fxsparse
        from ..trace import META_KEY

        info = self.gm.meta.get(META_KEY)
        if info is None or not info.mode_dependent:
            return self.eval_forward, self.gm
        if fxsparse.ghosts.present(self.gm):
            self._note("the model's graph depends on train/eval mode: no evaluation while ghosts are in it")
            return None
        model, _ = self._build_model()
        model.load_state_dict(fxdist.export(self.gm))  # under FSDP: gathered on every rank
        return model, model

    def _checkpoint(self, epoch: int) -> None:
        import fxsparse.fsdp

        if fxsparse.fsdp.is_sharded(self.gm):  # each rank holds its own shards: every rank writes
            self._checkpoint_sharded(epoch)
            return
        if fxdist.is_main():  # every rank holds the same state
            self.metrics.sync()
            state = {**self.sched.checkpoint(), **self._run_state(epoch, rng_state())}
            self.checkpoints.save(state, epoch=epoch, step=self.sched.step_count)
        fxdist.barrier()

    def _run_state(self, epoch: int, rng: dict[str, Any]) -> dict[str, Any]:
        """What every checkpoint holds besides the model and optimizer: where the run is, its
        generators, and what a resume needs to continue its logs."""
        return {"epoch": epoch, "rng": rng, "metrics_records": len(self.metrics), "elapsed": self.elapsed,
                "setup_time": self.setup_time, "config": asdict(self.config), "notes": self.notes}

    def _checkpoint_sharded(self, epoch: int) -> None:
        """A sharded checkpoint (collective): each rank writes its shards of the parameters and
        optimizer state with ``torch.distributed.checkpoint``, rank 0 adds what ``_checkpoint``
        saves besides them (scheduler, lr schedule, generators, ...) plus every rank's generators."""
        import fxsparse.fsdp

        sched = self.sched
        if fxdist.is_main():
            self.metrics.sync()
        # FSDP2 neither shards nor syncs buffers, and DCP writes one rank's copy of each: the BatchNorm
        # statistics every rank resumes with are rank 0's, so every rank continues from those now
        fxdist.sync_buffers(self.gm)
        generators = fxdist.all_gather_object(rng_state())
        state = {"format": "fxsparse-fsdp", "scheduler": sched.state_dict(), "lr_scheduler": sched.lr_scheduler.state_dict(),
                 "rng_ranks": generators, "world_size": fxdist.world_size(),
                 "fsdp_units": dict(self.gm.meta.get(fxsparse.fsdp.META_KEY, {})),
                 **self._run_state(epoch, generators[0])}
        self.checkpoints.save_sharded(lambda d: fxsparse.fsdp.save_sharded(self.gm, sched.optimizer, d), state,
                                      epoch=epoch, step=sched.step_count)

    # ------------------------------------------------------------------ the end
    def _finish(self, wall_time: float) -> dict[str, Any]:
        import fxsparse
        import fxsparse.fsdp
        import fxsparse.masks
        from safetensors.torch import save as safetensors_bytes

        from ..passes.mask import masked_parameters
        from .plots import plot_run

        c, gm = self.config, self.gm
        left = fxsparse.ghosts.present(gm)
        if left:  # a recipe may remove a ghost only at the very end
            self._note(f"removing {', '.join(left)} before export (still in the graph after the last step)")
            fxsparse.remove_ghosts(gm)
            if fxsparse.fsdp.is_sharded(gm):
                fxsparse.fsdp.forget_removed(gm)
        import fxsparse.masks.dynamic as dynamic

        if dynamic.present(gm):  # a [dynamic] phase that had not ended: its probes have no place in the export
            self._note("ending the dynamic-mask phase before export (its end was not reached)")
            dynamic.finish(gm)
        distill = self.recipe.distill
        teacher_step = self.sched.teacher_step if self.sched.teacher is not None else None
        self.sched.teacher = None  # training is over: its memory back before precise BN and export
        precise = self._precise_bn()
        test = self.evaluate(self.test_loader)
        val = self.evaluate(self.val_loader) if c.val else None
        record = {"type": "test", "step": self.sched.step_count}
        if test is not None:
            record["test_loss"], record["test_acc"] = test
        if val is not None:
            record["val_loss"], record["val_acc"] = val
        self.metrics.write(record)  # a re-finished run's log was cut back to its last checkpoint: no duplicate

        main = fxdist.is_main()  # under torchrun rank 0 writes the files (gm is the module, not the DDP wrapper)
        state = fxdist.export(gm) if fxsparse.fsdp.is_sharded(gm) else None  # gathered on every rank
        if main:
            state = state if state is not None else fxsparse.export(gm)
            meta = {"format": "pt", "fxsparse.model": c.model, "fxsparse.num_classes": str(self.splits.num_classes)}
            blob = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=meta)
            atomic_write(self.out / "model.safetensors", lambda f: f.write(blob))
        masks = masked_parameters(gm)
        mask_opts = self.recipe.masks.options
        report = None
        tied = fxsparse.masks.tied_weights(gm, masks)  # a weight two layers share counts once
        if masks:
            report = fxsparse.masks.MaskReport.from_masks(masks, requested_sparsity=mask_opts.get("sparsity"),
                                                          pattern=mask_opts.get("pattern"), tied=tied)
        if masks and main:
            tmp = self.out / ".masks.safetensors.tmp"
            fxsparse.masks.save(masks, tmp, tied=tied, method=mask_opts.get("method"), requested_sparsity=mask_opts.get("sparsity"),
                                distribution=mask_opts.get("distribution"), model=c.model, recipe=self.recipe.name,
                                seed=c.seed, **({"pattern": mask_opts["pattern"]} if "pattern" in mask_opts else {}))
            os.replace(tmp, self.out / "masks.safetensors")
        plots = plot_run(self.metrics.records, self.out, report.density if report else None,
                         report.achieved_sparsity if report else None) if main else []
        self.metrics.close()

        self.summary = {
            "model": c.model,
            "recipe": self.recipe.name,
            "data": self.splits.name,
            "images": {"train": len(self.splits.train), "val": len(self.splits.val), "test": len(self.splits.test)},
            "num_classes": self.splits.num_classes,
            "epochs": self.recipe.training.epochs,
            "steps": self.sched.step_count,
            "test_accuracy": test[1] if test else None,
            "test_loss": test[0] if test else None,
            "val_accuracy": val[1] if val else None,
            "requested_sparsity": mask_opts.get("sparsity") if masks else None,
            "sparsity": report.achieved_sparsity if report else 0.0,
            "weights_kept": report.kept if report else None,
            "weights_masked_total": report.total if report else None,
            "mask_method": mask_opts.get("method") if masks else None,
            "removals": [dict(e) for e in self.sched.events],
            "mask_updates": _mask_update_summary(self.sched),
            "distill": ({"teacher_step": teacher_step, "alpha": distill.alpha, "temperature": distill.temperature}
                        if distill.enabled else None),
            "precise_bn": precise,
            "passes": gm.meta.get("fxsparse.passes", []),
            "time_s": {"setup": self.setup_time, "train": self.elapsed, "this_process": wall_time},
            "device": str(self.device),
            "bf16": self.bf16, "channels_last": self.channels_last, "compile": c.compile,
            "seed": c.seed,
            "notes": self.notes,
            "files": {"weights": "model.safetensors", "masks": "masks.safetensors" if masks else None,
                      "metrics": "metrics.jsonl", "plots": [p.name for p in plots]},
            "config": asdict(c),
        }
        if main:
            atomic_write(self.out / "summary.json",
                         lambda f: f.write(json.dumps(self.summary, indent=1, default=str).encode()))
        self._say(self.paragraph())
        return self.summary

    def paragraph(self) -> str:
        """The run in one paragraph (what ``fxsparse train`` prints at the end)."""
        s = self.summary
        acc = f"test accuracy {100 * s['test_accuracy']:.2f}%" if s["test_accuracy"] is not None else "no test split"
        val = f" (validation {100 * s['val_accuracy']:.2f}%)" if s["val_accuracy"] is not None else ""
        sparsity = (f"{100 * s['sparsity']:.2f}% sparse ({s['weights_kept']:,} of {s['weights_masked_total']:,} conv/linear "
                    f"weights kept, {s['mask_method']} mask)" if s["weights_kept"] is not None else "dense (no mask)")
        removed = "; ".join(f"{e['group']} removed at step {e['step']}" for e in s["removals"]) or "no ghosts"
        t = s["time_s"]
        return (f"{s['model']} trained with recipe {s['recipe']} on {s['data']} ({s['images']['train']:,} training images) "
                f"for {s['epochs']} epoch{'s' * (s['epochs'] != 1)} / {s['steps']} steps on {s['device']}: {acc}{val} on "
                f"{s['images']['test']:,} test images. The network is {sparsity}; {removed}. Time: "
                f"{t['setup']:.0f} s setup + {t['train']:.0f} s training. Weights in {self.out / 'model.safetensors'} "
                f"(load strict into {s['model']}), masks, metrics.jsonl, plots and summary.json beside them.")

    # ------------------------------------------------------------------ output
    def _epoch_line(self, r: dict[str, Any], epochs: int) -> str:
        val = f"  val {100 * r['val_acc']:.2f}%" if "val_acc" in r else ""
        return (f"epoch {r['epoch']:>{len(str(epochs))}}/{epochs}  loss {r['train_loss']:.4f}  train {100 * r['train_acc']:.2f}%"
                f"{val}  lr {r['lr']:.3g}  {r['epoch_time']:.1f} s")

    def _postfix(self, r: dict[str, Any]) -> str:
        gates = " ".join(f"{_SHORT.get(g, g)}={v:.2f}" for g, v in r["gates"].items())
        return f"loss={r['loss']:.3f} acc={100 * r['train_acc']:.1f}% lr={r['lr']:.3g}" + (f" {gates}" if gates else "")

    def _say(self, message: str) -> None:
        if not self.config.quiet and fxdist.is_main():
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)

    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            self._say(f"note: {message}")


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, batches, forward=None) -> int:
    """Reset every BatchNorm's running statistics in ``module`` and re-estimate them over
    ``batches`` (``(x, y)`` pairs or inputs) as a cumulative average (``momentum = None``), in
    train mode and without gradients; each norm's momentum and the module's mode are restored.
    ``forward`` (default ``module``) runs one input. Nothing changes when ``batches`` is empty.
    Returns the number of batches used."""
    batches = list(batches)
    norms = list({id(m): m for m in module.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}.values())
    if not batches or not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = module.training
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        module.train()
        for b in batches:
            (forward or module)(b[0] if isinstance(b, (tuple, list)) else b)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        module.train(was_training)
    return len(batches)


class _Unlogged(MetricsLog):
    """The metrics of a rank other than 0 under torchrun: kept in memory, written nowhere."""

    def __init__(self):  # no file to open
        self.records = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _mask_update_summary(sched) -> dict[str, Any] | None:
    """[dynamic]: the method, how many updates ran and how many weights they moved in all."""
    if getattr(sched, "dynamic", None) is None:
        return None
    updates = sched.mask_updates
    return {"method": sched.dynamic.schedule.method, "updates": len(updates),
            "dropped": sum(u["dropped"] for u in updates), "grown": sum(u["grown"] for u in updates)}


def _input_channels(model: nn.Module) -> int | None:
    """The input channels of the model's first convolution (``None`` without one)."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return None if first is None else first.in_channels

