"""``list``, ``info`` and ``registry``: what adapters exist and what is known about them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from adapted_embeddings.cli.app import app, handle_errors
from adapted_embeddings.cli.output import format_table, print_json
from adapted_embeddings.registry import RegistryEntry, find_adapter, list_adapters


def adapter_location(name_or_path: str) -> Path:
    """The directory of an adapter given by registry name or by path.

    Raises:
        AdapterNotFoundError: If it is neither a directory nor a registered name; the
            message lists the available adapters.

    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    return find_adapter(name=name_or_path).path


def _summary(entry: RegistryEntry) -> dict[str, Any]:
    manifest = entry.manifest
    return {
        "name": manifest.name,
        "flavor": manifest.flavor,
        "source": manifest.source.id,
        "target": manifest.target.id,
        "recommended_threshold": manifest.recommended_threshold,
        "builtin": entry.builtin,
        "path": str(entry.path),
    }


@app.command("list")
@handle_errors
def list_command(
    source: Annotated[
        str | None, typer.Option(help="Only adapters reading this model or space id.")
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="Only adapters writing this model or space id.")
    ] = None,
    flavor: Annotated[str | None, typer.Option(help="Only this flavor.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
) -> None:
    """List the available adapters (user directories first, then built-in ones)."""
    entries = list_adapters(source=source, target=target, flavor=flavor)
    if as_json:
        print_json([_summary(e) for e in entries])
        return
    if not entries:
        typer.echo("no adapters match", err=True)
        return
    rows = [
        [
            e.name,
            e.manifest.flavor,
            e.manifest.source.id,
            e.manifest.target.id,
            f"{e.manifest.recommended_threshold:.3f}",
            "built-in" if e.builtin else str(e.path.parent),
        ]
        for e in entries
    ]
    typer.echo(format_table(["name", "flavor", "source", "target", "threshold", "from"], rows))


@app.command("info")
@handle_errors
def info_command(
    adapter: Annotated[str, typer.Argument(help="Adapter name (see `list`) or adapter directory.")],
) -> None:
    """Print an adapter's manifest, metrics and calibration as JSON."""
    from adapted_embeddings.adapter import Adapter

    loaded = Adapter.load(adapter_location(adapter))
    info = loaded.manifest.model_dump(mode="json")
    info["path"] = str(loaded.path)
    info["parameter_count"] = loaded.parameter_count
    print_json(info)


@app.command("registry")
@handle_errors
def registry_command() -> None:
    """Print every available adapter's full manifest as one JSON array."""
    entries = list_adapters()
    print_json(
        [
            {**e.manifest.model_dump(mode="json"), "path": str(e.path), "builtin": e.builtin}
            for e in entries
        ]
    )
