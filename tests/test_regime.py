"""The regime map (fxsparse.tools.regime, ``fxsparse compare --map``): pairing across studies, the
win/tie/loss rule, variants named by their overrides, the report and its plots."""
from __future__ import annotations

import json
import math

import pytest

from fxsparse.cli import main
from fxsparse.tools.compare import CompareError
from fxsparse.tools.regime import cells, read_map, verdict


def _study(path, model, epochs, overrides, runs):
    """A compare --out directory as run_grid leaves it: compare.json and results.jsonl."""
    path.mkdir(parents=True)
    proto = {"model": model, "epochs": epochs, "overrides": overrides}
    (path / "compare.json").write_text(json.dumps({"protocol": proto, "grids": []}))
    with open(path / "results.jsonl", "w") as f:
        for recipe, method, sparsity, seed, test, val, shock in runs:
            f.write(json.dumps({"key": f"{method}-s{sparsity}-{recipe}-seed{seed}", "recipe": recipe, "method": method,
                                "sparsity": sparsity, "seed": seed, "test_acc": test, "val_acc": val,
                                "mask_sha256": f"{method}{sparsity}{seed}", "removal_shock": shock,
                                "epoch_curve": [{"epoch": 1, "val_acc": val - 0.1}, {"epoch": 2, "val_acc": val}]}) + "\n")
    return path


def test_verdict_rule():
    assert verdict(1.0, 0.5) == "win" and verdict(-1.0, 0.5) == "loss" and verdict(0.3, 0.5) == "tie"
    assert verdict(0.5, 0.5) == "tie" and verdict(1.0, math.nan) == "?"


def test_map_pairs_across_studies_and_names_variants(tmp_path):
    shock = [{"group": "ghost_skips", "step": 41, "val_acc_before": 0.70, "val_acc_after": 0.60,
              "val_loss_before": 0.9, "val_loss_after": 1.2}]
    common = {"training.eval_at_removal": True}
    base = _study(tmp_path / "map" / "vgg", "fxsparse.nets:vgg16(width=0.25)", 3, common, [
        ("baseline", "random", 0.98, s, 0.70 + 0.01 * s, 0.71, []) for s in range(3)] + [
        # tost: +2, +3, +4 points: mean 3 > spread 1 -> a win, 3 of 3 pairs
        ("tost", "random", 0.98, s, 0.72 + 0.02 * s, 0.70, shock) for s in range(3)])
    var = _study(tmp_path / "c1" / "vgg", "fxsparse.nets:vgg16(width=0.25)", 3,
                 {**common, "ghost_skips.where": "plain"}, [
                     # -1, 0, +1: a tie
                     ("tost", "random", 0.98, s, 0.69 + 0.02 * s, 0.72, []) for s in range(3)])
    other = _study(tmp_path / "map" / "rn", "fxsparse.nets:resnet20(width=0.5)", 15, common, [
        ("baseline", "random", 0.98, s, 0.80, 0.80, []) for s in range(2)] + [
        ("tost", "random", 0.98, s, 0.75 + 0.001 * s, 0.79, []) for s in range(2)])
    results = read_map([base, var, other])
    variants = {r["variant"] for r in results}
    assert variants == {"baseline", "tost", 'tost [ghost_skips.where="plain"]'}
    table = {(c.variant, c.arch, c.epochs): c for c in cells(results)}
    c = table[("tost", "vgg16(width=0.25)", 3)]
    assert c.diffs == pytest.approx([2.0, 3.0, 4.0]) and c.verdict == "win" and c.wins == 3
    assert table[('tost [ghost_skips.where="plain"]', "vgg16(width=0.25)", 3)].verdict == "tie"
    assert table[("tost", "resnet20(width=0.5)", 15)].verdict == "loss"  # -5 ± 0.07: paired within its own budget
    val = {(c.variant, c.arch): c for c in cells(results, "val")}
    assert val[("tost", "vgg16(width=0.25)")].mean == pytest.approx(-1.0)

    out = tmp_path / "report"
    assert main(["compare", "--map", str(base), str(var), str(other), "--out", str(out)]) == 0
    text = (out / "map.md").read_text()
    assert "+3.00 ± 1.00 (3/3) **win**" in text and "1 wins, 0 ties, 1 losses in 2 cells" in text
    assert "| tost | vgg16(width=0.25) | 3 | ghost_skips | 3 | 70.0 → 60.0 (-10.0) |" in text
    assert "| tost | vgg16(width=0.25) | 3 | 3 | -1.0 ± 0.0 | -1.0 ± 0.0 |" in text  # the gap per epoch
    assert (out / "map_test.png").stat().st_size > 0 and (out / "map_val.png").exists()


