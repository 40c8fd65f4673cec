"""The layout the architecture page promises: the library never imports the tools built on it."""
from __future__ import annotations

import ast
from pathlib import Path

import fxsparse
import fxsparse.passes

LIBRARY = Path(fxsparse.__file__).parent
PASSES = Path(fxsparse.passes.__file__).parent


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against ``package``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def test_the_library_never_imports_the_tools():
    library = [(p, "fxsparse") for p in LIBRARY.glob("*.py")]
    library += [(p, "fxsparse.masks") for p in (LIBRARY / "masks").glob("*.py")]
    library += [(p, "fxsparse.passes") for p in PASSES.glob("*.py")]
    assert len(library) > 30
    offenders = {str(p.relative_to(p.parents[1])): sorted(m for m in _imports(p, pkg) if m.startswith("fxsparse.tools"))
                 for p, pkg in library}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_tools_are_found_where_the_layout_says():
    tools = {p.stem for p in (LIBRARY / "tools").glob("*.py")} - {"__init__"}
    tools |= {p.parent.name for p in (LIBRARY / "tools").glob("*/__init__.py")}  # tools that are packages
    assert tools == {"train", "checkpoint", "metrics", "plots", "compare", "regime", "bench", "zoo"}
    # and nothing of theirs is left beside the library
    assert not tools & {p.stem for p in LIBRARY.glob("*.py")}


def test_every_package_is_listed_for_the_wheel():
    # pyproject lists the packages by name (passes/ and recipes/ are mapped into fxsparse), so a
    # new subpackage left out of the list is missing from a wheel while an editable install works
    import tomllib

    root = LIBRARY.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in LIBRARY.rglob("__init__.py")}
    found |= {"fxsparse.passes", "fxsparse.recipes"}
    assert found == listed
