"""Masks for sparse training: which weights to prune, by which score, at exactly which sparsity.

```python
masks = fxsparse.masks.compute(model, "snip", 0.95, data=batches)   # {param name: bool tensor}
report = fxsparse.masks.MaskReport.from_masks(masks, requested_sparsity=0.95)
fxsparse.masks.save(masks, "mask.safetensors", method="snip", requested_sparsity=0.95)
masks = fxsparse.masks.load("mask.safetensors", model)             # validated against the model
```

Modules: ``selection`` (which layers), ``distribution`` (uniform/ER/ERK per-layer densities),
``ranking`` (exact top-k, per-layer minimum), ``scores`` (random, magnitude, Taylor, SNIP, GraSP),
``synflow``, ``imp``, ``report``, ``io`` (safetensors save/load, validation), ``compute`` (the
entry point). The formulas and their sources are in docs/masks.md.
"""
from __future__ import annotations

from .compute import METHODS, compute, score
from .distribution import DISTRIBUTIONS
from .io import load, read_metadata, save, validate
from .report import LayerCollapseWarning, LayerStats, MaskReport
from .selection import select_layers

__all__ = [
    "compute", "score", "select_layers", "save", "load", "read_metadata", "validate",
    "MaskReport", "LayerStats", "LayerCollapseWarning", "METHODS", "DISTRIBUTIONS",
]
