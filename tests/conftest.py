"""Shared test helpers: build a zoo model, trace it, give it random masks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import fxsparse  # noqa: E402
from zoo_models import ZOO, zoo_params  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def build(spec: str, size=(3, 64, 64), *, batch: int = 2, seed: int = 0, eval_mode: bool = False, **kwargs):
    """(model, gm, x): a zoo model with seeded random weights, its trace, and an input batch."""
    torch.manual_seed(seed)
    model = fxsparse.models.create(spec, **kwargs)
    model.train(not eval_mode)
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed + 1))
    gm = fxsparse.trace(model, x)
    return model, gm, x


def torchrun_ranks(script: str, out: Path, nproc: int = 2, timeout: float = 240) -> list:
    """Run ``script out`` under torchrun on ``nproc`` gloo processes (one thread each) and load
    what each rank saved as ``out/rank<r>.pt``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", "0", script, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def random_masks(gm, sparsity: float = 0.9, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Bernoulli mask (at least one weight kept) for every conv/linear weight of ``gm``."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(gm.named_parameters())
    masks = {}
    for layer in fxsparse.graph.parameterized_layers(gm):
        w = params[layer.weight]
        m = torch.rand(w.shape, generator=gen) >= sparsity
        m.view(-1)[0] = True
        masks[layer.weight] = m
    return masks


def masked(spec: str, size=(3, 64, 64), sparsity: float = 0.9, **kwargs):
    """(model, masked gm, x): the zoo model traced and run through MaskPass with random masks."""
    from fxsparse.passes.mask import MaskPass

    model, gm, x = build(spec, size, **kwargs)
    MaskPass(random_masks(gm, sparsity))(gm)
    return model, gm, x


@pytest.fixture(params=zoo_params())
def zoo_entry(request):
    """(spec, input size) for every model of the fixed zoo."""
    return request.param
