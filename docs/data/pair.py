"""Paired differences between two arms of `fxsparse compare` studies, as docs/results.md reports them.

    python docs/data/pair.py docs/data/w/short-w1:tost docs/data/w/short:tost
    python docs/data/pair.py --cells docs/data/z/resnet20:tost_learning docs/data/z/resnet20:tost

prints d = first - second (accuracy points), paired by (mask method, sparsity, seed), on validation
and test: mean ± sample std (pairs above 0 / pairs), the verdict (win if mean > std, loss if
mean < -std, else tie) and d per seed. Each argument is a study directory (its results.jsonl) and
a recipe label, ``DIR:RECIPE``. ``--cells``: one such line per cell (mask method, sparsity) instead
of all pairs pooled, and the mean over the cells of their means with the count of each verdict.
"""
import json
import statistics
import sys
from pathlib import Path


def arm(spec: str) -> dict:
    directory, _, recipe = spec.rpartition(":")
    runs = {}
    for line in (Path(directory) / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["recipe"] == recipe and r.get("schedule", "default") == "default":
            runs[(r["method"], r["sparsity"], r["seed"])] = r
    if not runs:
        sys.exit(f"{spec}: no runs of {recipe!r} in {directory}/results.jsonl")
    return runs


def report(a: dict, b: dict, keys: list) -> dict:
    """Print one cell's (or the pooled pairs') line per split; return {split: (mean, verdict)}."""
    out = {}
    for split in ("val_acc", "test_acc"):
        d = [100 * (a[k][split] - b[k][split]) for k in keys]
        mean, std = statistics.fmean(d), statistics.stdev(d) if len(d) > 1 else 0.0
        verdict = "win" if mean > std else "loss" if mean < -std else "tie"
        print(f"  {split:8s} {mean:+.2f} ± {std:.2f} ({sum(x > 0 for x in d)}/{len(d)}) {verdict}   "
              f"per seed {' '.join(f'{x:+.1f}' for x in d)}")
        out[split] = (mean, verdict)
    return out


def main(first: str, second: str, cells: bool = False) -> None:
    a, b = arm(first), arm(second)
    keys = sorted(set(a) & set(b))
    print(f"{first} - {second}: {len(keys)} pairs, seeds {sorted({k[2] for k in keys})}")
    groups = sorted({k[:2] for k in keys}) if cells else [None]
    rows = []
    for cell in groups:
        mine = [k for k in keys if cell is None or k[:2] == cell]
        if cell is not None:
            print(f" {cell[0]} {cell[1]}: seeds {[k[2] for k in mine]}")
        rows.append(report(a, b, mine))
    if cells:
        for split in ("val_acc", "test_acc"):
            verdicts = [r[split][1] for r in rows]
            print(f" over {len(rows)} cells, {split}: mean of the cells' means "
                  f"{statistics.fmean(r[split][0] for r in rows):+.2f}; "
                  + ", ".join(f"{verdicts.count(v)} {v}" for v in ("win", "tie", "loss")))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--cells"]
    if len(args) != 2:
        sys.exit(__doc__)
    main(*args, cells="--cells" in sys.argv[1:])
