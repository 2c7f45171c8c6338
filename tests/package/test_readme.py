"""What the README and the results record tell a user to run parses, and what they link to exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lp_fx.tools import cli
from lp_fx.tools.cli import llamacpp_check

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", REPO / "docs" / "results" / "README.md"]
FENCE = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PARSERS = {  # how a command starts -> (the parser that reads it, words that precede its arguments)
    "lp-fx": (cli.build_parser, 1),
    "python -m lp_fx.tools.cli": (cli.build_parser, 3),
    "python -m lp_fx.tools.cli.bench": (cli.build_parser, 3),
    "python -m lp_fx.tools.cli.llamacpp_check": (llamacpp_check.build_parser, 3),
}


def _commands(document: Path) -> list[str]:
    """Each command of the document's ``bash`` blocks that runs an lp_fx command line: continued lines
    joined, comments dropped, ``[optional]`` parts included, ``torchrun …`` reduced to its module."""
    out = []
    for block in FENCE.findall(document.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].replace("[", "").replace("]", "").strip()
            line = re.sub(r"^torchrun .*? -m ", "python -m ", line)
            if line.startswith(tuple(f"{prefix} " for prefix in PARSERS)):  # not lp-fx-lm-eval (lm-eval's own)
                out.append(line)
    return out


def _cases() -> list:
    return [pytest.param(doc, command, id=f"{doc.relative_to(REPO)}: {command[:60]}") for doc in DOCUMENTS for command in _commands(doc)]


def test_the_documents_quote_commands_of_every_tool():
    quoted = " ".join(command for document in DOCUMENTS for command in _commands(document))
    for tool in ("eval", "sweep", "plan", "finetune", "bench", "export", "frontier", "bench --single", "bench --llamacpp"):
        assert f"lp-fx {tool} " in quoted, tool
    assert "python -m lp_fx.tools.cli.llamacpp_check " in quoted


@pytest.mark.parametrize(("document", "command"), _cases())
def test_every_quoted_command_parses(document: Path, command: str):
    start = next(prefix for prefix in sorted(PARSERS, key=len, reverse=True) if command.startswith(f"{prefix} "))
    build, skip = PARSERS[start]
    words = shlex.split(command)[skip:]
    if start == "python -m lp_fx.tools.cli.bench":
        words = ["bench", *words]
    try:
        build().parse_args(words)
    except SystemExit as exit_:
        pytest.fail(f"{document.name}: `{command}` does not parse (exit {exit_.code})")


def _anchors(document: Path) -> set[str]:
    """GitHub's anchors of the document's headings."""
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", document.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(REPO)))
def test_every_link_resolves(document: Path):
    targets = LINK.findall(FENCE.sub("", document.read_text()))
    assert targets
    for target in targets:
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        assert linked.exists(), f"{document.name}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{document.name}: no heading for #{anchor} in {linked.name}"
