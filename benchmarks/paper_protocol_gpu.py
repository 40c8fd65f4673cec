"""ToST's comparison in the paper's shape on one GPU: CIFAR ResNet-18 and VGG-16, baseline vs tost, 98%.

What it runs (issue 11, item 5): for every seed, for ``fxsparse.nets:resnet18`` and
``fxsparse.nets:vgg16`` (ToST's CIFAR ResNet-18 and VGG-16-BN), the recipes ``baseline`` (mask
only) and ``tost`` (mask + LRsI + ghosts + label smoothing) at 98% sparsity, random-ERK masks
(``--method snip``: SNIP, one global threshold). Each run is one ``fxsparse.tools.train.Trainer`` run
with CUDA, bf16 autocast, channels_last and ``torch.compile`` (the Trainer's ``bf16``,
``channels_last``, ``compile``), the whole dataset resident on the GPU with random crop + flip done
there (``fxsparse.data.TensorLoader``: no DataLoader, no workers). The runs are paired: within a
seed both recipes start from the same initialization and the same mask (the Trainer seeds both
with the run's seed; the script checks the masks' hashes). Prints a table (test accuracy,
tost - baseline per seed, time per epoch, images/s) and writes ``paper_protocol.json`` and
``paper_protocol.md`` under ``--out``.

Data: a file written by ``fxsparse.data.save`` and carried with the working tree (the GPU machine
reaches no network; 64 MiB travel in all). ``--prepare-data`` writes it here, not in git:

    # Fashion-MNIST, all of it (Debian's dataset-fashion-mnist, 54k train / 6k val / 10k test, 52 MiB)
    python benchmarks/paper_protocol_gpu.py --prepare-data
    # or CIFAR-10 when you have it (1,200 / 100 / 300 images per class, 47 MiB)
    python benchmarks/paper_protocol_gpu.py --prepare-data --source cifar10 --data-root cifar-10-python.tar.gz

and the default ``--data auto`` takes ``benchmarks/data/cifar10*.safetensors`` if there is one,
else ``benchmarks/data/fashion-mnist.safetensors``. ``--data`` also takes any saved file, or
``cifar10`` with ``--data-root`` on a machine that has the files.

Budget: under 8 minutes on one H200 by default (2 seeds x 2 models x 2 recipes, 4 epochs each).
Nothing of this has run on a GPU yet; the sizing is an estimate, made this way:

* FLOPs (``torch.utils.flop_counter``, forward + backward = 3x forward, per image): ResNet-18
  2.73 GFLOP on 28x28 gray images (3.33 on 32x32 CIFAR), VGG-16 1.23 (1.88). The ghost phase
  (the first 30% of tost's steps) costs 1.36x (ResNet-18) / 1.43x (VGG-16) of that.
* Throughput: 50 TFLOP/s effective in bf16 (6% of the 790 TFLOP/s an H200 gives on a large
  matrix product: batch 128 of 32x32 images gives small convolutions), plus 2 ms per step for
  the optimizer, the scheduler and Python. So an epoch of Fashion-MNIST (54,000 images, 421
  steps) takes about 3.8 s (ResNet-18) and 2.2 s (VGG-16), a little more for tost.
* Compilation, the largest cost of a short run: 30 s (ResNet-18) / 20 s (VGG-16) for the first
  training graph, 1.5x that for a graph with ghosts, a third of it for the eval graph (test), and
  8 s for a graph compiled before in the same process (inductor's caches). About 190 s for the
  first seed's four runs, 65 s for each further seed.
* LRsI: tost's 180 iterations, about 3 training steps each: ~15 s per seed (both models).
* Start, imports, data: ~15 s; checkpoints and plots ~1 s per epoch and run.

Total: 15 + 190 + 65 + 2 x (15 + 8) + 2 x 4 epochs x 13.6 s = ~425 s, about 7 minutes.
``--time-limit`` (default 450 s) guards it anyway: a further seed starts only if its projection
(from the runs already done, compilation taken out) fits, so the table holds whole pairs. The
script prints its own estimate before it starts and, at the end, the measured first-epoch
overhead (compilation) and epoch times, so the next run can be sized from measurements.

Scale it with ``--epochs``, ``--seeds``, ``--models``, ``--recipes``, ``--sparsity``, ``--width``;
``--no-compile`` / ``--no-bf16`` / ``--no-channels-last`` turn the speed settings off. On the GPU
machine (its own Python and PyTorch; fxsparse runs from the working tree):

    PYTHONPATH=. python3 benchmarks/paper_protocol_gpu.py --out /tmp/paper --copy-to "$OUT"

The CPU dry run (``tests/test_gpu_scripts.py``): ``--device cpu --tiny`` (width 1/8, one epoch,
batch 32, 2 LRsI iterations) on a small saved file.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import _report
from _worktree import ROOT, missing, use_working_tree

DATA_DIR = ROOT / "benchmarks" / "data"
CARRY_LIMIT = 64 * 2**20  # what travels to the GPU machine, the working tree included
MODELS = ("resnet18", "vgg16")
RECIPES = ("baseline", "tost")
DISTRIBUTION = {"random": "erk", "snip": "global"}

# The estimate's assumptions (see the docstring): H200, bf16, batch 128.
EFFECTIVE_TFLOPS = 50.0
STEP_OVERHEAD_S = 0.002
COMPILE_COLD_S = {"resnet18": 30.0, "vgg16": 20.0}  # first training graph of the model
GHOST_COMPILE = 1.5  # a graph with ghosts compiles this much longer
EVAL_COMPILE = 1 / 3  # the eval graph, of the training graph's time
COMPILE_WARM_S = 8.0  # a graph compiled before in this process
GHOST_FLOPS = {"resnet18": 1.36, "vgg16": 1.43}  # ghost-phase step / masked step (measured FLOPs)
GHOST_SHARE = 0.3  # tost's ghosts go at 30% of the steps
START_S = 15.0
PER_EPOCH_IO_S = 0.3  # checkpoint per epoch
PER_RUN_S = 4.0  # model, mask, transform, export, plots


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data file (run here, before carrying it)")
    g.add_argument("--prepare-data", action="store_true", help="write the data file and exit")
    g.add_argument("--source", default="fashion-mnist",
                   help="fashion-mnist (Debian package, default) | cifar10 | cifar100 | mnist5k | digits")
    g.add_argument("--data-root", help="where the source's files are (cifar10: the directory or the .tar.gz)")
    g.add_argument("--per-class", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="images kept per class (default: all for Fashion-MNIST, 1200 100 300 for CIFAR)")
    g.add_argument("--data-out", help="file to write (default: benchmarks/data/<source>[-N].safetensors)")
    p.add_argument("--data", default="auto", help="a saved .safetensors, 'auto' (benchmarks/data/), or cifar10 "
                   "with --data-root")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="fxsparse.nets constructors (default: resnet18 vgg16)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--sparsity", type=float, default=0.98)
    p.add_argument("--method", choices=sorted(DISTRIBUTION), default="random", help="random (ERK) or snip (global)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of the nets (1.0: the published ones)")
    p.add_argument("--lrsi-iters", type=int, help="LRsI iterations (default: the recipe's 180)")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--val", action="store_true", help="evaluate the validation split after every epoch (costs an "
                   "eval-graph compile per run); off by default: nothing is tuned here, test is reported once")
    p.add_argument("--time-limit", type=float, default=450.0, help="seconds; a further seed starts only if it is "
                   "projected to fit (0: no limit)")
    p.add_argument("--out", default="runs/paper-gpu", help="run directories, paper_protocol.json and .md")
    p.add_argument("--copy-to", help="also copy paper_protocol.json and .md here (e.g. $OUT on the GPU machine)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: width 1/8, 1 epoch, batch 32, 2 LRsI "
                   "iterations, 1 calibration batch, no time limit")
    p.add_argument("--threads", type=int, help="torch threads (CPU)")
    args = p.parse_args(argv)
    if args.tiny:
        args.width, args.epochs, args.batch_size = 0.125, 1, 32
        args.lrsi_iters = 2 if args.lrsi_iters is None else args.lrsi_iters
        args.calib_batches, args.time_limit = 1, 0.0
    return args


# --------------------------------------------------------------------------- data
def prepare_data(args: argparse.Namespace) -> Path:
    from fxsparse import data

    source = args.source
    full = data.load(source, root=args.data_root, seed=0)
    per_class = args.per_class or ((1200, 100, 300) if source.startswith("cifar") else None)
    if per_class:
        train, val, test = (s.per_class(n, seed=0) for s, n in zip((full.train, full.val, full.test), per_class))
        mean, std = train.stats()
        splits = data.Splits(train, val, test, mean, std, full.name)
    else:
        splits = full
    n = len(splits.train) + len(splits.val) + len(splits.test)
    path = Path(args.data_out) if args.data_out else DATA_DIR / (
        f"{source}.safetensors" if per_class is None else f"{source}-{n // 1000}k.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    size = data.save(splits, path)
    print(f"wrote {path} ({size / 2**20:.1f} MiB): {len(splits.train):,} train / {len(splits.val):,} val / "
          f"{len(splits.test):,} test images of {splits.shape}, {splits.num_classes} classes")
    if size > CARRY_LIMIT - 8 * 2**20:
        print(f"warning: {size / 2**20:.0f} MiB leaves less than 8 MiB of the 64 MiB the GPU machine takes along "
              f"(the working tree travels too): use --per-class to shrink it")
    return path


def resolve_data(spec: str) -> str:
    if spec != "auto":
        return spec
    for pattern in ("cifar10*.safetensors", "fashion-mnist*.safetensors"):
        found = sorted(DATA_DIR.glob(pattern))
        if found:
            return str(found[0])
    raise SystemExit(f"no data file in {DATA_DIR}: write one first with\n"
                     f"  python benchmarks/paper_protocol_gpu.py --prepare-data            # Fashion-MNIST\n"
                     f"  python benchmarks/paper_protocol_gpu.py --prepare-data --source cifar10 --data-root PATH")


# --------------------------------------------------------------------------- estimate
def model_spec(name: str, width: float) -> str:
    """``fxsparse.nets:NAME``, with ``(width=W)`` where the constructor takes a width multiplier."""
    import importlib
    import inspect

    base = name if ":" in name else f"fxsparse.nets:{name}"
    if width == 1.0:
        return base
    module, _, attr = base.partition(":")
    if "width" not in inspect.signature(getattr(importlib.import_module(module), attr)).parameters:
        print(f"note: {base} takes no width multiplier: built at full width")
        return base
    return f"{base}(width={width:g})"


def train_flops(spec: str, shape: tuple[int, int, int], num_classes: int) -> float:
    """Forward + backward FLOPs of one image (flop counter on a CPU batch of 2)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from fxsparse.models import create

    model = create(spec, num_classes=num_classes, in_chans=shape[0]).train()
    x = torch.zeros(2, *shape)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(2, dtype=torch.long)).backward()
    return counter.get_total_flops() / 2


