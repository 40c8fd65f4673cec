"""``fxsparse compare``: the accuracy study (fxsparse.tools.compare) on the command line."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_set_arg

_EPILOG = """\
examples:
  fxsparse compare --out runs/compare --workers 2           # the default grid (preset cpu)
  fxsparse compare --out runs/compare --report-only         # tables and plots from what finished
  fxsparse compare --out runs/sweep --recipes tost --methods random --sparsities 0.95 --seeds 0 1 --no-dense \\
      --schedule late=0.2,0.5,0.5,cosine --schedule early=0,0.15,0.15,linear   # ghost-schedule sweep
  fxsparse compare --map runs/map/* runs/c1/* --out runs/map-report     # the regime map across studies
  fxsparse compare --preset gpu --data cifar10 --data-root cifar10-16k.safetensors --out runs/compare-gpu

Outputs in --out: results.jsonl (one line per finished run; a rerun skips them and continues a
killed run from its last epoch), errors.jsonl, compare.json (the protocol), summary.md,
summary.json, accuracy_vs_sparsity.png, training_curves.png, gate_schedules.png, runs/<run>/.
See docs/results.md.
"""


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.replace(",", " ").split())


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..tools.compare import PRESETS, RECIPES

    p = subparsers.add_parser(
        "compare", help="accuracy study: baseline vs tost vs each technique, per mask method, sparsity and seed",
        description="Train the same model from the same initialization with the same mask under every recipe "
        "of a grid (baseline, tost, each technique alone) for every mask method, sparsity and seed, plus the "
        "dense model; report mean ± std of test and validation accuracy, and plots. Resumable.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare", metavar="DIR", help="study directory (default: runs/compare)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu",
                   help="cpu: CIFAR ResNet-8, 3 epochs, Fashion-MNIST subset (or MNIST-5k), 10 LRsI iterations; "
                   "gpu: CIFAR ResNet-18, 182 epochs, the recipe's LRsI, --data cifar10 (default: cpu)")
    p.add_argument("--report-only", action="store_true", help="train nothing: summarize what results.jsonl holds")
    p.add_argument("--map", nargs="+", metavar="DIR", help="train nothing: the regime map across studies (one --out "
                   "directory per architecture, budget or recipe variant), paired with their baselines, into --out "
                   "(map.md, map_test.png, map_val.png)")

    g = p.add_argument_group("grid")
    g.add_argument("--methods", nargs="+", default=["random", "snip"], metavar="M",
                   help="mask methods; random uses ERK, the others one global threshold (default: random snip)")
    g.add_argument("--sparsities", nargs="+", type=float, default=[0.90, 0.95, 0.98], metavar="S",
                   help="default: 0.90 0.95 0.98")
    g.add_argument("--recipes", nargs="+", default=list(RECIPES), metavar="R",
                   help=f"shipped recipe names or TOML files (a file runs under its recipe's name, paired with the "
                   f"baseline like the others); default: {' '.join(RECIPES)}")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="N", help="default: 0 1 2")
    g.add_argument("--no-dense", dest="dense", action="store_false", help="skip the dense reference runs")
    g.add_argument("--schedule", action="append", default=[], metavar="NAME=HOLD,ANNEAL,REMOVE[,SHAPE]",
                   help="a ghost-schedule variant for every ghost group, run besides the recipe's own "
                   "(recipes with ghosts only); repeatable")

    g = p.add_argument_group("protocol (default: the preset's)")
    g.add_argument("--model", metavar="MODEL", help="timm name, tv:NAME or module:attr")
    g.add_argument("--data", metavar="NAME|PATH", help="auto (fashion-mnist when installed, else mnist5k), a "
                   "dataset name, or a file written by fxsparse.data.save")
    g.add_argument("--data-root", metavar="P", help="where fashion-mnist, mnist or cifar files are")
    g.add_argument("--per-class", nargs=3, type=int, metavar=("TRAIN", "VAL", "TEST"),
                   help="class-balanced subset, images per class (cpu preset: 600 100 500)")
    g.add_argument("--full-data", action="store_true", help="no subset: every image of the dataset")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lrsi-iters", type=int, metavar="N", help="LRsI iterations (cpu preset: 10)")
    add_set_arg(g, help="recipe override for every run (dotted key, TOML value); repeatable")

    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=1, help="runs in parallel, one process each (default: 1)")
    g.add_argument("--threads", type=int, help="torch threads per run (cpu preset: 1)")
    g.add_argument("--device", help="cpu | cuda (default: the preset's)")
    g.add_argument("--keep-runs", action="store_true", help="keep each run's checkpoints and weights")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tools.compare import CompareConfig, ScheduleVariant, report, run_grid
    from .common import parse_sets

    if args.map:
        from ..tools.regime import write_map

        print(write_map(args.map, args.out))
        return 0

    if not args.report_only:
        overrides = parse_sets(args.sets)
        config = CompareConfig(
            out=args.out, preset=args.preset, model=args.model, data=args.data, data_root=args.data_root,
            per_class=() if args.full_data else tuple(args.per_class) if args.per_class else None, methods=tuple(args.methods),
            sparsities=tuple(args.sparsities), recipes=tuple(args.recipes), seeds=tuple(args.seeds), dense=args.dense,
            epochs=args.epochs, batch_size=args.batch_size, lrsi_iters=args.lrsi_iters,
            schedules=tuple(ScheduleVariant.parse(s) for s in args.schedule), overrides=overrides,
            device=args.device, threads=args.threads, workers=args.workers, keep_runs=args.keep_runs,
            progress=args.progress)
        run_grid(config)
    summary = report(args.out)
    print((Path(args.out) / "summary.md").read_text())
    print("plots: " + ", ".join(summary.get("plots", [])))
    return 0
