"""Every ``from lp_fx... import name`` in the package names something that exists, checked in one
test that lists every stale import at once (imports inside functions run only when their function
does, so a moved function could leave one behind in a rarely run path)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import lp_fx

PACKAGE = Path(lp_fx.__file__).parent


def _package_imports() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lp_fx"):
                found += [(f"{path.relative_to(PACKAGE)}:{node.lineno}", node.module, alias.name) for alias in node.names]
    return found


def _missing(module: str, name: str) -> bool:
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return True
    return not hasattr(imported, name) and importlib.util.find_spec(f"{module}.{name}") is None


def test_every_import_from_the_package_names_something_that_exists():
    imports = _package_imports()
    assert len(imports) > 100
    stale = [f"{where}: {module} has no {name}" for where, module, name in imports if _missing(module, name)]
    assert stale == []
