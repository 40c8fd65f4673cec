"""Training-step speed on one GPU: dense / masked / ghosts / prune / parametrize, ResNet-50 and ViT-B/16.

What it runs (issue 13, item 4): ``fxsparse bench`` (``fxsparse.tools.bench.run_bench``) on timm's
``resnet50`` and ``vit_base_patch16_224`` at their own 224x224 input, batch 128, random-ERK masks
at 90% sparsity, CUDA with bf16 autocast and channels_last, compiled (``torch.compile``, inductor)
and then eager. Every round times one step of each variant in turn (the order reversed every other
round), so each ratio (masked / dense, ghosts / masked, prune / dense, parametrize / dense) is
the median of two variants measured side by side. The goal on the GPU: masked / dense <= 1.03
compiled. Prints the tables and writes ``gpu_speed.json`` and ``gpu_speed.md`` under ``--out``
(``bench.jsonl`` there too: a rerun with the same ``--out`` skips what is measured).

Without timm on the machine (the H200 image has it: the device tool's KINDS.md), the script says
so and falls back to torchvision's ``resnet50`` and ``vit_b_16`` (``--torchvision`` forces that).

Budget: under 5 minutes on one H200. Nothing here has run on a GPU yet; the estimate:

* A step: ResNet-50 is 4.1 GFLOP forward per 224x224 image, ~12.3 forward + backward, so 1.6
  TFLOP per batch of 128; ViT-B/16 17.6 forward, ~53 per image, 6.8 TFLOP per batch. At an
  effective 150-250 TFLOP/s in bf16 (the H200's large products run at 790): ~10 ms and ~35 ms;
  the ghost phase 1.4x. 10 timed rounds + 2 warm-up steps of 5 variants, a memory step, eager and
  compiled: under 10 s of stepping in all.
* Compilation is the cost: each of the 10 compiled variants (2 models x 5) compiles its own
  training graph. Estimated 45 s cold for ResNet-50, 35 s for ViT-B, ~25 s for a variant whose
  kernels are mostly in inductor's cache already (masked, prune, parametrize after dense), 1.5x
  for the ghost graph: ~180 s (ResNet-50) + ~140 s (ViT-B). With start-up, model building and
  eager: ~330 s, over the 5 minutes. So ``--time-limit`` (default 285 s) guards it: the
  (model, mode) blocks run in the order ResNet-50 compiled, ViT-B compiled, ResNet-50 eager,
  ViT-B eager, and one starts only if the previous block of its mode says it fits. What is left
  is printed; the same command again with the same ``--out`` measures only what is missing (a
  second device call, about 2 minutes more).

On the GPU machine (its own Python and PyTorch; fxsparse runs from the working tree):

    PYTHONPATH=. python3 benchmarks/gpu_speed.py --out /tmp/speed --copy-to "$OUT"

The CPU dry run (``tests/test_gpu_scripts.py``): ``--device cpu --tiny`` (resnet18 and
vit_tiny_patch16_224 at 32x32, batch 2, eager, 2 rounds).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _report
from _worktree import missing, use_working_tree

MODELS = ("resnet50", "vit_base_patch16_224")
TINY_MODELS = ("resnet18", "vit_tiny_patch16_224")
# timm name -> torchvision's, where timm is missing (None: no torchvision counterpart; dropped)
TORCHVISION = {"resnet50": "tv:resnet50", "vit_base_patch16_224": "tv:vit_b_16", "resnet18": "tv:resnet18",
               "vit_tiny_patch16_224": None}
GOAL = 1.03  # masked / dense, compiled, on the GPU (issue 13)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from_bench = ("dense", "masked", "ghosts", "prune", "parametrize")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help=f"default: {' '.join(MODELS)} (--tiny: {' '.join(TINY_MODELS)})")
    p.add_argument("--variants", nargs="+", default=list(from_bench))
    p.add_argument("--modes", nargs="+", default=["compiled", "eager"], choices=("compiled", "eager"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=0, help="input height = width; 0: the model's own (224)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="peak step memory")
    p.add_argument("--transform", action="store_true", help="also time the transform (on the CPU)")
    p.add_argument("--torchvision", action="store_true", help="torchvision's models even where timm is installed")
    p.add_argument("--time-limit", type=float, default=285.0, help="seconds; a (model, mode) block starts only if "
                   "projected to fit (0: no limit)")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="runs/gpu-speed")
    p.add_argument("--copy-to", help="also copy gpu_speed.json and .md here (e.g. $OUT on the GPU machine)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: small models at 32x32, batch 2, eager, "
                   "1 warm-up step, 2 rounds, no time limit")
    args = p.parse_args(argv)
    if args.tiny:
        args.models = args.models or list(TINY_MODELS)
        args.size, args.batch, args.warmup, args.rounds, args.time_limit = 32, 2, 1, 2, 0.0
        if args.modes == ["compiled", "eager"]:
            args.modes = ["eager"]
    args.models = args.models or list(MODELS)
    return args


def resolve_models(names: list[str], torchvision: bool) -> tuple[list[str], list[str]]:
    """(model names to run, notes): timm's names, or torchvision's where timm is missing."""
    if not torchvision and not missing("timm"):
        return list(names), []
    why = "--torchvision" if torchvision else "timm is not installed here"
    out, notes = [], []
    for n in names:
        if n.startswith("tv:") or ":" in n:
            out.append(n)
        elif TORCHVISION.get(n):
            out.append(TORCHVISION[n])
            notes.append(f"{why}: {n} -> {TORCHVISION[n]}")
        else:
            notes.append(f"{why}: {n} has no torchvision counterpart here; skipped")
    return out, notes


def ratios(rows: list[dict]) -> str:
    """One line per (model, mode): the ratios, each against its reference, measured side by side."""
    idx = {(r["model"], r["mode"], r["variant"]): r for r in rows if "error" not in r}
    lines = ["| model | mode | masked/dense | ghosts/masked | prune/dense | parametrize/dense | dense step ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for m in dict.fromkeys(r["model"] for r in rows):
        for mode in ("compiled", "eager"):
            if (m, mode, "dense") not in idx and (m, mode, "masked") not in idx:
                continue

            def ratio(v: str) -> str:
                r = idx.get((m, mode, v))
                if r is None:
                    err = next((q["error"] for q in rows if "error" in q and (q["model"], q["mode"], q["variant"]) ==
                                (m, mode, v)), None)
                    return "failed" if err else "–"
                return "–" if r["ratio"] is None else f"{r['ratio']:.3f}"

            dense = idx.get((m, mode, "dense"))
            lines.append(f"| {m} | {mode} | {ratio('masked')} | {ratio('ghosts')} | {ratio('prune')} | "
                         f"{ratio('parametrize')} | {'–' if dense is None else format(dense['median_ms'], '.1f')} |")
    return "\n".join(lines)


def goal_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("variant") == "masked" and r.get("mode") == "compiled" and r.get("ratio") is not None:
            out.append(f"{r['model']}: masked/dense compiled {r['ratio']:.3f} "
                       f"{'<=' if r['ratio'] <= GOAL else '>'} {GOAL} (the GPU goal)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    use_working_tree()
    need = missing("torch", "networkx")
    if need:
        raise SystemExit(f"missing Python packages: {', '.join(need)} (fxsparse needs them)")
    import torch

    from fxsparse.tools import bench

    models, notes = resolve_models(args.models, args.torchvision)
    for n in notes:
        print(f"note: {n}", flush=True)
    if not models:
        raise SystemExit("no model left to measure")
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
    out = Path(args.out)
    base = dict(variants=tuple(args.variants), batch=args.batch, size=args.size or None, sparsity=args.sparsity,
                warmup=args.warmup, rounds=args.rounds, threads=args.threads, device=args.device, bf16=args.bf16,
                channels_last=args.channels_last, memory=args.memory, transform=args.transform, out=str(out),
                progress=True)
    blocks = [(mode, m) for mode in args.modes for m in models]
    wall0 = time.perf_counter()
    spent: dict[str, float] = {}  # mode -> seconds of its last block measured now
    rows, skipped = [], []
    for mode, m in blocks:
        config = bench.BenchConfig(models=(m,), modes=(mode,), **base)
        left = args.time_limit - (time.perf_counter() - wall0)
        if args.time_limit and mode in spent and spent[mode] > left:
            skipped.append(f"{m} {mode}")
            print(f"time limit: {m} {mode} would take ~{spent[mode]:.0f} s, {left:.0f} s are left; skipped", flush=True)
            continue
        t = time.perf_counter()
        done = {(r["model"], r["mode"]) for r in bench.read_rows(out / bench.RESULTS)}
        rows = bench.run_bench(config)  # every row in out/bench.jsonl, this block's appended
        if (m, mode) not in done:
            spent[mode] = time.perf_counter() - t
    rows = [r for r in bench.read_rows(out / bench.RESULTS) if r["model"] in models and r["mode"] in args.modes]
    table, ratio_table = bench.markdown(rows), ratios(rows)
    goals = goal_lines(rows)
    machine = bench.machine(bench.BenchConfig(models=tuple(models), **{**base, "out": None}))
    text = "\n\n".join(x for x in [
        f"Training-step speed: batch {args.batch}, {'model-own size' if not args.size else f'{args.size}px'}, "
        f"sparsity {args.sparsity:g} (random ERK), device {args.device} ({machine.get('gpu', machine['cpu'])}), "
        f"torch {machine['torch']}, {args.rounds} alternating rounds.",
        ratio_table, table, "\n".join(goals),
        "\n".join(f"note: {n}" for n in notes),
        f"Not measured (time limit {args.time_limit:g} s; run the same command again to add them): "
        f"{', '.join(skipped)}." if skipped else ""] if x)
    report = {"settings": {k: v for k, v in base.items() if k != "out"} | {"models": models, "modes": args.modes},
              "machine": machine, "rows": rows, "notes": notes, "skipped": skipped, "goals": goals,
              "wall_s": time.perf_counter() - wall0}
    _report.write(out, "gpu_speed", report, text, args.copy_to)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
