"""The regime map: where a recipe beats the mask-only baseline, across architectures and budgets.

``fxsparse compare`` studies one model at one budget per directory. The map reads several of
them (one per architecture, budget and recipe variant) and answers, per cell (architecture,
budget, mask method, sparsity): is the recipe's paired difference to the baseline a win, a tie or
a loss? The rule (docs/results.md, "The regime map"): d = accuracy(recipe) − accuracy(baseline)
for the same seed, initialization and mask; spread = the sample std of d over seeds; a **win** when
mean d > spread, a **loss** when mean d < −spread, a **tie** otherwise.

    from fxsparse.tools.regime import read_map, cells, markdown, plot_map
    results = read_map(["runs/map/vgg16", "runs/c1/vgg16"])
    table = cells(results, which="val")

A run is identified by its directory's protocol (``compare.json``: model, epochs, overrides) and
its recipe; runs whose directory overrides recipe keys beyond those every directory shares form a
*variant* named after the recipe and those overrides, so the same recipe under two settings
stays apart. Baselines pair across directories of the same model and budget, and the masks'
hashes must agree.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .compare import PROTOCOL, CompareError, _masks_move, _pyplot, _save, read_results

__all__ = ["Cell", "read_map", "cells", "verdict", "markdown", "shock_markdown", "epoch_markdown", "plot_map", "write_map"]


@dataclass
class Cell:
    """One (variant, architecture, budget, method, sparsity) cell of the map."""

    variant: str
    arch: str
    epochs: int
    method: str
    sparsity: float
    diffs: list[float]
    seeds: list[int]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs) if self.diffs else math.nan

    @property
    def spread(self) -> float:
        return statistics.stdev(self.diffs) if len(self.diffs) > 1 else math.nan

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.diffs)

    @property
    def verdict(self) -> str:
        return verdict(self.mean, self.spread)


def verdict(mean: float, spread: float) -> str:
    """``win`` when mean > spread, ``loss`` when mean < −spread, else ``tie`` (``?`` without a spread)."""
    if math.isnan(mean) or math.isnan(spread):
        return "?"
    return "win" if mean > spread else "loss" if mean < -spread else "tie"


def _arch(model: str) -> str:
    """``fxsparse.nets:vgg16(width=0.25)`` -> ``vgg16(width=0.25)``: short enough for a table."""
    return model.rsplit(":", 1)[-1]


def read_map(dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every finished run of ``dirs``, each tagged with ``arch``, ``epochs`` and ``variant``."""
    studies = []
    for d in dirs:
        d = Path(d)
        proto = d / PROTOCOL
        if not proto.exists():
            raise CompareError(f"{d}: no {PROTOCOL}; is it an `fxsparse compare --out` directory?")
        studies.append((d, json.loads(proto.read_text())["protocol"]))
    if not studies:
        raise CompareError("the map needs at least one compare directory")
    common = set.intersection(*(set(_items(p.get("overrides") or {})) for _, p in studies))
    out = []
    for d, proto in studies:
        extra = sorted(set(_items(proto.get("overrides") or {})) - common)
        label = ", ".join(f"{k}={v}" for k, v in extra)
        for r in read_results(d):
            if r.get("test_acc") is None:
                continue
            variant = r["recipe"] if not label or r["recipe"] == "baseline" else f"{r['recipe']} [{label}]"
            out.append({**r, "arch": _arch(proto["model"]), "epochs": int(proto["epochs"]), "variant": variant,
                        "study": str(d), "label": label})
    return out


def _cell_key(r: dict[str, Any]) -> tuple:
    return (r["arch"], r["epochs"], r["method"], r["sparsity"], r["seed"])


