"""Import fxsparse from this working tree, installed or not (what the GPU machine needs).

An installed fxsparse maps the top-level ``passes/`` and ``recipes/`` folders to the packages
``fxsparse.passes`` and ``fxsparse.recipes`` (pyproject's ``package-dir``). A machine that only has
the working tree on ``PYTHONPATH`` (the lent GPU machine: its own Python and PyTorch, nothing can
be installed there) lacks that mapping; ``use_working_tree()`` adds it, and does nothing where
fxsparse is installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def use_working_tree() -> Path:
    """Put the working tree first on ``sys.path`` and make ``fxsparse.passes`` / ``fxsparse.recipes``
    importable; returns the directory fxsparse is imported from."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import fxsparse

    for sub in ("passes", "recipes"):
        name = f"fxsparse.{sub}"
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        folder = ROOT / sub
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(fxsparse, sub, module)
    return Path(fxsparse.__file__).resolve().parent


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported here."""
    return [m for m in modules if importlib.util.find_spec(m) is None]
