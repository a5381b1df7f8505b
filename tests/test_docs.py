"""The user documentation in docs/ stays in step with the code: every reference to a docs/ page
(and to a section of it) resolves, every Markdown link between the pages resolves, every command
and option of the CLI has its place in docs/cli.md, and every name in keys.py is in
docs/formats.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from histoprism._core import keys
from histoprism.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# docs/<page>.md, optionally followed by the section: , "Heading" or , 'Heading'
DOC_REF = re.compile(r"docs/([\w-]+\.md)(?:,\s*(?:\"([^\"\n]+)\"|'([^'\n]+)'))?")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)
MD_LINK = re.compile(r"\]\(([^()\s]+)\)")
# defined in keys.py but written by nothing, so not a documented contract
UNDOCUMENTED_KEYS = {"UNS_PATHWAY_NAMES"}


def _sources() -> list[Path]:
    return sorted(
        [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py")]
        + [ROOT / "README.md", *DOCS.glob("*.md")]
    )


def _headings(page: Path) -> list[str]:
    """Heading texts of a Markdown page, without backticks, code blocks skipped."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [h.replace("`", "") for h in HEADING.findall(text)]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _section(page: Path, heading: str) -> str:
    """Text of a page from ``heading`` to the next heading of the same or a higher level."""
    text = page.read_text(encoding="utf-8")
    m = re.search(rf"^(#+)\s+{re.escape(heading)}\s*$", text, re.MULTILINE)
    assert m, f"{page.name} has no heading '{heading}'"
    level = len(m.group(1))
    end = re.compile(rf"^#{{1,{level}}}\s", re.MULTILINE).search(text, m.end())
    return text[m.end() : end.start() if end else len(text)]


def test_docs_exist():
    assert {p.name for p in DOCS.glob("*.md")} >= {"formats.md", "cli.md", "metrics.md"}


def test_every_docs_reference_resolves():
    refs = []
    for path in _sources():
        for m in DOC_REF.finditer(path.read_text(encoding="utf-8")):
            refs.append((path.relative_to(ROOT), m.group(1), m.group(2) or m.group(3)))
    assert len(refs) >= 10, "expected the code to point to docs/"
    bad = []
    for where, name, section in refs:
        page = DOCS / name
        if not page.is_file():
            bad.append(f"{where}: docs/{name} does not exist")
        elif section and section not in _headings(page):
            bad.append(f"{where}: docs/{name} has no section '{section}'")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "page", ["README.md", *(str(p.relative_to(ROOT)) for p in sorted(DOCS.rglob("*.md")))]
)
def test_markdown_links_resolve(page):
    source = ROOT / page
    bad = []
    for target in MD_LINK.findall(source.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        dest = (source.parent / file).resolve() if file else source
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in map(_slug, _headings(dest)):
            bad.append(f"{target}: no heading with anchor '#{anchor}'")
    assert not bad, f"{page}: " + "; ".join(bad)


def _commands():
    group = typer.main.get_command(app)
    return {name: cmd for name, cmd in group.commands.items() if not cmd.hidden}


def test_every_command_and_option_is_in_cli_doc():
    page = DOCS / "cli.md"
    commands = _commands()
    assert {"train", "predict", "evaluate", "extract", "import", "demo"} <= set(commands)
    missing = []
    for name, cmd in commands.items():
        if f"histoprism {name}" not in _headings(page):
            missing.append(f"no section '## histoprism {name}'")
            continue
        text = _section(page, f"histoprism {name}")
        for param in cmd.params:
            if param.param_type_name == "argument":
                if param.name.upper() not in text:
                    missing.append(f"{name}: argument {param.name.upper()}")
                continue
            for opt in [*param.opts, *param.secondary_opts]:
                if opt != "--help" and f"`{opt}`" not in text:
                    missing.append(f"{name}: {opt}")
    for param in typer.main.get_command(app).params:  # global options
        for opt in param.opts:
            if f"`{opt}`" not in _section(page, "Conventions"):
                missing.append(f"global option {opt}")
    assert not missing, "docs/cli.md lacks: " + ", ".join(missing)


def test_every_documented_command_exists():
    headings = _headings(DOCS / "cli.md")
    documented = {h.removeprefix("histoprism ") for h in headings if h.startswith("histoprism ")}
    assert documented <= set(_commands()), documented - set(_commands())


def test_keys_are_in_formats_doc():
    text = (DOCS / "formats.md").read_text(encoding="utf-8")
    missing = []
    for name, value in vars(keys).items():
        if not name.isupper() or name in UNDOCUMENTED_KEYS:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, str) and v not in text:
                missing.append(f"{name} = {v!r}")
    assert not missing, "docs/formats.md does not mention " + ", ".join(missing)
