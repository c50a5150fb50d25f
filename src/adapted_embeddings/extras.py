"""Optional dependencies ("extras"): a missing one is reported with the line that installs it."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from adapted_embeddings.errors import MissingExtraError


def install_line(extra: str) -> str:
    """The command that installs ``extra``, e.g. ``pip install 'adapted-embeddings[cli]'``."""
    return f"pip install 'adapted-embeddings[{extra}]'"


def require(module: str, extra: str, *, needed_for: str, package: str = "") -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra's pip line.

    Args:
        module: The module to import, e.g. ``"langchain_core.embeddings"``.
        extra: The extra that installs it, e.g. ``"langchain"``.
        needed_for: What needs it, for the message, e.g. ``"adapted_embeddings.langchain"``.
        package: The distribution to name, e.g. ``"langchain-core"`` (default: the module).

    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and not module.startswith(exc.name):
            raise  # the package is installed but broken inside: show the real error
        name = package or module.split(".")[0]
        raise MissingExtraError(
            f"{needed_for} needs {name}, which is not installed: {install_line(extra)}"
        ) from None


def exit_unless_cli_installed() -> None:
    """For the console script: without typer, print the pip line and exit 2, no traceback.

    Imported as a library (not run as ``adapted-embeddings`` or ``python -m``), the missing
    package raises :class:`MissingExtraError` instead.
    """
    try:
        require("typer", "cli", needed_for="the adapted-embeddings command")
    except MissingExtraError as exc:
        if _running_as_command():
            sys.stderr.write(f"Error: {exc}\n")
            raise SystemExit(2) from None
        raise


def _running_as_command() -> bool:
    # While ``python -m adapted_embeddings.cli`` imports the package, argv[0] is "-m".
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script in {"adapted-embeddings", "adapted-embeddings.exe", "__main__.py", "-m"}
