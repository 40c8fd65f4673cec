"""fxsparse.pass_infra: whatever a pass raises reaches the user as an fxsparse PassError naming the
pass, the node and what to do, never as PassManager's bare Exception."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.errors import FxSparseError, PassError
from fxsparse.pass_infra import FxSparsePass, PassResult, run_passes


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(F.hardsigmoid(self.conv(x)).mean((2, 3)))


def _gm():
    torch.manual_seed(0)
    return fxsparse.trace(_Net(), torch.randn(2, 3, 8, 8))


class _Fails(FxSparsePass):
    """Fails with a plain RuntimeError while rewriting the conv node."""

    group = "failing"

    def call(self, gm):
        for node in gm.graph.nodes:
            with self.at(node):
                if node.op == "call_module" and node.target == "conv":
                    raise RuntimeError("the conv is too convoluted")
        return PassResult(gm, False)


class _Refuses(FxSparsePass):
    group = "refusing"

    def call(self, gm):
        raise PassError("_Refuses: this graph has no widgets; add widgets first.")


class _Noop(FxSparsePass):
    group = "noop"

    def call(self, gm):
        return PassResult(gm, False)


def test_a_plain_error_in_a_pass_becomes_a_pass_error():
    gm = _gm()
    with pytest.raises(PassError) as info:
        run_passes(gm, [_Noop(), _Fails()])
    err = info.value
    text = str(err)
    assert text.startswith("_Fails failed at node conv (")  # the pass and the node
    assert "RuntimeError: the conv is too convoluted" in text  # the original error text
    assert "`failing.enabled = false`" in text and "skip=['failing']" in text  # what to do
    assert "An error occurred when running" not in text
    assert isinstance(err.cause, RuntimeError) and err.__cause__ is err.cause  # chained
    assert "recompile" not in vars(gm) and "forward" not in vars(gm)  # the module is left usable
    gm(torch.randn(2, 3, 8, 8))


def test_called_directly_the_pass_raises_the_same_error():
    with pytest.raises(PassError, match=r"^_Fails failed at node conv .*too convoluted") as info:
        _Fails()(_gm())
    assert isinstance(info.value.__cause__, RuntimeError)


def test_no_node_is_named_when_the_pass_did_not_say_which():
    class Bare(FxSparsePass):
        def call(self, gm):
            return {}["missing"]

    with pytest.raises(PassError, match=r"^Bare failed: KeyError: 'missing'\n") as info:
        run_passes(_gm(), [Bare()])
    assert isinstance(info.value.cause, KeyError)


def test_an_error_raised_on_purpose_reaches_the_user_unchanged():
    with pytest.raises(PassError, match=r"^_Refuses: this graph has no widgets; add widgets first\.$") as info:
        run_passes(_gm(), [_Noop(), _Refuses()])
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no PassManager wrapper


def test_a_plain_function_pass_is_named_too():
    def widen(gm):
        raise ValueError("cannot widen")

    with pytest.raises(PassError, match=r"^widen failed: ValueError: cannot widen\n"):
        run_passes(_gm(), [_Noop(), widen])


def test_a_malformed_graph_names_the_pass_that_left_it():
    def orphan(gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.relu, (out,))  # reads a node that comes after it
        return PassResult(gm, True)

    with pytest.raises(PassError, match=r"^after orphan: the graph is malformed: Argument .output. of Node .relu. was used before .*bug in the pass"):
        run_passes(_gm(), [orphan])


def test_lrsi_on_an_op_without_double_backward_says_what_to_do(monkeypatch):
    # what a model with an op fxsparse.autograd does not cover yet would get
    import fxsparse.passes.rescale_init as rescale_init

    monkeypatch.setattr(rescale_init, "twice_differentiable", contextlib.nullcontext)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 8, 8, generator=gen), torch.randint(0, 10, (2,), generator=gen))] * 2
    recipe = fxsparse.load_recipe("lrsi", overrides={"rescale.iters": 2, "rescale.gamma": 1e-6})
    with pytest.raises(PassError) as info:
        fxsparse.transform(_Net(), recipe, data=data)
    text = str(info.value)
    assert text.startswith("RescaleInitPass failed: RuntimeError: derivative for aten::hardsigmoid_backward")
    assert "fxsparse.autograd.twice_differentiable" in text and "skip=['rescale']" in text
    assert isinstance(info.value, FxSparseError)


@pytest.mark.parametrize("stage", ["_site", "_add_branch"])
def test_ghost_skips_name_the_conv_they_failed_at(monkeypatch, stage):
    # planning and rewriting each run per conv under `with self.at(...)`: a failure names it
    import fxsparse.passes.ghost_skips as ghost_skips

    def broken(self, gm, *args, **kwargs):
        raise RuntimeError("unexpected geometry")

    class _Relu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).mean((2, 3)))

    gm = fxsparse.trace(_Relu(), torch.randn(2, 3, 8, 8))
    assert ghost_skips.GhostSkipPass()(fxsparse.trace(_Relu(), torch.randn(2, 3, 8, 8))).modified  # it fires
    monkeypatch.setattr(ghost_skips.GhostSkipPass, stage, broken)
    with pytest.raises(PassError, match=r"^GhostSkipPass failed at node conv .*unexpected geometry"):
        ghost_skips.GhostSkipPass()(gm)


class _Renames(FxSparsePass):
    """Changes the graph (a node's name) so that it has to be recompiled."""

    group = "renaming"

    def call(self, gm):
        node = next(n for n in gm.graph.nodes if n.op == "call_module")
        node.name = f"{node.name}_{len(self.stats)}x"
        self.stats["renamed"] += 1
        return PassResult(gm, True)


def test_under_run_passes_the_code_is_generated_once(monkeypatch):
    gm = _gm()
    calls = []
    original = torch.fx.GraphModule.recompile
    monkeypatch.setattr(torch.fx.GraphModule, "recompile", lambda self: calls.append(1) or original(self))
    run_passes(gm, [_Renames(), _Renames(), _Renames()])
    # PassManager recompiles after each pass, which only marks the code stale; no pass recompiles
    # itself either: the code is generated once, at the end
    assert len(calls) == 1
    assert "_0x" in gm.code  # the rewritten graph's code
    assert "recompile" not in vars(gm) and "forward" not in vars(gm)
    calls.clear()
    _Renames()(gm)  # called directly, a pass recompiles what it changed itself
    assert len(calls) == 1 and gm.code.count("_0x") >= 1


class _Doubles(FxSparsePass):
    """Doubles the output: a change of what the module computes."""

    group = "doubling"

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            doubled = gm.graph.call_function(torch.mul, (out.args[0], 2.0))
        out.args = (doubled,)
        self.stats["doubled"] += 1
        return PassResult(gm, True)


class _Runs(FxSparsePass):
    """Runs the module in the middle of the pipeline, as LRsI does."""

    group = "running"

    def __init__(self, x):
        super().__init__()
        self.x, self.seen = x, []

    def call(self, gm):
        self.seen.append(gm(self.x))
        return PassResult(gm, False)


def test_a_pass_that_runs_the_module_runs_the_graph_as_rewritten_so_far():
    gm, x = _gm(), torch.randn(2, 3, 8, 8)
    before = gm(x)
    runs = _Runs(x)
    run_passes(gm, [_Doubles(), runs, _Doubles()])
    assert torch.equal(runs.seen[0], before * 2)  # the first pass's change, not the stale code
    assert torch.equal(gm(x), before * 4)  # and the module after the pipeline: both changes
    assert "recompile" not in vars(gm) and "forward" not in vars(gm)
