"""What the learning tests and benchmark stream: a new domain, and a confidently-wrong adapter.

* Python standard-library docstrings: a domain the registry adapters never saw. They ship
  with every Python, so nothing is downloaded, and the order is fixed.
* :func:`confidently_wrong`: an adapter whose every vector is wrong while every confidence
  is what it was, to test the guard.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import numpy as np

from adapted_embeddings.adapter import Adapter

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


def confidently_wrong(adapter: Adapter, directory: Path) -> Path:
    """Save ``adapter`` with its output dimensions shuffled, and return the directory.

    The quality features (hidden units, OOD statistics, norms) do not change, so every
    confidence is as before; every vector points elsewhere.
    """
    weights = {name: np.array(tensor) for name, tensor in adapter.weights.items()}
    order = np.random.default_rng(0).permutation(adapter.target.dimensions)
    weights["decoder.weight"] = weights["decoder.weight"][:, order]
    weights["decoder.bias"] = weights["decoder.bias"][order]
    manifest = adapter.manifest.model_copy(update={"name": "confidently-wrong"}, deep=True)
    return Adapter(manifest, weights).save(directory / "confidently-wrong")
