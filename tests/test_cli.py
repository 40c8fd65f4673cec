"""The ``fxsparse`` command line: inspect and check, run in-process (one subprocess for the script)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from torch import nn

from fxsparse.cli import main

SMALL = ["--input-size", "3", "64", "64"]


class CountingNet(nn.Module):
    """Python state changing on every call: tracing freezes it, so ``check`` must fail."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0
        self.fxsparse_input_size = (4,)

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fxsparse {command}: error: ")
    assert "\n" not in err and "Traceback" not in err
    return err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "check" in out and "MODEL is a timm name" in out


@pytest.mark.parametrize("module", ["fxsparse", "fxsparse.cli"])
def test_python_dash_m_runs_the_command(module):
    # for environments where the console script is not on PATH
    done = subprocess.run([sys.executable, "-m", module, "inspect", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "usage: fxsparse inspect" in done.stdout


@pytest.mark.parametrize("command", ["inspect", "check"])
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "MODEL" in capsys.readouterr().out


def test_inspect_text_to_stdout(capsys):
    assert main(["inspect", "resnet18", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "2x64x16x16" in out and "21 layers (20 conv, 1 linear)" in out


@pytest.mark.parametrize("fmt", ["text", "json", "dot", "svg", "html"])
def test_inspect_formats_to_a_file(fmt, tmp_path, capsys):
    out = tmp_path / f"resnet18.{fmt}"
    assert main(["inspect", "resnet18", *SMALL, "--format", fmt, "--out", str(out)]) == 0
    assert capsys.readouterr().err.strip() == f"wrote {out}"
    text = out.read_text()
    if fmt == "text":
        assert "layer4.1.conv2" in text and "\x1b[" not in text
    elif fmt == "json":
        data = json.loads(text)
        assert data["summary"]["layers"] == 21 and data["summary"]["input_shapes"] == [[2, 3, 64, 64]]
    elif fmt == "dot":
        assert text.startswith('digraph "resnet18"') and " -> " in text
    elif fmt == "svg":
        assert ET.fromstring(text).tag == "{http://www.w3.org/2000/svg}svg"
    else:
        assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "<table>" in text


def test_inspect_depth_and_all(tmp_path):
    shallow, deep = tmp_path / "1.dot", tmp_path / "3.dot"
    assert main(["inspect", "resnet18", *SMALL, "--format", "dot", "--depth", "1", "--out", str(shallow)]) == 0
    assert main(["inspect", "resnet18", *SMALL, "--format", "dot", "--depth", "3", "--out", str(deep)]) == 0
    assert '"mod:layer1"' in shallow.read_text() and '"mod:layer1"' not in deep.read_text()
    assert shallow.read_text().count(" -> ") < deep.read_text().count(" -> ")


def test_inspect_bad_depth_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "resnet18", "--depth", "0"])
    assert exit_.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_inspect_recipe_without_transform_says_so(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fxsparse.transform" else real_find_spec(name, *a))
    assert main(["inspect", "resnet18", *SMALL, "--recipe", "tost"]) == 2
    assert "recipes are not available" in _one_line_error(capsys, "inspect")


@pytest.mark.skipif(importlib.util.find_spec("fxsparse.transform") is None, reason="fxsparse.transform not built yet")
def test_inspect_recipe_shows_the_diff(tmp_path):
    out = tmp_path / "tost.json"
    assert main(["inspect", "resnet18", *SMALL, "--recipe", "tost", "--format", "json", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["diff"]["added_by_group"].get("masks", 0) > 0
    assert data["summary"]["masks"]["tensors"] == 21
    # every node a pass added has its shape, ghost channels' new widths included
    added = [r for r in data["rows"] if r["tag"]]
    assert any(r["tag"].startswith("ghost_channels/") for r in added)
    assert [r for r in added if r["shape"] is None] == []


def test_inspect_set_overrides_the_recipe_and_shows_the_sites_left_alone(tmp_path, capsys):
    """--set reaches the recipe; the sites a pass left alone (ghost_skips.where) are listed, with why."""
    model = "fxsparse.nets:resnet20(width=0.25)"  # 19 convs: the stem is the only one nothing bypasses
    out = tmp_path / "bypassed.json"
    assert main(["inspect", model, "--recipe", "tost", "--set", "ghost_skips.where=bypassed",
                 "--format", "json", "--out", str(out)]) == 0
    passes = {p["pass"]: p for p in json.loads(out.read_text())["summary"]["passes"]}
    assert passes["GhostSkipPass"]["changes"]["edges"] == 18
    assert passes["GhostSkipPass"]["skipped"] == {"conv1": "where='bypassed': no other path goes around this layer"}
    assert "skipped" not in passes["MaskPass"]
    capsys.readouterr()
    assert main(["inspect", model, "--recipe", "tost"]) == 0
    text = capsys.readouterr().out
    assert "GhostSkipPass (" in text and "edges=19" in text and "left" not in text
    assert main(["inspect", model, "--recipe", "tost", "--set", "ghost_skips.where=bypassed"]) == 0
    assert "GhostSkipPass left 1 site alone (where='bypassed': no other path goes around this layer): conv1" in \
        capsys.readouterr().out.replace("\n", "")
    # a bad key names itself; --set without a recipe says what is missing
    assert main(["inspect", model, "--recipe", "tost", "--set", "ghost_skips.wher=plain"]) == 2
    assert "wher" in _one_line_error(capsys, "inspect")
    assert main(["inspect", model, "--set", "ghost_skips.where=plain"]) == 2
    assert "--recipe" in _one_line_error(capsys, "inspect")


def test_check_passes_on_resnet18(capsys):
    assert main(["check", "resnet18", *SMALL]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "PASS"
    checks = [line.split()[0] for line in lines[1:-1]]
    assert checks == ["PASS"] * 6
    assert any("gradients (eval)" in line for line in lines)


def test_check_fails_when_tracing_freezes_python_state(capsys):
    assert main(["check", "test_cli:CountingNet"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "FAIL"
    assert "FAIL  outputs (train)" in out and "max |diff|" in out
    assert "FAIL  trace is deterministic" in out


@pytest.mark.parametrize("command", ["inspect", "check"])
@pytest.mark.parametrize("model", ["resnet_nope", "tv:resnet_nope", "no_such_package:Model", "os:no_such_attr"])
def test_bad_model_name_is_a_one_line_error(command, model, capsys):
    assert main([command, model]) == 2
    err = _one_line_error(capsys, command)
    assert "resnet_nope" in err or "no_such" in err


def test_bad_leaf_type_is_a_one_line_error(capsys):
    assert main(["inspect", "resnet18", "--leaf", "timm.NoSuchBlock"]) == 2
    assert "--leaf 'timm.NoSuchBlock'" in _one_line_error(capsys, "inspect")


def test_console_script_exit_status_and_error():
    script = os.path.join(os.path.dirname(sys.executable), "fxsparse")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([script, "inspect", "resnet_nope"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().startswith("fxsparse inspect: error: timm has no model 'resnet_nope'")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("recipe, first, second", [
    ("rigl", "dynamic masks: rigl, every 100 steps", "cosine decay"),
    ("gmp", "dynamic masks: gmp, every 100 steps from 10% to 50% of training", "cubic (Zhu & Gupta)"),
])
def test_inspect_shows_a_dynamic_recipes_schedule(capsys, recipe, first, second):
    assert main(["inspect", "fxsparse.nets:resnet8", "--recipe", recipe]) == 0
    text = capsys.readouterr().out
    assert first in text and second in text, text[-800:]
    assert main(["inspect", "fxsparse.nets:resnet8", "--recipe", "tost"]) == 0
    assert "dynamic masks" not in capsys.readouterr().out
