"""Imports inside functions (kept lazy so that `import lp_fx` stays light) run only when their
function does; this checks every `from lp_fx... import name` in the package names something that
exists, so a moved function cannot leave a stale import behind in a rarely-run path."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import lp_fx

PACKAGE = Path(lp_fx.__file__).parent


def _package_imports() -> list[tuple[str, int, str, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lp_fx"):
                found += [(str(path.relative_to(PACKAGE)), node.lineno, node.module, alias.name)
                          for alias in node.names]
    return found


@pytest.mark.parametrize("where,line,module,name", _package_imports())
def test_every_import_from_the_package_names_something_that_exists(where, line, module, name):
    imported = importlib.import_module(module)
    assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}") is not None, (
        f"{where}:{line}: {module} has no {name}")
