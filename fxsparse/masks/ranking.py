"""From scores to masks: keep exactly the requested number of highest-scored weights.

ToST's pruner thresholds with ``torch.kthvalue`` and keeps ``score > threshold``; with tied scores
that keeps fewer weights than asked. Here the count is exact: the weights strictly above the
k-th largest score are kept, then as many tied weights as still fit, lowest index first (layers
in graph order, each flattened row-major), so the same scores always give the same mask.

A :class:`Budget` says how many weights to keep: one global count (``global`` distribution: one
threshold over all layers, the original's ``scope="global"``) or exact per-layer counts (uniform,
ER, ERK), plus a per-layer minimum. ``Budget.at_fraction(t)`` is the budget of an iterative
method's intermediate round, density ``d ** t`` (SynFlow's exponential schedule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import MaskError
from .distribution import apportion, layer_densities

__all__ = ["Budget", "top_k", "top_k_rows", "kth_largest", "random_subset", "random_mask", "make_budget"]


def top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of a 1-D tensor, ties going to the lower index."""
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    threshold = kth_largest(values, k)
    keep = values >= threshold
    extra = int(torch.count_nonzero(keep)) - k
    if extra > 0:  # more ties at the threshold than fit: the ones at the highest indices go
        _drop_last_ties(keep, values, threshold, extra)
    return keep


def _drop_last_ties(keep: torch.Tensor, values: torch.Tensor, threshold: torch.Tensor, extra: int,
                    chunk: int = 1 << 22) -> None:
    """Unset ``keep`` at the ``extra`` highest indices where ``values == threshold``, a chunk at a
    time from the end: the tied indices of all of a large model's scores (SNIP's zeros, where a
    zero-initialized head stops the gradient) would take 8 bytes per score."""
    end = values.numel()
    while extra > 0 and end > 0:
        start = max(0, end - chunk)
        tied = (values[start:end] == threshold).nonzero().squeeze(1)
        take = min(extra, tied.numel())
        if take:
            keep[start + tied[tied.numel() - take:]] = False
        extra -= take
        end = start


# Below this many entries a full ``kthvalue`` is as fast as narrowing it down first.
_BAND_MIN = 1 << 16
_BAND_SAMPLE = 1 << 12


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry of a 1-D tensor (``1 <= k <= numel``), exactly
    ``values.kthvalue(numel - k + 1).values``, found by ranking only a narrow band of values.

    An evenly strided sample (no random numbers drawn: the global RNG is left as it was) brackets
    the k-th largest value; the entries inside the bracket are few, and ``kthvalue`` over them at
    the rank the entries below the bracket leave gives the same value a full ``kthvalue`` would.
    When the sample misses (a bracket that does not hold the rank), the full ``kthvalue`` runs.
    On 2.4M random scores it takes about half a full ``kthvalue``'s time, and it avoids that
    kernel's worst case, scores already in order (80-90 s for 1M of them at rank 2). A band that
    a block of equal scores fills is answered without copying it (ViT-H/14's SNIP scores: 600M
    zeros, which a full ``kthvalue`` would copy with 8-byte indices).
    """
    n = values.numel()
    rank = n - k + 1  # ascending, 1-based: kthvalue's convention
    if n < _BAND_MIN:
        return values.kthvalue(rank).values
    sample = values[:: n // _BAND_SAMPLE].sort().values
    m = sample.numel()
    at = (rank - 0.5) / n * m  # where the rank falls in the sorted sample
    margin = 4.0 * math.sqrt(m * (rank / n) * (1 - rank / n)) + 8  # 4 sigma of a sample quantile
    i_lo, i_hi = math.floor(at - margin), math.ceil(at + margin)
    if i_lo < 0 and i_hi >= m:
        return values.kthvalue(rank).values
    # past the sample's ends the band is open: the sample need not hold the extremes
    inside = values <= sample[i_hi] if i_hi < m else None
    below = 0
    if i_lo >= 0:
        lo = sample[i_lo]
        below = int(torch.count_nonzero(values < lo))
        inside = values >= lo if inside is None else inside.logical_and_(values >= lo)
    size = int(torch.count_nonzero(inside))
    if not below < rank <= below + size:  # the sample missed
        return values.kthvalue(rank).values
    if i_lo >= 0 and i_hi < m and sample[i_lo] == sample[i_hi]:
        return sample[i_lo]  # every value in the band is this one (a block of ties: zero scores)
    band = values[inside]
    if size < n:  # the band is ranked the same way (a large one can hold a block of ties)
        return kth_largest(band, size - (rank - below) + 1)
    return band.kthvalue(rank - below).values


def random_subset(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask of ``n`` entries with exactly ``k`` set, every ``k``-subset equally likely.

    What ``top_k`` of ``n`` uniform scores gives, for the random numbers of about
    ``min(k, n - k)`` indices instead of ``n`` scores and no ranking: a random mask at 95% sparsity
    draws a twentieth of the numbers. Indices are drawn with replacement and the shortfall left by
    repeats is drawn again until the set is full; the process treats every index alike, so the
    final set is a uniform ``k``-subset. Past half the entries the complement is drawn instead.
    """
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    complement = k > n // 2
    want = n - k if complement else k
    chosen = torch.zeros(n, dtype=torch.bool)
    have = 0
    while have < want:  # each round adds at most what is missing, so the count is never passed
        chosen[torch.randint(n, (want - have,), generator=generator)] = True
        have = int(torch.count_nonzero(chosen))
    return chosen.logical_not_() if complement else chosen


