"""Printing helpers shared by the commands: JSON, NDJSON lines and aligned tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import typer

PREVIEW_VALUES = 4
"""How many leading vector values the embed table shows."""


def print_json(value: Any) -> None:
    """Pretty-print ``value`` as JSON on stdout."""
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def ndjson_line(record: dict[str, Any]) -> str:
    """One NDJSON line for ``record``, valid whatever the text holds.

    Non-ASCII text is written as is (UTF-8), which keeps output readable. The JSON encoder
    escapes quotes and control characters; U+0085, U+2028 and U+2029 are legal unescaped in
    JSON but many line readers (Python's ``splitlines``, older JavaScript) break lines on
    them, so they are escaped too and a record is exactly one line for every reader.
    """
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return line.translate(_LINE_BREAKS)


# Outside strings JSON never contains these characters, so replacing them is always safe.
_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


def vector_values(vector: np.ndarray) -> list[float]:
    """Vector as JSON numbers; 9 significant digits round-trip float32 exactly."""
    return [float(f"{x:.9g}") for x in np.asarray(vector, dtype=np.float32).tolist()]


def vector_preview(vector: np.ndarray, count: int = PREVIEW_VALUES) -> str:
    """The first ``count`` values of a vector, e.g. ``[-0.0123 +0.0045 ... ]``."""
    values = " ".join(f"{x:+.4f}" for x in np.asarray(vector)[:count].tolist())
    return f"[{values} …]"


def printable(text: str) -> str:
    r"""``text`` with control characters escaped (``\r``, ``\x1b``, ``\u2028``, ...).

    Names and paths from user directories are printed through this, so a carriage return
    or an escape sequence in a file name cannot rewrite the terminal's output.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def one_line(text: str, width: int) -> str:
    """``text`` on one line, control characters escaped, cut to ``width`` characters."""
    flat = printable(" ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded.

    Every cell goes through :func:`printable`, so no cell can break the table's lines.
    """
    shown = [[printable(str(cell)) for cell in row] for row in (headers, *rows)]
    widths = [max(len(cell) for cell in column) for column in zip(*shown, strict=True)]
    lines = []
    for row in shown:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _escaped(character: str) -> str:
    escapes = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if character in escapes:
        return escapes[character]
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
