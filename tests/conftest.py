"""Shared test helpers: build a zoo model, trace it, give it random masks."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import fxsparse  # noqa: E402
from zoo_models import ZOO, zoo_params  # noqa: E402

# One intra-op thread per pytest-xdist worker (the README runs the suite with -n 2 on 2 cores:
# two single-threaded workers, not four threads fighting over two cores); two otherwise.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

# --------------------------------------------------------------------------- session cache
# The zoo's pass tests (test_ghost_*.py, test_mask_pass.py, ...) build and trace the same models
# with the same seeds in every file. ``build`` keeps what it made (the model and its trace) for the
# rest of the session (per xdist worker) and hands each caller a deep copy, with torch's global RNG
# put in the state a fresh build leaves it in: a cached call returns exactly what a fresh one
# would. ``masked`` masks such a copy (MaskPass is cheap next to creating and tracing a model).
# The cache holds at most FXSPARSE_TEST_CACHE_MB of tensors (first come, first kept; 0 disables).
_CACHE: dict[tuple, tuple] = {}
_CACHE_LIMIT = int(float(os.environ.get("FXSPARSE_TEST_CACHE_MB", "1024")) * 2**20)
_cache_bytes = 0


def _tensor_bytes(*modules: torch.nn.Module) -> int:
    seen = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _cached(key: tuple, make):
    global _cache_bytes
    hit = _CACHE.get(key)
    if hit is not None:
        value, rng = hit
        torch.set_rng_state(rng)
        return copy.deepcopy(value)
    value = make()
    size = _tensor_bytes(value[0], value[1])
    if _cache_bytes + size <= _CACHE_LIMIT:
        _CACHE[key] = (copy.deepcopy(value), torch.get_rng_state())
        _cache_bytes += size
    return value


def _fresh_build(spec, size, batch, seed, eval_mode, kwargs):
    torch.manual_seed(seed)
    model = fxsparse.models.create(spec, **kwargs)
    model.train(not eval_mode)
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed + 1))
    gm = fxsparse.trace(model, x)
    return model, gm, x


def build(spec: str, size=(3, 64, 64), *, batch: int = 2, seed: int = 0, eval_mode: bool = False,
          fresh: bool = False, **kwargs):
    """(model, gm, x): a zoo model with seeded random weights, its trace, and an input batch.

    Served from the session cache unless ``fresh`` (a test of ``fxsparse.trace`` itself asks for
    the tracer's own output, not a copy of it)."""
    args = (spec, tuple(size), batch, seed, eval_mode, kwargs)
    if fresh:
        return _fresh_build(*args)
    key = ("build", spec, tuple(size), batch, seed, eval_mode, repr(sorted(kwargs.items())))
    return _cached(key, lambda: _fresh_build(*args))


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

    model, gm, x = build(spec, size, **kwargs)  # a copy from the session cache, masked here
    MaskPass(random_masks(gm, sparsity))(gm)
    return model, gm, x


@pytest.fixture(params=zoo_params())
def zoo_entry(request):
    """(spec, input size) for every model of the fixed zoo."""
    return request.param
