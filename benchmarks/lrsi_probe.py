"""What LRsI (GradInit) does in the first N iterations on the accuracy study's setting.

    python benchmarks/lrsi_probe.py --data runs/grid/data-fashion-mnist-600-100-500.safetensors --iters 60

Builds the model exactly as ``fxsparse train`` does for one seed (seeded init, random ERK mask,
the first ``calib`` training batches of epoch 0), runs ``RescaleInitPass`` and prints, per
iteration, whether it took a constraint step (gradient norm > gamma: shrink the gradient) or a
look-ahead step (lower the loss after one SGD step), the gradient norm, and the scales' spread.
Used in docs/results.md to explain what a 10-iteration LRsI does (and does not do).
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

import fxsparse
from fxsparse import data
from fxsparse.models import create
from fxsparse.passes.mask import MaskPass
from fxsparse.passes.rescale_init import RescaleInitPass


class Probe(RescaleInitPass):
    """RescaleInitPass that records the gradient norm and the scales at every iteration."""

    def _gradient(self, gm, names, base, scales, x, y):
        loss, gnorm, grads = super()._gradient(gm, names, base, scales, x, y)
        s = scales.detach()
        self.trace.append({"gnorm": gnorm.item(), "loss": loss.item(), "scale_mean": s.mean().item(),
                           "scale_min": s.min().item(), "scale_max": s.max().item()})
        return loss, gnorm, grads


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--model", default="fxsparse.nets:resnet8")
    p.add_argument("--sparsity", type=float, default=0.98)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--calib", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    splits = data.load(args.data, seed=args.seed)
    train, _, _ = splits.loaders(recipe=fxsparse.load_recipe("baseline"), seed=args.seed)
    train.set_epoch(0)
    calib = list(itertools.islice(train, args.calib))
    torch.manual_seed(args.seed)
    model = create(args.model, num_classes=splits.num_classes, in_chans=splits.shape[0])
    gm = fxsparse.trace(model, calib[0][0])
    masks = fxsparse.masks.compute(gm, "random", sparsity=args.sparsity, distribution="erk", seed=args.seed)
    MaskPass(masks)(gm)
    probe = Probe(calib, iters=args.iters)
    probe.trace = []
    probe(gm)
    kinds = []
    for i, t in enumerate(probe.trace):
        t["step"] = "constraint" if t["gnorm"] > probe.gamma else "lookahead"
        kinds.append(t["step"][0])
        print(json.dumps({"iter": i, **{k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()}}))
    r = probe.report
    print(f"# {r.constraint_steps} constraint + {r.lookahead_steps} look-ahead steps: {''.join(kinds)}; "
          f"final scales mean {sum(r.scales.values()) / len(r.scales):.3f}, min {min(r.scales.values()):.3f}, "
          f"max {max(r.scales.values()):.3f}")


if __name__ == "__main__":
    main()
