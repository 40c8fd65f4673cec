"""The ``fxsparse`` command line: one module per subcommand in this package.

Each subcommand module defines ``register(subparsers)`` (adds its parser and sets
``func=run``) and ``run(args) -> int``. Errors fxsparse raises on purpose are printed as one
paragraph and exit with status 2, never as a stack trace.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import FxSparseError

# subcommands in the order --help lists them
COMMANDS = ("inspect", "check", "train", "compare", "bench", "zoo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxsparse",
        description="torch.fx passes for training sparse networks better with any mask (ToST).",
        epilog="MODEL is a timm name (resnet50), tv:NAME for torchvision (tv:resnet50), or "
        "module:attr for your own constructor. Run 'fxsparse CMD --help' for each command.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log what each pass changed (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="CMD")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except FxSparseError as e:
        print(f"fxsparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
