"""How many weights each layer keeps: uniform, ER and ERK layer-wise densities.

* ``uniform``: every layer has the global density.
* ``er`` (Erdos-Renyi, Mocanu et al. 2018): density proportional to ``(n_out + n_in) / (n_out * n_in)``.
* ``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020, "Rigging the Lottery"): density proportional to
  ``sum(shape) / prod(shape)``, kernel dimensions included.

For ER/ERK the scale ``eps`` is chosen so the kept weights add up to the global budget. When a
layer's density ``eps * raw`` would exceed 1, that layer is made dense and ``eps`` is solved again
for the others, as in RigL's ``get_sparsities_erdos_renyi``: each pass makes dense the layers with
the largest raw density.

The ``global`` distribution has no per-layer counts: one threshold over all scores decides.
"""
from __future__ import annotations

import math

from torch import nn

__all__ = ["DISTRIBUTIONS", "layer_densities", "apportion", "logical_shape"]

DISTRIBUTIONS = ("global", "uniform", "er", "erk")


def logical_shape(module: nn.Module, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The (out, in, *kernel) shape ER/ERK read off a weight.

    timm's CondConv2d stores its experts flattened as ``(num_experts, out * in * kh * kw)``; it
    counts as a conv with ``num_experts * out`` output channels.
    """
    conv_shape = getattr(module, "weight_shape", None)
    experts = getattr(module, "num_experts", None)
    if conv_shape is not None and experts is not None and len(weight_shape) == 2:
        out, *rest = conv_shape
        if experts * math.prod(conv_shape) == math.prod(weight_shape):
            return (experts * out, *rest)
    return tuple(weight_shape)


def raw_density(shape: tuple[int, ...], distribution: str) -> float:
    if distribution == "er":
        n_out, n_in = shape[0], shape[1]
        return (n_out + n_in) / (n_out * n_in)
    return sum(shape) / math.prod(shape)  # erk


def layer_densities(shapes: dict[str, tuple[int, ...]], keep: int, distribution: str) -> dict[str, float]:
    """Per-layer density for ``keep`` weights kept in all, by ``distribution`` (not ``global``)."""
    numels = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(numels.values())
    if distribution == "uniform" or keep >= total:
        return {n: keep / total for n in shapes}
    raw = {n: raw_density(s, distribution) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        sparse = [n for n in shapes if n not in dense]
        budget = keep - sum(numels[n] for n in dense)
        eps = budget / sum(raw[n] * numels[n] for n in sparse)
        largest = max(raw[n] for n in sparse)
        if eps * largest <= 1 or len(sparse) == 1:
            break
        dense.update(n for n in sparse if raw[n] == largest)
    return {n: 1.0 if n in dense else min(1.0, eps * raw[n]) for n in shapes}


def apportion(numels: dict[str, int], densities: dict[str, float], keep: int) -> dict[str, int]:
    """Integer kept counts, one per layer, that add up to exactly ``keep``.

    Largest-remainder rounding of ``density * numel``: floors first, then one more weight to the
    layers with the largest fractional parts (ties go to the earlier layer).
    """
    exact = {n: min(numels[n], densities[n] * numels[n]) for n in numels}
    counts = {n: int(math.floor(v)) for n, v in exact.items()}
    rest = keep - sum(counts.values())
    by_fraction = sorted(numels, key=lambda n: -(exact[n] - counts[n]))  # stable: layer order on ties
    while rest > 0:
        grew = False
        for n in by_fraction:
            if rest and counts[n] < numels[n]:
                counts[n] += 1
                rest -= 1
                grew = True
        if not grew:
            break
    while rest < 0:  # float round-off can overshoot by a weight or two
        for n in reversed(by_fraction):
            if rest and counts[n] > 0:
                counts[n] -= 1
                rest += 1
    return counts
