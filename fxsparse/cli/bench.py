"""``fxsparse bench``: the speed study (fxsparse.tools.bench) on the command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_EPILOG = """\
examples:
  fxsparse bench --out runs/bench                           # 4 models x 5 variants, eager + compiled
  fxsparse bench --models resnet18 --modes eager --rounds 3 # a quick look
  fxsparse bench --out runs/bench --report-only             # the tables again, from bench.jsonl
  fxsparse bench --zoo --out runs/bench                     # transform time over the test zoo
  fxsparse bench --zoo --zoo-source timm --limit 50         # ... or over the first 50 timm models
  fxsparse bench --device cuda --batch 64 --size 224        # GPU: bf16 autocast and channels_last on
  fxsparse bench --variants masked ghosts --set ghost_channels.ratio=0.1   # another ghost phase

Ratios are medians over alternating rounds of (variant step time / reference step time in the
same round): masked, prune and parametrize against dense, ghosts against masked. See
docs/benchmarks.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..tools.bench import ALL_VARIANTS, MODELS, MODES, VARIANTS
    from .common import add_set_arg

    p = subparsers.add_parser(
        "bench", help="speed study: training-step time and peak memory of dense, masked, ghost phase, "
        "nn.utils.prune and ao parametrize, eager and compiled; transform time",
        description="Time one training step (forward, loss, backward, SGD step) of each model under each "
        "variant, in alternating rounds so that a shared machine's load hits all alike; report medians, ratios "
        "and peak step memory. With --zoo, time the transform pipeline over many models instead.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL",
                   help=f"default: {' '.join(MODELS)}")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=ALL_VARIANTS, metavar="V",
                   help=f"default: {' '.join(VARIANTS)}; also {' '.join(ALL_VARIANTS[len(VARIANTS):])} "
                   "(mask + one ghost technique)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, metavar="M", help="eager and/or compiled")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--size", type=int, default=64, help="input height = width; 0: the model's own (default: 64)")
    p.add_argument("--sparsity", type=float, default=0.9, help="random ERK mask sparsity (default: 0.9)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant, compilation included (default: 2)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (default: 10)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last (default: on for CUDA)")
    p.add_argument("--recipe", default="tost", metavar="R",
                   help="the ghost phase's recipe, a name or a TOML path (default: tost)")
    add_set_arg(p, "override a key of the ghost variants' recipes (e.g. ghost_channels.ratio=0.1); repeatable")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory step")
    p.add_argument("--no-transform", dest="transform", action="store_false", help="skip the transform timing")
    p.add_argument("--out", metavar="DIR", help="append rows to DIR/bench.jsonl (zoo: zoo.jsonl) and skip what "
                   "is there; also writes DIR/bench.md")
    p.add_argument("--report-only", action="store_true", help="measure nothing: print the tables from --out")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of markdown")
    p.add_argument("--edges", action="store_true", help="instead of the step study: the transform, one LRsI "
                   "iteration next to a training step, and a removal with the step after it (recompile) per mode")
    g = p.add_argument_group("zoo: transform time over many models")
    g.add_argument("--zoo", action="store_true", help="time trace + mask + ghost passes + removal per model")
    g.add_argument("--zoo-source", choices=("zoo", "timm"), default="zoo",
                   help="zoo: tests/zoo_models.py (40 timm + torchvision models); timm: timm.list_models()")
    g.add_argument("--limit", type=int, help="only the first N models of the zoo source")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tools import bench
    from .common import parse_sets

    out = Path(args.out) if args.out else None
    if args.report_only and out is None:
        raise bench.BenchError("--report-only reads --out DIR: name it")
    if args.zoo:
        path = out / bench.ZOO_RESULTS if out else None
        rows = bench.read_rows(path) if path else []
        if not args.report_only:
            done = {r["model"] for r in rows}
            todo = [m for m in bench.zoo_models(args.limit, args.zoo_source) if m[0] not in done]
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            info = bench.machine()
            for spec in todo:  # one at a time, appended as it ends: a killed sweep continues
                row = {**bench.zoo_times([spec], args.sparsity, say=lambda s: print(s, file=sys.stderr))[0],
                       "machine": info}
                rows.append(row)
                if path:
                    bench.append_rows(path, [row])
        text = json.dumps(rows, indent=1) if args.json else bench.zoo_markdown(rows)
    elif args.edges:
        config = bench.BenchConfig(
            models=tuple(args.models), modes=tuple(args.modes), batch=args.batch, size=args.size or None,
            sparsity=args.sparsity, warmup=args.warmup, threads=args.threads, device=args.device, bf16=args.bf16,
            channels_last=args.channels_last, out=args.out, recipe=args.recipe, overrides=parse_sets(args.sets))
        path = out / bench.EDGE_RESULTS if out else None
        rows = bench.read_rows(path) if path else []
        if not args.report_only:
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            done = {r["model"] for r in rows}
            for name in config.models:
                if name in done:
                    continue
                row = {**bench.edge_costs(name, config, say=lambda s: print(s, file=sys.stderr)),
                       "machine": bench.machine(config)}
                rows.append(row)
                if path:
                    bench.append_rows(path, [row])
        text = json.dumps(rows, indent=1) if args.json else bench.edges_markdown(rows)
    else:
        config = bench.BenchConfig(
            models=tuple(args.models), variants=tuple(args.variants), modes=tuple(args.modes), batch=args.batch,
            size=args.size or None, sparsity=args.sparsity, warmup=args.warmup, rounds=args.rounds,
            threads=args.threads, device=args.device, bf16=args.bf16, channels_last=args.channels_last,
            memory=args.memory, transform=args.transform, out=args.out, recipe=args.recipe,
            overrides=parse_sets(args.sets))
        rows = bench.read_rows(out / bench.RESULTS) if args.report_only else bench.run_bench(config)
        if args.json:
            text = json.dumps(rows, indent=1)
        else:
            m = rows[0]["machine"] if rows else bench.machine(config)
            head = (f"{m['cpu']}, {m['cpus']} CPUs, torch threads {m['torch_threads']}, load average "
                    f"{m['load_average'][0]} at start; torch {m['torch']}, timm {m.get('timm', '?')}, python "
                    f"{m['python']}; {m['date']}")
            text = "\n".join([head, "", bench.markdown(rows), "", *(f"* {b}" for b in bench.bars(rows))])
        if out and not args.json:
            out.mkdir(parents=True, exist_ok=True)
            (out / "bench.md").write_text(text + "\n")
    print(text)
    return 0
