"""Masks for sparse training: which weights to prune, by which score, at exactly which sparsity.

```python
masks = fxsparse.masks.compute(model, "snip", 0.95, data=batches)   # {param name: bool tensor}
report = fxsparse.masks.MaskReport.from_masks(masks, requested_sparsity=0.95)
fxsparse.masks.save(masks, "mask.safetensors", method="snip", requested_sparsity=0.95)
masks = fxsparse.masks.load("mask.safetensors", model)             # validated against the model
```

Modules: ``selection`` (which layers), ``distribution`` (uniform/ER/ERK per-layer densities),
``ranking`` (exact top-k, per-layer minimum), ``scores`` (random, magnitude, Taylor, SNIP, GraSP),
``synflow``, ``imp``, ``nm`` (N:M masks), ``report``, ``io`` (safetensors save/load, validation), ``compute`` (the
entry point). The formulas and their sources are in docs/masks.md.
"""
from __future__ import annotations

from .compute import METHODS, check_request, compute, compute_keywords, method_options, score
from .distribution import DISTRIBUTIONS
from .io import load, read_metadata, save, validate
from .nm import is_nm, parse_pattern
from .report import LayerCollapseWarning, LayerStats, MaskReport
from .selection import select_layers, tied_weights

__all__ = [
    "compute", "score", "select_layers", "tied_weights", "save", "load", "read_metadata", "validate",
    "MaskReport", "LayerStats", "LayerCollapseWarning", "METHODS", "DISTRIBUTIONS",
    "is_nm", "parse_pattern", "check_request", "method_options", "compute_keywords",
]
