"""Per-rank memory of DDP against FSDP2 (``fxsparse.distributed.fully_shard``) on a timm model.

Run one mode per launch (peak RSS is per process, so the two modes must not share one):

    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_memory.py --mode ddp  --model resnet50
    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_memory.py --mode fsdp --model resnet50

The tost recipe (LRsI off: it only costs time here) at 90% sparsity, the three ghosts removed
half-way; SGD with momentum. Each rank prints one JSON line: bytes of parameters, gradients,
optimizer state and masks it holds, before and after the removals, and its peak RSS.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import time

import torch

from _worktree import use_working_tree

use_working_tree()

import fxsparse  # noqa: E402
import fxsparse.ghosts  # noqa: E402
from fxsparse import distributed as fxdist  # noqa: E402


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if t is not None)


def held(gm, opt) -> dict[str, int]:
    params = list(gm.parameters())
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    masks = [b for n, b in gm.named_buffers() if n.startswith("fxsparse.masks.")]
    return {"params": nbytes(params), "grads": nbytes(p.grad for p in params), "optimizer": nbytes(state),
            "masks": nbytes(masks), "tensors": len(params)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("ddp", "fsdp"), required=True)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="global batch")
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = fxdist.init()
    fxdist.seed(0)
    import timm

    model = timm.create_model(args.model, pretrained=False, num_classes=100)
    dense = sum(p.numel() for p in model.parameters())
    over = {"rescale.enabled": False, "masks.sparsity": 0.9}
    for g in ("ghost_neurons", "ghost_skips", "ghost_channels"):
        over.update({f"{g}.schedule.hold_until": 0.25, f"{g}.schedule.anneal_until": 0.5,
                     f"{g}.schedule.remove_at": 0.5})
    x = torch.randn(args.batch // env.world_size, 3, args.size, args.size)
    y = torch.randint(0, 100, (len(x),))
    gm = fxsparse.transform(model, fxsparse.load_recipe("tost", overrides=over), example_inputs=x)
    del model
    ghosts = sum(p.numel() for g in fxsparse.ghosts.present(gm) for p in fxsparse.ghosts.parameters(gm, g))
    sched = fxsparse.RecipeScheduler(gm, total_steps=args.steps)
    wrapped = fxdist.fully_shard(gm) if args.mode == "fsdp" else None
    opt = sched.build_optimizer()
    model = wrapped if wrapped is not None else fxdist.wrap(gm, scheduler=sched)
    gc.collect()
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        loss = sched.loss(model(x), y)
        opt.zero_grad(set_to_none=False)  # keep gradients allocated: they are part of what a rank holds
        loss.backward()
        opt.step()
        rows.append({"step": step + 1, **held(gm, opt)})
        model = fxdist.step(sched, model)
    seconds = (time.perf_counter() - t0) / args.steps
    units = gm.meta.get("fxsparse.fsdp", {})
    out = {"rank": env.rank, "world": env.world_size, "mode": args.mode, "model": args.model,
           "dense_params": dense, "ghost_params": ghosts, "units": len(units),
           "before_removal": rows[0], "after_removal": {**held(gm, opt), "step": args.steps},
           "removals": [(e["group"], e["step"], e.get("fsdp_shard_bytes_freed_at_step")) for e in sched.events],
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_after_build_mb": rss_built / 1024, "step_s": seconds}
    print(json.dumps(out), flush=True)
    fxdist.destroy()


if __name__ == "__main__":
    main()
