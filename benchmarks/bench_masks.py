"""Training-step time of masked networks: fxsparse's in-graph mask vs torch's own ways to mask.

Kept for its old command line; the measurement lives in ``fxsparse.tools.bench`` (``fxsparse bench``),
this runs its ``dense``, ``masked``, ``prune`` and ``parametrize`` variants:

    python benchmarks/bench_masks.py --models resnet18,resnet50 --batch 32 --size 64
    # the same as
    fxsparse bench --models resnet18 resnet50 --variants dense masked prune parametrize --batch 32 --size 64
"""
from __future__ import annotations

import argparse
import sys

from fxsparse.cli import main as fxsparse_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--modes", default="eager,compile", help="eager and/or compile (comma-separated)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    modes = ["compiled" if m.strip() in ("compile", "compiled") else m.strip() for m in args.modes.split(",")]
    cmd = ["bench", "--models", *args.models.split(","), "--modes", *modes,
           "--variants", "dense", "masked", "prune", "parametrize", "--batch", str(args.batch), "--size", str(args.size),
           "--sparsity", str(args.sparsity), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
           "--no-transform"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return fxsparse_main(cmd)


if __name__ == "__main__":
    sys.exit(main())
