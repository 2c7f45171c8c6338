"""What the README and the pages under docs/ tell a user: the commands they quote parse, every
relative link and anchor resolves, every page is reachable from the README, the README stays short,
and its results table is the record's, whose figures are the record's measurements."""

from __future__ import annotations

import argparse
import functools
import re
import shlex
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from lp_fx.tools import cli
from lp_fx.tools.cli import llamacpp_check

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
RESULTS = REPO / "docs" / "results" / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").rglob("*.md"))]
README_MAX_LINES = 300
BASH = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FIGURE = re.compile(r"\d+(?:\.\d+)?")
PARSERS = {  # how a command starts -> (the parser that reads it, words that precede its arguments)
    "lp-fx": (cli.build_parser, 1),
    "python -m lp_fx.tools.cli": (cli.build_parser, 3),
    "python -m lp_fx.tools.cli.bench": (cli.build_parser, 3),
    "python -m lp_fx.tools.cli.llamacpp_check": (llamacpp_check.build_parser, 3),
}


def _name(document: Path) -> str:
    return str(document.relative_to(REPO))


def _prose(document: Path) -> str:
    """The document without its fenced code blocks (a ``# comment`` there is not a heading)."""
    return FENCE.sub("", document.read_text())


def _is_command(line: str) -> bool:
    return line.startswith(tuple(f"{prefix} " for prefix in PARSERS))  # not lp-fx-lm-eval (lm-eval's own)


def _commands(document: Path) -> list[str]:
    """Each lp_fx command line the document quotes: in its ``bash`` blocks (continued lines joined,
    comments dropped, ``[optional]`` parts included, ``torchrun …`` reduced to its module) and as a
    code span in a table row."""
    out = []
    for block in BASH.findall(document.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].replace("[", "").replace("]", "").strip()
            line = re.sub(r"^torchrun .*? -m ", "python -m ", line)
            if _is_command(line):
                out.append(line)
    rows = [line for line in _prose(document).splitlines() if line.startswith("|")]
    return out + [span for row in rows for span in CODE_SPAN.findall(row) if _is_command(span)]


def _cases() -> list:
    return [pytest.param(doc, command, id=f"{_name(doc)}: {command[:60]}") for doc in DOCUMENTS for command in _commands(doc)]


def test_the_documents_quote_commands_of_every_tool():
    quoted = " ".join(command for document in DOCUMENTS for command in _commands(document))
    for tool in ("eval", "sweep", "plan", "finetune", "bench", "export", "frontier", "bench --single", "bench --llamacpp"):
        assert f"lp-fx {tool} " in quoted, tool
    assert "python -m lp_fx.tools.cli.llamacpp_check " in quoted


@functools.cache
def _parser(build: Callable[[], argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """One parser per command line (building the whole CLI's takes half a second)."""
    return build()


@pytest.mark.parametrize(("document", "command"), _cases())
def test_every_quoted_command_parses(document: Path, command: str):
    start = next(prefix for prefix in sorted(PARSERS, key=len, reverse=True) if command.startswith(f"{prefix} "))
    build, skip = PARSERS[start]
    words = shlex.split(command)[skip:]
    if start == "python -m lp_fx.tools.cli.bench":
        words = ["bench", *words]
    try:
        _parser(build).parse_args(words)
    except SystemExit as exit_:
        pytest.fail(f"{_name(document)}: `{command}` does not parse (exit {exit_.code})")


# ------------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (a link's label, not its target) lower-cased, every
    character but letters, digits, ``_``, ``-`` and spaces dropped, spaces made ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(document: Path) -> set[str]:
    """GitHub's anchors of the document's headings; a repeated one gets ``-1``, ``-2``, … as there."""
    seen: Counter[str] = Counter()
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(document), re.MULTILINE):
        base = slug(heading)
        out.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return out


def relative_links(document: Path) -> list[tuple[str, Path, str]]:
    """Each relative link of the document outside code blocks: as written, the file it points at,
    and its ``#anchor`` ("" for none)."""
    out = []
    for target in LINK.findall(_prose(document)):
        if not target.startswith(("http://", "https://", "mailto:")):
            path, _, anchor = target.partition("#")
            out.append((target, (document.parent / path).resolve() if path else document, anchor))
    return out


def broken_links(document: Path) -> list[str]:
    """Each relative link of the document whose file is missing, or whose ``#anchor`` names no
    heading of the Markdown file it points at."""
    broken = []
    for target, linked, anchor in relative_links(document):
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading for #{anchor} in {linked.name}")
    return broken


def test_the_anchor_rule_is_githubs():
    assert slug("Speed against quality: `lp-fx frontier`, planned + fine-tuned at Δ = 8") == (
        "speed-against-quality-lp-fx-frontier-planned--fine-tuned-at-δ--8"
    )
    assert slug("The demo's [served](x.md) configuration") == "the-demos-served-configuration"


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_link_resolves(document: Path):
    assert broken_links(document) == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A section: `code`, here\n")
    page.write_text(
        "# Page\n\n[fine](other.md#a-section-code-here) [self](#page) [gone](missing.md)"
        " [no such heading](other.md#a-section) [not here](#other)\n\n```bash\n[in code](ignored.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#a-section: no heading for #a-section in other.md",
        "#other: no heading for #other in page.md",
    ]


def test_every_page_of_docs_is_reached_from_the_readme():
    reached, todo = set(), [README]
    while todo:
        document = todo.pop()
        if document in reached:
            continue
        reached.add(document)
        todo += [linked for _, linked, _ in relative_links(document) if linked.suffix == ".md" and linked.exists()]
    assert sorted(_name(d) for d in DOCUMENTS if d.resolve() not in reached) == []


# ------------------------------------------------------------------------------- the README itself


def test_the_readme_is_read_in_ten_minutes():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def table_lines(text: str, heading: str) -> list[str]:
    """The lines of the first Markdown table after ``heading``."""
    lines = text[text.index(f"\n{heading}\n"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def table_after(document: Path, heading: str) -> list[list[str]]:
    """The first Markdown table after ``heading``: its header row, then its rows, as stripped cells
    (the ``---`` row left out)."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table_lines(document.read_text(), heading)]
    return [rows[0], *rows[2:]]


def test_the_readmes_results_table_is_the_records():
    readme = table_after(README, "## Results at a glance")
    record = table_after(RESULTS, "## At a glance")
    assert record[0][-1] == "from"
    assert readme == [row[:-1] for row in record]


def test_every_figure_at_a_glance_is_measured_in_the_record():
    """Each figure of the record's glance table is in a table of a run in docs/results."""
    glance = [cell for row in table_after(RESULTS, "## At a glance")[1:] for cell in row[:-1]]
    measured = set()
    for page in sorted(RESULTS.parent.rglob("*.md")):
        text = page.read_text()
        if page == RESULTS:
            text = text.replace("\n".join(table_lines(text, "## At a glance")), "")
        measured |= {f for line in text.splitlines() if line.startswith("|") for f in FIGURE.findall(line)}
    assert sorted({f for cell in glance for f in FIGURE.findall(cell)} - measured) == []
