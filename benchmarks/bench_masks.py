"""Training-step time of masked networks: fxsparse's in-graph mask vs torch's own ways to mask.

Variants, each on its own copy of the same randomly initialized model and the same masks:

* ``dense``        the model as is (no mask): the baseline every ratio is against
* ``fxsparse``     ``fxsparse.trace`` + ``MaskPass``: ``F.conv2d(x, w * mask)`` in the graph
* ``nn.utils.prune``  ``torch.nn.utils.prune.custom_from_mask``: a forward pre-hook recomputes
                   ``weight = weight_orig * weight_mask`` before every forward
* ``ao.parametrize``  ``torch.nn.utils.parametrize`` with ``torch.ao.pruning``'s ``FakeSparsity``
                   (what ``torch.ao.pruning``'s sparsifiers install)

A step is forward + cross-entropy + backward + SGD(momentum) step. Eager and ``torch.compile``
(the model compiled, default inductor backend). Every round times one step of every variant in
turn, so slow drifts of a shared machine hit all of them alike; the table gives the median step
time and the median over rounds of each variant's time divided by dense's time in that round.

    python benchmarks/bench_masks.py --models resnet18,resnet50 --batch 32 --size 64

Not a test: prints a markdown table (and the machine/versions) to paste into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

import fxsparse
from fxsparse.passes.mask import MaskPass

VARIANTS = ("dense", "fxsparse", "nn.utils.prune", "ao.parametrize")


def random_masks(model: nn.Module, sparsity: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    gm = fxsparse.trace(model)
    params = dict(gm.named_parameters())
    return {l.weight: torch.rand(params[l.weight].shape, generator=gen) >= sparsity
            for l in fxsparse.graph.parameterized_layers(gm)}


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def build_variant(kind: str, model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(model)
    if kind == "dense":
        return model
    if kind == "fxsparse":
        gm = fxsparse.trace(model, x)
        MaskPass(masks)(gm)
        return gm
    if kind == "nn.utils.prune":
        for name, mask in masks.items():
            prune.custom_from_mask(*_owner(model, name), mask=mask)
        return model
    if kind == "ao.parametrize":
        from torch.ao.pruning.sparsifier.utils import FakeSparsity

        for name, mask in masks.items():
            parametrize.register_parametrization(*_owner(model, name), FakeSparsity(mask.clone()))
        return model
    raise ValueError(kind)


class Runner:
    def __init__(self, kind: str, module: nn.Module, compiled: bool, x: torch.Tensor, y: torch.Tensor):
        self.kind, self.x, self.y = kind, x, y
        self.module = module.train()
        self.opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-5)
        self.fn = torch.compile(module) if compiled else module
        self.graph_breaks = 0
        self.compile_s = 0.0

    def step(self) -> float:
        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.fn(self.x), self.y)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t


def bench(model_name: str, mode: str, args) -> list[dict]:
    torch.manual_seed(0)
    model = fxsparse.models.create(model_name)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    masks = random_masks(model, args.sparsity)
    runners = []
    for kind in VARIANTS:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        r = Runner(kind, build_variant(kind, model, masks, x), mode == "compile", x, y)
        t = time.perf_counter()
        for _ in range(args.warmup):
            r.step()
        r.compile_s = time.perf_counter() - t
        r.graph_breaks = sum(counters["graph_break"].values())
        runners.append(r)
        print(f"  {model_name} {mode} {kind}: warmup {r.compile_s:.1f}s, graph breaks {r.graph_breaks}",
              file=sys.stderr, flush=True)
    times = {r.kind: [] for r in runners}
    for i in range(args.rounds):
        order = runners if i % 2 == 0 else runners[::-1]  # alternate the order too
        for r in order:
            times[r.kind].append(r.step())
    dense = times["dense"]
    rows = []
    for r in runners:
        ts = times[r.kind]
        rows.append({
            "model": model_name, "mode": mode, "variant": r.kind,
            "median_ms": 1e3 * statistics.median(ts),
            "ratio": statistics.median(t / d for t, d in zip(ts, dense)),
            "graph_breaks": r.graph_breaks if mode == "compile" else None,
            "warmup_s": r.compile_s,
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for model_name in args.models.split(","):
        for mode in args.modes.split(","):
            rows += bench(model_name, mode, args)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, python {platform.python_version()}; "
          f"batch {args.batch}, {args.size}x{args.size}, sparsity {args.sparsity}, "
          f"warmup {args.warmup}, rounds {args.rounds}\n")
    print("| model | mode | variant | step ms (median) | / dense (median of rounds) | graph breaks |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        gb = "" if r["graph_breaks"] is None else str(r["graph_breaks"])
        print(f"| {r['model']} | {r['mode']} | {r['variant']} | {r['median_ms']:.1f} | {r['ratio']:.3f} | {gb} |")


if __name__ == "__main__":
    main()
