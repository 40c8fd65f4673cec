"""PNG plots of a training run, drawn from its metrics records (matplotlib, Agg backend).

* ``training_curves.png``: loss, accuracy (train per step and per epoch, validation, test),
  learning rate and step time against optimizer steps;
* ``gates.png``: every ghost gate and the label smoothing eps over training, removals marked;
* ``mask_density.png``: the density each masked layer keeps;
* ``mask_churn.png`` (``[dynamic]`` runs): weights dropped and grown at each mask update, per layer,
  and the sparsity over training.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["plot_run", "plot_training_curves", "plot_gates", "plot_mask_density", "plot_mask_churn"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never open a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    plt = _pyplot()
    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    test = [r for r in records if r.get("type") == "test"]
    x = [r["step"] for r in steps]
    window = max(1, len(steps) // 50)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)

    ax = axes[0, 0]
    ax.plot(x, [r["loss"] for r in steps], color="0.75", lw=0.8, label="step")
    ax.plot(x, _smooth([r["loss"] for r in steps], window), color="C0", label=f"step (mean of {window})")
    ax.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-", color="C1", label="epoch mean")
    if any("val_loss" in r for r in epochs):
        ax.plot([r["step"] for r in epochs if "val_loss" in r], [r["val_loss"] for r in epochs if "val_loss" in r],
                "s-", color="C2", label="validation")
    ax.set(title="loss", xlabel="step")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    ax.plot(x, _smooth([100 * r["train_acc"] for r in steps], window), color="C0", label="train (batches)")
    ax.plot([r["step"] for r in epochs], [100 * r["train_acc"] for r in epochs], "o-", color="C1", label="train (epoch)")
    if any("val_acc" in r for r in epochs):
        ax.plot([r["step"] for r in epochs if "val_acc" in r], [100 * r["val_acc"] for r in epochs if "val_acc" in r],
                "s-", color="C2", label="validation")
    if test and x:
        ax.axhline(100 * test[-1]["test_acc"], color="C3", ls="--", label=f"test {100 * test[-1]['test_acc']:.2f}%")
    ax.set(title="accuracy (%)", xlabel="step")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    ax.plot(x, [r["lr"] for r in steps], color="C4")
    ax.set(title="learning rate", xlabel="step")
    if steps and min(r["lr"] for r in steps) > 0:
        ax.set_yscale("log")

    ax = axes[1, 1]
    ax.plot(x, [1000 * r["step_time"] for r in steps], color="0.6", lw=0.8)
    ax.plot(x, _smooth([1000 * r["step_time"] for r in steps], window), color="C5")
    ax.set(title="step time (ms)", xlabel="step")
    return _save(fig, path)


def plot_gates(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    plt = _pyplot()
    steps = [r for r in records if r.get("type") == "step"]
    events = [r for r in records if r.get("type") == "event"]
    groups = sorted({g for r in steps for g in r.get("gates", {})})
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    for i, group in enumerate(groups):
        # a removed ghost has no gate any more: it is 0 from its removal on
        ys = [r["gates"].get(group, 0.0) for r in steps]
        # groups often share one schedule: distinct line styles keep every curve visible
        ax.plot([r["step"] for r in steps], ys, color=f"C{i}", ls=("-", "--", "-.", ":")[i % 4], lw=3.0 - 0.7 * (i % 3),
                label=group)
    for e in events:
        color = f"C{groups.index(e['group'])}" if e.get("group") in groups else "0.3"
        ax.axvline(e["step"], color=color, ls=":", lw=1)
    if steps:
        ax.plot([r["step"] for r in steps], [r.get("label_smoothing", 0.0) for r in steps], color="0.4", ls="--",
                label="label smoothing eps")
    ax.set(title="ghost gates (dotted: removal)", xlabel="step", ylim=(-0.05, 1.05))
    if groups or steps:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_mask_density(density: Mapping[str, float], path: str | os.PathLike, achieved_sparsity: float | None = None) -> Path:
    plt = _pyplot()
    names = list(density)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(names) + 1)), constrained_layout=True)
    ax.barh(range(len(names)), [density[n] for n in names], color="C0")
    ax.set_yticks(range(len(names)), [n.removesuffix(".weight") for n in names], fontsize=7)
    ax.invert_yaxis()
    title = "mask density per layer"
    if achieved_sparsity is not None:
        ax.axvline(1 - achieved_sparsity, color="C3", ls="--", label=f"overall {100 * (1 - achieved_sparsity):.2f}%")
        ax.legend(fontsize=8)
        title += f" (sparsity {100 * achieved_sparsity:.2f}%)"
    ax.set(title=title, xlabel="fraction of weights kept", xlim=(0, 1))
    return _save(fig, path)


def plot_mask_churn(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """``[dynamic]`` mask updates: weights dropped and grown per update (all layers, and the share
    of each layer as a stacked area), and the sparsity of the masked weights, against steps."""
    plt = _pyplot()
    updates = [r for r in records if r.get("type") == "mask_update"]
    steps = [r["step"] for r in updates]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    ax = axes[0]
    ax.plot(steps, [r["dropped"] for r in updates], "o-", ms=3, color="C3", label="dropped")
    ax.plot(steps, [r["grown"] for r in updates], "s--", ms=3, color="C2", label="grown")
    ax.set(title="mask churn per update (all layers)", xlabel="step", ylabel="weights")
    ax.legend(fontsize=8)
    ax = axes[1]
    layers = list(updates[0]["layers"]) if updates else []
    if layers:
        churn = [[u["layers"].get(n, {}).get("dropped", 0) for u in updates] for n in layers]
        ax.stackplot(steps, churn, labels=[n.removesuffix(".weight") for n in layers])
        if len(layers) <= 12:
            ax.legend(fontsize=6, loc="upper right")
    ax.set(title="dropped per layer (stacked)", xlabel="step", ylabel="weights")
    ax = axes[2]
    ax.plot(steps, [100 * (1 - r["kept"] / r["total"]) for r in updates], "o-", ms=3, color="C0")
    ax.set(title="sparsity of the masked weights (%)", xlabel="step")
    return _save(fig, path)


def plot_run(records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, density: Mapping[str, float] | None = None,
             achieved_sparsity: float | None = None) -> list[Path]:
    """Every plot of a run into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    paths = [plot_training_curves(records, out / "training_curves.png"), plot_gates(records, out / "gates.png")]
    if density:
        paths.append(plot_mask_density(density, out / "mask_density.png", achieved_sparsity))
    if any(r.get("type") == "mask_update" for r in records):
        paths.append(plot_mask_churn(records, out / "mask_churn.png"))
    return paths


def _save(fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