def random_mask(shape: tuple[int, ...], density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool mask of ``shape`` keeping exactly ``round(density * numel)`` entries (at least one), at
    random: the masks of the ghost branches, at the density of the layer they stand beside."""
    numel = math.prod(shape)
    return random_subset(numel, max(1, round(density * numel)), generator).view(shape)


def top_k_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of each row of a 2-D tensor, ties going to the lower
    index (the rule of :func:`top_k`, row by row)."""
    order = values.sort(dim=1, descending=True, stable=True).indices  # stable: lower index first on ties
    keep = torch.zeros_like(values, dtype=torch.bool)
    return keep.scatter_(1, order[:, :k], True)


def rankable(score: torch.Tensor, alive: torch.Tensor | None) -> torch.Tensor:
    """Flat float scores safe to rank: NaN ranks lowest among live weights, dead weights below all.

    Read-only: the result may be a view of ``score``.
    """
    s = score.detach().flatten()
    s = s.double() if s.dtype == torch.float64 else s.float()
    # a finite sum means every score is finite (a NaN or an infinity would carry into it), and a
    # sum reads the scores without writing a copy: the usual case costs a fraction of nan_to_num
    if not torch.isfinite(s.sum()):
        low = torch.finfo(s.dtype).min
        s = torch.nan_to_num(s, nan=low, posinf=torch.finfo(s.dtype).max, neginf=low)
    if alive is not None:
        s = s.masked_fill(~alive.flatten().to(s.device), float("-inf"))
    return s


@dataclass(frozen=True)
class Budget:
    """How many weights to keep: in all (``keep``), and per layer unless the threshold is global."""

    numels: dict[str, int]
    keep: int
    per_layer: dict[str, int] | None = None  # None: one global threshold
    min_per_layer: int = 0
    floors: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "floors", {n: min(self.min_per_layer, v) for n, v in self.numels.items()})

    @property
    def total(self) -> int:
        return sum(self.numels.values())

    def at_fraction(self, t: float) -> Budget:
        """The budget of density ``d ** t`` (``t`` in (0, 1]; ``t = 1`` is this budget)."""
        if t >= 1:
            return self
        if self.per_layer is None:
            keep = max(self.keep, round(self.total * (self.keep / self.total) ** t))
            return Budget(self.numels, keep, None, self.min_per_layer)
        per_layer = {
            n: max(c, round(self.numels[n] * (c / self.numels[n]) ** t)) for n, c in self.per_layer.items()
        }
        return Budget(self.numels, sum(per_layer.values()), per_layer, self.min_per_layer)

    def select(self, scores: dict[str, torch.Tensor], alive: dict[str, torch.Tensor] | None = None,
               *, consume: bool = False) -> dict[str, torch.Tensor]:
        """Bool masks (shaped like the scores) keeping the highest scores within this budget.

        ``alive`` masks of an earlier round rank every weight they pruned below all live ones, so
        an iterative method never revives a pruned weight while live ones remain. ``consume=True``
        takes each layer's scores out of ``scores`` once they are ranked: a caller whose scores
        are its own then holds one copy of them at a time, not two (float64 SynFlow scores of
        RegNetY-128GF: 5.2 GB).
        """
        shapes = {n: scores[n].shape for n in self.numels}
        devices = {n: scores[n].device for n in self.numels}

        def ranked(n: str) -> torch.Tensor:
            r = rankable(scores[n], None if alive is None else alive[n])
            if consume:
                del scores[n]
            return r

        if self.per_layer is None:
            # the one ranking of every score, written layer by layer into a single buffer: what
            # torch.cat of the ranked layers gives (the same dtype promotion), without holding them all
            dtype = torch.float64 if any(scores[n].dtype == torch.float64 for n in self.numels) else torch.float32
            flat = torch.empty(self.total, dtype=dtype, device=devices[next(iter(self.numels))])
            views = dict(zip(self.numels, torch.split(flat, list(self.numels.values()))))
            for n in self.numels:
                views[n].copy_(ranked(n))
            chosen = torch.split(top_k(flat, self.keep), list(self.numels.values()))
            keep = {n: c.to(devices[n]) for n, c in zip(self.numels, chosen)}
            keep = self._raise_to_floors(keep, views)
        else:
            keep = {n: top_k(ranked(n), self.per_layer[n]) for n in self.numels}
        return {n: keep[n].view(shapes[n]) for n in self.numels}

    def draw(self, like: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
        """Uniformly random bool masks within this per-layer budget, shaped like and on the device of
        ``like``'s tensors (``random_subset`` per layer, in layer order, from one generator seeded
        with ``seed``): the random method's masks."""
        if self.per_layer is None:
            raise MaskError("Budget.draw needs per-layer counts; a global random budget ranks random scores (select).")
        gen = torch.Generator().manual_seed(seed)
        return {n: random_subset(self.numels[n], self.per_layer[n], gen).view(like[n].shape).to(like[n].device)
                for n in self.numels}

    def _raise_to_floors(self, keep: dict[str, torch.Tensor], ranked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Give every layer at least its floor, taking the weights from the lowest-ranked kept ones
        of layers above their floor, so the total stays exact."""
        kept = {n: int(k.sum()) for n, k in keep.items()}
        short = {n: self.floors[n] - kept[n] for n in keep if kept[n] < self.floors[n]}
        if not short:
            return keep
        keep = {n: k.clone() for n, k in keep.items()}
        ranked = {n: r.to(keep[n].device) for n, r in ranked.items()}  # a copy only for a layer on another device
        for n, need in short.items():
            free = (~keep[n]).nonzero().squeeze(1)
            keep[n][free[top_k(ranked[n][free], need)]] = True
        # candidates to drop: in each donor layer, its lowest-ranked kept weights above the floor
        donors, idx, vals = [], [], []
        for n in keep:
            spare = kept[n] - self.floors[n] if n not in short else 0
            if spare > 0:
                held = keep[n].nonzero().squeeze(1)
                lowest = held[top_k(-ranked[n][held], spare)]
                donors += [n] * lowest.numel()
                idx.append(lowest.cpu())
                vals.append(ranked[n][lowest].cpu())
        idx_all, vals_all = torch.cat(idx), torch.cat(vals)
        drop = top_k(-vals_all, sum(short.values())).nonzero().squeeze(1).tolist()
        for i in drop:
            keep[donors[i]][idx_all[i]] = False
        return keep


def make_budget(
    shapes: dict[str, tuple[int, ...]], sparsity: float, distribution: str, min_per_layer: int = 0
) -> Budget:
    """The budget for ``sparsity`` (fraction of weights removed) spread by ``distribution``.

    ``shapes`` are ER/ERK's logical weight shapes (see ``distribution.logical_shape``).
    """
    numels = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(numels.values())
    keep = total - round(sparsity * total)
    floors = {n: min(min_per_layer, v) for n, v in numels.items()}
    if sum(floors.values()) > keep:
        raise MaskError(
            f"min_per_layer={min_per_layer} is impossible at sparsity {sparsity:g}: {len(numels)} layers "
            f"need at least {sum(floors.values()):,} kept weights but only {keep:,} of {total:,} are "
            f"kept. Lower min_per_layer (at most {keep // max(1, len(numels)):,} here) or the sparsity."
        )
    if distribution == "global":
        return Budget(numels, keep, None, min_per_layer)
    counts = apportion(numels, layer_densities(shapes, keep, distribution), keep)
    return Budget(numels, keep, _raise_counts(counts, floors, numels), min_per_layer)


def _raise_counts(counts: dict[str, int], floors: dict[str, int], numels: dict[str, int]) -> dict[str, int]:
    """Per-layer counts lifted to their floors; the extra weights come from the other layers in
    proportion to how far each is above its floor, so the total is unchanged."""
    deficit = sum(max(0, floors[n] - c) for n, c in counts.items())
    if not deficit:
        return counts
    lifted = {n: max(c, floors[n]) for n, c in counts.items()}
    slack = {n: lifted[n] - floors[n] for n in lifted}
    total_slack = sum(slack.values())
    share = {n: slack[n] / numels[n] * (1 - deficit / total_slack) for n in slack}  # kept slack density
    kept_slack = apportion(numels, share, total_slack - deficit)
    return {n: floors[n] + min(kept_slack[n], slack[n]) for n in lifted}
