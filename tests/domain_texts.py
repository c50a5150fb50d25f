"""Real texts of a domain the registry adapters never saw: Python standard-library docstrings.

They ship with every Python, so tests need no download; the order is fixed, so every run
streams the same texts.
"""

from __future__ import annotations

import importlib
import inspect

_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "functools", "gzip", "hashlib", "heapq", "hmac",
    "http.client", "http.server", "imaplib", "inspect", "ipaddress", "itertools", "json",
    "logging", "mailbox", "mimetypes", "multiprocessing", "optparse", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)  # fmt: skip


def stdlib_docstrings(limit: int) -> list[str]:
    """First paragraphs of public docstrings (30-400 characters), deduplicated, in order."""
    seen: set[str] = set()
    texts: list[str] = []
    for name in _MODULES:
        module = importlib.import_module(name)
        for attribute in sorted(vars(module)):
            if attribute.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attribute, None)) or ""
            paragraph = " ".join(doc.split("\n\n")[0].split())
            if 30 <= len(paragraph) <= 400 and paragraph not in seen:
                seen.add(paragraph)
                texts.append(paragraph)
                if len(texts) == limit:
                    return texts
    return texts
