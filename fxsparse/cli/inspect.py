"""``fxsparse inspect MODEL``: what the traced (and optionally rewritten) graph contains."""
from __future__ import annotations

import argparse
import importlib.util
import sys

from ..errors import RecipeError
from .common import add_model_args, add_set_arg, build_model, parse_sets

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
    p.add_argument("--recipe", metavar="R", help="apply recipe R (a shipped name or a TOML path) and show the "
                   "diff; LRsI is skipped, as it changes weight values only")
    add_set_arg(p, help="with --recipe: override a recipe key by dotted path, VALUE in TOML syntax "
                "(e.g. ghost_skips.where=bypassed); repeatable")
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
    if args.sets and not args.recipe:
        raise RecipeError("--set overrides a recipe key: give the recipe too (--recipe tost --set KEY=VALUE).")
    if args.recipe:
        before, gm = gm, _apply_recipe(gm, args.recipe, inputs, parse_sets(args.sets))
    report = inspect_graph(gm, before=before, all_nodes=args.all_nodes)

    if args.format == "text" and args.out is None:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # piped: no terminal width to respect, keep rows on one line
            console = Console(width=160)
        print_report(report, console)
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


def _apply_recipe(gm, recipe: str, inputs, overrides=None):
    """The traced ``gm`` rewritten by ``fxsparse.transform`` (on a copy; ``gm`` stays the original).

    LRsI is skipped: it only rescales weight values (no node stays in the graph) and its search
    costs many forward/backward passes. Data-driven mask scores get one synthetic batch.
    """
    if importlib.util.find_spec("fxsparse.transform") is None:
        raise RecipeError(
            f"--recipe {recipe!r}: recipes are not available in this build of fxsparse "
            f"(fxsparse.transform is missing). Inspect the plain trace without --recipe."
        )
    import torch

    import fxsparse

    loaded = fxsparse.load_recipe(recipe, overrides or None)
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    meta = getattr(output, "meta", {}).get("tensor_meta")
    classes = meta.shape[-1] if hasattr(meta, "shape") else 10
    # inspect shows structure, not accuracy: random labels are enough for SNIP/GraSP-style scores
    labels = torch.randint(classes, (inputs[0].shape[0],), generator=torch.Generator().manual_seed(0))
    return fxsparse.transform(gm, loaded, data=[(inputs[0], labels)], example_inputs=inputs, skip=("rescale",))
