"""Where a training step's time goes, per variant: torch.profiler over ``fxsparse bench``'s steps.

    OMP_NUM_THREADS=1 python benchmarks/profile_ghosts.py --models resnet18 efficientnet_b0 \
        --variants masked ghost_neurons ghost_skips ghost_channels ghosts --modes eager compiled

For every (model, mode) it builds the variants exactly as ``fxsparse bench`` does
(``fxsparse.tools.bench.build_variant`` / ``Runner``), warms them up, then profiles ``--steps`` steps of
each variant in alternating order and prints, per variant, the step time, the number of operator
calls and the top operators by self CPU time; then, per ghost variant, the operators whose self
time grew most against ``masked`` (the reference): that is where the ghost phase's extra time
goes. ``--flops`` adds the forward + backward FLOPs of each variant (torch.utils.flop_counter).
``--json`` writes everything to a file.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

from fxsparse.tools import bench


def flops(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Forward + backward FLOPs of one step (convolutions and matmuls: what FlopCounterMode counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(module(x), y).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def profile_steps(runner: bench.Runner, steps: int) -> dict[str, tuple[float, int]]:
    """{op name: (self CPU ms per step, calls per step)} over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step()
    out = {}
    for e in prof.key_averages():
        out[e.key] = (e.self_cpu_time_total / 1e3 / steps, e.count // steps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18"])
    p.add_argument("--variants", nargs="+", default=["masked", "ghost_neurons", "ghost_skips", "ghost_channels", "ghosts"])
    p.add_argument("--modes", nargs="+", default=["eager"], choices=bench.MODES)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--flops", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = bench.BenchConfig(models=tuple(args.models), variants=tuple(args.variants), modes=tuple(args.modes),
                               batch=args.batch, size=args.size, progress=False)
    report = []
    for name in args.models:
        model, x, y = bench.create_model(name, config)
        masks = bench.random_masks(model, x, config.sparsity)
        for mode in args.modes:
            torch._dynamo.reset()
            runners = []
            for kind in args.variants:
                r = bench.Runner(kind, bench.build_variant(kind, model, masks, x), mode == "compiled", x, y)
                for _ in range(2):
                    r.step()
                runners.append(r)
            prof: dict[str, dict] = {r.kind: collections.Counter() for r in runners}
            calls: dict[str, dict] = {r.kind: collections.Counter() for r in runners}
            for i in range(2):  # two profiled blocks, the order reversed in the second
                for r in runners if i == 0 else runners[::-1]:
                    for k, (ms, n) in profile_steps(r, args.steps).items():
                        prof[r.kind][k] += ms / 2
                        calls[r.kind][k] = n
            ref = prof.get("masked")
            for r in runners:
                total = sum(v for k, v in prof[r.kind].items() if not k.startswith("ProfilerStep"))
                row = {"model": name, "mode": mode, "variant": r.kind, "self_ms": total,
                       "ops": sum(calls[r.kind].values()),
                       "top": [(k, round(v, 2), calls[r.kind][k]) for k, v in prof[r.kind].most_common(args.top)]}
                if ref is not None and r.kind != "masked":
                    delta = collections.Counter({k: prof[r.kind][k] - ref.get(k, 0.0) for k in prof[r.kind]})
                    row["extra_vs_masked"] = [(k, round(v, 2), calls[r.kind][k] - calls["masked"].get(k, 0))
                                              for k, v in delta.most_common(args.top) if v > 0]
                if args.flops:
                    row["gflops"] = flops(r.module, x, y) / 1e9
                report.append(row)
                print(f"\n== {name} {mode} {r.kind}: {total:.1f} ms self CPU per step, {row['ops']} op calls"
                      + (f", {row['gflops']:.2f} GFLOP fwd+bwd" if "gflops" in row else ""))
                for k, v, n in row["top"]:
                    print(f"   {v:8.2f} ms  {n:5d}x  {k}")
                if "extra_vs_masked" in row:
                    print("   -- grew most against masked:")
                    for k, v, n in row["extra_vs_masked"]:
                        print(f"   +{v:7.2f} ms  {n:+5d}x  {k}")
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
