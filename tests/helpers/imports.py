"""The package's imports read from its source (nothing imported): which module imports which,
top-level and inside functions alike, and the circles among them."""

from __future__ import annotations

import ast
from pathlib import Path


def modules_of(package: Path) -> dict[str, Path]:
    """Every module of ``package`` by its dotted name (a folder's ``__init__.py`` is the folder)."""
    root = package.parent
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _absolute(node: ast.ImportFrom, name: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def module_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The modules ``path`` (module ``name``) imports anywhere in it: ``from a import b`` is ``a.b``
    when that is a module of the package, else ``a``; packages above a module are not counted."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, name, path)
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return found


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Each circle of imports among ``modules`` once, as the modules on it (depth-first search)."""
    graph = {name: sorted(m for m in module_imports(path, name, modules) if m in modules and m != name)
             for name, path in modules.items()}
    cycles, state, stack = [], {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for other in graph[name]:
            if state.get(other) == "open":
                cycles.append(stack[stack.index(other):] + [other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return cycles


def lazy_imports(package: Path) -> list[tuple[str, str]]:
    """``(file:line, source line)`` of every import inside a function of ``package``."""
    out = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out += [(f"{path.relative_to(package.parent)}:{sub.lineno}", lines[sub.lineno - 1].strip())
                        for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))]
    return out
