"""Paired differences between two arms of `fxsparse compare` studies, as docs/results.md reports them.

    python docs/data/pair.py docs/data/w/short-w1:tost docs/data/w/short:tost

prints d = first - second (accuracy points), paired by (mask method, sparsity, seed), on validation
and test: mean ± sample std (pairs above 0 / pairs), the verdict (win if mean > std, loss if
mean < -std, else tie) and d per seed. Each argument is a study directory (its results.jsonl) and
a recipe label, ``DIR:RECIPE``.
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


def main(first: str, second: str) -> None:
    a, b = arm(first), arm(second)
    keys = sorted(set(a) & set(b))
    print(f"{first} - {second}: {len(keys)} pairs, seeds {[k[2] for k in keys]}")
    for split in ("val_acc", "test_acc"):
        d = [100 * (a[k][split] - b[k][split]) for k in keys]
        mean, std = statistics.fmean(d), statistics.stdev(d) if len(d) > 1 else 0.0
        verdict = "win" if mean > std else "loss" if mean < -std else "tie"
        print(f"  {split:8s} {mean:+.2f} ± {std:.2f} ({sum(x > 0 for x in d)}/{len(d)}) {verdict}   "
              f"per seed {' '.join(f'{x:+.1f}' for x in d)}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