def baselines(results: Sequence[dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """``baseline_of(run)``: the baseline run paired with ``run``. A study's own baseline first
    (its overrides, e.g. ``training.*``, may change the baseline too: that is another protocol);
    else the baseline of a study without extra overrides (the common protocol), so that a variant
    study that ran only the recipe borrows the map's baseline."""
    own: dict[tuple, dict[str, Any]] = {}
    common: dict[tuple, dict[str, Any]] = {}
    for r in results:
        if r["variant"] == "baseline":
            own[(r["study"], *_cell_key(r))] = r
            if not r.get("label"):
                common[_cell_key(r)] = r
    return lambda r: own.get((r["study"], *_cell_key(r))) or common.get(_cell_key(r))


def _items(overrides: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, json.dumps(v)) for k, v in overrides.items()]


def cells(results: Sequence[dict[str, Any]], which: str = "test") -> list[Cell]:
    """Paired differences to the baseline per cell, for every variant but the baseline."""
    key = {"test": "test_acc", "val": "val_acc"}[which]
    baseline_of = baselines(results)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        if r["variant"] in ("baseline", "dense"):
            continue
        b = baseline_of(r)
        if b is None:
            continue
        # a recipe whose masks move (rigl, set, gmp) ends with masks of its own: nothing to compare
        if b.get("mask_sha256") != r.get("mask_sha256") and not _masks_move(r.get("recipe_file", r["recipe"])):
            raise CompareError(f"{r['study']}: {r['key']} trained with another mask than its baseline in "
                               f"{b['study']}: the pairing is broken (different protocol or data?)")
        groups.setdefault((r["variant"], r["arch"], r["epochs"], r["method"], r["sparsity"]), []).append(
            {"seed": r["seed"], "d": 100.0 * (r[key] - b[key])})
    out = []
    for (variant, arch, epochs, method, sparsity), rs in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        rs.sort(key=lambda x: x["seed"])
        out.append(Cell(variant, arch, epochs, method, sparsity, [x["d"] for x in rs], [x["seed"] for x in rs]))
    return out


def _order(key: tuple) -> tuple:
    variant, arch, epochs, method, sparsity = key
    return (variant != "tost", variant, arch, epochs, method, sparsity)


def markdown(table: Sequence[Cell], which: str = "test") -> str:
    """Per variant: one row per (architecture, budget, mask), one column per sparsity, each cell
    ``mean ± spread (pairs won/n) verdict``; then the count of wins, ties and losses."""
    lines = []
    for variant in dict.fromkeys(c.variant for c in table):
        cs = [c for c in table if c.variant == variant]
        sparsities = sorted({c.sparsity for c in cs})
        lines += [f"**{variant} − baseline**, {which} accuracy, points (mean ± spread over seeds, pairs won, verdict):",
                  "", "| architecture | epochs | mask | " + " | ".join(f"{s:g}" for s in sparsities) + " |",
                  "|---|---:|---|" + "---:|" * len(sparsities)]
        rows: dict[tuple, dict[float, Cell]] = {}
        for c in cs:
            rows.setdefault((c.arch, c.epochs, c.method), {})[c.sparsity] = c
        for (arch, epochs, method), by_s in rows.items():
            text = [_cell_text(by_s.get(s)) for s in sparsities]
            lines.append(f"| {arch} | {epochs} | {method} | " + " | ".join(text) + " |")
        counts = {v: sum(c.verdict == v for c in cs) for v in ("win", "tie", "loss")}
        lines += ["", f"{counts['win']} wins, {counts['tie']} ties, {counts['loss']} losses in {len(cs)} cells; "
                  f"pairs won: {sum(c.wins for c in cs)} of {sum(len(c.diffs) for c in cs)}.", ""]
    return "\n".join(lines)


def _cell_text(c: Cell | None) -> str:
    if c is None:
        return "–"
    mark = {"win": "**win**", "loss": "**loss**"}.get(c.verdict, c.verdict)
    return f"{c.mean:+.2f} ± {c.spread:.2f} ({c.wins}/{len(c.diffs)}) {mark}"


def shock_markdown(results: Sequence[dict[str, Any]]) -> str:
    """Validation accuracy and loss just before and just after each ghost's removal, per variant
    and architecture (runs with ``[training] eval_at_removal``), mean over runs."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        for ev in r.get("removal_shock") or []:
            groups.setdefault((r["variant"], r["arch"], r["epochs"], ev["group"]), []).append(ev)
    if not groups:
        return ""
    lines = ["| recipe | architecture | epochs | ghost removed | runs | val. acc. before → after (points) | "
             "val. loss before → after |", "|---|---|---:|---|---:|---:|---:|"]
    for (variant, arch, epochs, group), evs in sorted(groups.items()):
        acc_b = statistics.fmean(e["val_acc_before"] for e in evs) * 100
        acc_a = statistics.fmean(e["val_acc_after"] for e in evs) * 100
        loss_b = statistics.fmean(e["val_loss_before"] for e in evs)
        loss_a = statistics.fmean(e["val_loss_after"] for e in evs)
        lines.append(f"| {variant} | {arch} | {epochs} | {group} | {len(evs)} | {acc_b:.1f} → {acc_a:.1f} "
                     f"({acc_a - acc_b:+.1f}) | {loss_b:.3f} → {loss_a:.3f} |")
    return "\n".join(lines)


def epoch_markdown(results: Sequence[dict[str, Any]]) -> str:
    """Where the gap opens and whether it closes: the paired validation-accuracy difference to the
    baseline at the end of every epoch, per variant, architecture and budget (mean ± spread over
    every (mask, sparsity, seed) pair)."""
    baseline_of = baselines(results)
    groups: dict[tuple, dict[int, list[float]]] = {}
    for r in results:
        b = None if r["variant"] in ("baseline", "dense") else baseline_of(r)
        if b is None:
            continue
        ours = {e["epoch"]: e.get("val_acc") for e in r.get("epoch_curve") or []}
        theirs = {e["epoch"]: e.get("val_acc") for e in b.get("epoch_curve") or []}
        by_epoch = groups.setdefault((r["variant"], r["arch"], r["epochs"]), {})
        for epoch, acc in ours.items():
            if acc is not None and theirs.get(epoch) is not None:
                by_epoch.setdefault(epoch, []).append(100.0 * (acc - theirs[epoch]))
    groups = {k: v for k, v in groups.items() if v}  # runs without per-epoch curves add nothing
    if not groups:
        return ""
    width = max(len(v) for v in groups.values())
    shown = sorted({e for v in groups.values() for e in v})
    if width > 6:  # a long budget: the first epochs (the ghost phase) and a few after
        shown = sorted(set(shown[:3]) | set(shown[:: max(1, len(shown) // 4)]) | {shown[-1]})
    lines = ["| recipe | architecture | epochs | pairs | " + " | ".join(f"epoch {e}" for e in shown) + " |",
             "|---|---|---:|---:|" + "---:|" * len(shown)]
    for (variant, arch, epochs), by_epoch in sorted(groups.items()):
        n = max(len(v) for v in by_epoch.values())
        text = []
        for e in shown:
            ds = by_epoch.get(e, [])
            text.append(f"{statistics.fmean(ds):+.1f} ± {statistics.stdev(ds):.1f}" if len(ds) > 1 else "–")
        lines.append(f"| {variant} | {arch} | {epochs} | {n} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def plot_map(table: Sequence[Cell], path: str | Path, title: str = "") -> Path:
    """A heat map per variant: rows (architecture, budget, mask), columns sparsity, colour = mean d
    in points (green: the recipe ahead), each cell annotated with mean ± spread and its verdict."""
    plt = _pyplot()
    variants = list(dict.fromkeys(c.variant for c in table))
    if not variants:
        raise CompareError("nothing to plot: no cell has both a recipe and its baseline")
    sparsities = sorted({c.sparsity for c in table})
    row_keys = list(dict.fromkeys((c.arch, c.epochs, c.method) for c in table))
    # the colour range follows the complete cells: one single-seed outlier must not wash out the rest
    judged = [abs(c.mean) for c in table if c.verdict != "?"] or [abs(c.mean) for c in table if not math.isnan(c.mean)]
    lim = max(1.0, max(judged, default=1.0))
    # the panels share their rows, labelled once on the left, so that a second panel's labels
    # cannot run into the first panel
    fig, axes = plt.subplots(1, len(variants), figsize=(2.2 + 2.1 * len(sparsities) * len(variants),
                                                         1.2 + 0.5 * len(row_keys)), squeeze=False, sharey=True)
    for ax, variant in zip(axes[0], variants):
        grid = [[math.nan] * len(sparsities) for _ in row_keys]
        for c in table:
            if c.variant == variant:
                i, j = row_keys.index((c.arch, c.epochs, c.method)), sparsities.index(c.sparsity)
                grid[i][j] = c.mean
                ax.text(j, i, f"{c.mean:+.1f}±{c.spread:.1f}\n{c.verdict}", ha="center", va="center", fontsize=7,
                        fontweight="bold" if c.verdict in ("win", "loss") else "normal")
        im = ax.imshow(grid, cmap="RdYlGn", vmin=-lim, vmax=lim, aspect="auto")  # beyond the range: end colours
        ax.set_xticks(range(len(sparsities)), [f"{s:g}" for s in sparsities])
        ax.set_xlabel("sparsity")
        ax.set_title(f"{variant} − baseline", fontsize=8)
    axes[0][0].set_yticks(range(len(row_keys)), [f"{a.split('(')[0]}, {e} ep, {m}" for a, e, m in row_keys], fontsize=7)
    fig.subplots_adjust(left=0.2, right=0.86, wspace=0.08)
    fig.colorbar(im, cax=fig.add_axes((0.88, 0.15, 0.015, 0.7)), label="points (paired mean)")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))


def write_map(dirs: Sequence[str | Path], out: str | Path) -> str:
    """``map.md`` (test and validation tables, the removal shock) and ``map_test.png`` /
    ``map_val.png`` in ``out``; returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = read_map(dirs)
    parts = []
    for which in ("test", "val"):
        table = cells(results, which)
        if table:
            plot_map(table, out / f"map_{which}.png", title=f"{which} accuracy: recipe − baseline, paired by seed")
        parts.append(markdown(table, which))
    by_epoch = epoch_markdown(results)
    if by_epoch:
        parts += ["Validation accuracy, recipe − baseline at the end of each epoch (points, paired):", "", by_epoch, ""]
    shock = shock_markdown(results)
    if shock:
        parts += ["Around each removal (validation split, eval mode):", "", shock, ""]
    text = "\n".join(parts)
    (out / "map.md").write_text(text)
    return text
