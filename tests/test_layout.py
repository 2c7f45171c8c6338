"""The package has two parts: the compiler pass (``lp_fx``) and the tools around it
(``lp_fx.tools``). Imports go one way: a user who only compiles loads no tool, transformers or torchao."""

import ast
import subprocess
import sys
from pathlib import Path

PASS_DIR = Path(__file__).resolve().parent.parent / "lp_fx"


def test_importing_lp_fx_loads_no_tool_transformers_or_torchao():
    code = (
        "import sys, lp_fx\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torchao') "
        "or m.startswith('lp_fx.tools')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PASS_DIR.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ("lp_fx." if node.level else "") + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_pass_never_imports_a_tool():
    pass_modules = [p for p in PASS_DIR.glob("*.py") if p.name != "__init__.py"]
    assert pass_modules
    for path in pass_modules:
        tools = {m for m in _imported_modules(path) if ".tools" in m or m.startswith(("transformers", "torchao"))}
        assert not tools, f"{path.name} imports {sorted(tools)}"


def test_no_module_of_the_package_prints_output_goes_through_the_console_or_logging() -> None:
    """Library code logs; a command's results and its one-line refusal go through
    :mod:`lp_fx.tools.console`."""
    package = Path(__file__).resolve().parent.parent / "lp_fx"
    printing = sorted(
        f"{path.relative_to(package)}:{node.lineno}"
        for path in package.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    )
    assert printing == []
