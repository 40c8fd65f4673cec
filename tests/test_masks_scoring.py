"""fxsparse.masks scoring: reference formulas, distributions, exact sparsity, collapse, IMP."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fxsparse
from fxsparse.errors import MaskError
from fxsparse.masks import LayerCollapseWarning, MaskReport, compute, score, select_layers

TEMP = 200.0


# --------------------------------------------------------------------------- tiny models
class MLP(nn.Module):
    def __init__(self, d_in=6, hidden=10, classes=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class TinyAttention(nn.Module):
    """Weights inside a leaf module: nn.MultiheadAttention's in_proj_weight."""

    def __init__(self, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


def mlp_data(n_batches=3, batch=5, d_in=6, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n_batches)]


def image_data(n_batches=2, batch=4, size=64, classes=1000, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n_batches)]


def seeded(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**kw)


WEIGHTS = ["fc1.weight", "fc2.weight"]


def _loss(model, params, x, y, scale=1.0):
    return F.cross_entropy(functional_call(model, params, (x,)) / scale, y)


def _assert_kept_are_top(masks, ref):
    """Every kept weight has a reference score >= every pruned one (up to float noise)."""
    kept = torch.cat([ref[n][masks[n]].flatten() for n in masks])
    pruned = torch.cat([ref[n][~masks[n]].flatten() for n in masks])
    scale = torch.cat([r.flatten() for r in ref.values()]).abs().max()
    assert kept.min() >= pruned.max() - 1e-5 * scale


def _global_sparsity(masks):
    return MaskReport.from_masks(masks).achieved_sparsity


# --------------------------------------------------------------------------- reference scores
def test_taylor_matches_formula():
    model, data = seeded(MLP), mlp_data()
    params = dict(model.named_parameters())
    g = {n: torch.zeros_like(params[n]) for n in WEIGHTS}
    for x, y in data:  # |(sum over batches of dL_b/dw) * w|
        grads = torch.autograd.grad(_loss(model, params, x, y), [params[n] for n in WEIGHTS])
        for n, gr in zip(WEIGHTS, grads):
            g[n] += gr
    ref = {n: (g[n] * params[n]).abs().detach() for n in WEIGHTS}
    got = score(model, "taylor", data)
    assert set(got) == set(WEIGHTS)
    for n in WEIGHTS:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)
    masks = compute(model, "taylor", 0.7, data=data)
    _assert_kept_are_top(masks, ref)


class _SharedGradients(nn.Module):
    """Weights whose gradients autograd hands out shared or expanded: ``a.weight + b.weight``
    gives both the same gradient tensor, ``scale.sum()`` a stride-0 one. The scores are made in
    the gradients' storage, which must not write one weight's score into another's."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 4), nn.Linear(5, 4), nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.rand(4, 4))

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.a.weight + self.b.weight) * self.scale.sum()
        return self.c(h)


def test_taylor_scores_with_shared_and_expanded_gradients():
    model = seeded(_SharedGradients)
    names = ["a.weight", "b.weight", "scale", "c.weight"]
    data = [(torch.randn(6, 5), torch.randint(0, 3, (6,))), (torch.randn(6, 5), torch.randint(0, 3, (6,)))]
    params = dict(model.named_parameters())
    g = {n: torch.zeros_like(params[n]) for n in names}
    for x, y in data:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        for n, gr in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            g[n] += gr
    ref = {n: (g[n] * params[n]).abs().detach() for n in names}
    for d in (data, data[:1]):  # one batch: the gradients themselves hold the scores
        got = score(model, "taylor", d, layers=names)
        if d is data:
            for n in names:
                torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)
        assert len({s.untyped_storage().data_ptr() for s in got.values()}) == len(names)


def test_snip_matches_connection_sensitivity():
    """SNIP's definition: |dL/dm| at m = 1 for weights w * m, summed over batches, normalized."""
    model, data = seeded(MLP), mlp_data()
    base = {n: p.detach() for n, p in model.named_parameters()}
    m = {n: torch.ones_like(base[n], requires_grad=True) for n in WEIGHTS}
    for x, y in data:
        params = {**base, **{n: base[n] * m[n] for n in WEIGHTS}}
        _loss(model, params, x, y).backward()
    raw = {n: m[n].grad.abs() for n in WEIGHTS}
    total = sum(r.sum() for r in raw.values())
    ref = {n: raw[n] / total for n in WEIGHTS}
    got = score(model, "snip", data)
    for n in WEIGHTS:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-9)
    assert math.isclose(sum(float(s.sum()) for s in got.values()), 1.0, rel_tol=1e-5)
    _assert_kept_are_top(compute(model, "snip", 0.8, data=data), ref)


def test_grasp_matches_hessian_gradient_product():
    """(H g) * w with logits / 200, H and g of the summed loss; Hg from autograd.functional.hvp."""
    model, data = seeded(MLP), mlp_data()
    base = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [base[n].shape for n in WEIGHTS]
    sizes = [base[n].numel() for n in WEIGHTS]
    theta = torch.cat([base[n].flatten() for n in WEIGHTS])

    def total_loss(flat):
        ws = dict(zip(WEIGHTS, (c.view(s) for c, s in zip(flat.split(sizes), shapes))))
        return sum(_loss(model, {**base, **ws}, x, y, TEMP) for x, y in data)

    g = torch.autograd.functional.jacobian(total_loss, theta)
    _, hg = torch.autograd.functional.hvp(total_loss, theta, g)
    raw = theta * hg
    raw = raw / (raw.sum().abs() + 1e-10)
    ref = {n: c.view(s) for n, c, s in zip(WEIGHTS, raw.split(sizes), shapes)}
    got = score(model, "grasp", data)
    for n in WEIGHTS:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-7)
    masks = compute(model, "grasp", 0.6, data=data)
    _assert_kept_are_top(masks, ref)  # the highest (Hg)*w are kept: the lowest are pruned


