"""``fxsparse check MODEL``: does the traced graph compute what the model computes?

Checks, each PASS or FAIL with the largest difference seen:

* outputs in train and eval mode and the gradient of every parameter (``fxsparse.testing.compare``);
* the state_dict keys of the GraphModule are those of the model;
* two independent traces have the same structure (tracing is deterministic).

A mode-dependent model (its graph differs between train and eval) is checked in the mode it was
traced in; the other mode needs its own trace.
"""
from __future__ import annotations

import argparse
import re

from .common import add_model_args, build_model

_MAX_DIFF = re.compile(r"max \|diff\| ([0-9.e+\-]+|nan|inf)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="check that the traced graph computes what the model computes",
        description="Trace MODEL and compare the GraphModule with the model: outputs in train and eval "
        "mode, every parameter's gradient, state_dict keys, and the structure of two independent "
        "traces. Exit status 0 when everything passes, 1 otherwise.",
    )
    add_model_args(p)
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default: 1e-4)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default: 1e-5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import fxsparse
    from ..testing import compare

    model, inputs, leaves = build_model(args)
    gm = fxsparse.trace(model, inputs, leaf_modules=leaves)
    info = gm.meta["fxsparse"]
    traced_mode = "train" if info.traced_training else "eval"
    modes = (traced_mode,) if info.mode_dependent else ("train", "eval")

    failures = compare(model, gm, inputs, modes=modes, rtol=args.rtol, atol=args.atol)
    # a second, exact comparison only to report how large the (tolerated) differences are
    exact = compare(model, gm, inputs, modes=modes, exact=True)
    n_params = len(dict(model.named_parameters()))

    results: list[tuple[bool, str, str]] = []
    for mode in modes:
        for what, prefix in (("outputs", f"{mode} output"), ("gradients", f"{mode} grad")):
            bad = [m for m in failures if m.what.startswith(prefix)]
            worst = _largest(m for m in exact if m.what.startswith(prefix))
            detail = f"max |diff| {worst:.2e}" if worst else "identical"
            if what == "gradients":
                detail += f" over {n_params} parameters"
            if bad:
                detail = "; ".join(f"{m.what}: {m.detail}" for m in bad[:3]) + (
                    f"; ... {len(bad) - 3} more" if len(bad) > 3 else "")
            results.append((not bad, f"{what} ({mode})", detail))
    other = [m for m in failures if not any(m.what.startswith(p) for p in ("train ", "eval "))]
    for m in other:  # e.g. parameters missing from the graph module
        results.append((False, m.what, m.detail))

    keys_model, keys_gm = set(model.state_dict()), set(gm.state_dict())
    key_diff = sorted(keys_model ^ keys_gm)
    results.append((not key_diff, "state_dict keys",
                    f"{len(keys_model)} keys, same set" if not key_diff else
                    f"{len(key_diff)} differ: {', '.join(key_diff[:5])}"))

    again = fxsparse.trace(model, inputs, leaf_modules=leaves)
    structure = fxsparse.graph.structure_diff(gm, again, limit=3)
    results.append((not structure, "trace is deterministic",
                    f"two traces have the same structure ({len(gm.graph.nodes)} nodes)" if not structure
                    else "two traces differ: " + "; ".join(structure)))

    header = f"fxsparse check {args.model}: {info.model_class}, traced in {traced_mode} mode, input " + \
        " ".join("x".join(map(str, s)) for s in info.input_shapes)
    print(header)
    if info.mode_dependent:
        print(f"  note: the graph differs between train and eval; checked {traced_mode} mode only")
    width = max(len(name) for _, name, _ in results)
    for ok, name, detail in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    passed = all(ok for ok, _, _ in results)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def _largest(mismatches) -> float:
    values = []
    for m in mismatches:
        found = _MAX_DIFF.search(m.detail)
        if found:
            values.append(float(found.group(1)))
    return max(values, default=0.0)
