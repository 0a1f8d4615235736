"""The README's Python examples run as written and print what the README shows after them."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
# A Python block, optionally followed by one line of prose and the ```text block of its output.
EXAMPLE = re.compile(r"```python\n(.*?)```\n(?:\n[^\n`]*\n\n```text\n(.*?)```)?", flags=re.S)
EXAMPLES = EXAMPLE.findall(README.read_text())


def test_readme_has_examples():
    assert len(EXAMPLES) >= 4
    assert sum(bool(out) for _, out in EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_prints_what_the_readme_shows(index, capsys):
    code, expected = EXAMPLES[index]
    # An example that prints must show its output, so that the README cannot drift from the code.
    assert ("print(" in code) == bool(expected), "a printing example needs a ```text output block, and only it"
    exec(compile(code, f"README.md example {index}", "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out == expected