def test_map_refuses_broken_pairing_and_non_studies(tmp_path):
    a = _study(tmp_path / "a", "m:x", 3, {}, [("baseline", "random", 0.9, 0, 0.5, 0.5, [])])
    b = _study(tmp_path / "b", "m:x", 3, {}, [("tost", "random", 0.9, 0, 0.6, 0.6, [])])
    lines = (b / "results.jsonl").read_text().replace('"random0.90"', '"other"')
    (b / "results.jsonl").write_text(lines)
    with pytest.raises(CompareError, match="another mask"):
        cells(read_map([a, b]))
    with pytest.raises(CompareError, match="compare.json"):
        read_map([tmp_path])


def test_a_study_with_its_own_baseline_is_another_protocol(tmp_path):
    # training.* overrides change the baseline too: such a study's runs pair with its own baseline,
    # and its baseline never replaces the map's for the other studies
    m = "fxsparse.nets:vgg16(width=0.25)"
    plain = _study(tmp_path / "map", m, 3, {}, [("baseline", "random", 0.99, 0, 0.70, 0.70, []),
                                               ("tost", "random", 0.99, 0, 0.10, 0.10, [])])
    pbn = _study(tmp_path / "pbn", m, 3, {"training.precise_bn": 50}, [("baseline", "random", 0.99, 0, 0.69, 0.69, []),
                                                                       ("tost", "random", 0.99, 0, 0.64, 0.64, [])])
    borrow = _study(tmp_path / "c1", m, 3, {"ghost_skips.where": "plain"}, [("tost", "random", 0.99, 0, 0.72, 0.72, [])])
    for order in ([plain, pbn, borrow], [pbn, borrow, plain]):
        table = {c.variant: c for c in cells(read_map(order))}
        assert table["tost"].diffs == pytest.approx([-60.0])
        assert table["tost [training.precise_bn=50]"].diffs == pytest.approx([-5.0])
        assert table['tost [ghost_skips.where="plain"]'].diffs == pytest.approx([2.0])  # the map's baseline


def test_recipes_whose_masks_move_pair_without_the_mask_check(tmp_path):
    m = "fxsparse.nets:resnet20(width=0.5)"
    base = _study(tmp_path / "map", m, 3, {}, [("baseline", "random", 0.98, 0, 0.65, 0.66, [])])
    dyn = _study(tmp_path / "dyn", m, 3, {"dynamic.update_every": 5}, [("rigl", "random", 0.98, 0, 0.60, 0.59, []),
                                                                    ("tost", "random", 0.98, 0, 0.70, 0.70, [])])
    lines = (dyn / "results.jsonl").read_text().replace('"random0.980"', '"moved"')  # both end with other masks
    (dyn / "results.jsonl").write_text(lines)
    with pytest.raises(CompareError, match="another mask"):  # tost's masks never move: still checked
        cells(read_map([base, dyn]))
    (dyn / "results.jsonl").write_text("".join(l for l in lines.splitlines(True) if '"tost"' not in l))
    (c,) = cells(read_map([base, dyn]))
    assert c.variant == "rigl [dynamic.update_every=5]" and c.diffs == pytest.approx([-5.0])