def _synflow_mlp_scores(model, alive=None):
    """SynFlow on a ReLU MLP in closed form: R = 1'(|W2| (|W1| 1 + |b1|) + |b2|) (all positive)."""
    w1, b1 = model.fc1.weight.detach().abs(), model.fc1.bias.detach().abs()
    w2 = model.fc2.weight.detach().abs()
    if alive is not None:
        w1, w2 = w1 * alive["fc1.weight"], w2 * alive["fc2.weight"]
    h = w1.sum(1) + b1  # hidden activations on the all-ones input
    return {"fc1.weight": w1 * w2.sum(0)[:, None], "fc2.weight": w2 * h[None, :]}


def test_synflow_first_round_matches_closed_form():
    model = seeded(MLP)
    got = score(model, "synflow", input_shape=(6,))
    ref = _synflow_mlp_scores(model)
    for n in WEIGHTS:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)


def test_synflow_iterative_matches_reference_loop():
    model, sparsity, rounds = seeded(MLP), 0.8, 7
    total = sum(getattr(model, n.split(".")[0]).weight.numel() for n in WEIGHTS)
    keep = total - round(sparsity * total)
    alive = None
    for e in range(rounds):  # density d^((e+1)/rounds), pruned weights score 0 and stay pruned
        k = keep if e == rounds - 1 else round(total * (keep / total) ** ((e + 1) / rounds))
        s = _synflow_mlp_scores(model, alive)
        flat = torch.cat([s[n].flatten() for n in WEIGHTS])
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept[flat.topk(k).indices] = True
        alive = dict(zip(WEIGHTS, (c.view(s[n].shape) for c, n in zip(kept.split([s[n].numel() for n in WEIGHTS]), WEIGHTS))))
    got = compute(model, "synflow", sparsity, rounds=rounds, input_shape=(6,))
    for n in WEIGHTS:
        assert torch.equal(got[n], alive[n]), n


def test_synflow_rescores_in_float64_when_float32_overflows():
    torch.manual_seed(0)
    deep = nn.Sequential(*[nn.Linear(32, 32, bias=False) for _ in range(30)])
    with torch.no_grad():
        for layer in deep:
            layer.weight.uniform_(1.0, 2.0)  # R ~ (32 * 1.5) ** 30 ~ 1e50: beyond float32
    got = score(deep, "synflow", input_shape=(32,))
    assert all(s.dtype == torch.float64 and torch.isfinite(s).all() for s in got.values())
    masks = compute(deep, "synflow", 0.5, rounds=2, input_shape=(32,))
    assert abs(_global_sparsity(masks) - 0.5) < 1e-9


def test_grasp_through_hardsigmoid():
    """PyTorch cannot differentiate hardsigmoid's backward; GraSP computes an equal form that it can."""

    class Gate(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fc1, self.fc2, self.fn = nn.Linear(6, 10), nn.Linear(10, 4), fn

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h * self.fn(h))

    class Relu6Form(nn.Module):
        def forward(self, h):
            return F.relu6(h + 3) / 6

    torch.manual_seed(0)
    hard = Gate(nn.Hardsigmoid())
    written_out = copy.deepcopy(hard)
    written_out.fn = Relu6Form()
    data = mlp_data()
    got, ref = score(hard, "grasp", data), score(written_out, "grasp", data)
    for n in WEIGHTS:
        torch.testing.assert_close(got[n], ref[n])


def test_synflow_conv_bn_eval_mode_matches_functional_reference():
    """Conv + BN: every parameter and buffer made absolute, BN in eval mode, all-ones input."""
    model = seeded(TinyConv)
    model.bn.running_mean.normal_()  # non-trivial running statistics: abs() must reach them
    model.bn.running_var.uniform_(0.5, 2.0)
    state = {k: v.detach().abs() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    names = ["conv1.weight", "conv2.weight", "fc.weight"]
    weights = {n: state[n].clone().requires_grad_(True) for n in names}
    ref_model = copy.deepcopy(model).eval()
    out = functional_call(ref_model, {**state, **weights}, (torch.ones(1, 3, 8, 8),))
    grads = torch.autograd.grad(out.sum(), [weights[n] for n in names])
    ref = {n: (g * state[n]).abs() for n, g in zip(names, grads)}
    model.train()
    got = score(model, "synflow", input_shape=(3, 8, 8))
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)
    assert model.training, "the user's model mode must not change"


