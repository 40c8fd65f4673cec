"""fxsparse bench: the variants compute the same masked network, and the rows have their structure."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from fxsparse.tools import bench
from fxsparse.cli import main

MODEL = "fxsparse.nets:resnet8"
TINY = dict(models=(MODEL,), modes=("eager",), batch=2, size=16, warmup=1, rounds=2, threads=None, num_classes=10,
            progress=False)


def test_mask_variants_compute_the_same_thing():
    config = bench.BenchConfig(**TINY)
    model, x, y = bench.create_model(MODEL, config)
    masks = bench.random_masks(model, x, 0.9)
    losses = {}
    for kind in ("masked", "prune", "parametrize", "ghosts"):
        m = bench.build_variant(kind, model, masks, x).eval()
        if kind == "ghosts":
            import fxsparse

            fxsparse.gates.set_identity(m)  # at the identity the ghost phase computes the masked network
        losses[kind] = F.cross_entropy(m(x), y).item()
    assert len({round(v, 5) for v in losses.values()}) == 1, losses
    dense = F.cross_entropy(bench.build_variant("dense", model, masks, x).eval()(x), y).item()
    assert abs(dense - losses["masked"]) > 1e-6  # the mask does something


def test_bench_rows(tmp_path):
    rows = bench.run_bench(bench.BenchConfig(**TINY, out=str(tmp_path)))
    assert [r["variant"] for r in rows] == list(bench.VARIANTS)
    by = {r["variant"]: r for r in rows}
    assert by["dense"]["ratio"] is None and by["ghosts"]["reference"] == "masked"
    for r in rows:
        assert r["median_ms"] > 0 and r["rounds"] == 2 and r["peak_mb"] >= r["static_mb"] > 0
        assert r["step_peak_mb"] > 0 and r["machine"]["torch"] == torch.__version__
    assert by["prune"]["static_mb"] > by["dense"]["static_mb"]  # weight_orig + mask buffers
    assert by["masked"]["ratio"] > 0 and "total" in by["dense"]["transform_s"]
    # resumable: a second call measures nothing new
    again = bench.run_bench(bench.BenchConfig(**TINY, out=str(tmp_path)))
    assert len(again) == len(rows) == len(bench.read_rows(tmp_path / bench.RESULTS))
    text = bench.markdown(rows)
    assert "| fxsparse.nets:resnet8 | eager | masked |" in text and "ghost_channels" in text
    assert any("ghosts/masked" in line for line in bench.bars(rows))


def test_cli_and_zoo(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", "--models", MODEL, "--modes", "eager", "--variants", "dense", "masked", "--batch", "2",
                 "--size", "16", "--rounds", "2", "--warmup", "1", "--no-memory", "--no-transform",
                 "--out", str(out)]) == 0
    assert "| masked |" in capsys.readouterr().out.replace(f"| {MODEL} | eager ", "|")
    assert main(["bench", "--out", str(out), "--report-only", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    rows = bench.zoo_times([(MODEL, (3, 16, 16))], say=lambda s: None)
    assert rows[0]["total"] > 0 and rows[0]["ghost_skips"] >= 0 and "error" not in rows[0]
    assert "all 1 models" in bench.zoo_markdown(rows)
    assert main(["bench", "--report-only"]) == 2  # needs --out: a one-line error


def test_before_variants_and_bf16_channels_last_path(tmp_path):
    """The forms before issue 13 (masked_mul, ghosts_mul, ...) compute what masked / ghosts compute,
    values and gradients; the GPU settings (bf16 autocast, channels_last) run through the same code on CPU."""
    import operator

    from fxsparse.fused import apply_mask, ghost_relu_blend

    config = bench.BenchConfig(**TINY)
    model, x, y = bench.create_model(MODEL, config)
    masks = bench.random_masks(model, x, 0.9)
    for before, after in bench.BEFORE_VARIANTS.items():
        a, b = bench.build_variant(after, model, masks, x), bench.build_variant(before, model, masks, x)
        targets = {n.target for n in b.graph.nodes}
        if before.endswith("_mul"):
            assert operator.mul in targets and apply_mask not in targets and apply_mask in {n.target for n in a.graph.nodes}
        if before.startswith("ghost"):
            assert ghost_relu_blend in {n.target for n in a.graph.nodes} and ghost_relu_blend not in targets
        out_a, out_b = a(x), b(x)
        assert torch.equal(out_a, out_b), before
        out_a.square().sum().backward()
        out_b.square().sum().backward()
        grads = [{n: p.grad for n, p in gm.named_parameters() if p.grad is not None} for gm in (a, b)]
        assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0]), before
    rows = bench.run_bench(bench.BenchConfig(**{**TINY, "variants": ("dense", "masked", "masked_mul")}, bf16=True,
                                             channels_last=True, transform=False))
    assert all(r["bf16"] and r["channels_last"] and r["median_ms"] > 0 for r in rows)
    assert {r["variant"]: r["reference"] for r in rows}["masked_mul"] == "dense"


def test_edge_costs(capsys):
    config = bench.BenchConfig(**TINY)
    row = bench.edge_costs(MODEL, config, lrsi_iters=1, say=lambda s: None)
    assert row["transform_s"] > 0 and row["lrsi_iter_s"] > -1 and row["masked_step_s"] > 0
    e = row["eager"]
    assert e["removal_s"] > 0 and e["first_step_after_s"] > 0 and e["step_after_s"] > 0
    assert "| fxsparse.nets:resnet8 | eager |" in bench.edges_markdown([row])


def test_recipe_overrides_reach_the_ghost_variants(tmp_path, capsys):
    import pytest

    from fxsparse.errors import RecipeError
    from fxsparse.passes.ghost_channels import GROUP
    from fxsparse.pass_infra import container

    def ghost_channels(config):
        model, x, _ = bench.create_model(MODEL, config)
        masks = bench.random_masks(model, x, config.sparsity)
        gm = bench.build_variant("ghosts", model, masks, x, config.ghost_recipe())
        return sum(b.weight.shape[0] for b in container(gm, GROUP).children())

    more, fewer = (bench.BenchConfig(**TINY, overrides={"ghost_channels.ratio": r}) for r in (0.5, 0.1))
    assert ghost_channels(fewer) < ghost_channels(more)
    assert fewer.ghost_recipe("ghost_channels").passes["ghost_channels"].options["ratio"] == 0.1  # one technique too
    with pytest.raises(RecipeError, match="ghost_channels.ratioo"):
        bench.BenchConfig(**TINY, overrides={"ghost_channels.ratioo": 0.1})
    out = tmp_path / "r"
    assert main(["bench", "--models", MODEL, "--modes", "eager", "--variants", "masked", "ghosts", "--batch", "2",
                 "--size", "16", "--rounds", "1", "--warmup", "1", "--no-memory", "--no-transform",
                 "--set", "ghost_channels.ratio=0.1", "--out", str(out)]) == 0
    assert {r["recipe"] for r in bench.read_rows(out / bench.RESULTS)} == {"tost ghost_channels.ratio=0.1"}
