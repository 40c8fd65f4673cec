"""fxsparse: torch.fx passes for training sparse networks better with any mask.

See README.md for a tour and docs/ for the guide. Public names (``../shared/API.md``) are loaded
lazily so that ``import fxsparse`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .errors import FxSparseError, MaskError, RecipeError, TraceError  # noqa: E402
from .trace import trace  # noqa: E402

# Eager, unlike the lazy names below: the submodule fxsparse.export would otherwise shadow the
# function fxsparse.export as soon as anything imports the submodule (``from fxsparse.export
# import ...`` sets the package attribute to the module). Costs nothing: torch is loaded already.
from .export import export, strip_masks  # noqa: E402
from .transform import transform  # noqa: E402  (same reason: fxsparse.transform is also a submodule)

# public name -> "module:attribute" (or "module" for a submodule), imported on first use
_LAZY = {
    "graph": "fxsparse.graph",
    "testing": "fxsparse.testing",
    "gates": "fxsparse.gates",
    "masks": "fxsparse.masks",
    "models": "fxsparse.models",
    "data": "fxsparse.data",
    "passes": "fxsparse.passes",
    "remove_ghosts": "fxsparse.ghosts:remove_ghosts",
    "load_recipe": "fxsparse.recipe:load_recipe",
    "RecipeScheduler": "fxsparse.scheduler:RecipeScheduler",
}

__all__ = ["trace", "export", "strip_masks", "transform", "FxSparseError", "TraceError", "MaskError", "RecipeError", *_LAZY]


def __getattr__(name: str) -> Any:
    spec = _LAZY.get(name)
    if spec is None:
        raise AttributeError(f"module 'fxsparse' has no attribute {name!r}")
    mod_name, _, attr = spec.partition(":")
    mod = importlib.import_module(mod_name)
    value = getattr(mod, attr) if attr else mod
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