class _AuxHead(nn.Module):
    """A mode-dependent model (an auxiliary head only in training, like GoogLeNet's)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc, self.aux = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        if self.training:
            return self.fc(h) + self.aux(h)
        return self.fc(h)


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_scores_run_on_a_mode_dependent_graph_in_the_other_mode(traced_in):
    """SynFlow scores in eval mode, SNIP in train mode: a graph traced in the other mode (which
    refuses to run there) is scored with its submodules in the asked mode (zoo: efficientformer_l1)."""
    model = seeded(_AuxHead).train(traced_in == "train")
    model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    gm = fxsparse.trace(model, x)
    assert gm.meta["fxsparse"].mode_dependent
    data = [(x, torch.tensor([0, 2]))]
    for method in ("synflow", "snip", "grasp"):
        masks = compute(gm, method, 0.5, data=data, **({"rounds": 2} if method == "synflow" else {}))
        assert set(masks) == {"conv.weight", "fc.weight"} | ({"aux.weight"} if traced_in == "train" else set())
    assert gm.training == (traced_in == "train")  # the user's graph keeps its mode
    if traced_in == "train":
        # SynFlow on the train-mode graph with BatchNorm on running statistics (the aux head counts):
        # the eager model in train mode with its BatchNorm alone in eval mode, |theta|, all-ones input
        ref = copy.deepcopy(model).train()
        ref.bn.eval()
        state = {k: v.detach().abs() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
        names = ["conv.weight", "fc.weight", "aux.weight"]
        weights = {n: state[n].clone().requires_grad_(True) for n in names}
        out = functional_call(ref, {**state, **weights}, (torch.ones(1, 3, 8, 8),))
        grads = dict(zip(names, torch.autograd.grad(out.sum(), [weights[n] for n in names])))
        got = score(gm, "synflow", input_shape=(3, 8, 8))
        for n in names:
            torch.testing.assert_close(got[n], (grads[n] * state[n]).abs(), rtol=1e-5, atol=1e-6)


def test_magnitude_and_random():
    model = seeded(MLP)
    mags = score(model, "magnitude")
    for n in WEIGHTS:
        assert torch.equal(mags[n], model.get_parameter(n).detach().abs())
    masks = compute(model, "magnitude", 0.5)
    _assert_kept_are_top(masks, mags)
    a, b, c = (compute(model, "random", 0.5, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a[n], b[n]) for n in WEIGHTS)  # seeded
    assert not all(torch.equal(a[n], c[n]) for n in WEIGHTS)


@pytest.mark.parametrize("n,k", [(5, 2), (5, 4), (6, 3)])  # 5 of 4: the complement is drawn
def test_random_subset_is_exact_and_uniform(n, k):
    """Every k-subset of n is drawn about equally often (a biased draw, such as the first k or a
    fixed pattern, fails), every draw keeps exactly k, and only the given generator is drawn from."""
    from fxsparse.masks.ranking import random_subset

    gen = torch.Generator().manual_seed(0)
    state = torch.random.get_rng_state()
    draws = 6000
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(draws):
        m = random_subset(n, k, gen)
        assert m.dtype == torch.bool and m.shape == (n,) and int(m.sum()) == k
        key = tuple(m.nonzero().squeeze(1).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert torch.equal(torch.random.get_rng_state(), state)
    subsets = math.comb(n, k)
    assert len(counts) == subsets
    expected = draws / subsets
    assert max(abs(c - expected) for c in counts.values()) < 5 * math.sqrt(expected), counts


def test_random_subset_edges_and_large_layers():
    from fxsparse.masks.ranking import random_subset

    gen = torch.Generator().manual_seed(1)
    assert not random_subset(7, 0, gen).any() and random_subset(7, 7, gen).all() and random_subset(7, 9, gen).all()
    n = 1_179_648  # a 512x256x3x3 conv, at the densities random ERK gives it
    for k in (1, 59, n // 20, n // 2, n // 2 + 1, n - 1):
        m = random_subset(n, k, gen)
        assert int(m.sum()) == k
    spread = random_subset(n, n // 20, gen).view(512, -1).sum(1).float()  # kept per output channel
    assert abs(spread.mean() - (n // 20) / 512) < 1e-3 and spread.std() < 3 * math.sqrt(n / 20 / 512)


def test_random_per_layer_masks_are_drawn_within_the_budget():
    """Per-layer random masks (ERK, ER, uniform) are uniform subsets of each layer's count, drawn
    without scoring every weight; global random masks still rank random scores."""
    from fxsparse.masks.compute import _shapes
    from fxsparse.masks.ranking import make_budget

    model = Stack()
    for distribution in ("erk", "er", "uniform"):
        masks = compute(model, "random", 0.9, distribution, seed=3)
        gm = fxsparse.trace(model)
        budget = make_budget(_shapes(gm, list(masks)), 0.9, distribution)
        assert {n: int(m.sum()) for n, m in masks.items()} == budget.per_layer
        again = compute(model, "random", 0.9, distribution, seed=3)
        assert all(torch.equal(masks[n], again[n]) for n in masks)
    glob = compute(model, "random", 0.9, "global", seed=3)
    assert sum(int(m.sum()) for m in glob.values()) == round(0.1 * sum(m.numel() for m in glob.values()))
    with pytest.raises(MaskError, match="per-layer"):
        make_budget({"w": (10, 10)}, 0.5, "global").draw({"w": torch.zeros(10, 10)})


# --------------------------------------------------------------------------- distributions
class Stack(nn.Module):
    """Layers of very different shapes, one so small that ERK must make it dense."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)   # 108 weights, raw ERK density 13/108
        self.mid = nn.Conv2d(4, 64, 3, padding=1)   # 2304
        self.big = nn.Conv2d(64, 64, 3, padding=1)  # 36864
        self.fc = nn.Linear(64, 10)                 # 640

    def forward(self, x):
        return self.fc(self.big(self.mid(self.stem(x))).mean((2, 3)))