def estimate_run(name: str, recipe: str, flops: float, epochs: int, steps: int, batch: int, lrsi_iters: int,
                 first: bool, compiled: bool) -> float:
    """Seconds one run should take on an H200 (the docstring's model)."""
    key = name.split(":")[-1].split("(")[0]
    ghost = GHOST_FLOPS.get(key, 1.4) if recipe == "tost" else 1.0
    step = flops * batch / (EFFECTIVE_TFLOPS * 1e12)
    train = epochs * steps * (step * (1 + GHOST_SHARE * (ghost - 1)) + STEP_OVERHEAD_S)
    compile_s = 0.0
    if compiled:
        cold = COMPILE_COLD_S.get(key, 30.0)
        graphs = [cold * GHOST_COMPILE, cold] if recipe == "tost" else [cold]  # tost: with ghosts, then without
        compile_s = sum(g if first else COMPILE_WARM_S for g in graphs) + (cold * EVAL_COMPILE if first else 3.0)
    lrsi = lrsi_iters * 3 * step if recipe == "tost" else 0.0
    return train + compile_s + lrsi + PER_RUN_S + epochs * PER_EPOCH_IO_S


# --------------------------------------------------------------------------- one run


def run_one(args, name: str, recipe: str, seed: int, data_path: str, out: Path) -> dict:
    from fxsparse.tools.compare import mask_hash  # the hash compare's pairing checks, so the two agree
    from fxsparse.tools.metrics import read_metrics
    from fxsparse.tools.train import TrainConfig, Trainer

    run_dir = out / "runs" / f"{name}-{recipe}-seed{seed}"
    overrides = {"training.epochs": args.epochs, "training.batch_size": args.batch_size,
                 "masks.method": args.method, "masks.sparsity": args.sparsity,
                 "masks.distribution": DISTRIBUTION[args.method]}
    tc = TrainConfig(model=model_spec(name, args.width), out=str(run_dir), data=data_path,
                     data_root=args.data_root if not data_path.endswith((".safetensors", ".pt")) else None,
                     recipe=recipe, overrides=overrides, seed=seed, device=args.device, bf16=args.bf16,
                     channels_last=args.channels_last, compile=args.compile, threads=args.threads, val=args.val,
                     resume=True, calib_batches=args.calib_batches,
                     lrsi_iters=args.lrsi_iters if recipe == "tost" else None, keep_checkpoints=1,
                     progress=False, quiet=True)
    t0 = time.perf_counter()
    summary = Trainer(tc).run()
    wall = time.perf_counter() - t0
    records = read_metrics(run_dir / "metrics.jsonl")
    epochs = [r for r in records if r.get("type") == "epoch"]
    times = [r["epoch_time"] for r in epochs]
    steady = times[1:] or times  # the first epoch compiles
    epoch_s = statistics.median(steady)
    steps_per_epoch = summary["steps"] / max(summary["epochs"], 1)
    return {
        "model": name, "spec": tc.model, "recipe": recipe, "seed": seed,
        "test_acc": summary["test_accuracy"], "val_acc": summary["val_accuracy"], "test_loss": summary["test_loss"],
        "sparsity": summary["sparsity"], "weights_kept": summary["weights_kept"], "epochs": summary["epochs"],
        "steps": summary["steps"], "train_images": summary["images"]["train"], "data": summary["data"],
        "epoch_times_s": times, "epoch_s": epoch_s,
        "images_per_s": steps_per_epoch * args.batch_size / epoch_s if epoch_s > 0 else None,
        "first_epoch_extra_s": times[0] - epoch_s if len(times) > 1 else None,
        "setup_s": summary["time_s"]["setup"], "train_s": summary["time_s"]["train"], "wall_s": wall,
        "removals": summary["removals"], "mask_sha256": mask_hash(run_dir / "masks.safetensors"),
        "device": summary["device"], "bf16": summary["bf16"], "channels_last": summary["channels_last"],
        "compile": summary["compile"], "notes": summary["notes"],
    }


