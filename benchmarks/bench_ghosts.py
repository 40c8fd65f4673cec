"""Training-step cost of the ghost phase against the masked-only graph, eager and compiled.

Kept for its old command line; the measurement lives in ``fxsparse.bench`` (``fxsparse bench``),
this runs its ``masked``, ``ghost_skips`` (the mask plus ghost skips alone) and ``ghosts``
variants (``ghosts``: the mask plus every ghost pass of the tost recipe with its options, gates
at 1, i.e. the whole ghost phase):

    python benchmarks/bench_ghosts.py --models resnet18 --modes eager --steps 5
    # the same as
    fxsparse bench --models resnet18 --modes eager --variants masked ghost_skips ghosts --rounds 5 --threads 1
"""
from __future__ import annotations

import argparse
import sys

from fxsparse.cli import main as fxsparse_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compiles, allocator)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    return fxsparse_main(["bench", "--models", *args.models, "--modes", *args.modes,
                          "--variants", "masked", "ghost_skips", "ghosts",
                          "--batch", str(args.batch), "--size", str(args.size), "--rounds", str(args.steps),
                          "--warmup", str(args.warmup), "--sparsity", str(args.sparsity), "--threads", str(args.threads),
                          "--no-transform"])


if __name__ == "__main__":
    sys.exit(main())
