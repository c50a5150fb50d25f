"""The pasted outputs of README.md and docs/, and how a test compares one with the code's now.

A fenced block right after an HTML comment ``<!-- output: WHAT -->`` in README.md or a page
under docs/ is real output that a test regenerates (tests/test_readme.py, tests/test_docs.py
for the Python examples, and tests/test_cookbook.py for the cookbook scripts). ``WHAT`` says
how:

- ``console``: a console session. Every ``$ `` line is run; the lines up to the next ``$ ``
  are its output (stdout and stderr), and a last line ``(exit code N)`` its exit code.
- ``python cookbook/NN_name.py ARGS``: that script's stdout.
- ``the python above`` (``node``, ``bash``): what the example just before it printed
  (tests/test_docs.py).
- any other command: its stdout and stderr.

Only what cannot be the same from one run or machine to the next is normalised: loopback
ports, the Python version, timings that a test names, and the last digits of long floats
(float32 arithmetic differs slightly between CPUs and thread counts).
"""

from __future__ import annotations

import difflib
import math
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
EXAMPLE_ABOVE = re.compile(r"the (?P<language>python|node|bash) above")
"""How a page marks what the example just before it printed (run by tests/test_docs.py)."""


def documented_pages() -> list[Path]:
    """README.md and every page of the documentation site."""
    return [README, *sorted(DOCS.rglob("*.md"))]


_BLOCK = re.compile(
    r"^<!-- output: (?P<what>.+?) -->\n```[a-z]*\n(?P<text>.*?)^```$", re.MULTILINE | re.DOTALL
)
COOKBOOK_COMMAND = re.compile(r"python cookbook/(?P<script>\S+\.py)(?P<args>.*)")
"""How the README marks a cookbook script's output (run by tests/test_cookbook.py)."""
_DECIMAL = re.compile(r"[-+]?\d+\.\d+(?:[eE][-+]?\d+)?")
_LONG_FLOAT_DIGITS = 7
"""Decimals printed with at least this many significant digits are compared with a tolerance."""

ALWAYS_VOLATILE = (
    r"127\.0\.0\.1:\d+",  # a free port, chosen at run time
    r"\(Python \d+\.\d+\.\d+\)",  # `version` names the interpreter it runs on
)


@dataclass(frozen=True)
class ReadmeOutput:
    """One pasted output: what produced it, the text, and the page and line it starts on."""

    what: str
    text: str
    line: int
    page: Path = README

    @property
    def where(self) -> str:
        """``docs/page.md line N``, for messages."""
        return f"{self.page.relative_to(ROOT)} line {self.line}"


def readme_outputs(pages: Iterable[Path] | None = None) -> list[ReadmeOutput]:
    """Every marked output block in README.md and docs/ (or in ``pages``), in order."""
    found = []
    for page in documented_pages() if pages is None else pages:
        text = page.read_text(encoding="utf-8")
        found += [
            ReadmeOutput(
                match["what"], match["text"], text.count("\n", 0, match.start("text")) + 1, page
            )
            for match in _BLOCK.finditer(text)
        ]
    return found


def cookbook_output(script: str) -> tuple[ReadmeOutput, list[str]]:
    """The one pasted output of ``cookbook/<script>``, and the arguments it was run with."""
    found = [
        (block, match)
        for block in readme_outputs()
        if (match := COOKBOOK_COMMAND.fullmatch(block.what)) and match["script"] == script
    ]
    assert len(found) == 1, f"docs/ needs one <!-- output: python cookbook/{script} ... -->"
    block, match = found[0]
    return block, shlex.split(match["args"])


def assert_same_output(actual: str, block: ReadmeOutput, *, volatile: Iterable[str] = ()) -> None:
    """Fail, with a diff and the whole new output to paste, unless ``actual`` matches ``block``.

    Args:
        actual: What the code prints now.
        block: The pasted output (README.md or a page in docs/).
        volatile: Regular expressions for spans whose numbers differ from run to run
            (timings): the numbers inside them are not compared.

    """
    patterns = [*ALWAYS_VOLATILE, *volatile]
    expected_lines = _comparable(block.text, patterns)
    actual_lines = _comparable(actual, patterns)
    if len(expected_lines) == len(actual_lines) and all(
        _same_line(e, a) for e, a in zip(expected_lines, actual_lines, strict=True)
    ):
        return
    diff = "\n".join(
        difflib.unified_diff(expected_lines, actual_lines, block.where, "now", n=1, lineterm="")
    )
    pytest.fail(
        f"{block.where} (<!-- output: {block.what} -->) no longer matches what "
        f"the code prints:\n{diff}\n\nThe whole output now:\n{actual}",
        pytrace=False,
    )


def _comparable(text: str, volatile: list[str]) -> list[str]:
    for pattern in volatile:
        text = re.sub(pattern, _hide_numbers, text, flags=re.MULTILINE)
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def _hide_numbers(match: re.Match[str]) -> str:
    """The span with each number as ``#``; the padding that aligned the numbers goes too."""
    return re.sub(r"[ \t]+", " ", re.sub(r"\d+(?:\.\d+)?", "#", match.group()))


def _same_line(expected: str, actual: str) -> bool:
    """Equal, except that long decimals need only agree to about six significant digits."""
    expected_rest, expected_floats = _long_floats(expected)
    actual_rest, actual_floats = _long_floats(actual)
    return (
        expected_rest == actual_rest
        and len(expected_floats) == len(actual_floats)
        and all(
            math.isclose(e, a, rel_tol=1e-5, abs_tol=1e-7)
            for e, a in zip(expected_floats, actual_floats, strict=True)
        )
    )


def _long_floats(line: str) -> tuple[str, list[float]]:
    floats: list[float] = []

    def take(match: re.Match[str]) -> str:
        mantissa = re.split(r"[eE]", match.group())[0]
        if len(re.sub(r"\D", "", mantissa).lstrip("0")) < _LONG_FLOAT_DIGITS:
            return match.group()
        floats.append(float(match.group()))
        return "<float>"

    return _DECIMAL.sub(take, line), floats
