"""Why a compiled masked step is slow on CPU: the bool mask under inductor's layout optimization.

    python benchmarks/mask_dtype.py --layout-opt 1       # inductor's default
    python benchmarks/mask_dtype.py --layout-opt 0

Times compiled training steps (alternating rounds, as ``fxsparse bench``) of the dense model, the
``MaskPass`` graph with its bool mask buffers (what fxsparse ships), and the same graph with the
mask buffers cast to float32 once. With layout optimization inductor stores conv weights
channels_last, so ``weight * mask`` transposes the mask tile by tile; bool tiles take a slow
scalar path, float tiles a vectorized one. docs/benchmarks.md has the numbers.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch._inductor.config as inductor_config

from fxsparse.tools import bench


def float_masks(gm: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``fxsparse.masks.*`` bool buffer by its float32 copy (same graph)."""
    for name, buf in list(gm.named_buffers()):
        if name.startswith("fxsparse.masks."):
            owner, _, attr = name.rpartition(".")
            gm.get_submodule(owner).register_buffer(attr, buf.float())
    return gm


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--layout-opt", type=int, default=1, choices=(0, 1))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    inductor_config.layout_optimization = bool(args.layout_opt)
    config = bench.BenchConfig(models=(args.model,), batch=args.batch, size=args.size, memory=False)
    model, x, y = bench.create_model(args.model, config)
    masks = bench.random_masks(model, x, 0.9)
    runners = []
    for kind in ("dense", "masked", "masked_float"):
        torch._dynamo.reset()
        module = bench.build_variant("masked" if kind == "masked_float" else kind, model, masks, x)
        if kind == "masked_float":
            float_masks(module)
        r = bench.Runner(kind, module, True, x, y)
        for _ in range(2):
            r.step()
        runners.append(r)
    times = bench.measure(runners, args.rounds)
    for kind, ts in times.items():
        ratio = statistics.median(t / d for t, d in zip(ts, times["dense"]))
        print(f"layout_optimization={args.layout_opt} {args.model} compiled {kind}: "
              f"{1e3 * statistics.median(ts):.0f} ms, {ratio:.3f} of dense")


if __name__ == "__main__":
    main()
