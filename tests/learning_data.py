"""What the learning tests and benchmark stream: a new domain, and a confidently-wrong adapter.

* Python standard-library docstrings: a domain the registry adapters never saw. They ship
  with every Python, so nothing is downloaded, and the order is fixed.
* :func:`confidently_wrong`: an adapter whose every vector is wrong while every confidence
  is what it was, to test the guard.
"""

from __future__ import annotations

import functools
import inspect
import json
import subprocess
import sys
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


def stdlib_docstrings(limit: int, *, fresh: bool = True) -> list[str]:
    """First paragraphs of public docstrings (30-400 characters), deduplicated, in order.

    Collected in a fresh interpreter (``fresh``), so the list is the same in any process: a
    module's attributes depend on what the process imported (pytest alone adds
    ``unittest.mock``; ``logging.handlers`` adds ``logging.handlers``) and on what earlier
    tests monkeypatched, which changed 233 of the first 1,000 texts between two processes.
    ``fresh=False`` collects in this process, as ``benchmarks/domain_adaptation.py`` did for
    its published results.
    """
    if not fresh:
        return _docstrings_in_this_process(limit, _MODULES)
    return list(_docstrings_in_a_fresh_process(limit))


@functools.cache
def _docstrings_in_a_fresh_process(limit: int) -> tuple[str, ...]:
    code = (
        inspect.getsource(_docstrings_in_this_process)
        + "import json, sys\n"
        + f"json.dump(_docstrings_in_this_process({limit}, {_MODULES!r}), sys.stdout)\n"
    )
    # -I: no user site, no PYTHON* variables, no current directory on the path.
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    return tuple(json.loads(done.stdout))


def _docstrings_in_this_process(limit: int, modules: tuple[str, ...]) -> list[str]:
    import importlib
    import inspect

    seen: set[str] = set()
    texts: list[str] = []
    for name in modules:
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
