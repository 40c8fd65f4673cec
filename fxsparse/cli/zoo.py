"""``fxsparse zoo``: trace every timm / torchvision classification model on the meta device."""
from __future__ import annotations

import argparse
import os

from ..errors import FxSparseError, ModelSpecError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "zoo",
        help="trace every timm / torchvision model and report what fails",
        description="Build every timm and/or torchvision classification model on the meta device, "
        "trace it with fxsparse.trace, and write a JSON report plus a markdown summary beside it. "
        "Each model runs in a pool of worker processes with a timeout, so a crash or hang is "
        "recorded and the sweep goes on.",
    )
    p.add_argument("--source", choices=("timm", "torchvision", "all"), default="timm",
                   help="which models to sweep (default: timm)")
    p.add_argument("--model", action="append", default=[], metavar="MODEL",
                   help="sweep these MODEL specs instead of a whole source; repeatable")
    p.add_argument("--models-from", metavar="FILE",
                   help="sweep the MODEL specs listed in FILE (one per line, '#' comments), in that order")
    p.add_argument("--filter", metavar="GLOB", help="only models whose name matches GLOB (e.g. 'resnet*')")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N models (after --filter)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds per model before its worker is killed (default: 120)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                   help="worker processes (default: 2; 0 runs in this process, without timeout or isolation)")
    p.add_argument("--numeric", action="store_true",
                   help="also build small models on CPU with random weights and check that the traced "
                   "graph's eval output equals the module's")
    p.add_argument("--max-params", type=float, default=30e6, metavar="M",
                   help="--numeric only checks models with at most M parameters (default: 30e6)")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="start no new model after S seconds; the report covers the models done by then")
    p.add_argument("--out", default="zoo-report.json", metavar="PATH",
                   help="JSON report; the markdown summary goes beside it with a .md suffix (default: zoo-report.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import zoo

    if args.timeout <= 0:
        raise FxSparseError(f"--timeout must be a positive number of seconds; got {args.timeout:g}.")
    explicit = list(args.model)
    if args.models_from:
        explicit += _read_model_list(args.models_from)
    if explicit:
        specs = zoo.select(explicit, filter=args.filter, limit=args.limit)
    else:
        specs = zoo.list_specs(args.source, filter=args.filter, limit=args.limit)
    if not specs:
        raise ModelSpecError(
            f"no models to sweep (source={args.source}, filter={args.filter!r}, limit={args.limit}); "
            f"check the --filter glob."
        )
    settings = {
        "source": "explicit" if explicit else args.source,
        "models_from": args.models_from,
        "filter": args.filter,
        "limit": args.limit,
        "timeout_s": args.timeout,
        "workers": args.workers,
        "requested": len(specs),
        "time_budget_s": args.time_budget,
        "numeric": args.numeric,
        "max_params": int(args.max_params) if args.numeric else None,
        "device": "meta",
    }
    settings = {k: v for k, v in settings.items() if v is not None}
    results = zoo.sweep(
        specs,
        timeout=args.timeout,
        workers=args.workers,
        numeric=args.numeric,
        max_params=int(args.max_params),
        time_budget=args.time_budget,
        progress=not args.no_progress,
    )
    what = ", ".join(args.model) if args.model and len(args.model) <= 3 else (args.models_from or settings["source"])
    title = f"fxsparse zoo: {what}, traced on the meta device" + (", checked numerically on CPU" if args.numeric else "")
    json_path, md_path = zoo.write_report(results, args.out, settings=settings, title=title)
    s = zoo.summarize(results)
    t = s["trace_s"]
    if len(results) < len(specs):
        print(f"time budget reached: {len(results)} of {len(specs)} models done")
    print(f"traced {s['traced']} / {s['models']} models ({100 * (s['success_rate'] or 0):.1f}%)", end="")
    print(f"; trace time median {t['median']:.3f} s, p90 {t['p90']:.3f} s" if t["median"] is not None else "")
    if "numeric" in s:
        n = s["numeric"]
        print(f"numeric: {n['checked']} checked, {n['equal']} bit-identical, {n['close']} close, "
              f"{n['mismatch']} mismatch, {n['error']} error, {n['skipped']} skipped")
    for key, models in s["failures"].items():
        shown = ", ".join(models[:5]) + (f" and {len(models) - 5} more" if len(models) > 5 else "")
        print(f"  {len(models)} failed: {key}  [{shown}]")
    print(f"report: {json_path}, {md_path}")
    return 0


def _read_model_list(path: str) -> list[str]:
    try:
        with open(path) as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except OSError as e:
        raise ModelSpecError(f"--models-from {path!r}: cannot read it ({e.strerror}).") from None
    return [line for line in lines if line]
