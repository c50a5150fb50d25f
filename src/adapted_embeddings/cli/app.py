"""The ``adapted-embeddings`` Typer app, its exit codes and its one-line error reporting.

Exit codes: 0 success, 1 runtime failure (provider down, corrupt adapter, bug), 2 usage
error (bad option, missing file, wrong column, empty input, unknown adapter, settings or
spaces that cannot work together). Library errors print one ``Error: ...`` line to stderr
(an unknown adapter adds one line per available adapter), never a traceback, unless
``--debug`` is given. Where the library's message names its keywords as the way out (a
cache directory: ``cache_dir=``, ``cache=False``), the command's own flags are named instead.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import typer

from adapted_embeddings.cli.output import printable
from adapted_embeddings.encoders import SHOW_PROGRESS_ENV
from adapted_embeddings.errors import (
    AdaptedEmbeddingsError,
    AdapterNotFoundError,
    CacheDirectoryError,
    ConfigurationError,
    InvalidInputError,
    SpaceMismatchError,
    TrainingDataError,
)
from adapted_embeddings.io import InputFileError
from adapted_embeddings.settings_check import DEBUG_ENV, variable_name

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

USAGE_ERRORS: tuple[type[Exception], ...] = (
    AdapterNotFoundError,
    ConfigurationError,
    InputFileError,
    InvalidInputError,
    SpaceMismatchError,  # on the command line, always a combination of options that cannot work
    TrainingDataError,
)
"""Errors caused by what the user asked for: reported with exit code 2."""

app = typer.Typer(
    name="adapted-embeddings",
    help="Embed text locally in a provider's embedding space, with confidence and fallback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click output: stable to paste into docs and to parse in tests.
    rich_markup_mode=None,
)
cache_app = typer.Typer(
    help="Inspect or empty the embedding cache.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(cache_app, name="cache")

_state = {"debug": False}

P = ParamSpec("P")
R = TypeVar("R")


@app.callback()
def _root(
    debug: bool = typer.Option(
        False,
        "--debug",
        envvar=DEBUG_ENV,
        help="Show full tracebacks instead of one-line errors.",
    ),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Log what the library does (model loading, cache, provider) and show the "
        f"model-loading progress bar (also: {SHOW_PROGRESS_ENV}=1).",
    ),
) -> None:
    """Embed text locally in a provider's embedding space, with confidence and fallback.

    Settings come from ADAPTED_EMBEDDINGS_* environment variables and .env, exactly as for
    the library; command-line options override them.
    """
    _state["debug"] = debug
    if verbose:
        os.environ[SHOW_PROGRESS_ENV] = "1"
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def fail(message: str | list[str], code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``Error: message`` to stderr, control characters escaped (a newline too).

    A message is one line; given as a list, its first line follows ``Error:`` and the rest
    go on lines of their own (an unknown adapter lists the available ones so).

    Returns:
        The Exit to raise.

    """
    first, *rest = [message] if isinstance(message, str) else message
    typer.echo("\n".join([f"Error: {printable(first)}", *map(printable, rest)]), err=True)
    return typer.Exit(code)


def handle_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn exceptions escaping ``command`` into one stderr line and an exit code."""
    ways_out = _cache_ways_out(command)

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if _state["debug"] or _is_click_exception(exc):
                raise
            raise fail(_describe(exc, ways_out), _exit_code(exc)) from None

    return wrapper


def _cache_ways_out(command: Callable[..., object]) -> str:
    """What a user of ``command`` can do about a cache directory it cannot use: its flags."""
    parameters = inspect.signature(command).parameters
    flags = []
    if "cache_dir" in parameters:
        flags.append("pass --cache-dir DIR with a directory you own")
    if "cache" in parameters or "no_cache" in parameters:
        flags.append("--no-cache to run without a cache")
    setting = f"set {variable_name('cache', 'directory')}"
    return f"{', or '.join(flags)} (or {setting})" if flags else setting


def _exit_code(exc: BaseException) -> int:
    return EXIT_USAGE if isinstance(exc, USAGE_ERRORS) else EXIT_FAILURE


def _describe(exc: BaseException, cache_ways_out: str) -> str | list[str]:
    # A command may have wrapped the cache's error in its own: report the cache's problem.
    cache_error = exc if isinstance(exc, CacheDirectoryError) else exc.__cause__
    if isinstance(cache_error, CacheDirectoryError):
        return f"{cache_error.problem}; {cache_ways_out}"
    if isinstance(exc, AdapterNotFoundError):
        # One line per adapter; escape each part first, so no name (from a user's adapter
        # directory) can add a line of its own.
        escaped = AdapterNotFoundError(printable(exc.problem), list(map(printable, exc.available)))
        return str(escaped).split("\n")
    if isinstance(exc, AdaptedEmbeddingsError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)"


def _is_click_exception(exc: BaseException) -> bool:
    # Usage errors raised by the parser (BadParameter, ...) carry their own exit code and
    # formatting; typer may vendor click, so match by the attribute they all share.
    return hasattr(exc, "exit_code") and hasattr(exc, "show")


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point (``adapted-embeddings``)."""
    return app(args=argv, prog_name="adapted-embeddings")
