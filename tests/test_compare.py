"""fxsparse compare: the grid, its resumability and its report, on a tiny real run (MNIST-5k)."""
from __future__ import annotations

import json
import math

import pytest

import fxsparse
from fxsparse.cli import main
from fxsparse.tools.compare import (CompareConfig, CompareError, RunSpec, ScheduleVariant, aggregate, bar_check,
                              read_results, report, run_grid)

TINY = dict(data="mnist5k", per_class=(8, 3, 4), epochs=1, batch_size=16, lrsi_iters=1, calib_batches=2,
            methods=("random",), sparsities=(0.9,), seeds=(0,), progress=False)


def test_grid_order_and_keys():
    c = CompareConfig(out="unused", methods=("random", "snip"), sparsities=(0.9, 0.98), seeds=(0, 1),
                      schedules=(ScheduleVariant.parse("late=0.2,0.5,0.5"),))
    specs = c.runs()
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys))
    # dense, baseline and tost (each ghost recipe also under the variant) come before any ablation
    last_core = max(i for i, s in enumerate(specs) if s.recipe in ("dense", "baseline", "tost"))
    first_ablation = min(i for i, s in enumerate(specs) if s.recipe not in ("dense", "baseline", "tost"))
    assert last_core < first_ablation
    assert "random-s0.98-tost-sched_late-seed1" in keys and "dense-seed1" in keys
    # recipes without ghosts run once, not once per schedule variant
    assert "random-s0.9-lrsi-sched_late-seed0" not in keys
    o = c.recipe_overrides(RunSpec("ghost_skips", 0, "snip", 0.98, "late"))
    assert o["masks.distribution"] == "global" and o["ghost_skips.schedule.anneal_until"] == 0.5
    # a variant is the schedule on every network: it replaces a recipe's schedule_plain too
    o = c.recipe_overrides(RunSpec("tost", 0, "snip", 0.98, "late"))
    assert o["ghost_neurons.schedule_plain.hold_until"] == 0.2 and o["ghost_neurons.schedule.hold_until"] == 0.2
    recipe = fxsparse.load_recipe("tost", {k: v for k, v in o.items() if ".schedule" in k})
    assert all(spec.schedule_for(True) == spec.schedule_for(False) for spec in recipe.ghosts.values())
    assert CompareConfig(out="unused", preset="cpu").epochs == 3  # preset fills what is left out


def test_config_errors():
    with pytest.raises(CompareError, match="NAME=HOLD"):
        ScheduleVariant.parse("late=0.2,0.5")
    with pytest.raises(CompareError, match="not 'default'"):
        CompareConfig(out="x", schedules=(ScheduleVariant("default", 0, 0.1, 0.1),))
    with pytest.raises(CompareError, match="mask method"):
        CompareConfig(out="x", methods=("imp",))
    with pytest.raises(CompareError, match="preset"):
        CompareConfig(out="x", preset="tpu")


def _result(recipe, seed, acc, method="random", sparsity=0.95):
    return {"key": RunSpec(recipe, seed, method, sparsity).key, "recipe": recipe, "method": method,
            "sparsity": sparsity, "seed": seed, "schedule": "default", "test_acc": acc, "val_acc": acc,
            "achieved_sparsity": sparsity, "time_s": {"train": 1.0, "setup": 0.0}, "mask_sha256": f"m{seed}"}


def test_aggregate_and_bar():
    results = [_result("baseline", s, a) for s, a in enumerate((0.70, 0.72, 0.71))]
    results += [_result("tost", s, a) for s, a in enumerate((0.75, 0.76, 0.77))]
    results += [_result(r, s, a, sparsity=0.98) for r, vals in (("baseline", (0.6, 0.6)), ("tost", (0.6, 0.61)))
                for s, a in enumerate(vals)]
    rows = {(r["recipe"], r["sparsity"]): r for r in aggregate(results)}
    tost = rows[("tost", 0.95)]
    assert tost["n"] == 3 and math.isclose(tost["test_mean"], 0.76) and math.isclose(tost["test_std"], 0.01)
    assert math.isclose(tost["delta_test_mean"], 0.05)  # paired by seed
    check = bar_check(list(rows.values()))
    assert check["per_method"]["random"]["cells"]["0.95"]["met"]
    assert not check["per_method"]["random"]["cells"]["0.98"]["met"]  # +0.5 points, std 0.71
    assert not check["met"]


