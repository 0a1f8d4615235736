"""The Python examples of README.md and of every docs/*.md page run as written and print what the
page shows after them; the pages link to files that exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
# A Python block, optionally followed by one line of prose and the ```text block of its output.
EXAMPLE = re.compile(r"```python\n(.*?)```\n(?:\n[^\n`]*\n\n```text\n(.*?)```)?", flags=re.S)
# Every fence that opens a code block, with its language (```python, ```bash, ```text, ```).
FENCE = re.compile(r"^```(\S*)$", flags=re.M)
# Relative Markdown links: [text](path) or [text](path#anchor), not URLs.
LINK = re.compile(r"\]\((?!https?://|mailto:|#)([^)#\s]+)(?:#[^)\s]*)?\)")


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


EXAMPLES = [
    (_name(page), index, code, expected)
    for page in PAGES
    for index, (code, expected) in enumerate(EXAMPLE.findall(page.read_text()))
]


def test_docs_pages_are_found():
    assert DOCS, "no docs/*.md page found"
    readme = README.read_text()
    for page in DOCS:
        assert f"docs/{page.name}" in readme, f"README.md does not link to docs/{page.name}"


def test_pages_have_examples():
    assert len(EXAMPLES) >= 4
    assert sum(bool(expected) for *_, expected in EXAMPLES) >= 2
    assert any(name == "README.md" for name, *_ in EXAMPLES), "README.md has no Python example"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_python_block_is_an_example(page):
    # A Python block tagged otherwise (```py, ```python3) would not run here: only ```python.
    text = page.read_text()
    languages = FENCE.findall(text)[::2]  # opening fences only (every block opens and closes)
    assert len(FENCE.findall(text)) % 2 == 0, f"{_name(page)} has an unclosed code block"
    assert not {"py", "python3", "pycon"} & set(languages), f"{_name(page)}: tag Python blocks ```python"
    assert languages.count("python") == len(EXAMPLE.findall(text))


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    missing = [t for t in LINK.findall(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{_name(page)} links to missing files: {missing}"


@pytest.mark.parametrize(
    ("name", "index", "code", "expected"), EXAMPLES, ids=[f"{name}-{index}" for name, index, *_ in EXAMPLES]
)
def test_example_prints_what_the_page_shows(name, index, code, expected, capsys):
    # An example that prints must show its output, so that the page cannot drift from the code.
    assert ("print(" in code) == bool(expected), "a printing example needs a ```text output block, and only it"
    exec(compile(code, f"{name} example {index}", "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out == expected
