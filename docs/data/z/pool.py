"""Z's pooled table (docs/results.md): tost - baseline over every seed set that decided nothing.

    python docs/data/z/pool.py

V's seeds 41-43 enter as the V table of docs/results.md rounds them (mean and std of three pairs;
V's result lines were not kept), W's, X's and Z's from their result lines here. The pooled mean
and sample std over all pairs follow exactly from each set's n, mean and std.
"""
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # docs/data
sys.path.insert(0, str(HERE))
import pair  # noqa: E402  (docs/data/pair.py: reads a study's arm)
# V (seeds 41-43), from results.md's V table: (val mean, val std, test mean, test std), n = 3
V = {("vgg16","random",0.95):(0.97,0.40,1.17,0.72), ("vgg16","random",0.98):(0.57,0.12,0.23,0.88),
     ("vgg16","random",0.99):(2.17,1.82,1.49,2.49), ("vgg16","snip",0.95):(0.93,0.25,0.23,0.29),
     ("vgg16","snip",0.98):(-4.67,6.36,-3.98,6.77), ("resnet20","random",0.95):(-0.83,4.97,-1.25,2.28),
     ("resnet20","random",0.98):(0.90,1.65,0.63,1.20), ("resnet20","random",0.99):(3.93,7.15,3.43,6.14),
     ("resnet20","snip",0.95):(-1.93,4.53,-1.10,4.22), ("resnet20","snip",0.98):(0.03,0.15,-1.33,0.79),
     ("resnet20","snip",0.99):(2.67,10.22,3.00,8.74), ("mobilenetv2","random",0.95):(-8.60,6.38,-7.49,5.95)}


def pairs(directory, arch):
    """{(arch, method, sparsity): [(validation d, test d) per seed]} for tost - baseline (pair.py's arms)."""
    a, b = pair.arm(f"{directory}:tost"), pair.arm(f"{directory}:baseline")
    out = {}
    for k in sorted(set(a) & set(b)):
        out.setdefault((arch, *k[:2]), []).append(tuple(100 * (a[k][s] - b[k][s]) for s in ("val_acc", "test_acc")))
    return out


extra = {}
for arch in ("mobilenetv2", "resnet20", "vgg16"):
    for k, v in pairs(HERE / "z" / arch, arch=arch).items(): extra.setdefault(k, []).append(("Z", v))
for k, v in pairs(HERE / "w" / "short", arch="mobilenetv2").items(): extra.setdefault(k, []).append(("W", v))
for k, v in pairs(HERE / "x" / "snip98", arch="resnet20").items(): extra.setdefault(k, []).append(("X", v))


def combine(groups):  # groups: (n, mean, std) -> pooled n, mean, std (exact from the groups' moments)
    N = sum(n for n, _, _ in groups); M = sum(n*m for n, m, _ in groups) / N
    ss = sum((n-1)*s*s + n*(m-M)**2 for n, m, s in groups)
    return N, M, math.sqrt(ss/(N-1))


res = {"val": [], "test": []}
print("| cell | seed sets | pairs | validation | test |"); print("|---|---|---:|---:|---:|")
for cell in sorted(V):
    vm, vs, tm, ts = V[cell]
    gv, gt, sets = [(3, vm, vs)], [(3, tm, ts)], ["V"]
    for name, v in extra.get(cell, []):
        xs = [a for a, _ in v]; ys = [b for _, b in v]
        gv.append((len(xs), statistics.fmean(xs), statistics.stdev(xs))); gt.append((len(ys), statistics.fmean(ys), statistics.stdev(ys)))
        sets.append(name)
    cols = []
    for key, g in (("val", gv), ("test", gt)):
        n, m, s = combine(g); v = "win" if m > s else "loss" if m < -s else "tie"
        res[key].append((m, v)); cols.append(f"{m:+.2f} ± {s:.2f} {v}")
    print(f"| {' '.join(map(str, cell))} | {', '.join(sets)} | {n} | {cols[0]} | {cols[1]} |")
for key, r in res.items():
    vs = [v for _, v in r]
    print(key, f"mean {statistics.fmean(m for m, _ in r):+.2f}", {x: vs.count(x) for x in ("win", "tie", "loss")})
