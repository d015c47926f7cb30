"""The documentation's references resolve: test ids, relative links and cited sections.

Each fact lives on one page and the others link to it (tests/README.md, "Documentation"), so a
renamed test, a moved heading or a deleted file would leave a dangling pointer that nobody sees
until a reader follows it. These tests read the Markdown and the code comments and check, against
the tree as it is:

1. every test a page names (``tests/e2e/test_x.py::test_name``, a plain ``tests/.../file.py``)
   exists, the function included (parametrised ids allowed);
2. every relative link resolves to a file, and a ``#anchor`` to a heading of it (GitHub's slugs);
3. every ``docs/architecture.md, "Section"`` style citation, in the code and in the pages, names a
   heading of that file;
4. docs/configuration.md lists every setting with its flag, environment variable and default.

Each checker is a plain function over text, and the last tests feed them broken input to show they
can fail.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Pages whose references are checked.
DOC_GLOBS = ("README.md", "docs/**/*.md", "benchmarks/**/*.md", "tests/**/*.md", "nodes/*/README.md", "protocol/README.md")
# Code whose comments and docstrings cite documentation sections.
CODE_GLOBS = (
    "openai_stream_server/**/*.py",
    "nodes/*/*/**/*.py",
    "nodes/*/tests/**/*.py",
    "protocol/**/*.py",
    "benchmarks/**/*.py",
    "tests/**/*.py",
    "*.yml",
    "benchmarks/dataflows/*.yml",
    "Makefile",
)


def _files(globs: tuple[str, ...]) -> list[Path]:
    found = {p for g in globs for p in ROOT.glob(g) if p.is_file() and ".venv" not in p.parts and "egg-info" not in str(p)}
    return sorted(found)


def doc_files() -> list[Path]:
    return _files(DOC_GLOBS)


def code_files() -> list[Path]:
    return [p for p in _files(CODE_GLOBS) if p != Path(__file__).resolve()]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- headings and GitHub anchors ---------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _outside_fences(text: str) -> list[str]:
    """The lines of ``text`` that are not inside a fenced code block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def headings(text: str) -> list[str]:
    """The text of every ATX heading, outside code blocks."""
    return [m.group(2) for line in _outside_fences(text) if (m := _HEADING.match(line))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor GitHub makes for the headings of ``text`` (a repeated slug gets ``-1``, ``-2``, …)."""
    seen: dict[str, int] = {}
    result = set()
    for heading in headings(text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


@cache
def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --- 1. test ids -------------------------------------------------------------------------------

# A test path (tests/…, protocol/tests/…, nodes/<node>/tests/…), optionally ``::name[param]``; or a
# bare ``::name`` that continues the last path named before it ("`a.py::test_x`, `::test_y`").
_TEST_REF = re.compile(
    r"(?<![\w/.-])(?P<path>(?:tests|protocol/tests|nodes/\w+/tests)/[\w/.-]*?\.py)(?:::(?P<name>\w+))?"
    r"|(?<![\w:])::(?P<more>test\w*)"
)


def named_tests(text: str) -> list[tuple[str, str | None]]:
    """(path, function or None) for every test id in ``text``, in order."""
    refs: list[tuple[str, str | None]] = []
    last: str | None = None
    for m in _TEST_REF.finditer(text):
        if m.group("path"):
            last = m.group("path")
            refs.append((last, m.group("name")))
        elif last is not None:
            refs.append((last, m.group("more")))
    return refs


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(_read(path))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}


def missing_tests(text: str, root: Path = ROOT) -> list[str]:
    """The test ids of ``text`` that do not exist under ``root``."""
    missing = []
    for path, name in named_tests(text):
        file = root / path
        if not file.is_file():
            missing.append(path)
        elif name is not None and name not in _defined_names(file):
            missing.append(f"{path}::{name}")
    return missing


# --- 2. relative links -------------------------------------------------------------------------

_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text: str) -> list[str]:
    """The target of every inline Markdown link and image, outside code blocks and code spans."""
    prose = "\n".join(_outside_fences(text))
    prose = re.sub(r"(`+)(?:(?!\1).)+\1", "", prose)
    return [m.group(1) for m in _LINK.finditer(prose)]


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """The relative links of ``page`` whose file, or heading, does not exist."""
    text = _read(page) if text is None else text
    broken = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        file = (page.parent / file_part).resolve() if file_part else page
        if not file.exists():
            broken.append(target)
        elif anchor and (file.is_dir() or file.suffix != ".md" or anchor not in anchors(_read(file))):
            broken.append(target)
    return broken


# --- 3. cited sections -------------------------------------------------------------------------

# ``docs/architecture.md, "Replicas and failover"``, ``README.md, "A", "B"`` or ``README, "A"``:
# each quoted name after a Markdown file is a heading of that file; so is an unquoted one closed by
# a parenthesis, ``(docs/architecture.md, Facts measured)``. The text is first freed of comment
# markers and line breaks, so a citation wrapped over two comment lines still reads as one.
_CITATION = re.compile(
    r"(?P<file>[\w./-]+\.md|\bREADME)`*[,:]\s*"
    r"(?:(?P<names>\"[^\"\n]{1,80}\"(?:\s*,\s*\"[^\"\n]{1,80}\")*)|(?P<bare>[A-Z][^,;()\"\n]{0,60}?)\))"
)


def citations(text: str) -> list[tuple[str, str]]:
    """(file, section) for every section citation in ``text``."""
    flat = re.sub(r"\n\s*(?:#\s*)?", " ", text)
    found = []
    for m in _CITATION.finditer(flat):
        file = "README.md" if m.group("file") == "README" else m.group("file")
        names = re.findall(r"\"([^\"]+)\"", m.group("names")) if m.group("names") else [m.group("bare").strip()]
        found.extend((file, name) for name in names)
    return found


def _headings_of(file: Path) -> set[str]:
    return {h.replace("`", "") for h in headings(_read(file))}


def wrong_citations(text: str, root: Path = ROOT, here: Path | None = None) -> list[str]:
    """The citations of ``text`` whose file does not exist or has no such heading.

    A cited path is taken from the repository root, or else (a page citing a neighbour) from ``here``.
    """
    wrong = []
    for name, section in citations(text):
        file = root / name
        if not file.is_file() and here is not None:
            file = here / name
        if not file.is_file() or section.replace("`", "") not in _headings_of(file):
            wrong.append(f'{name}, "{section}"')
    return wrong


# --- the checks over the repository ------------------------------------------------------------


@pytest.mark.parametrize("page", doc_files(), ids=_rel)
def test_every_test_a_page_names_exists(page: Path) -> None:
    assert missing_tests(_read(page)) == []


@pytest.mark.parametrize("page", doc_files(), ids=_rel)
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("source", code_files() + doc_files(), ids=_rel)
def test_every_cited_section_exists(source: Path) -> None:
    assert wrong_citations(_read(source), here=source.parent) == []


def settings_rows() -> list[str]:
    """The first three cells (flag, variable, default) of each setting's row, as the page writes them."""
    from openai_stream_server.settings import ENV_PREFIX, Settings

    rows = []
    for f in dataclasses.fields(Settings):
        flag = "--model NAME" if f.name == "models" else "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + ("MODEL" if f.name == "models" else f.name.upper())
        default = "(none)" if f.default in (None, ()) else str(f.default)
        rows.append(f"| `{flag}` | `{env}` | `{default}` |")
    return rows


def test_the_configuration_page_lists_every_setting_with_its_default() -> None:
    page = _read(ROOT / "docs" / "configuration.md")
    assert [row for row in settings_rows() if row not in page] == []


_ISSUE_REF = re.compile(r"\bissues? #?\d+", re.IGNORECASE)


@pytest.mark.parametrize("source", code_files() + doc_files(), ids=_rel)
def test_no_issue_numbers_in_docs_or_comments(source: Path) -> None:
    """Comments and pages say why, not which issue asked for it: an issue number tells a reader nothing."""
    assert _ISSUE_REF.findall(_read(source)) == []


def test_the_readme_stays_a_front_page() -> None:
    """What a newcomer reads in five minutes; the manual is in docs/."""
    assert len(_read(ROOT / "README.md").splitlines()) <= 250


def test_the_pages_and_the_code_are_found() -> None:
    pages = {_rel(p) for p in doc_files()}
    assert {"README.md", "docs/architecture.md", "benchmarks/README.md", "tests/README.md"} <= pages
    assert Path(__file__).resolve() not in code_files()
    assert ROOT / "openai_stream_server" / "app.py" in code_files()


# --- the checkers can fail ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "heading, anchor",
    [
        ("Responses API: `/v1/responses`", "responses-api-v1responses"),
        ("What happens when …", "what-happens-when-"),
        ("Request: output `v1/chat/completions`", "request-output-v1chatcompletions"),
        ("Step mode: the batch form", "step-mode-the-batch-form"),
        ("Per-event CPU in step mode", "per-event-cpu-in-step-mode"),
        ("Room 2: stream state", "room-2-stream-state"),
    ],
)
def test_slugs_follow_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_a_repeated_heading_gets_a_numbered_anchor() -> None:
    assert anchors("# A\n## Usage\n## Usage\n```\n# not a heading\n```\n") == {"a", "usage", "usage-1"}


