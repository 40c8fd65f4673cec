"""What a set of masks keeps: per-layer density, global sparsity, requested vs achieved, collapse."""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

__all__ = ["MaskReport", "LayerStats", "LayerCollapseWarning"]


class LayerCollapseWarning(UserWarning):
    """A mask keeps no weight at all of some layer: the network is cut there."""


@dataclass(frozen=True)
class LayerStats:
    name: str
    shape: tuple[int, ...]
    kept: int
    numel: int
    tied_to: str | None = None  # the first name of a weight this layer shares with another (counted there)

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class MaskReport:
    """Per-layer and global figures of a mask dict (build one with :meth:`from_masks`)."""

    layers: list[LayerStats]
    requested_sparsity: float | None = None
    method: str | None = None
    distribution: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    pattern: str | None = None  # "N:M" for an N:M mask: its fully kept layers are the ones left dense

    @classmethod
    def from_masks(
        cls,
        masks: Mapping[str, torch.Tensor],
        *,
        requested_sparsity: float | None = None,
        method: str | None = None,
        distribution: str | None = None,
        pattern: str | None = None,
        tied: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> MaskReport:
        """``tied``: ``{alias: first name}`` of weights two layers share
        (``fxsparse.masks.tied_weights(model, masks)``); an alias is listed but counted once, under
        its first name, as the model holds one tensor for both."""
        tied = tied or {}
        layers = [LayerStats(n, tuple(m.shape), int(m.count_nonzero()), m.numel(), tied.get(n)) for n, m in masks.items()]
        return cls(layers, requested_sparsity, method, distribution, dict(extra), pattern)

    @property
    def counted(self) -> list[LayerStats]:
        """The layers whose weights count in the totals: all but the aliases of tied weights."""
        return [l for l in self.layers if l.tied_to is None]

    @property
    def total(self) -> int:
        return sum(l.numel for l in self.counted)

    @property
    def kept(self) -> int:
        return sum(l.kept for l in self.counted)

    @property
    def achieved_sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0

    @property
    def density(self) -> dict[str, float]:
        """{parameter name: fraction of its weights kept}."""
        return {l.name: l.density for l in self.layers}

    @property
    def collapsed(self) -> list[str]:
        """Layers with no weight kept."""
        return [l.name for l in self.layers if l.kept == 0]

    @property
    def dense(self) -> list[str]:
        """Layers with every weight kept (for an N:M mask: the layers left dense)."""
        return [l.name for l in self.layers if l.kept == l.numel]

    @property
    def error(self) -> float | None:
        """achieved - requested sparsity (None when nothing was requested)."""
        return None if self.requested_sparsity is None else self.achieved_sparsity - self.requested_sparsity

    def warn_collapse(self, stacklevel: int = 3) -> None:
        if self.collapsed:
            names = ", ".join(self.collapsed[:8]) + (" ..." if len(self.collapsed) > 8 else "")
            warnings.warn(
                f"{len(self.collapsed)} layer(s) keep no weights at all ({names}): the network is cut "
                f"there. Pass min_per_layer=k to keep at least k weights in every layer, or use a "
                f"layer-wise distribution (erk).",
                LayerCollapseWarning, stacklevel=stacklevel,
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "distribution": self.distribution,
            "requested_sparsity": self.requested_sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "kept": self.kept,
            "total": self.total,
            "collapsed": self.collapsed,
            **({"pattern": self.pattern, "left_dense": self.dense} if self.pattern else {}),
            "layers": [{**{k: v for k, v in asdict(l).items() if k != "tied_to" or v is not None}, "density": l.density}
                       for l in self.layers],
            **({"extra": self.extra} if self.extra else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def summary(self) -> str:
        """One line: method, requested vs achieved sparsity, kept weights, collapsed layers."""
        what = " ".join(x for x in (self.method, self.pattern, self.distribution and f"({self.distribution})") if x)
        req = "" if self.requested_sparsity is None else f"requested {self.requested_sparsity:.2%}, "
        collapsed = f"; {len(self.collapsed)} collapsed" if self.collapsed else ""
        aliases = len(self.layers) - len(self.counted)
        tied = f"; {aliases} tied to another, counted once" if aliases else ""
        dense = ""
        if self.pattern and self.dense:
            names = ", ".join(self.dense[:4]) + (" ..." if len(self.dense) > 4 else "")
            dense = f"; {len(self.dense)} left dense: {names}"
        return (
            f"{what + ': ' if what else ''}{req}achieved sparsity {self.achieved_sparsity:.2%} "
            f"({self.kept:,} of {self.total:,} weights kept in {len(self.layers)} layers{tied}{collapsed}{dense})"
        )

    def __str__(self) -> str:
        width = max([len(l.name) for l in self.layers] + [5])
        lines = [self.summary(), f"{'layer':<{width}}  {'shape':<20} {'kept':>12} {'total':>12} {'density':>8}"]
        for l in self.layers:
            mark = "  <- collapsed" if l.kept == 0 else ""
            if self.pattern and l.kept == l.numel:
                mark = f"  <- left dense (not {self.pattern})"
            if l.tied_to is not None:
                mark += f"  <- the weight of {l.tied_to} (counted there)"
            lines.append(
                f"{l.name:<{width}}  {str(l.shape):<20} {l.kept:>12,} {l.numel:>12,} {l.density:>8.2%}{mark}"
            )
        return "\n".join(lines)