def test_tiny_grid_resumes_and_reports(tmp_path):
    out = tmp_path / "study"
    config = CompareConfig(out=str(out), recipes=("baseline", "tost"), dense=False, **TINY)
    results = run_grid(config, say=lambda s: None)
    assert sorted(r["key"] for r in results) == ["random-s0.9-baseline-seed0", "random-s0.9-tost-seed0"]
    for r in results:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["val_acc"] is not None
        assert abs(r["achieved_sparsity"] - 0.9) < 0.01 and r["epoch_curve"] and r["loss_curve"]
        assert not list((out / "runs" / r["key"]).glob("checkpoint-*"))  # tidied
        assert r["removal_shock"] == []  # [training] eval_at_removal is off by default
    tost = next(r for r in results if r["recipe"] == "tost")
    assert {e["group"] for e in tost["removals"]} == {"ghost_neurons", "ghost_skips", "ghost_channels"}
    assert len({r["mask_sha256"] for r in results}) == 1  # same mask for both recipes
    assert [r["label_smoothing"] for r in results] == [0.0, 0.0]  # the eps each trained with: off in both

    # a rerun trains nothing; a lost line is trained again, and only that one
    lines = (out / "results.jsonl").read_text().splitlines()
    run_grid(config, say=lambda s: None)
    assert (out / "results.jsonl").read_text().splitlines() == lines
    (out / "results.jsonl").write_text(lines[0] + "\n")
    assert len(read_results(out)) == 1
    run_grid(config, say=lambda s: None)
    assert len(read_results(out)) == 2

    summary = report(out)
    assert summary["mask_mismatch"] == [] and len(summary["rows"]) == 2
    for name in ("summary.md", "summary.json", "accuracy_vs_sparsity.png", "training_curves.png", "gate_schedules.png"):
        assert (out / name).stat().st_size > 0
    assert "| random | 0.9 |" in (out / "summary.md").read_text()

    # another protocol in the same directory is refused
    with pytest.raises(CompareError, match="another protocol"):
        run_grid(CompareConfig(out=str(out), recipes=("baseline",), dense=False, **{**TINY, "epochs": 2}),
                 say=lambda s: None)


def test_a_recipe_file_is_an_arm_paired_with_the_baseline(tmp_path):
    """A TOML recipe in --recipes runs under its name, in the same study, paired with the baseline
    of each seed; the run holds what the file says (here no ghost channels), not the parent's."""
    arm = tmp_path / "experiments" / "w1.toml"
    arm.parent.mkdir()
    arm.write_text('extends = "tost"\nname = "tost_no_channels"\n[ghost_channels]\nenabled = false\n')
    out = tmp_path / "study"
    config = CompareConfig(out=str(out), recipes=("baseline", str(arm)), dense=False, **TINY)
    assert config.recipes == ("baseline", "tost_no_channels")
    results = {r["recipe"]: r for r in run_grid(config, say=lambda s: None)}
    assert set(results) == {"baseline", "tost_no_channels"}
    r = results["tost_no_channels"]
    assert r["key"] == "random-s0.9-tost_no_channels-seed0" and r["recipe_file"] == str(arm)
    assert {e["group"] for e in r["removals"]} == {"ghost_neurons", "ghost_skips"}  # the file's recipe ran
    assert r["mask_sha256"] == results["baseline"]["mask_sha256"]
    summary = report(out)
    assert summary["mask_mismatch"] == []
    row = next(row for row in summary["rows"] if row["recipe"] == "tost_no_channels")
    assert row["delta_n"] == 1 and row["delta_test_mean"] is not None  # paired with the baseline of its seed
    assert json.loads((out / "compare.json").read_text())["grids"][-1]["recipe_files"] == {"tost_no_channels": str(arm)}
    # editing the file makes its earlier runs another protocol
    arm.write_text(arm.read_text().replace("enabled = false", "ratio = 0.1"))
    with pytest.raises(CompareError, match="another protocol"):
        run_grid(CompareConfig(out=str(out), recipes=("baseline", str(arm)), dense=False, **TINY), say=lambda s: None)


def test_recipe_files_need_names_that_can_label_runs(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('extends = "tost"\nname = "tost"\n')
    b.write_text('extends = "tost"\nname = "my arm"\n')
    with pytest.raises(CompareError, match="name 'tost' twice"):
        CompareConfig(out="x", recipes=("tost", str(a)))
    with pytest.raises(CompareError, match="cannot name its runs"):
        CompareConfig(out="x", recipes=("baseline", str(b)))
    c = tmp_path / "sub"
    c.mkdir()
    (c / "a.toml").write_text('extends = "tost"\nname = "tost"\n')
    with pytest.raises(CompareError, match="two recipe files are called 'tost'"):
        CompareConfig(out="x", recipes=(str(a), str(c / "a.toml")))


def test_cli_report_only(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["compare", "--out", str(out), "--data", "mnist5k", "--per-class", "8", "3", "4", "--epochs", "1",
                 "--batch-size", "16", "--recipes", "baseline", "--methods", "random", "--sparsities", "0.9",
                 "--seeds", "0", "--no-dense", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", "--out", str(out), "--report-only"]) == 0
    assert "Test accuracy" in capsys.readouterr().out
    assert json.loads((out / "compare.json").read_text())["protocol"]["per_class"] == [8, 3, 4]
    assert main(["compare", "--out", str(tmp_path / "empty"), "--report-only"]) == 2  # a clear error, no trace


def test_dynamic_recipes_run_in_the_grid_and_their_moved_masks_are_not_a_mismatch(tmp_path):
    out = tmp_path / "dyn"
    config = CompareConfig(out=str(out), recipes=("baseline", "rigl", "set"), dense=False,
                           overrides={"dynamic.update_every": 1, "dynamic.end": 0.9}, **TINY)
    results = {r["recipe"]: r for r in run_grid(config, say=lambda s: None)}
    assert set(results) == {"baseline", "rigl", "set"}
    for name in ("rigl", "set"):
        r = results[name]
        assert abs(r["achieved_sparsity"] - 0.9) < 0.01  # the count each update keeps
        assert r["mask_sha256"] != results["baseline"]["mask_sha256"]  # the masks moved
    summary = report(out)
    assert summary["mask_mismatch"] == []  # moving masks end as their own: not compared with the baseline's
    assert {row["recipe"] for row in summary["rows"]} == {"baseline", "rigl", "set"}
