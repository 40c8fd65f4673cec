"""``fxsparse inspect MODEL``: what the traced (and optionally rewritten) graph contains."""
from __future__ import annotations

import argparse
import importlib.util
import sys

from ..errors import RecipeError
from .common import add_model_args, build_model

FORMATS = ("text", "json", "dot", "svg", "html")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show a model's traced graph: layers, shapes, masks, ghosts",
        description="Trace MODEL and show one row per layer or notable node (module path, op, output "
        "shape, parameters, mask density, nodes added by passes), a summary, and with --recipe the "
        "diff against the traced original. dot/svg/html draw the graph collapsed by module "
        "hierarchy; svg and html need no graphviz.",
    )
    add_model_args(p)
    p.add_argument("--recipe", metavar="R", help="apply recipe R (a shipped name or a TOML path) and show the diff")
    p.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    p.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")
    p.add_argument("--depth", type=_positive_int, default=None, metavar="N",
                   help="module depth to collapse the drawing to (dot/svg/html; default: the deepest "
                   "level that keeps it within --max-boxes)")
    p.add_argument("--max-boxes", type=_positive_int, default=150, metavar="N",
                   help="box budget of the automatic --depth (default: 150)")
    p.add_argument("--all", action="store_true", dest="all_nodes",
                   help="list every node in the table, plain functions and attribute reads included")
    p.set_defaults(func=run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    import fxsparse
    from .. import render
    from ..inspect import inspect_graph, print_report, to_json, to_text

    model, inputs, leaves = build_model(args)
    gm = fxsparse.trace(model, inputs, leaf_modules=leaves)
    before = None
    if args.recipe:
        before, gm = gm, _apply_recipe(model, args.recipe, inputs, leaves)
    report = inspect_graph(gm, before=before, all_nodes=args.all_nodes)

    if args.format == "text" and args.out is None:
        from rich.console import Console

        print_report(report, Console())
        return 0
    if args.format == "text":
        text = to_text(report)
    elif args.format == "json":
        text = to_json(report) + "\n"
    else:
        boxes = render.collapse(gm, args.depth, before=before, max_boxes=args.max_boxes)
        title = f"{args.model}" + (f" + {args.recipe}" if args.recipe else "")
        if args.format == "dot":
            text = render.to_dot(boxes, name=title)
        elif args.format == "svg":
            text = render.to_svg(boxes, title=title)
        else:
            text = render.to_html(report, boxes, title=f"fxsparse inspect {title}")
    if args.out is None:
        sys.stdout.write(text)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _apply_recipe(model, recipe: str, inputs, leaves):
    """``fxsparse.transform(model, load_recipe(recipe))`` with one synthetic batch for data-driven masks."""
    if importlib.util.find_spec("fxsparse.transform") is None:
        raise RecipeError(
            f"--recipe {recipe!r}: recipes are not available in this build of fxsparse "
            f"(fxsparse.transform is missing). Inspect the plain trace without --recipe."
        )
    import torch

    import fxsparse

    loaded = fxsparse.load_recipe(recipe)
    with torch.no_grad():
        logits = model(*inputs)
    # inspect shows structure, not accuracy: random labels are enough for SNIP/GraSP-style scores
    labels = torch.randint(logits.shape[-1], (logits.shape[0],))
    kwargs = {"leaf_modules": leaves} if leaves else {}
    return fxsparse.transform(model, loaded, data=[(inputs[0], labels)], example_inputs=inputs, **kwargs)
