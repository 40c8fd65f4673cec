"""CPU dry runs of the GPU scripts (benchmarks/paper_protocol_gpu.py, benchmarks/gpu_speed.py).

Each script runs end to end at a tiny size. The paper-protocol run is a subprocess started the way
the GPU machine runs it: fxsparse imported from the working tree without the editable install's
package mapping (its finder is taken off ``sys.meta_path``), so ``fxsparse.passes`` /
``fxsparse.recipes`` must come from benchmarks/_worktree.py. The others run in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

# run a script with the editable install's finder removed: only the working tree provides fxsparse
_LAUNCH = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[:0] = [str(__import__("pathlib").Path(script).parent.parent), str(__import__("pathlib").Path(script).parent)]
import importlib.util, fxsparse
assert importlib.util.find_spec("fxsparse.passes") is None, "the editable install is still visible"
runpy.run_path(script, run_name="__main__")
"""


def run_script(name: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    p = subprocess.run([sys.executable, "-c", _LAUNCH, str(BENCH / name), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _tiny_data(path: Path) -> None:
    """40 train / 10 val / 20 test gray 16x16 images, classes told apart by brightness."""
    from fxsparse import data

    g = torch.Generator().manual_seed(0)

    def part(n: int) -> data.ImageDataset:
        y = torch.arange(n) % 10
        x = (torch.rand(n, 1, 16, 16, generator=g) * 60 + y.view(-1, 1, 1, 1) * 19).to(torch.uint8)
        return data.ImageDataset(x, y, tuple(str(i) for i in range(10)), "synthetic")

    train = part(40)
    mean, std = train.stats()
    data.save(data.Splits(train, part(10), part(20), mean, std, "synthetic"), path)


def test_paper_protocol_dry_run(tmp_path):
    data_file = tmp_path / "tiny.safetensors"
    _tiny_data(data_file)
    out = tmp_path / "paper"
    text = run_script("paper_protocol_gpu.py", "--device", "cpu", "--tiny", "--threads", "1", "--data", str(data_file),
                      "--models", "vgg16", "--seeds", "0", "1", "--out", str(out), "--copy-to", str(tmp_path / "copy"))
    report = json.loads((out / "paper_protocol.json").read_text())
    runs = report["runs"]
    assert [(r["model"], r["recipe"], r["seed"]) for r in runs] == [
        ("vgg16", "baseline", 0), ("vgg16", "tost", 0), ("vgg16", "baseline", 1), ("vgg16", "tost", 1)]
    for r in runs:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["epoch_s"] > 0 and r["images_per_s"] > 0
        assert r["spec"] == "fxsparse.nets:vgg16(width=0.125)" and r["sparsity"] > 0.95
    assert [r["removals"] != [] for r in runs] == [False, True, False, True]  # tost's ghosts went
    (pair,) = report["pairs"]
    assert pair["seeds"] == [0, 1] and len(pair["diffs"]) == 2 and pair["same_masks"]
    assert report["estimate_s"] > 0 and report["settings"]["compile"] is False and not report["skipped"]
    assert "| vgg16 | tost | 1 |" in text and "tost − baseline" in text
    assert (tmp_path / "copy" / "paper_protocol.md").read_text() == (out / "paper_protocol.md").read_text()
    assert Path(report["machine"]["fxsparse"]).parent == ROOT  # fxsparse came from the working tree


def _script(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_paper_protocol_prepare_data(tmp_path, capsys):
    pytest.importorskip("sklearn")
    path = tmp_path / "digits.safetensors"
    assert _script("paper_protocol_gpu").main(["--prepare-data", "--source", "digits", "--per-class", "4", "2", "3",
                                              "--data-out", str(path)]) == 0
    from fxsparse import data

    splits = data.load(path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 20, 30) and "wrote" in capsys.readouterr().out


def test_gpu_speed_dry_run(tmp_path, capsys):
    out = tmp_path / "speed"
    assert _script("gpu_speed").main(["--device", "cpu", "--tiny", "--threads", "1", "--models", "resnet18",
                                      "--no-memory", "--out", str(out), "--copy-to", str(tmp_path / "copy")]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "gpu_speed.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["dense", "masked", "ghosts", "prune", "parametrize"]
    assert all(r["mode"] == "eager" and r["batch"] == 2 and r["median_ms"] > 0 for r in report["rows"])
    assert "| resnet18 | eager |" in text and "masked/dense" in text
    assert (tmp_path / "copy" / "gpu_speed.json").exists()


def test_gpu_speed_torchvision_fallback():
    gpu_speed = _script("gpu_speed")
    models, notes = gpu_speed.resolve_models(["resnet50", "vit_base_patch16_224", "vit_tiny_patch16_224"], True)
    assert models == ["tv:resnet50", "tv:vit_b_16"] and len(notes) == 3
    assert gpu_speed.resolve_models(["resnet50"], False)[0] == ["resnet50"]  # timm is installed here
