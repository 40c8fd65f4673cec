"""``fxsparse zoo``: trace every timm / torchvision classification model on the meta device
(``--numeric``: and compare outputs on CPU; ``--pipeline``: and run the whole recipe on CPU)."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

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
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds per model before its worker is killed (default: 120; 900 with --pipeline)")
    p.add_argument("--timeout-for", action="append", default=[], metavar="SOURCE=S",
                   help="another --timeout for one source (timm, torchvision, user), e.g. torchvision=3600; repeatable")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                   help="worker processes (default: 2; 0 runs in this process, without timeout or isolation)")
    p.add_argument("--worker-memory", type=float, default=None, metavar="MB",
                   help="replace a worker with a fresh process once it holds more than MB of resident memory "
                   "after a model (default with --pipeline: 4096, or a quarter of the machine's memory)")
    p.add_argument("--numeric", action="store_true",
                   help="also build small models on CPU with random weights and check that the traced "
                   "graph's eval output equals the module's")
    p.add_argument("--pipeline", action="store_true",
                   help="also run the whole recipe on each model with at most --max-params parameters, on CPU "
                   "with random weights: trace, every mask method that needs no training, fxsparse.transform, SGD "
                   "steps at every gate value, the identity-gate check, every removal, export loaded strict into "
                   "a fresh instance and its equivalence check; each failure is reported with its stage")
    p.add_argument("--recipe", default="tost", metavar="R", help="--pipeline's recipe (default: tost)")
    p.add_argument("--lrsi-iters", type=int, default=2, metavar="N",
                   help="--pipeline: LRsI search iterations (rescale.iters; default: 2)")
    p.add_argument("--max-params", type=float, default=30e6, metavar="M",
                   help="--numeric and --pipeline only run models with at most M parameters; larger ones are "
                   "reported as skipped (default: 30e6; 'inf' for none)")
    p.add_argument("--max-params-for", action="append", default=[], metavar="SOURCE=M",
                   help="a budget for one source instead of --max-params, e.g. torchvision=inf; repeatable")
    p.add_argument("--rerun-failed", action="store_true",
                   help="with --resume: run the models whose logged result failed again")
    p.add_argument("--resume", action="store_true",
                   help="keep the results already in the report's .jsonl log (written as models finish) and "
                   "sweep only the models not in it")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="start no new model after S seconds; the report covers the models done by then")
    p.add_argument("--out", default="zoo-report.json", metavar="PATH",
                   help="JSON report; the markdown summary goes beside it with a .md suffix (default: zoo-report.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _per_source(value: float, items: list[str], flag: str, form: str, *, zero: bool = False) -> float | dict[str, float]:
    """``value``, or ``{"default": value, SOURCE: X, ...}`` from ``flag``'s SOURCE=X items (X > 0, or
    X >= 0 with ``zero``)."""
    if not items:
        return value
    out = {"default": value}
    for item in items:
        source, sep, text = item.partition("=")
        try:
            if not sep or source not in ("timm", "torchvision", "user"):
                raise ValueError
            out[source] = float(text)
            if not (out[source] >= 0 if zero else out[source] > 0):
                raise ValueError
        except ValueError:
            raise FxSparseError(f"{flag} takes {form}, SOURCE one of timm, torchvision, user, and a "
                                f"{'non-negative' if zero else 'positive'} number; got {item!r}.") from None
    return out


def run(args: argparse.Namespace) -> int:
    from ..tools import zoo
    from ..tools.zoo.pool import DEFAULT_TIMEOUT_S

    if args.timeout is None:
        args.timeout = 900.0 if args.pipeline else DEFAULT_TIMEOUT_S
    if args.timeout <= 0:
        raise FxSparseError(f"--timeout must be a positive number of seconds; got {args.timeout:g}.")
    if args.worker_memory is not None and not args.worker_memory > 0:
        raise FxSparseError(f"--worker-memory must be a positive number of MB; got {args.worker_memory:g}.")
    budget = _per_source(args.max_params, args.max_params_for, "--max-params-for", "SOURCE=M (e.g. torchvision=inf)",
                         zero=True)
    timeout = _per_source(args.timeout, args.timeout_for, "--timeout-for", "SOURCE=S (e.g. torchvision=3600)")
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
        "max_params": (int(args.max_params) if math.isfinite(args.max_params) else "none")
        if args.numeric or args.pipeline else None,
        "device": "meta",
    }
    pipeline = None
    if args.pipeline:
        if args.lrsi_iters < 1:
            raise FxSparseError(f"--lrsi-iters must be at least 1; got {args.lrsi_iters}.")
        from ..recipe import load_recipe

        load_recipe(args.recipe)  # a bad recipe fails here, not once per model in the workers
        pipeline = zoo.PipelineOptions(recipe=args.recipe, lrsi_iters=args.lrsi_iters)
        settings.update(pipeline=True, device="meta, then CPU for the pipeline", **pipeline.to_settings())
    settings = {k: v for k, v in settings.items() if v is not None}

    out = Path(args.out)
    log_path = out.with_suffix(".jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, zoo.ModelResult] = {}
    if args.resume and log_path.exists():
        done = {r.model: r for r in zoo.read_log(log_path)}
        if args.rerun_failed:
            done = {m: r for m, r in done.items() if r.ok and r.pipeline != "error" and r.numeric not in ("error", "mismatch")}
    elif log_path.exists():
        log_path.unlink()
    specs = list(dict.fromkeys(specs))  # each model once
    todo = [s for s in specs if s not in done]
    if done:
        print(f"resuming: {len(specs) - len(todo)} of {len(specs)} models already in {log_path}")
    title = _title(args, settings)
    since_report = 0

    def on_result(r: zoo.ModelResult) -> None:
        nonlocal since_report
        done[r.model] = r
        zoo.append_log(log_path, r)
        since_report += 1
        if since_report >= 20:  # a long sweep's report is readable while it runs
            since_report = 0
            zoo.write_report([done[s] for s in specs if s in done], out, settings=settings, title=title)

    if isinstance(budget, dict):
        settings["max_params_for"] = {k: (int(v) if math.isfinite(v) else "none") for k, v in budget.items()}
    if isinstance(timeout, dict):
        settings["timeout_for"] = timeout
    zoo.sweep(
        todo,
        timeout=timeout,
        workers=args.workers,
        numeric=args.numeric,
        max_params=budget,
        pipeline=pipeline,
        max_rss_mb=args.worker_memory,
        time_budget=args.time_budget,
        progress=not args.no_progress,
        on_result=on_result,
    )
    results = [done[s] for s in specs if s in done]
    json_path, md_path = zoo.write_report(results, out, settings=settings, title=title)
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
        print(f"  {len(models)} failed: {key}  [{_shown(models)}]")
    if "pipeline" in s:
        p = s["pipeline"]
        print(f"{settings.get('recipe', 'tost')} pipeline: {p['ok']} / {p['ran']} completed "
              f"({100 * (p['success_rate'] or 0):.1f}%), {p['skipped']} skipped by the parameter budget")
        for key, models in p["failures"].items():
            print(f"  {len(models)} failed at {key}  [{_shown(models)}]")
    print(f"report: {json_path}, {md_path}")
    return 0


def _shown(models: list[str]) -> str:
    return ", ".join(models[:5]) + (f" and {len(models) - 5} more" if len(models) > 5 else "")


def _title(args: argparse.Namespace, settings: dict) -> str:
    what = ", ".join(args.model) if args.model and len(args.model) <= 3 else (args.models_from or settings["source"])
    title = f"fxsparse zoo: {what}, traced on the meta device"
    if args.numeric:
        title += ", checked numerically on CPU"
    if args.pipeline:
        title += f", the {args.recipe} pipeline on CPU"
    return title


def _read_model_list(path: str) -> list[str]:
    try:
        with open(path) as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except OSError as e:
        raise ModelSpecError(f"--models-from {path!r}: cannot read it ({e.strerror}).") from None
    return [line for line in lines if line]
