"""Arguments and helpers shared by several subcommands."""
from __future__ import annotations

import argparse
import importlib
import tomllib
from typing import Any

import torch

from ..errors import ModelSpecError, RecipeError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="timm name, tv:NAME (torchvision) or module:attr")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="example input size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=2, help="example batch size (default: 2)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier width (default: the model's)")
    p.add_argument("--leaf", action="append", default=[], metavar="TYPE",
                   help="module type (package.module.Class) to keep as a leaf; repeatable")
    p.add_argument("--eval", action="store_true", help="trace in eval mode (default: train mode)")


def add_set_arg(g: argparse._ActionsContainer, help: str) -> None:
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets", help=help)


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax when it parses (numbers, booleans, lists), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as recipe overrides by dotted key (validated when the recipe loads)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE with a dotted recipe key, e.g. masks.sparsity=0.98")
        overrides[key.strip()] = parse_value(value.strip())
    return overrides


def resolve_type(path: str) -> type:
    mod_name, _, cls = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod_name), cls)
    except (ImportError, AttributeError, ValueError):
        raise ModelSpecError(f"--leaf {path!r}: no such class; give it as package.module.ClassName.") from None


def build_model(args: argparse.Namespace, device: str = "cpu"):
    """(model, example_inputs, leaf types) from the shared model arguments."""
    from ..models import create
    from ..trace import default_example_inputs

    model = create(args.model, device=device, num_classes=args.num_classes)
    model.train(not args.eval)
    if args.input_size:
        model.fxsparse_input_size = tuple(args.input_size)
    inputs = default_example_inputs(model, batch_size=args.batch_size)
    if args.input_size:  # timm's pretrained_cfg input size would otherwise win over --input-size
        inputs = (torch.randn(args.batch_size, *args.input_size, device=inputs[0].device, dtype=inputs[0].dtype),)
    return model, inputs, [resolve_type(t) for t in args.leaf]
