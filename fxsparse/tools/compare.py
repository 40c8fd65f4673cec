"""The accuracy study behind ``fxsparse compare``: does the recipe work?

The same model, from the same initialization, with the same mask, is trained under every recipe
of a grid: the baseline (mask only), full ``tost``, and each technique alone, for every mask
method, sparsity and seed, plus the dense model as a reference. Each run is one
``fxsparse.tools.train.Trainer`` run; the study only decides what to run and summarizes it.

    from fxsparse.tools.compare import CompareConfig, run_grid, report
    run_grid(CompareConfig(out="runs/compare", data="fashion-mnist", workers=2))
    report("runs/compare")            # tables (summary.md, summary.json) and plots from results.jsonl

Why the comparison is paired: the Trainer seeds the model's initialization and the mask with the
run's seed (``masks.seed``), and draws calibration batches (SNIP scores, LRsI) from a loader
seeded the same way, so for one (method, sparsity, seed) every recipe starts from identical
weights and an identical mask. Each result line records a hash of the mask the run trained with,
and ``report`` checks that the hashes agree.

Resumable: ``out/results.jsonl`` gets one JSON line per finished run; a rerun with the same
protocol skips those and continues an interrupted run from its last epoch checkpoint
(``Trainer(resume=True)``). Protocol settings are fixed in ``out/compare.json``; changing them
needs another ``out``.

Schedule variants (``ScheduleVariant``) run every recipe that has ghosts once per variant, with
every ghost group's ``hold_until / anneal_until / remove_at / shape`` overridden: that is how the
ghost-phase defaults are chosen, on the validation split (docs/results.md).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import FxSparseError

log = logging.getLogger(__name__)

__all__ = [
    "CompareConfig", "CompareError", "RunSpec", "ScheduleVariant", "PRESETS", "RECIPES", "DISTRIBUTION",
    "run_grid", "execute", "report", "aggregate", "read_results", "prepare_data", "mask_hash",
]

# The recipes of the study: baseline and full ToST first, then each technique alone.
RECIPES = ("baseline", "tost", "ghost_neurons", "ghost_skips", "ghost_channels", "lrsi", "label_smoothing")
CORE = ("dense", "baseline", "tost")  # run before the ablations: what the headline needs
# Each mask method with the layer-wise distribution it is used with in the literature: random
# with ERK (Liu et al. 2022), the data-driven scores with one global threshold (ToST, SNIP).
DISTRIBUTION = {"random": "erk", "magnitude": "global", "taylor": "global", "snip": "global", "grasp": "global",
                "synflow": "global"}
RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
PROTOCOL = "compare.json"
DENSE = "dense"
DEFAULT_SCHEDULE = "default"  # the recipe's own ghost schedules

# What each preset sets (CompareConfig fields). "cpu": minutes per run on 2 shared CPU cores, a
# CIFAR ResNet-8 on Fashion-MNIST (a class-balanced subset) or the bundled MNIST-5k. "gpu": ToST's
# CIFAR protocol shape (CIFAR ResNet-18, 182 epochs, the recipe's 180 LRsI iterations) for a lent
# GPU; CIFAR-10 comes from a local path (--data cifar10 --data-root ...).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(model="fxsparse.nets:resnet8", data="auto", per_class=(600, 100, 500), epochs=3, batch_size=128,
                lrsi_iters=10, device="cpu", threads=1),
    "gpu": dict(model="fxsparse.nets:resnet18", data="cifar10", per_class=None, epochs=182, batch_size=128,
                lrsi_iters=None, device="cuda", threads=None),
}


class CompareError(FxSparseError):
    """The study cannot run as asked."""


# --------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class ScheduleVariant:
    """A ghost schedule applied to every ghost group of a run: gate 1 until ``hold``, annealed
    along ``shape`` to 0 by ``anneal``, removed at ``remove`` (fractions of training)."""

    name: str
    hold: float
    anneal: float
    remove: float
    shape: str = "cosine"

    @classmethod
    def parse(cls, text: str) -> "ScheduleVariant":
        """``NAME=HOLD,ANNEAL,REMOVE[,SHAPE]``, e.g. ``late=0.2,0.5,0.5,cosine``."""
        name, sep, rest = text.partition("=")
        parts = [p.strip() for p in rest.split(",")]
        try:
            if not sep or not name.strip() or len(parts) not in (3, 4):
                raise ValueError
            hold, anneal, remove = (float(p) for p in parts[:3])
        except ValueError:
            raise CompareError(f"schedule {text!r}: expected NAME=HOLD,ANNEAL,REMOVE[,SHAPE] with fractions of "
                               f"training, e.g. late=0.2,0.5,0.5,cosine") from None
        return cls(name.strip(), hold, anneal, remove, parts[3] if len(parts) == 4 else "cosine")

    def overrides(self, groups: Iterable[str]) -> dict[str, Any]:
        from ..recipe import schedule_overrides

        out = {}
        for g in groups:  # schedule_plain too: the variant is the schedule on every network
            out.update(schedule_overrides(g, hold_until=self.hold, anneal_until=self.anneal, remove_at=self.remove,
                                          shape=self.shape))
        return out

    def describe(self) -> str:
        return f"hold {self.hold:g}, {self.shape} anneal to {self.anneal:g}, remove at {self.remove:g}"


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid. ``recipe == "dense"`` is the unmasked reference."""

    recipe: str
    seed: int
    method: str | None = None
    sparsity: float | None = None
    schedule: str = DEFAULT_SCHEDULE

    @property
    def key(self) -> str:
        if self.recipe == DENSE:
            return f"dense-seed{self.seed}"
        sched = "" if self.schedule == DEFAULT_SCHEDULE else f"-sched_{self.schedule}"
        return f"{self.method}-s{self.sparsity:g}-{self.recipe}{sched}-seed{self.seed}"


