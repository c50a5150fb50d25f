"""Extra out-of-domain corpora for the benchmarks: Debian package summaries, Python docstrings.

Benchmark-only: the Debian loader reads the local apt lists (shelling out to ``lz4`` for
compressed ones), which a library has no business doing. Both serve as text *types* the
Jeopardy adapters never saw, and as extra training text for the MiniLM -> e5 adapter.

Debian package descriptions
    One-line package summaries from the local apt lists. They exist only where
    ``apt-get update`` has run, so the loader raises :class:`FileNotFoundError` when they
    are absent; nothing in the test suite depends on them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np


def load_debian_descriptions(limit: int | None = None, *, seed: int = 0) -> list[str]:
    """One-line Debian package summaries from the local apt lists, deduplicated.

    Args:
        limit: Return a seeded random sample of at most this many (all when None).
        seed: Sampling seed.

    Raises:
        FileNotFoundError: If no apt package lists exist (run ``apt-get update`` first).

    """
    lists = sorted(Path("/var/lib/apt/lists").glob("*_Packages*"))
    if not lists:
        raise FileNotFoundError("no apt package lists in /var/lib/apt/lists; run apt-get update")
    descriptions: set[str] = set()
    for path in lists:
        if path.suffix == ".lz4":
            content = subprocess.run(
                ["lz4", "-dc", str(path)], check=True, capture_output=True
            ).stdout.decode("utf-8", errors="replace")
        elif path.suffix in ("", ".txt"):
            content = path.read_text(encoding="utf-8", errors="replace")
        else:
            continue
        for line in content.splitlines():
            if line.startswith("Description: "):
                text = line[len("Description: ") :].strip()
                if len(text.split()) >= 3:
                    descriptions.add(text)
    ordered = sorted(descriptions)
    if limit is not None and limit < len(ordered):
        rng = np.random.default_rng(seed)
        ordered = [ordered[i] for i in sorted(rng.choice(len(ordered), limit, replace=False))]
    return ordered


_STDLIB_MODULES = (
    "os",
    "json",
    "re",
    "pathlib",
    "collections",
    "itertools",
    "functools",
    "datetime",
    "subprocess",
    "socket",
    "threading",
    "asyncio",
    "argparse",
    "logging",
    "shutil",
    "string",
    "textwrap",
    "random",
    "statistics",
    "math",
    "heapq",
    "bisect",
    "csv",
    "sqlite3",
    "zipfile",
    "tarfile",
    "hashlib",
    "hmac",
    "base64",
    "urllib.parse",
    "http.client",
    "email.message",
    "xml.etree.ElementTree",
    "unittest",
    "inspect",
    "typing",
    "dataclasses",
    "enum",
    "uuid",
)


def load_stdlib_docstrings(limit: int | None = None, *, seed: int = 0) -> list[str]:
    """First paragraphs of Python standard-library docstrings: an offline technical domain.

    Available wherever Python is, so it serves as an out-of-domain set in tests and
    benchmarks. The exact texts depend on the Python version.
    """
    import importlib
    import inspect

    texts: set[str] = set()
    for module_name in _STDLIB_MODULES:
        module = importlib.import_module(module_name)
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member) if callable(member) else None
            if not doc:
                continue
            paragraph = " ".join(doc.split("\n\n")[0].split())
            if len(paragraph.split()) >= 6:
                texts.add(paragraph)
    ordered = sorted(texts)
    if limit is not None and limit < len(ordered):
        rng = np.random.default_rng(seed)
        ordered = [ordered[i] for i in sorted(rng.choice(len(ordered), limit, replace=False))]
    return ordered
