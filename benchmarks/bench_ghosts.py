"""Training-step cost of the ghost phase against the masked-only graph, eager and compiled, on CPU.

    python benchmarks/bench_ghosts.py                       # resnet18 and resnet50, eager + compiled
    python benchmarks/bench_ghosts.py --models resnet18 --modes eager --steps 5

For each model three graphs are built from the same seeded model and masks (random, 90% sparse,
ERK): "masked" (MaskPass only), "skips" (MaskPass + GhostSkipPass) and "ghosts" (MaskPass, then
every ghost pass present in fxsparse.passes with its default options, gates at 1: ghost
neurons, ghost skips, ghost channels: the whole ghost phase). One training step is forward +
cross-entropy + backward + SGD step over every parameter (ghost parameters included). The
graphs' steps are timed in alternation so that load from other processes hits all alike; the
table reports medians and the ratios to the masked graph.
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
import torch.nn.functional as F

import fxsparse
from fxsparse.passes import GHOST_GROUPS, PASS_ORDER, load
from fxsparse.pass_infra import tagged_nodes
from fxsparse.passes.mask import MaskPass


def ghost_passes() -> list[tuple[str, type]]:
    """(group, pass class) for every ghost pass whose module exists, in PASS_ORDER."""
    found = []
    for group in PASS_ORDER:
        if group not in GHOST_GROUPS:
            continue
        try:
            found.append((group, load(GHOST_GROUPS[group][0])))
        except ModuleNotFoundError:
            pass
    return found


def build(model_name: str, x: torch.Tensor, sparsity: float, groups: tuple[str, ...]):
    torch.manual_seed(0)
    model = fxsparse.models.create(model_name).train()
    gm = fxsparse.trace(model, x)
    masks = fxsparse.masks.compute(gm, "random", sparsity=sparsity, distribution="erk", seed=0)
    MaskPass(masks)(gm)
    applied = []
    for group, cls in ghost_passes():
        if group in groups and cls()(gm).modified:
            applied.append(group)
    return gm, applied


def make_step(gm, x, y, compiled: bool):
    opt = torch.optim.SGD(gm.parameters(), lr=1e-3, momentum=0.9)
    fn = torch.compile(gm) if compiled else gm

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fn(x), y).backward()
        opt.step()

    return step


def measure(steps: dict, n: int, warmup: int) -> dict[str, list[float]]:
    """Alternate the variants' steps; seconds per step for each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {k: [] for k in steps}
    for _ in range(n):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compiles, allocator)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("fxsparse").setLevel(logging.WARNING)

    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 1000, (args.batch,), generator=torch.Generator().manual_seed(2))
    variants = {"masked": (), "skips": ("ghost_skips",), "ghosts": tuple(GHOST_GROUPS)}
    rows = []
    for name in args.models:
        graphs = {v: build(name, x, args.sparsity, groups) for v, groups in variants.items()}
        applied = "+".join(graphs["ghosts"][1])
        edges = len(tagged_nodes(graphs["skips"][0], group="ghost_skips", role="merge"))
        for mode in args.modes:
            torch._dynamo.reset()
            steps = {v: make_step(copy.deepcopy(gm), x, y, mode == "compiled") for v, (gm, _) in graphs.items()}
            med = {v: statistics.median(t) for v, t in measure(steps, args.steps, args.warmup).items()}
            rows.append((name, mode, med, applied, edges))
            print(f"{name:10s} {mode:8s} " + "  ".join(f"{v} {m * 1e3:7.1f} ms" for v, m in med.items())
                  + f"  skips/masked {med['skips'] / med['masked']:.3f}  ghosts/masked {med['ghosts'] / med['masked']:.3f}",
                  flush=True)

    print(f"\nCPU, {args.threads} thread(s), batch {args.batch}, {args.size}x{args.size}, sparsity {args.sparsity}, "
          f"median of {args.steps} steps, torch {torch.__version__}\n")
    print("| model | mode | masked ms/step | skips ms/step | ghosts ms/step | skips / masked | ghosts / masked | ghost phase | skip edges |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for name, mode, med, applied, edges in rows:
        print(f"| {name} | {mode} | {med['masked'] * 1e3:.1f} | {med['skips'] * 1e3:.1f} | {med['ghosts'] * 1e3:.1f} | "
              f"{med['skips'] / med['masked']:.3f} | {med['ghosts'] / med['masked']:.3f} | {applied} | {edges} |")

if __name__ == "__main__":
    main()