def projection(done: list[dict], name: str, recipe: str) -> float | None:
    """Seconds the next run of (name, recipe) should take, from the last one without its compilation."""
    prev = [r for r in done if r["model"] == name and r["recipe"] == recipe]
    if not prev:
        return None
    r = prev[-1]
    return r["wall_s"] - (r["first_epoch_extra_s"] or 0.0) + 2 * COMPILE_WARM_S


# --------------------------------------------------------------------------- report
def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    m = statistics.mean(values)
    return f"{100 * m:.2f}" + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")


def pairs(results: list[dict], recipes: list[str]) -> list[dict]:
    """tost (every non-baseline recipe) - baseline, per model, over the seeds that have both."""
    out = []
    for name in dict.fromkeys(r["model"] for r in results):
        by = {(r["recipe"], r["seed"]): r for r in results if r["model"] == name}
        for recipe in recipes:
            if recipe == "baseline":
                continue
            seeds = sorted(s for (rc, s) in by if rc == recipe and ("baseline", s) in by)
            diffs = [by[(recipe, s)]["test_acc"] - by[("baseline", s)]["test_acc"] for s in seeds]
            same = all(by[(recipe, s)]["mask_sha256"] == by[("baseline", s)]["mask_sha256"] for s in seeds)
            out.append({"model": name, "recipe": recipe, "seeds": seeds, "diffs": diffs,
                        "baseline": [by[("baseline", s)]["test_acc"] for s in seeds],
                        "other": [by[(recipe, s)]["test_acc"] for s in seeds],
                        "mean_diff": statistics.mean(diffs) if diffs else None,
                        "sd_diff": statistics.stdev(diffs) if len(diffs) > 1 else None,
                        "wins": sum(d > 0 for d in diffs), "same_masks": same})
    return out


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"Paper-shaped comparison: {s['data']}, sparsity {s['sparsity']:g} ({s['method']} mask), "
             f"{s['epochs']} epochs, batch {s['batch_size']}, seeds {s['seeds']}, device {report['machine'].get('device')}"
             f" (bf16 {s['bf16']}, channels_last {s['channels_last']}, compile {s['compile']}).", "",
             "| model | recipe | seed | test acc % | time/epoch s | images/s | 1st-epoch extra s | setup s | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        extra = "–" if r["first_epoch_extra_s"] is None else f"{r['first_epoch_extra_s']:.1f}"
        ips = "–" if r["images_per_s"] is None else f"{r['images_per_s']:,.0f}"
        lines.append(f"| {r['model']} | {r['recipe']} | {r['seed']} | {100 * r['test_acc']:.2f} | {r['epoch_s']:.2f} | "
                     f"{ips} | {extra} | {r['setup_s']:.1f} | {r['wall_s']:.1f} |")
    lines += ["", "| model | pair | seeds | baseline % | other % | other − baseline (points) | pairs won | same masks |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for p in report["pairs"]:
        d = "–" if p["mean_diff"] is None else (f"{100 * p['mean_diff']:+.2f}" + (
            f" ± {100 * p['sd_diff']:.2f}" if p["sd_diff"] is not None else ""))
        per = ", ".join(f"{100 * x:+.2f}" for x in p["diffs"])
        lines.append(f"| {p['model']} | {p['recipe']} − baseline | {p['seeds']} | {_ms(p['baseline'])} | "
                     f"{_ms(p['other'])} | {d} ({per}) | {p['wins']}/{len(p['diffs'])} | "
                     f"{'yes' if p['same_masks'] else 'NO'} |")
    lines += ["", f"Wall time {report['wall_s']:.0f} s (estimate before the start: {report['estimate_s']:.0f} s)."]
    if report["skipped"]:
        lines.append(f"Not run (time limit {s['time_limit']:g} s): {', '.join(report['skipped'])}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    fxsparse_dir = use_working_tree()
    need = missing("torch", "safetensors", "tqdm", "networkx")
    if need:
        raise SystemExit(f"missing Python packages: {', '.join(need)} (fxsparse's Trainer needs them)")
    if args.prepare_data:
        prepare_data(args)
        return 0
    import torch

    from fxsparse import data
    from fxsparse.tools.train import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.compile = cuda if args.compile is None else args.compile
    if cuda:
        torch.set_float32_matmul_precision("high")
    elif args.threads:
        torch.set_num_threads(args.threads)
    data_path = resolve_data(args.data)
    splits = data.load(data_path, root=args.data_root)
    shape, classes = splits.shape, splits.num_classes
    steps = len(splits.train) // args.batch_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # the plan and its estimate (H200 model; meaningless on a CPU, printed anyway)
    flops = {m: train_flops(model_spec(m, args.width), shape, classes) for m in args.models}
    lrsi = args.lrsi_iters if args.lrsi_iters is not None else 180
    plan = [(seed, m, rc) for seed in args.seeds for m in args.models for rc in args.recipes]
    est = {(seed, m, rc): estimate_run(m, rc, flops[m], args.epochs, steps, args.batch_size, lrsi,
                                       first=seed == args.seeds[0], compiled=args.compile) for seed, m, rc in plan}
    estimate_s = START_S + sum(est.values())
    print(f"data {data_path}: {len(splits.train):,} train images {shape}, {steps} steps/epoch; "
          f"{len(plan)} runs of {args.epochs} epochs on {device}; "
          + ", ".join(f"{m} {flops[m] / 1e9:.2f} GFLOP/image/step" for m in args.models)
          + f"; estimate for one H200: {estimate_s:.0f} s", flush=True)

    wall0 = time.perf_counter()
    results, skipped = [], []
    for i, seed in enumerate(args.seeds):
        block = [(m, rc) for m in args.models for rc in args.recipes]
        if i > 0 and args.time_limit:
            left = args.time_limit - (time.perf_counter() - wall0)
            need_s = sum(projection(results, m, rc) or est[(seed, m, rc)] for m, rc in block)
            if need_s > left:
                skipped += [f"seed {s}" for s in args.seeds[i:]]
                print(f"time limit: seed {seed} would take ~{need_s:.0f} s, {left:.0f} s are left; stopping", flush=True)
                break
        for m, rc in block:
            r = run_one(args, m, rc, seed, data_path, out)
            results.append(r)
            print(f"{m} {rc} seed {seed}: test {100 * r['test_acc']:.2f}%  epoch {r['epoch_s']:.2f} s  "
                  f"{r['images_per_s'] or 0:,.0f} img/s  wall {r['wall_s']:.0f} s", flush=True)
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "device": str(device),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "fxsparse": str(fxsparse_dir)}
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(device)
    report = {
        "settings": {"data": data_path, "models": args.models, "recipes": args.recipes, "sparsity": args.sparsity,
                     "method": args.method, "distribution": DISTRIBUTION[args.method], "seeds": args.seeds,
                     "epochs": args.epochs, "batch_size": args.batch_size, "width": args.width,
                     "lrsi_iters": lrsi, "compile": args.compile,
                     "bf16": results[0]["bf16"] if results else args.bf16,
                     "channels_last": results[0]["channels_last"] if results else args.channels_last,
                     "time_limit": args.time_limit, "train_images": len(splits.train), "shape": list(shape)},
        "machine": info, "estimate_s": estimate_s,
        "estimate_per_run_s": {f"{m}-{rc}-seed{s}": v for (s, m, rc), v in est.items()},
        "train_gflop_per_image": {m: f / 1e9 for m, f in flops.items()},
        "runs": results, "pairs": pairs(results, args.recipes), "skipped": skipped,
        "wall_s": time.perf_counter() - wall0,
    }
    text = markdown(report)
    _report.write(out, "paper_protocol", report, text, args.copy_to)
    print(text)
    bad = [p for p in report["pairs"] if not p["same_masks"]]
    if bad:
        print(f"warning: masks differ within a pair for {[p['model'] for p in bad]}: the comparison is not paired")
    return 0


if __name__ == "__main__":
    sys.exit(main())