@dataclass
class CompareConfig:
    """The grid and its training protocol. ``None`` fields take the preset's value.

    ``per_class``: ``(train, val, test)`` images kept per class (a fixed, class-balanced subset,
    saved once under ``out/``); ``None`` uses the whole dataset. ``overrides`` are recipe keys
    applied to every run. ``schedules``: ghost-schedule variants, run besides each recipe's own.
    ``recipes`` are shipped names or TOML files; a file is an arm of the study under its recipe's
    ``name`` (its file name when it has none), paired with the baseline like a shipped recipe:
    ``recipes=("baseline", "tost", "experiments/tost_ungrouped.toml")``. After construction
    ``recipes`` holds those labels and ``recipe_files`` maps each file's label to its path.
    """

    out: str = "runs/compare"
    preset: str = "cpu"
    model: str | None = None
    data: str | None = None
    data_root: str | None = None
    per_class: tuple[int, int, int] | None = None
    methods: tuple[str, ...] = ("random", "snip")
    sparsities: tuple[float, ...] = (0.90, 0.95, 0.98)
    recipes: tuple[str, ...] = RECIPES
    seeds: tuple[int, ...] = (0, 1, 2)
    dense: bool = True
    epochs: int | None = None
    batch_size: int | None = None
    lrsi_iters: int | None = None
    calib_batches: int = 8
    schedules: tuple[ScheduleVariant, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    threads: int | None = None
    workers: int = 1
    keep_runs: bool = False
    progress: bool | None = None
    recipe_files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise CompareError(f"preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.methods = tuple(self.methods)
        self.recipes = self._label_recipes(tuple(self.recipes))
        self.sparsities, self.seeds = tuple(float(s) for s in self.sparsities), tuple(int(s) for s in self.seeds)
        self.schedules = tuple(s if isinstance(s, ScheduleVariant) else ScheduleVariant(**s) for s in self.schedules)
        if self.per_class is not None:  # () = the whole dataset
            self.per_class = tuple(int(n) for n in self.per_class) or None
        self._check()

    def _label_recipes(self, given: tuple[str, ...]) -> tuple[str, ...]:
        """Shipped names stay as they are; a recipe file is labelled by its recipe's name (a run's
        directory and every table use the label, so it must be a plain word)."""
        from ..recipe import is_recipe_file, load_recipe

        labels = []
        for r in given:
            if r in self.recipe_files or not is_recipe_file(r):  # a label already (a resumed config)
                labels.append(r)
                continue
            label = load_recipe(r).name
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", label) or label == DENSE:
                raise CompareError(f"recipe file {r!r} is called {label!r}, which cannot name its runs: give it a "
                                   f"name = \"...\" of letters, digits, '_', '.', '+' or '-' (not {DENSE!r})")
            if label in self.recipe_files and self.recipe_files[label] != str(r):
                raise CompareError(f"two recipe files are called {label!r} ({self.recipe_files[label]}, {r}): give "
                                   f"each its own name = \"...\"")
            self.recipe_files[label] = str(r)
            labels.append(label)
        clash = sorted({l for l in labels if labels.count(l) > 1})
        if clash:
            raise CompareError(f"the study's recipes name {', '.join(map(repr, clash))} twice (a recipe file's "
                               f"name = \"...\" may equal a shipped recipe's): give each arm its own name")
        return tuple(labels)

    def source(self, recipe: str) -> str:
        """What ``load_recipe`` takes for the study's recipe ``recipe`` (a label): its file, or the name."""
        return self.recipe_files.get(recipe, recipe)

    def _check(self) -> None:
        from ..recipe import load_recipe

        bad = [m for m in self.methods if m not in DISTRIBUTION]
        if bad:
            raise CompareError(f"mask method(s) {bad}: the study supports {', '.join(DISTRIBUTION)} (imp and file "
                               f"masks are not computed per run)")
        if not all(0.0 < s < 1.0 for s in self.sparsities):
            raise CompareError(f"sparsities must be in (0, 1); got {list(self.sparsities)}")
        for r in self.recipes:
            load_recipe(self.source(r))  # a clear RecipeError for an unknown name, now rather than mid-grid
        names = [s.name for s in self.schedules]
        if len(set(names)) != len(names) or DEFAULT_SCHEDULE in names:
            raise CompareError(f"schedule variant names must be distinct and not {DEFAULT_SCHEDULE!r} (the recipe's "
                               f"own schedule, which always runs too); got {names}")
        if self.per_class is not None and (len(self.per_class) != 3 or min(self.per_class) < 1):
            raise CompareError(f"per_class is (train, val, test) images per class, each >= 1; got {self.per_class}")
        if self.workers < 1:
            raise CompareError(f"workers must be >= 1; got {self.workers}")

    # the settings a result depends on: resuming with others would mix two studies
    def protocol(self) -> dict[str, Any]:
        from ..recipe import load_recipe

        # the recipes' content too: editing a shipped schedule makes earlier runs of it stale
        recipes = {r: hashlib.sha256(json.dumps(load_recipe(self.source(r)).to_dict(), sort_keys=True, default=str)
                                     .encode()).hexdigest()[:12] for r in sorted(set(self.recipes) | {"baseline"})}
        return {"model": self.model, "data": self.resolved_data(), "data_root": self.data_root,
                "per_class": list(self.per_class) if self.per_class else None, "epochs": self.epochs,
                "batch_size": self.batch_size, "lrsi_iters": self.lrsi_iters, "calib_batches": self.calib_batches,
                "overrides": self.overrides, "device": self.device, "recipes": recipes}

    def resolved_data(self) -> str:
        """``auto``: Fashion-MNIST when its Debian package is installed, else the bundled MNIST-5k."""
        from ..data import FASHION_MNIST_DEBIAN

        if self.data != "auto":
            return self.data
        return "fashion-mnist" if Path(FASHION_MNIST_DEBIAN).is_dir() else "mnist5k"

    def runs(self) -> list[RunSpec]:
        """Every run, in the order they are started: the dense reference, baseline and tost for
        every seed first (what the headline needs if the grid is cut short), then the ablations;
        seed-major within each, so an interrupted grid holds whole seeds."""
        from ..recipe import load_recipe

        with_ghosts = {r: bool(load_recipe(self.source(r)).ghosts) for r in self.recipes}
        variants = [DEFAULT_SCHEDULE] + [s.name for s in self.schedules]
        specs: list[RunSpec] = []
        for tier in (True, False):
            for seed in self.seeds:
                if tier and self.dense:
                    specs.append(RunSpec(DENSE, seed))
                for sparsity in self.sparsities:
                    for method in self.methods:
                        for recipe in self.recipes:
                            if (recipe in CORE) != tier:
                                continue
                            for v in (variants if with_ghosts[recipe] else [DEFAULT_SCHEDULE]):
                                specs.append(RunSpec(recipe, seed, method, sparsity, v))
        return specs

    def recipe_overrides(self, spec: RunSpec) -> dict[str, Any]:
        from ..recipe import load_recipe

        o: dict[str, Any] = {"training.epochs": self.epochs, "training.batch_size": self.batch_size}
        if spec.recipe == DENSE:
            o["masks.enabled"] = False
        else:
            o.update({"masks.method": spec.method, "masks.sparsity": spec.sparsity,
                      "masks.distribution": DISTRIBUTION[spec.method]})
        o.update(self.overrides)
        if spec.schedule != DEFAULT_SCHEDULE:
            variant = next(s for s in self.schedules if s.name == spec.schedule)
            o.update(variant.overrides(load_recipe(self.source(spec.recipe)).ghosts))
        return o


# --------------------------------------------------------------------------- data
def prepare_data(config: CompareConfig, out: Path) -> str:
    """The ``data`` argument every run gets: the dataset name, or a class-balanced subset saved
    once under ``out`` (same images for every run; validation fixed across seeds)."""
    from .. import data

    name = config.resolved_data()
    if config.per_class is None:
        return name
    n_train, n_val, n_test = config.per_class
    path = out / f"data-{name}-{n_train}-{n_val}-{n_test}.safetensors"
    if path.exists():
        return str(path.resolve())
    try:
        full = data.load(name, root=config.data_root, seed=0)
    except data.DataError as e:
        raise CompareError(f"--data {name}: {e}") from None
    train = full.train.per_class(n_train, seed=0)
    val = full.val.per_class(n_val, seed=0)
    test = full.test.per_class(n_test, seed=0)
    mean, std = train.stats()
    tmp = path.with_suffix(".tmp.safetensors")
    data.save(data.Splits(train, val, test, mean, std, full.name), tmp)
    os.replace(tmp, path)
    return str(path.resolve())


# --------------------------------------------------------------------------- one run
def execute(spec: RunSpec, config: CompareConfig, data_arg: str, out: Path) -> dict[str, Any]:
    """Train ``spec`` with the reference Trainer and return its result line."""
    from .metrics import read_metrics
    from ..recipe import load_recipe
    from .train import TrainConfig, Trainer

    run_dir = out / "runs" / spec.key
    recipe = "baseline" if spec.recipe == DENSE else config.source(spec.recipe)
    overrides = config.recipe_overrides(spec)
    loaded = load_recipe(recipe, overrides=overrides)
    ghost_schedules = {g: asdict(p.schedule) for g, p in loaded.ghosts.items()}
    tc = TrainConfig(model=config.model, out=str(run_dir), data=data_arg, data_root=config.data_root, recipe=recipe,
                     overrides=overrides, seed=spec.seed, device=config.device,
                     threads=config.threads, resume=True, calib_batches=config.calib_batches,
                     lrsi_iters=config.lrsi_iters if recipe_has_lrsi(recipe) else None, keep_checkpoints=1,
                     progress=False, quiet=True)
    t0 = time.perf_counter()
    summary = Trainer(tc).run()
    wall = time.perf_counter() - t0
    records = read_metrics(run_dir / "metrics.jsonl")
    epochs = [{k: r.get(k) for k in ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc")}
              for r in records if r.get("type") == "epoch"]
    steps = [r for r in records if r.get("type") == "step"]
    stride = max(1, math.ceil(len(steps) / 300))  # enough points for a curve, a small line
    result = {
        "key": spec.key, **asdict(spec),
        **({"recipe_file": recipe} if spec.recipe in config.recipe_files else {}),
        "distribution": None if spec.recipe == DENSE else DISTRIBUTION[spec.method],
        "test_acc": summary["test_accuracy"], "val_acc": summary["val_accuracy"],
        "test_loss": summary["test_loss"], "achieved_sparsity": summary["sparsity"],
        "weights_kept": summary["weights_kept"], "steps": summary["steps"], "epochs": summary["epochs"],
        "data": summary["data"], "images": summary["images"], "removals": summary["removals"],
        "ghost_schedules": ghost_schedules,
        "label_smoothing": loaded.label_smoothing.eps_at(0.0),  # the eps training starts with (0: off)
        "mask_sha256": mask_hash(run_dir / "masks.safetensors"),
        "time_s": {**summary["time_s"], "wall": wall},
        "epoch_curve": epochs,
        "loss_curve": [[r["step"], r["loss"]] for r in steps[::stride]],
        # [training] eval_at_removal / bn_recalibrate: validation right before and after each removal
        "removal_shock": [{k: v for k, v in r.items() if k != "type"} for r in records if r.get("type") == "removal"],
        # [training] precise_bn: the metrics before the final re-estimation of BatchNorm statistics
        "precise_bn": summary.get("precise_bn"),
        "notes": summary["notes"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return result


def recipe_has_lrsi(name: str) -> bool:
    from ..recipe import load_recipe

    spec = load_recipe(name).passes.get("rescale")
    return spec is not None and spec.enabled


def mask_hash(path: Path) -> str | None:
    """SHA-256 over the masks' names and bits: equal hashes = the same mask."""
    if not path.exists():
        return None
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(name.encode())
        h.update(t.to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _tidy(run_dir: Path) -> None:
    """Drop what a finished run no longer needs (checkpoints, weights); keep metrics and summary."""
    for p in list(run_dir.glob("checkpoint-*")) + [run_dir / "model.safetensors", run_dir / "checkpoints.json"]:
        if p.exists():
            p.unlink()


def _worker_run(spec: RunSpec, config: CompareConfig, data_arg: str, out: str) -> dict[str, Any]:
    logging.getLogger("fxsparse").setLevel(logging.WARNING)
    return execute(spec, config, data_arg, Path(out))


# --------------------------------------------------------------------------- the grid
def read_results(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Finished runs of a study (one per key, the last line wins; a cut-off last line is ignored)."""
    path = Path(out) / RESULTS
    if not path.exists():
        return []
    found: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            found[r["key"]] = r
    return list(found.values())


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _check_protocol(config: CompareConfig, out: Path) -> None:
    path = out / PROTOCOL
    proto = config.protocol()
    if path.exists():
        saved = json.loads(path.read_text())["protocol"]
        # recipes: only those both studies name must agree (a rerun may add recipes to the grid)
        differ = [k for k in proto if k != "recipes" and saved.get(k) != proto[k]]
        old = saved.get("recipes", {})
        differ += [f"recipe {r}" for r in proto["recipes"] if r in old and old[r] != proto["recipes"][r]]
        proto["recipes"] = {**old, **proto["recipes"]}
        if differ:
            what = "; ".join(f"{k}: {saved.get(k)!r} then, {proto[k]!r} now" if k in proto else f"{k} was edited"
                             for k in differ)
            raise CompareError(f"{out} holds a study run with another protocol ({what}). Rerun with the same "
                               f"settings to continue it, or choose another --out.")
    grid = {"methods": config.methods, "sparsities": config.sparsities, "recipes": config.recipes,
            **({"recipe_files": config.recipe_files} if config.recipe_files else {}),
            "seeds": config.seeds, "dense": config.dense, "schedules": [asdict(s) for s in config.schedules],
            "preset": config.preset, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    grids = json.loads(path.read_text()).get("grids", []) if path.exists() else []
    doc = {"protocol": proto, "grids": grids + [grid]}  # every invocation's grid, for the record
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def run_grid(config: CompareConfig, *, say=print) -> list[dict[str, Any]]:
    """Run every unfinished run of the grid (``config.workers`` processes); returns all results.

    Finished runs are appended to ``out/results.jsonl`` as they end; failures go to
    ``out/errors.jsonl`` and are retried on the next call.
    """
    from tqdm import tqdm

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_protocol(config, out)
    data_arg = prepare_data(config, out)
    specs = config.runs()
    done = {r["key"] for r in read_results(out)}
    todo = [s for s in specs if s.key not in done]
    say(f"fxsparse compare: {len(specs)} runs ({len(specs) - len(todo)} done), {config.model} on "
        f"{config.resolved_data()}{' subset ' + str(config.per_class) if config.per_class else ''}, "
        f"{config.epochs} epochs, {config.workers} worker(s); results in {out / RESULTS}")
    progress = sys.stderr.isatty() if config.progress is None else config.progress
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), disable=not progress, desc="compare",
               unit="run", dynamic_ncols=True, file=sys.stderr)
    failures = 0

    def finished(spec: RunSpec, result: dict[str, Any] | None, error: BaseException | None) -> None:
        nonlocal failures
        if error is not None:
            failures += 1
            import traceback

            _append(out / ERRORS, {"key": spec.key, "error": f"{type(error).__name__}: {error}",
                                   "traceback": "".join(traceback.format_exception(error))[-4000:],
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            bar.write(f"{spec.key}: FAILED ({type(error).__name__}: {error})")
        else:
            _append(out / RESULTS, result)  # first the line, then the tidy: a kill between keeps the line
            if not config.keep_runs:
                _tidy(out / "runs" / spec.key)
            bar.set_postfix_str(f"{spec.key} test {100 * (result['test_acc'] or 0):.2f}%", refresh=False)
        bar.update(1)

    try:
        if config.workers == 1 or len(todo) <= 1:
            for spec in todo:
                try:
                    result = execute(spec, config, data_arg, out)
                except Exception as e:  # one broken run must not end the grid: recorded, retried on rerun
                    finished(spec, None, e)
                else:
                    finished(spec, result, None)
        else:
            _run_pool(config, todo, data_arg, out, finished)
    finally:
        bar.close()
    if failures:
        say(f"{failures} run(s) failed: see {out / ERRORS}; rerun the same command to retry them")
    return read_results(out)


def _run_pool(config: CompareConfig, todo: list[RunSpec], data_arg: str, out: Path, finished) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn: a fresh interpreter per worker (fork after torch has started threads can hang)
    with ProcessPoolExecutor(config.workers, mp_context=mp.get_context("spawn")) as pool:
        queue = list(todo)
        running = {}
        try:
            while queue or running:
                while queue and len(running) < config.workers:  # submit lazily: order = priority
                    spec = queue.pop(0)
                    running[pool.submit(_worker_run, spec, config, data_arg, str(out))] = spec
                ready, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in ready:
                    spec = running.pop(fut)
                    error = fut.exception()
                    finished(spec, None if error else fut.result(), error)
        except BaseException:
            for fut in running:
                fut.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# --------------------------------------------------------------------------- report
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def aggregate(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, sparsity, recipe, schedule): n, test/val accuracy mean and sample std
    over seeds, and the paired difference to the baseline of the same (method, sparsity, seed)."""
    results = [r for r in results if r.get("test_acc") is not None]
    base = {(r["method"], r["sparsity"], r["seed"]): r for r in results if r["recipe"] == "baseline"}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["sparsity"], r["recipe"], r["schedule"]), []).append(r)
    rows = []
    for (method, sparsity, recipe, schedule), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        test_m, test_s = _mean_std([r["test_acc"] for r in rs])
        val_m, val_s = _mean_std([r["val_acc"] for r in rs if r.get("val_acc") is not None])
        diffs = [r["test_acc"] - base[(method, sparsity, r["seed"])]["test_acc"] for r in rs
                 if (method, sparsity, r["seed"]) in base and recipe not in ("baseline", DENSE)]
        vdiffs = [r["val_acc"] - base[(method, sparsity, r["seed"])]["val_acc"] for r in rs
                  if (method, sparsity, r["seed"]) in base and recipe not in ("baseline", DENSE)]
        d_m, d_s = _mean_std(diffs)
        vd_m, vd_s = _mean_std(vdiffs)
        hashes = {r.get("mask_sha256") for r in rs}
        rows.append({"method": method, "sparsity": sparsity, "recipe": recipe, "schedule": schedule, "n": len(rs),
                     "seeds": [r["seed"] for r in rs], "test_mean": test_m, "test_std": test_s, "val_mean": val_m,
                     "val_std": val_s, "delta_test_mean": d_m, "delta_test_std": d_s, "delta_n": len(diffs),
                     "delta_val_mean": vd_m, "delta_val_std": vd_s,
                     "achieved_sparsity": statistics.fmean(r["achieved_sparsity"] or 0.0 for r in rs),
                     "train_s": statistics.fmean(r["time_s"]["train"] + r["time_s"]["setup"] for r in rs),
                     "masks_distinct": len(hashes), "has_ghosts": bool(rs[0].get("ghost_schedules")),
                     "ghost_schedules": rs[0].get("ghost_schedules")})
    order = {r: i for i, r in enumerate((DENSE,) + RECIPES)}
    rows.sort(key=lambda r: (r["method"] or "", r["sparsity"] or 0.0, order.get(r["recipe"], 99), r["schedule"]))
    return rows


def same_masks(results: Iterable[dict[str, Any]]) -> list[str]:
    """(method, sparsity, seed) cells whose recipes trained with different masks (should be none).
    Recipes whose masks move ([dynamic]: rigl, set, gmp) end with masks of their own: not compared."""
    cells: dict[tuple, set] = {}
    for r in results:
        if r["recipe"] != DENSE and r.get("mask_sha256") and not _masks_move(r.get("recipe_file", r["recipe"])):
            cells.setdefault((r["method"], r["sparsity"], r["seed"]), set()).add(r["mask_sha256"])
    return [f"{m} {s:g} seed {seed}" for (m, s, seed), h in sorted(cells.items()) if len(h) > 1]


@functools.lru_cache(maxsize=None)
def _masks_move(recipe: str) -> bool:
    """Whether ``recipe`` moves its masks during training (an enabled ``[dynamic]`` table)."""
    from ..recipe import load_recipe

    try:
        spec = load_recipe(recipe).passes.get("dynamic")
    except FxSparseError:  # a recipe file gone since the run: compare its masks as before
        return False
    return spec is not None and spec.enabled


def bar_check(rows: list[dict[str, Any]], recipe: str = "tost", at: Sequence[float] = (0.95, 0.98)) -> dict[str, Any]:
    """Does ``recipe`` beat the baseline at each sparsity of ``at`` by more than the seed-to-seed
    std (the larger of the two recipes' test-accuracy stds)? Per method, and overall (any method
    meeting it at every sparsity of ``at``)."""
    idx = {(r["method"], r["sparsity"], r["recipe"], r["schedule"]): r for r in rows}
    per: dict[str, dict[str, Any]] = {}
    for method in sorted({r["method"] for r in rows if r["method"]}):
        cells = {}
        for s in at:
            t, b = idx.get((method, s, recipe, DEFAULT_SCHEDULE)), idx.get((method, s, "baseline", DEFAULT_SCHEDULE))
            if t is None or b is None:
                cells[f"{s:g}"] = None
                continue
            margin = t["test_mean"] - b["test_mean"]
            if min(t["n"], b["n"]) < 2:  # one seed has no seed-to-seed std: the bar cannot be met
                cells[f"{s:g}"] = {"margin": margin, "std": math.nan, "met": False}
                continue
            noise = max(t["test_std"], b["test_std"])
            cells[f"{s:g}"] = {"margin": margin, "std": noise, "met": margin > noise}
        per[method] = {"cells": cells, "met": all(c is not None and c["met"] for c in cells.values())}
    return {"recipe": recipe, "sparsities": list(at), "per_method": per,
            "met": any(p["met"] for p in per.values())}


def _pct(m: float, s: float | None = None, signed: bool = False) -> str:
    if m is None or math.isnan(m):
        return "–"
    text = f"{100 * m:+.2f}" if signed else f"{100 * m:.2f}"
    return text if s is None or math.isnan(s) else f"{text} ± {100 * s:.2f}"


def _recipe_table(rows: list[dict[str, Any]], recipes: Sequence[str], cell) -> list[str]:
    """Markdown lines: one line per (method, sparsity) of the default schedule, one column per
    recipe, ``cell(row or None)`` in each."""
    default = [r for r in rows if r["schedule"] == DEFAULT_SCHEDULE]
    idx = {(r["method"], r["sparsity"], r["recipe"]): r for r in default}
    lines = ["| mask | sparsity | " + " | ".join(recipes) + " |", "|---|---:|" + "---:|" * len(recipes)]
    for method, sparsity in sorted({(r["method"], r["sparsity"]) for r in default if r["method"]}):
        cells = [cell(idx.get((method, sparsity, rec))) for rec in recipes]
        lines.append(f"| {method} | {sparsity:g} | " + " | ".join(cells) + " |")
    return lines


def _recipes_in(rows: list[dict[str, Any]]) -> list[str]:
    """The recipes the rows hold: the study's (RECIPES order), then any other (rigl, set, gmp, a
    TOML path, ...) in the order they first appear; not the dense reference."""
    present = list(dict.fromkeys(x["recipe"] for x in rows if x["recipe"] != DENSE))
    return [r for r in RECIPES if r in present] + [r for r in present if r not in RECIPES]


def markdown(rows: list[dict[str, Any]], results: list[dict[str, Any]], which: str = "test") -> str:
    """A table: one line per (method, sparsity), one column per recipe, mean ± std (%) of ``which``."""
    recipes = _recipes_in(rows)
    lines = _recipe_table(rows, recipes, lambda r: "–" if r is None else
                          f"{_pct(r[which + '_mean'], r[which + '_std'])} (n={r['n']})")
    dense = next((r for r in rows if r["recipe"] == DENSE and r["schedule"] == DEFAULT_SCHEDULE), None)
    if dense:
        lines.append(f"\nDense reference (no mask): {which} {_pct(dense[which + '_mean'], dense[which + '_std'])} "
                     f"(n={dense['n']}).")
    return "\n".join(lines)


def delta_markdown(rows: list[dict[str, Any]], which: str = "test") -> str:
    """Paired differences to the baseline (same seed, init and mask), mean ± std over seeds (points)."""
    recipes = [r for r in _recipes_in(rows) if r != "baseline"]
    return "\n".join(_recipe_table(rows, recipes, lambda r: "–" if r is None or not r["delta_n"] else
                                    _pct(r[f"delta_{which}_mean"], r[f"delta_{which}_std"], signed=True)))


def schedule_markdown(rows: list[dict[str, Any]], schedules: Sequence[dict[str, Any]]) -> str:
    """Validation accuracy per schedule variant (the sweep's table; test is left out on purpose)."""
    desc = {s["name"]: ScheduleVariant(**s).describe() for s in schedules}
    lines = ["| mask | sparsity | recipe | schedule | validation acc. (%) | vs baseline (paired, points) | n |",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        if r["recipe"] in ("baseline", DENSE) or not r["has_ghosts"]:
            continue
        s = next(iter((r.get("ghost_schedules") or {}).values()), None)  # what the runs trained with
        what = desc.get(r["schedule"], "?") if s is None else ScheduleVariant(
            "", s["hold_until"], s["anneal_until"], s["remove_at"], s["shape"]).describe()
        if r["schedule"] == DEFAULT_SCHEDULE:
            what = f"the recipe's ({what})"
        lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['recipe']} | {r['schedule']}: {what} | {_pct(r['val_mean'], r['val_std'])} | "
                     f"{_pct(r['delta_val_mean'], r['delta_val_std'], signed=True) if r['delta_n'] else '–'} | {r['n']} |")
    return "\n".join(lines)


def report(out: str | os.PathLike, *, plots: bool = True) -> dict[str, Any]:
    """Summarize ``out/results.jsonl``: ``summary.json``, ``summary.md`` and PNG plots in ``out``."""
    out = Path(out)
    results = read_results(out)
    if not results:
        raise CompareError(f"{out / RESULTS} holds no finished run yet")
    proto = json.loads((out / PROTOCOL).read_text()) if (out / PROTOCOL).exists() else {}
    schedules = list({s["name"]: s for g in proto.get("grids", []) for s in g["schedules"]}.values())
    rows = aggregate(results)
    check = bar_check(rows)
    differing = same_masks(results)
    summary = {"protocol": proto, "runs": len(results), "rows": rows, "bar": check, "mask_mismatch": differing}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    parts = [f"# fxsparse compare: {out}\n", f"{len(results)} finished runs; protocol: `{json.dumps(proto.get('protocol'))}`\n"]
    if any(r["schedule"] != DEFAULT_SCHEDULE for r in rows):
        parts += ["## Schedule variants (validation)\n", schedule_markdown(rows, schedules), ""]
    parts += ["## Test accuracy (%), mean ± std over seeds\n", markdown(rows, results, "test"), "",
              "## Validation accuracy (%), mean ± std over seeds\n", markdown(rows, results, "val"), "",
              "## Test accuracy minus the baseline's, same seed/init/mask (points), mean ± std\n",
              delta_markdown(rows, "test"), ""]
    met = "MET" if check["met"] else "NOT met"
    parts.append(f"Bar (tost beats baseline at {', '.join(f'{s:g}' for s in check['sparsities'])} by more than the "
                 f"seed-to-seed std on at least one mask method): **{met}**.")
    for method, p in check["per_method"].items():
        cells = ", ".join(f"{s}: " + ("–" if c is None else f"{100 * c['margin']:+.2f} vs std {100 * c['std']:.2f}")
                          for s, c in p["cells"].items())
        parts.append(f"* {method}: {cells}")
    parts.append("\nSame mask for every recipe of a (method, sparsity, seed): "
                 + ("yes (hashes agree)" if not differing else f"NO for {', '.join(differing)}"))
    (out / "summary.md").write_text("\n".join(parts) + "\n")
    if plots:
        summary["plots"] = [str(p) for p in plot_all(results, rows, out, schedules)]
    return summary


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_all(results, rows, out: Path, schedules=()) -> list[Path]:
    paths = []
    default = [r for r in rows if r["schedule"] == DEFAULT_SCHEDULE]
    if any(r["method"] for r in default):
        paths.append(plot_accuracy(default, out / "accuracy_vs_sparsity.png"))
    if any(r["recipe"] == "tost" for r in results) and any(r["recipe"] == "baseline" for r in results):
        paths.append(plot_curves(results, out / "training_curves.png"))
    paths.append(plot_schedules(out / "gate_schedules.png", schedules))
    return paths


def plot_accuracy(rows, path: Path) -> Path:
    """Test accuracy vs sparsity, one panel per mask method, one line per recipe (mean ± std)."""
    plt = _pyplot()
    methods = sorted({r["method"] for r in rows if r["method"]})
    sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"]})
    dense = next((r for r in rows if r["recipe"] == DENSE), None)
    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 4), squeeze=False, sharey=True,
                             constrained_layout=True)
    recipes = _recipes_in(rows)
    for ax, method in zip(axes[0], methods):
        for i, rec in enumerate(recipes):
            pts = sorted((r["sparsity"], r["test_mean"], r["test_std"]) for r in rows
                         if r["method"] == method and r["recipe"] == rec)
            if not pts:
                continue
            xs = [sparsities.index(p[0]) + (i - len(recipes) / 2) * 0.03 for p in pts]  # dodge the error bars
            style = dict(lw=2.4, ms=6, zorder=3) if rec in ("baseline", "tost") else dict(lw=1, ms=3, alpha=0.8)
            ax.errorbar(xs, [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts], marker="o", capsize=3,
                        label=rec, color=f"C{i}", **style)
        if dense:
            m, s = 100 * dense["test_mean"], 100 * dense["test_std"]
            ax.axhspan(m - s, m + s, color="0.85", zorder=0)
            ax.axhline(m, color="0.4", ls="--", lw=1, label="dense")
        ax.set_xticks(range(len(sparsities)), [f"{s:g}" for s in sparsities])
        ax.set(title=f"{method} mask ({DISTRIBUTION.get(method, '')})", xlabel="sparsity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), mean ± std over seeds")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def plot_curves(results, path: Path) -> Path:
    """Baseline vs tost at the highest sparsity of each method: validation accuracy per epoch and
    training loss per step, mean over seeds (thin lines: single seeds)."""
    plt = _pyplot()
    methods = sorted({r["method"] for r in results if r["method"] and r["recipe"] == "tost"})
    fig, axes = plt.subplots(2, len(methods), figsize=(5.2 * len(methods), 6.5), squeeze=False, constrained_layout=True)
    for col, method in enumerate(methods):
        top = max(r["sparsity"] for r in results if r["method"] == method and r["recipe"] == "tost")
        for i, rec in enumerate(("baseline", "tost")):
            runs = [r for r in results if r["method"] == method and r["sparsity"] == top and r["recipe"] == rec
                    and r["schedule"] == DEFAULT_SCHEDULE]
            if not runs:
                continue
            ax = axes[0][col]
            for r in runs:
                ax.plot([e["step"] for e in r["epoch_curve"]], [100 * (e["val_acc"] or 0) for e in r["epoch_curve"]],
                        color=f"C{i}", lw=0.6, alpha=0.5)
            n = min(len(r["epoch_curve"]) for r in runs)
            ax.plot([runs[0]["epoch_curve"][k]["step"] for k in range(n)],
                    [100 * statistics.fmean(r["epoch_curve"][k]["val_acc"] or 0 for r in runs) for k in range(n)],
                    "o-", color=f"C{i}", lw=2, label=f"{rec} (n={len(runs)})")
            ax.set(title=f"{method} {top:g}: validation accuracy (%)", xlabel="step")
            ax = axes[1][col]
            n = min(len(r["loss_curve"]) for r in runs)
            xs = [runs[0]["loss_curve"][k][0] for k in range(n)]
            ys = [statistics.fmean(r["loss_curve"][k][1] for r in runs) for k in range(n)]
            w = max(1, n // 25)
            smooth = [statistics.fmean(ys[max(0, k - w + 1):k + 1]) for k in range(n)]
            # label smoothing raises the loss floor: compare shapes, not levels (records written
            # before 2026-11-30 lack the field; tost smoothed its labels then)
            smoothed = runs[0].get("label_smoothing", runs[0]["recipe"] == "tost")
            ax.plot(xs, smooth, color=f"C{i}", lw=2, label=rec + (" (smoothed labels)" if smoothed else ""))
            for e in runs[0]["removals"]:
                ax.axvline(e["step"], color=f"C{i}", ls=":", lw=1)
            ax.set(title=f"{method} {top:g}: training loss (dotted: ghosts removed)", xlabel="step")
        axes[0][col].legend(fontsize=8)
        axes[1][col].legend(fontsize=8)
        axes[0][col].grid(alpha=0.3)
        axes[1][col].grid(alpha=0.3)
    return _save(fig, path)


def plot_schedules(path: Path, schedules: Sequence[dict[str, Any]] = ()) -> Path:
    """The gate of every ghost group of the shipped tost recipe over training (and of each schedule
    variant of a sweep), with its label smoothing and learning-rate factor."""
    from ..recipe import load_recipe
    from ..scheduler import lr_factor

    plt = _pyplot()
    recipe = load_recipe("tost")
    ts = [i / 400 for i in range(401)]
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    for i, (group, spec) in enumerate(recipe.ghosts.items()):
        ax.plot(ts, [spec.schedule.factor(t) for t in ts], color=f"C{i}", lw=3.2 - 0.8 * i,
                ls=("-", "--", "-.")[i % 3], label=f"{group} (tost.toml), removed at {spec.schedule.remove_at:g}")
    for j, s in enumerate(schedules):
        v = ScheduleVariant(**s)
        sched = type(next(iter(recipe.ghosts.values())).schedule)(v.hold, v.anneal, v.shape, v.remove)
        ax.plot(ts, [sched.factor(t) for t in ts], color=f"C{j + 3}", lw=1, ls=":", label=f"sweep '{v.name}': {v.describe()}")
    ax.plot(ts, [recipe.label_smoothing.eps_at(t) for t in ts], color="0.3", ls="--", lw=1, label="label smoothing eps")
    ax.plot(ts, [lr_factor(round(t * 1000), 1000, recipe.training) for t in ts], color="0.6", lw=1,
            label="lr / initial lr")
    ax.set(title="ghost gates over training (fraction of total steps)", xlabel="fraction of training",
           ylim=(-0.05, 1.05))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path