def test_a_missing_test_or_function_is_reported() -> None:
    text = (
        "`tests/unit/test_docs.py::test_slugs_follow_github[x]`, `::test_no_such_test`; "
        "`tests/unit/test_no_such_file.py`; ok: `tests/unit/test_docs.py`"
    )
    assert missing_tests(text) == ["tests/unit/test_docs.py::test_no_such_test", "tests/unit/test_no_such_file.py"]


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n## A section\n")
    text = (
        "[fine](other.md#a-section) [self](#top) [web](https://example.com/x) `[in code](gone.md)`\n"
        "[gone](gone.md) [no heading](other.md#no-section) [no self](#nowhere)\n"
        "```\n[in a block](gone.md)\n```\n# Top\n"
    )
    page.write_text(text)
    assert broken_links(page, text) == ["gone.md", "other.md#no-section", "#nowhere"]


def test_a_citation_of_a_missing_section_is_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n## Request path `x`\n## Other\n")
    source = (
        '# see docs/a.md, "Request path x", "Gone"\n# and docs/a.md, "Wrapped\n# over lines"; docs/b.md, "Other"\n'
        "# (docs/a.md, Other) (docs/a.md, Elsewhere) (docs/a.md: one wake-up per batch)\n"
    )
    assert wrong_citations(source, tmp_path) == [
        'docs/a.md, "Gone"',
        'docs/a.md, "Wrapped over lines"',
        'docs/b.md, "Other"',
        'docs/a.md, "Elsewhere"',
    ]


def test_an_issue_number_is_found() -> None:
    a, b, c = 12, 9, 3  # numbers kept out of the literal, so that grepping the tree for them stays clean
    found = _ISSUE_REF.findall(f"(issue {a}) the surface (Issue #{b}), issues {c} ... no tissue {c}")
    assert found == [f"issue {a}", f"Issue #{b}", f"issues {c}"]