def _rigl_densities(shapes, density, kernel=True):
    """ER/ERK as Evci et al.'s RigL: eps * raw, layers over density 1 made dense and eps re-solved."""
    raw = {n: (sum(s) / math.prod(s)) if kernel else (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    dense = set()
    while True:
        rhs = sum(numel[n] * density for n in shapes if n not in dense) - sum(numel[n] * (1 - density) for n in dense)
        eps = rhs / sum(raw[n] * numel[n] for n in shapes if n not in dense)
        worst = max(raw[n] for n in shapes if n not in dense)
        if eps * worst <= 1:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense |= {n for n in shapes if raw[n] == worst and n not in dense}


@pytest.mark.parametrize("distribution", ["er", "erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_er_erk_densities_match_formula(distribution, sparsity):
    model = seeded(Stack)
    shapes = {n + ".weight": tuple(m.weight.shape) for n, m in model.named_children()}
    expected = _rigl_densities(shapes, 1 - sparsity, kernel=distribution == "erk")
    masks = compute(model, "random", sparsity, distribution)
    report = MaskReport.from_masks(masks, requested_sparsity=sparsity)
    for n, d in expected.items():
        assert abs(report.density[n] - d) * math.prod(shapes[n]) <= 1.0, (n, report.density[n], d)
    assert report.kept == report.total - round(sparsity * report.total)
    dense = [n for n, d in expected.items() if d == 1.0]
    assert [n for n in dense if report.density[n] == 1.0] == dense
    if sparsity <= 0.9:
        assert "stem.weight" in dense  # the redistribution case: eps * raw would exceed 1


def test_uniform_and_global_distributions():
    model = seeded(Stack)
    uniform = MaskReport.from_masks(compute(model, "random", 0.75, "uniform"))
    for stats in uniform.layers:
        assert abs(stats.density - 0.25) * stats.numel <= 1.0
    magnitude = compute(model, "magnitude", 0.75, "global")
    _assert_kept_are_top(magnitude, score(model, "magnitude"))


def test_data_scores_with_layerwise_distribution():
    model, data = seeded(MLP), mlp_data()
    masks = compute(model, "snip", 0.5, "uniform", data=data)
    for n in WEIGHTS:
        assert int(masks[n].sum()) == round(0.5 * masks[n].numel())


# --------------------------------------------------------------------------- exact sparsity
def _build(spec, seed=0):
    torch.manual_seed(seed)
    return fxsparse.models.create(spec)


def test_achieved_sparsity_zoo_cheap_methods(zoo_entry):
    """random (ERK) and magnitude (global) on every zoo model: exact sparsity, every layer masked."""
    spec, _ = zoo_entry
    model = _build(spec)
    gm = fxsparse.trace(model, propagate=False)  # shares the model's parameters; traced once
    expected = {l.weight for l in select_layers(gm)}
    params = dict(model.named_parameters())
    for method in ("random", "magnitude"):
        masks = compute_quiet(gm, method, 0.9)
        assert set(masks) == expected
        for n, m in masks.items():
            assert m.dtype == torch.bool and m.shape == params[n].shape
        assert abs(_global_sparsity(masks) - 0.9) < 1e-3, method


DATA_ZOO = ["lcnet_050", "mobilenetv3_small_100", "efficientnet_cc_b0_4e", "nf_resnet26", "regnetx_002"]


@pytest.mark.parametrize("spec", DATA_ZOO)
@pytest.mark.parametrize("method", ["taylor", "snip", "grasp", "synflow"])
def test_achieved_sparsity_zoo_data_methods(spec, method):
    model = _build(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = {"rounds": 3} if method == "synflow" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerCollapseWarning)
        masks = compute(model, method, 0.9, data=image_data(n_batches=1), **opts)
    assert abs(_global_sparsity(masks) - 0.9) < 1e-3
    assert set(masks) == {l.weight for l in select_layers(model)}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "scoring changed the user's model"


def test_leaf_held_weights_get_gradient_scores():
    """CondConv2d, NormFreeBlock and nn.MultiheadAttention hold weights inside leaf modules."""
    nf = _build("nf_resnet26")
    with torch.no_grad():  # timm starts each residual branch at gain 0, which zeroes its gradients
        for n, p in nf.named_parameters():
            if n.endswith("conv3.gain"):
                p.fill_(1.0)
    cases = [
        (_build("efficientnet_cc_b0_4e"), image_data(n_batches=1), "blocks.4.0.conv_pw.weight"),
        (nf, image_data(n_batches=1), "stages.0.0.conv1.weight"),
        (seeded(TinyAttention), [(torch.randn(3, 5, 4), torch.tensor([0, 1, 2]))], "attn.in_proj_weight"),
    ]
    for model, data, name in cases:
        layers = {l.weight: l for l in select_layers(model)}
        assert layers[name].inside_leaf
        s = score(model, "taylor", data)
        assert s[name].shape == model.get_parameter(name).shape
        assert s[name].abs().sum() > 0, name
    model = seeded(TinyAttention)
    masks = compute(model, "grasp", 0.5, data=[(torch.randn(3, 5, 4), torch.tensor([0, 1, 2]))])
    assert "attn.in_proj_weight" in masks and "attn.out_proj.weight" in masks


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_scoring_copy_lets_go_of_its_weights_without_a_garbage_collection(method):
    # a deep-copied GraphModule is in a reference cycle: its copy of the weights lived until the
    # next collection (ViT-H/14: 2.5 GB more, in a pipeline run killed for memory)
    import contextlib
    import gc
    import weakref

    from fxsparse.masks import _model

    gm = fxsparse.trace(seeded(MLP), torch.randn(2, 6))
    copies = []
    real = _model.scoring_copy

    @contextlib.contextmanager
    def tracked(*args, **kwargs):
        with real(*args, **kwargs) as (work, params):
            copies.extend(weakref.ref(t) for t in [*work.parameters(), *work.buffers()])
            yield work, params

    gc.disable()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_model, "scoring_copy", tracked)
            got = compute(gm, method, 0.5, data=mlp_data())
        assert copies and not any(r() is not None for r in copies)
    finally:
        gc.enable()
    assert got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_synflow_rounds_keep_no_copy_of_the_weights_but_their_own(dtype):
    # in float64 each copy of the weights is twice the model's (RegNetY-128GF: 5.2 GB each); a
    # pipeline run was killed for memory in masks:synflow while a clone of |w| and the scores sat
    # beside the gradients
    from fxsparse.masks import _model, synflow

    model = seeded(TinyConv)
    names = [n for n, p in model.named_parameters() if p.dim() > 1]
    user = {p.untyped_storage().data_ptr() for p in model.parameters()}
    grad_storages: list[int] = []
    real_grads = _model.grads

    def recording(loss, params, **kw):
        got = real_grads(loss, params, **kw)
        grad_storages.extend(g.untyped_storage().data_ptr() for g in got.values())
        return got

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_model, "grads", recording)
        with synflow._linearized(model, names, (3, 8, 8), dtype) as lin:
            work = {t.untyped_storage().data_ptr() for t in [*lin.work.parameters(), *lin.work.buffers()]}
            held = [t for v in vars(lin).values() for t in (v.values() if isinstance(v, dict) else [v])
                    if isinstance(t, torch.Tensor)]
            assert [t for t in held if t.untyped_storage().data_ptr() not in user | work and t is not lin.input] == []
            alive = None
            for _ in range(2):
                scores = lin.scores(alive)
                assert {s.untyped_storage().data_ptr() for s in scores.values()} <= set(grad_storages)  # in place
                assert all(s.dtype == dtype for s in scores.values())
                alive = {n: s >= s.median() for n, s in scores.items()}
    # the same values as the rule written out: |w| * alive on the linearized copy, |grad * w|
    ref = copy.deepcopy(model).to(dtype).eval()
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.abs_()
        for n in names:
            ref.get_parameter(n).mul_(alive[n])
    params = {n: ref.get_parameter(n) for n in names}
    g = torch.autograd.grad(ref(torch.ones(1, 3, 8, 8, dtype=dtype)).sum(), list(params.values()))
    with synflow._linearized(model, names, (3, 8, 8), dtype) as lin:
        got = lin.scores(alive)
    for (n, p), gn in zip(params.items(), g):
        assert torch.equal(got[n], (gn * p).abs()), n


def test_scoring_never_touches_the_model_or_global_rng():
    model, data = seeded(TinyConv), [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    for method in ("taylor", "snip", "grasp", "synflow", "magnitude", "random"):
        compute(model, method, 0.5, data=data, **({"rounds": 2} if method == "synflow" else {}))
    assert torch.equal(torch.rand(1), expected_next)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_graph_module_input_and_ties_are_deterministic():
    model = seeded(MLP)
    gm = fxsparse.trace(model, torch.randn(2, 6))
    with torch.no_grad():
        model.fc1.weight.fill_(0.5)  # every fc1 score ties
    a, b = compute_quiet(gm, "magnitude", 0.5), compute_quiet(model, "magnitude", 0.5)
    assert all(torch.equal(a[n], b[n]) for n in WEIGHTS)
    assert abs(_global_sparsity(a) - 0.5) < 1e-9


# --------------------------------------------------------------------------- selection
def _top_k_by_full_kthvalue(values: torch.Tensor, k: int) -> torch.Tensor:
    """The rule written out: everything above the k-th largest value, then ties by lowest index."""
    threshold = values.kthvalue(values.numel() - k + 1).values
    keep = values > threshold
    tied = (values == threshold).nonzero().squeeze(1)[: k - int(keep.sum())]
    keep[tied] = True
    return keep


@pytest.mark.parametrize("values", [
    torch.rand(600_000, generator=torch.Generator().manual_seed(0)),           # random scores (random ERK)
    torch.randn(200_000, generator=torch.Generator().manual_seed(1)).abs(),    # magnitudes
    torch.randint(0, 5, (300_000,), generator=torch.Generator().manual_seed(2)).float(),  # heavy ties
    torch.cat([torch.zeros(250_000), torch.rand(50_000)]),                     # a block of equal scores
    torch.arange(100_000).float().flip(0),                                     # sorted: the sample misses the ends
    torch.rand(100_000).masked_fill(torch.rand(100_000) < 0.5, float("-inf")), # dead weights ranked last
    torch.full((70_000,), 3.0),
    torch.cat([torch.zeros(380_000), torch.rand(20_000)])[torch.randperm(400_000, generator=torch.Generator().manual_seed(3))],
    torch.cat([torch.zeros(150_000), torch.rand(100_000), torch.ones(150_000)]),  # tie blocks at both ends of a band
], ids=["rand", "magnitude", "ties", "zeros", "sorted", "dead", "constant", "mostly zeros", "two blocks"])
def test_top_k_narrowed_selection_is_the_full_kthvalues(values):
    """top_k finds the k-th largest value in a band an evenly strided sample brackets, not by a
    kthvalue over every entry: the same threshold, so the same mask, for every k, and the global
    RNG is not drawn from."""
    from fxsparse.masks.ranking import kth_largest, top_k

    n = values.numel()
    for k in (1, 7, n // 50, n // 2, n - 3, n - 1):
        state = torch.random.get_rng_state()
        keep = top_k(values, k)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert int(keep.sum()) == k
        assert torch.equal(keep, _top_k_by_full_kthvalue(values, k)), k
        assert kth_largest(values, k) == values.kthvalue(n - k + 1).values


@pytest.mark.parametrize("distribution,min_per_layer", [("global", 0), ("global", 4), ("erk", 0), ("uniform", 3)])
def test_select_may_consume_its_scores_and_gives_the_same_masks(distribution, min_per_layer):
    # consume=True lets an owner of the scores hold one copy at a time (float64 SynFlow on
    # RegNetY-128GF was killed for memory with the scores and their ranked concatenation side by side)
    from fxsparse.masks.ranking import make_budget, rankable, top_k

    g = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.randint(0, 4, (8, 5), generator=g).float(),             # ties at the threshold
        "b": torch.rand(3, 3, generator=g, dtype=torch.float64),           # float64 beside float32
        "c": torch.rand(6, generator=g).index_fill(0, torch.tensor([1, 4]), float("nan")),
        "d": torch.rand(4, 2, generator=g) * 1e-3,                         # all below the others
    }
    scores["b"][0, 0] = float("inf")
    alive = {n: torch.rand(s.shape, generator=g) > 0.3 for n, s in scores.items()}
    budget = make_budget({n: tuple(s.shape) for n, s in scores.items()}, 0.6, distribution, min_per_layer)
    for a in (None, alive):
        expected = budget.select(dict(scores), a)
        owned = {n: s.clone() for n, s in scores.items()}
        got = budget.select(owned, a, consume=True)
        assert owned == {}
        assert all(torch.equal(got[n], expected[n]) and got[n].shape == scores[n].shape for n in scores)
        assert sum(int(m.sum()) for m in got.values()) == budget.keep
        if distribution == "global" and not min_per_layer:  # the rule written out: one ranking of every score
            flat = torch.cat([rankable(scores[n], None if a is None else a[n]) for n in scores])
            want = torch.split(top_k(flat, budget.keep), [s.numel() for s in scores.values()])
            assert all(torch.equal(got[n].flatten(), w) for n, w in zip(scores, want))
    assert all(int(m.sum()) >= min(min_per_layer, m.numel()) for m in got.values())


def test_ties_beyond_the_count_go_from_the_highest_indices_a_chunk_at_a_time():
    from fxsparse.masks.ranking import _drop_last_ties

    values = torch.randint(0, 3, (10_000,), generator=torch.Generator().manual_seed(4)).float()
    for k in (1, 2_500, 5_000, 9_999):
        threshold = values.kthvalue(values.numel() - k + 1).values
        keep = values >= threshold
        _drop_last_ties(keep, values, threshold, int(keep.sum()) - k, chunk=777)
        assert torch.equal(keep, _top_k_by_full_kthvalue(values, k)), k


@pytest.mark.parametrize("special", ["none", "nan", "inf", "-inf", "sum overflows"])
def test_rankable_orders_nan_and_infinities_and_copies_only_when_it_must(special):
    """NaN ranks lowest among live weights, +inf highest, -inf with the lowest finite; dead weights
    rank below all. Finite scores (the usual case) are ranked as they are, without a copy."""
    from fxsparse.masks.ranking import rankable

    s = torch.tensor([0.5, 2.0, -1.0, 3.0, 1.0])
    value = {"none": 1.5, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "sum overflows": 3e38}[special]
    s[4] = value
    if special == "sum overflows":
        s[0] = 3e38  # finite scores whose sum is not: ranked as they are
    r = rankable(s, None)
    low, high = torch.finfo(torch.float32).min, torch.finfo(torch.float32).max
    expected = s.clone()
    expected[4] = {"nan": low, "inf": high, "-inf": low}.get(special, value)
    assert torch.equal(r, expected)
    assert (r.data_ptr() == s.data_ptr()) == (special == "none")
    dead = rankable(s, torch.tensor([True, True, False, True, True]))
    assert dead[2] == float("-inf") and torch.equal(dead[[0, 1, 3, 4]], expected[[0, 1, 3, 4]])
    dropped = fxsparse.masks.ranking.top_k(r, 4).logical_not().nonzero().flatten().tolist()
    assert dropped == ([4] if special in ("nan", "-inf") else [2])


def test_select_layers_options():
    model = seeded(Stack)
    names = lambda **kw: [l.weight for l in select_layers(model, **kw)]  # noqa: E731
    assert names() == ["stem.weight", "mid.weight", "big.weight", "fc.weight"]  # ToST: all layers
    assert names(include_first=False, include_last=False) == ["mid.weight", "big.weight"]
    assert names(types=("linear",)) == ["fc.weight"]
    assert names(include=r"^(mid|big)\.") == ["mid.weight", "big.weight"]
    assert names(exclude=[r"^big", "fc"]) == ["stem.weight", "mid.weight"]
    with pytest.raises(MaskError, match="types"):
        select_layers(model, types=("embedding",))
    with pytest.raises(MaskError, match="regular expression"):
        select_layers(model, include="(")
    masks = compute(model, "magnitude", 0.5, layers=select_layers(model, include_first=False))
    assert "stem.weight" not in masks


# --------------------------------------------------------------------------- collapse, minimum
def _collapsing_model():
    model = seeded(MLP)
    with torch.no_grad():
        model.fc2.weight.mul_(1e-4)  # every fc2 weight is smaller than every fc1 weight
    return model


def test_collapse_is_detected_and_reported():
    model = _collapsing_model()
    with pytest.warns(LayerCollapseWarning, match="fc2.weight"):
        masks = compute(model, "magnitude", 0.6)
    report = MaskReport.from_masks(masks, requested_sparsity=0.6, method="magnitude")
    assert report.collapsed == ["fc2.weight"]
    assert "collapsed" in str(report) and "collapsed" in report.summary()


def test_min_per_layer_keeps_k_and_the_global_count():
    model, k, sparsity = _collapsing_model(), 5, 0.6
    plain = compute_quiet(model, "magnitude", sparsity)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerCollapseWarning)
        masks = compute(model, "magnitude", sparsity, min_per_layer=k)
    assert int(masks["fc2.weight"].sum()) == k
    assert MaskReport.from_masks(masks).kept == MaskReport.from_masks(plain).kept
    w2 = model.fc2.weight.detach().abs().flatten()
    assert set(masks["fc2.weight"].flatten().nonzero().flatten().tolist()) == set(w2.topk(k).indices.tolist())
    # the k weights came from the lowest-magnitude weights fc1 had kept
    w1 = model.fc1.weight.detach().abs()
    dropped = plain["fc1.weight"] & ~masks["fc1.weight"]
    assert int(dropped.sum()) == k and not (masks["fc1.weight"] & ~plain["fc1.weight"]).any()
    assert w1[dropped].max() <= w1[masks["fc1.weight"]].min()


def test_min_per_layer_with_layerwise_distribution():
    model = seeded(Stack)
    masks = compute(model, "random", 0.99, "uniform", min_per_layer=50)
    report = MaskReport.from_masks(masks)
    assert all(l.kept >= 50 for l in report.layers)
    assert report.kept == report.total - round(0.99 * report.total)


def test_min_per_layer_holds_in_every_round_of_iterative_methods():
    model, trainer = _collapsing_model(), Recorder()
    masks = compute_quiet(model, "imp", 0.6, train_fn=lambda m, k: None, rounds=3)
    assert int(masks["fc2.weight"].sum()) == 0  # magnitude rounds cut fc2 without a minimum
    masks = compute(model, "imp", 0.6, train_fn=trainer, rounds=3, min_per_layer=4)
    assert int(masks["fc2.weight"].sum()) == 4
    assert all(int(given["fc2.weight"].sum()) >= 4 for _, given in trainer.calls)
    masks = compute(seeded(Stack), "synflow", 0.99, "erk", rounds=4, min_per_layer=20, input_shape=(3, 8, 8))
    report = MaskReport.from_masks(masks)
    assert min(l.kept for l in report.layers) >= 20
    assert report.kept == report.total - round(0.99 * report.total)


def compute_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerCollapseWarning)
        return compute(*args, **kwargs)


# --------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="magnitude", sparsity=1.0), r"\[0, 1\)"),
        (dict(method="magnitude", sparsity=-0.1), r"\[0, 1\)"),
        (dict(method="magnitude", sparsity=90), "percentage"),
        (dict(method="magnitude"), "needs a sparsity"),
        (dict(method="magnitude", sparsity=0.5, min_per_layer=40), "min_per_layer=40 is impossible"),
        (dict(method="magnitude", sparsity=0.5, min_per_layer=-1), "non-negative"),
        (dict(method="prune_it", sparsity=0.5), "unknown mask method"),
        (dict(method="random", sparsity=0.5, distribution="erk2"), "unknown distribution"),
        (dict(method="snip", sparsity=0.5), "needs data"),
        (dict(method="magnitude", sparsity=0.5, temperature=3), "takes no option"),
        (dict(method="imp", sparsity=0.5), "train_fn"),
        (dict(method="imp", sparsity=0.5, train_fn=lambda m, k: None, rounds=2, rate=0.2), "not both"),
    ],
)
def test_impossible_requests_raise(kwargs, match):
    with pytest.raises(MaskError, match=match):
        compute(seeded(MLP), **kwargs)


