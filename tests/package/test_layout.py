"""The package's shape: the compiler pass (``lp_fx``) and the tools around it (``lp_fx.tools``, a
folder per capability). Imports go one way, with no circle: a user who only compiles loads no tool,
transformers or torchao. Modules and functions stay small enough to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers.imports import import_cycles, lazy_imports, module_imports, modules_of

PACKAGE = Path(__file__).resolve().parents[2] / "lp_fx"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_importing_lp_fx_loads_no_tool_transformers_or_torchao():
    code = (
        "import sys, lp_fx\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torchao') "
        "or m.startswith('lp_fx.tools')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_pass_never_imports_a_tool_init_included():
    modules = modules_of(PACKAGE)
    core = [name for name, path in modules.items() if path.parent == PACKAGE]
    assert "lp_fx" in core and "lp_fx.backend" in core
    found = {
        name: sorted(m for m in module_imports(modules[name], name, modules)
                     if m.startswith("lp_fx.tools") or m.split(".")[0] in ("transformers", "torchao"))
        for name in core
    }
    assert {name: tools for name, tools in found.items() if tools} == {}


def test_no_import_cycle_lazy_imports_included():
    assert import_cycles(modules_of(PACKAGE)) == []


def test_the_cli_is_imported_by_nothing_else_in_the_package():
    modules = modules_of(PACKAGE)
    importers = sorted(
        name for name, path in modules.items() if not name.startswith("lp_fx.tools.cli")
        for imported in module_imports(path, name, modules) if imported.startswith("lp_fx.tools.cli")
    )
    assert importers == []


def test_every_import_inside_a_function_says_why_on_its_line():
    silent = [f"{where}: {line}" for where, line in lazy_imports(PACKAGE) if "#" not in line]
    assert silent == []


def test_no_module_of_the_package_prints_output_goes_through_the_console_or_logging() -> None:
    """Library code logs; a command's results and its one-line refusal go through
    :mod:`lp_fx.tools.console`."""
    printing = sorted(
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    )
    assert printing == []


def test_no_module_over_400_lines_and_no_function_over_60():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(PACKAGE.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{where}: {len(text.splitlines())} lines")
        too_long += [
            f"{where}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        ]
    assert too_long == []


def test_no_test_module_imports_another_shared_code_is_in_helpers_and_conftest():
    tests = PACKAGE.parent / "tests"
    modules = modules_of(tests)
    importing = sorted(
        f"{name} imports {imported}" for name, path in modules.items()
        for imported in module_imports(path, name, modules) if imported.rpartition(".")[2].startswith("test_")
    )
    assert importing == []