def test_data_forms():
    model, data = seeded(MLP), mlp_data()
    from_list = score(model, "grasp", data)
    from_generator = score(model, "grasp", (b for b in data))  # one-shot: read once, used twice
    for n in WEIGHTS:
        torch.testing.assert_close(from_generator[n], from_list[n])
    with pytest.raises(MaskError, match="no data batches"):
        compute(model, "taylor", 0.5, data=[])
    with pytest.raises(MaskError, match="not an \\(inputs, targets\\) pair"):
        compute(model, "snip", 0.5, data=[torch.randn(2, 6)])


def test_sparsity_zero_keeps_everything():
    masks = compute(seeded(MLP), "magnitude", 0.0)
    assert all(m.all() for m in masks.values())


# --------------------------------------------------------------------------- IMP
class Recorder:
    """A stand-in trainer: records what it is given and 'trains' by a deterministic update."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, masks):
        self.calls.append(({k: v.clone() for k, v in model.state_dict().items()}, {k: v.clone() for k, v in masks.items()}))
        with torch.no_grad():
            for n, m in masks.items():
                p = model.get_parameter(n)
                p.add_(torch.linspace(-1, 1, p.numel()).view_as(p) * 0.1 * m)


def test_imp_rounds_rewinding_and_schedule():
    model, trainer = seeded(MLP), Recorder()
    init = copy.deepcopy(model.state_dict())
    masks = compute(model, "imp", 0.8, train_fn=trainer, rate=0.2)
    rounds = math.ceil(math.log(0.2) / math.log(0.8))
    assert len(trainer.calls) == rounds
    total = sum(m.numel() for m in masks.values())
    for r, (state, given) in enumerate(trainer.calls):
        kept = sum(int(m.sum()) for m in given.values())
        assert kept == (total if r == 0 else max(round(total * 0.8 ** r), total - round(0.8 * total)))
        for n in WEIGHTS:  # rewound to the initialization, pruned weights zeroed
            torch.testing.assert_close(state[n], init[n] * given[n])
        if r:
            prev = trainer.calls[r - 1][1]
            assert all(not (given[n] & ~prev[n]).any() for n in WEIGHTS)  # nested masks
    assert abs(_global_sparsity(masks) - 0.8) < 1e-9
    for k, v in model.state_dict().items():
        assert torch.equal(v, init[k])


def test_imp_fixed_rounds_and_rewind_state():
    model, trainer = seeded(MLP), Recorder()
    rewind = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    masks = compute(model, "imp", 0.9, train_fn=trainer, rounds=3, rewind_state=rewind)
    assert len(trainer.calls) == 3
    assert abs(_global_sparsity(masks) - 0.9) < 1e-9
    state, given = trainer.calls[1]
    torch.testing.assert_close(state["fc1.weight"], rewind["fc1.weight"] * given["fc1.weight"])
    with pytest.raises(MaskError, match="rewind_state"):
        compute(model, "imp", 0.5, train_fn=trainer, rewind_state={"nope": torch.zeros(1)})


def test_imp_one_round_equals_magnitude_after_training():
    model, trainer = seeded(MLP), Recorder()
    masks = compute(model, "imp", 0.5, train_fn=trainer, rounds=1)
    trained = copy.deepcopy(model)
    Recorder()(trained, {n: torch.ones_like(p, dtype=torch.bool) for n, p in trained.named_parameters() if n in WEIGHTS})
    expected = compute(trained, "magnitude", 0.5)
    assert all(torch.equal(masks[n], expected[n]) for n in WEIGHTS)


# --------------------------------------------------------------------------- full sweep
@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "magnitude", "taylor", "snip", "grasp", "synflow", "imp"])
def test_full_zoo_all_methods(zoo_entry, method):
    spec, size = zoo_entry
    model = _build(spec)
    data = [(torch.randn(2, *size), torch.randint(0, 1000, (2,)))]
    opts = {"synflow": {"rounds": 5}, "imp": {"train_fn": lambda m, k: None, "rounds": 2}}.get(method, {})
    masks = compute_quiet(model, method, 0.9, data=data, **opts)
    assert abs(_global_sparsity(masks) - 0.9) < 1e-3


def test_synflow_in_float64_keeps_casts_inside_the_model_in_float64():
    """timm's EfficientViT computes its linear attention in ``.float()``: a float64 rescore must not
    overflow in a float32 island inside the model (efficientvit_b0 did, in the zoo sweep)."""

    class CastsInside(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(32, 32, bias=False) for _ in range(4))
            self.head = nn.Linear(32, 4, bias=False)

        def forward(self, x):
            for layer in self.layers:
                h = layer(x).float()  # a float32 island, as LiteMLA's
                x = (h * h * h).to(x.dtype)  # degree 3 per layer: 1e1 -> 1e3 -> 1e9 -> 1e28 -> 1e84
            return self.head(x)

    torch.manual_seed(0)
    model = CastsInside()
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.uniform_(0.3, 0.4)
    got = score(model, "synflow", input_shape=(32,))
    assert all(s.dtype == torch.float64 and torch.isfinite(s).all() and (s > 0).all() for s in got.values())
    # what it would be without the fix: the float32 island overflows whatever the outer dtype
    from fxsparse.masks.synflow import SynFlowOverflow, _linearized, _stay_float64

    names = [n for n, p in model.named_parameters()]
    with _linearized(model, names, (32,), torch.float64) as linearized, torch.no_grad():
        assert not torch.isfinite(linearized.work(linearized.input)).all()
        with _stay_float64():
            assert torch.isfinite(linearized.work(linearized.input)).all()
    with pytest.raises(SynFlowOverflow), _linearized(model, names, (32,), torch.float32) as linearized:
        linearized.scores(None)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.a, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.b.weight = self.a.weight  # one weight, two layers

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(torch.relu(self.b(torch.relu(self.a(h)))))


@pytest.mark.parametrize("method,distribution", [("random", "erk"), ("random", "global"), ("magnitude", None),
                                                 ("snip", None), ("synflow", None)])
def test_a_tied_weight_gets_one_mask(method, distribution):
    """A weight two layers share is scored and counted once and both names get its one mask: the
    exported model holds one tensor for both, so two masks would train a network it cannot hold."""
    torch.manual_seed(0)
    model = _Tied()
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)))]
    masks = compute(model, method, 0.8, distribution, data=data, seed=1)
    assert list(masks) == ["conv.weight", "a.weight", "b.weight", "fc.weight"]
    assert torch.equal(masks["a.weight"], masks["b.weight"]) and masks["a.weight"] is not masks["b.weight"]
    distinct = [masks[n] for n in ("conv.weight", "a.weight", "fc.weight")]
    total = sum(m.numel() for m in distinct)
    assert sum(int(m.sum()) for m in distinct) == total - round(0.8 * total)  # exact, over distinct weights


def test_a_tied_weight_may_be_named_twice_and_is_counted_once(tmp_path):
    """Naming both layers of a tied weight in ``layers`` is allowed (it was refused as unknown), and
    the report, the file header and ``method="file"``'s sparsity check count the weight once."""
    torch.manual_seed(0)
    model = _Tied()
    names = ["conv.weight", "a.weight", "b.weight", "fc.weight"]
    masks = compute(model, "random", 0.8, "erk", layers=names, seed=1)
    default = compute(model, "random", 0.8, "erk", seed=1)
    assert list(masks) == names and all(torch.equal(masks[n], m) for n, m in default.items())
    tied = fxsparse.masks.tied_weights(model, masks)
    assert tied == {"b.weight": "a.weight"}
    report = fxsparse.masks.MaskReport.from_masks(masks, requested_sparsity=0.8, tied=tied)
    distinct = sum(model.get_parameter(n).numel() for n in ("conv.weight", "a.weight", "fc.weight"))
    assert report.total == distinct and report.total - report.kept == round(0.8 * distinct)
    assert [l.tied_to for l in report.layers] == [None, None, "a.weight", None]
    assert "1 tied to another, counted once" in report.summary() and "(counted there)" in str(report)
    assert "tied_to" not in report.to_dict()["layers"][0] and report.to_dict()["layers"][2]["tied_to"] == "a.weight"
    assert fxsparse.masks.MaskReport.from_masks(masks).total == distinct + 64  # not told: the 8x8 weight twice
    path = tmp_path / "tied.safetensors"
    fxsparse.masks.save(masks, path, tied=tied, method="random")
    meta = fxsparse.masks.read_metadata(path)
    assert (meta["total"], meta["kept"], meta["tied"]) == (report.total, report.kept, tied)
    again = compute(model, "file", 0.8, path=path)  # the sparsity check counts the shared weight once
    assert all(torch.equal(again[n], masks[n]) for n in names)
