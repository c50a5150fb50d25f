"""``list``, ``info`` and ``registry``: what adapters exist and what is known about them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from adapted_embeddings.cli.app import app, handle_errors
from adapted_embeddings.cli.output import format_table, print_json, printable
from adapted_embeddings.registry import RegistryEntry, list_adapters, resolve_adapter


def adapter_location(name_or_path: str, given_as: str = "--adapter") -> Path:
    """The directory of an adapter given by name (as ``list`` shows it) or by directory.

    The library's resolver, searching the adapters ``adapt()`` learned too, as ``list`` does.

    Raises:
        AdapterNotFoundError: If it is neither a directory nor an available adapter's name;
            the message names ``given_as`` and lists the available adapters.

    """
    return resolve_adapter(name_or_path, given_as=given_as, extra_dirs=[_learned_adapters()])


def _learned_adapters() -> Path:
    """Where ``adapt()`` saves the adapters it learns (the settings, else beside the cache)."""
    from adapted_embeddings.learning.adapt import adapted_adapter_dir
    from adapted_embeddings.settings import load_settings

    settings = load_settings()
    return adapted_adapter_dir(settings.learning, settings.cache.directory)


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
        str | None,
        typer.Option(metavar="MODEL", help="Only adapters reading this model or space id."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(metavar="MODEL", help="Only adapters writing this model or space id."),
    ] = None,
    flavor: Annotated[str | None, typer.Option(metavar="FLAVOR", help="Only this flavor.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
) -> None:
    """List the available adapters (user directories first, then built-in ones).

    Adapters ``adapt()`` learned from your data (in the adapter directory beside the cache)
    are listed first.
    """
    entries = list_adapters(
        source=source, target=target, flavor=flavor, extra_dirs=[_learned_adapters()]
    )
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
    as_json: Annotated[
        bool,
        typer.Option("--json", "--full", help="Print the whole manifest (metrics, calibration)."),
    ] = False,
) -> None:
    """Summarise an adapter: spaces, size, threshold, validation quality, where it lives."""
    from adapted_embeddings.adapter import Adapter

    loaded = Adapter.load(adapter_location(adapter, given_as="ADAPTER"))
    if as_json:
        info = loaded.manifest.model_dump(mode="json")
        info["path"] = str(loaded.path)
        info["parameter_count"] = loaded.parameter_count
        print_json(info)
        return
    manifest = loaded.manifest
    rows = [
        ["name", manifest.name],
        ["flavor", manifest.flavor],
        ["source", manifest.source.id],
        ["target", manifest.target.id],
        ["parameters", f"{loaded.parameter_count:,}"],
        ["recommended threshold", f"{manifest.recommended_threshold:.3f}"],
        *([["validation", quality]] if (quality := _validation_quality(manifest.metrics)) else []),
        ["trained on", str(manifest.training.get("data", "-"))],
        ["weights", f"{manifest.weights_file} (sha256 {manifest.weights_sha256[:12]}…)"],
        ["path", str(loaded.path)],
    ]
    if manifest.description:
        rows.insert(1, ["description", manifest.description])
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        typer.echo(f"{label.ljust(width)}  {printable(value)}")
    typer.echo(f"(everything, with metrics and calibration: info {adapter_hint(adapter)} --json)")


@app.command("registry")
@handle_errors
def registry_command(
    as_json: Annotated[
        bool,
        typer.Option("--json", "--full", help="Print every adapter's full manifest as JSON."),
    ] = False,
) -> None:
    """Every available adapter with its validation quality (--json: the full manifests)."""
    entries = list_adapters()
    if as_json:
        print_json(
            [
                {**e.manifest.model_dump(mode="json"), "path": str(e.path), "builtin": e.builtin}
                for e in entries
            ]
        )
        return
    rows = [
        [
            e.name,
            e.manifest.flavor,
            f"{e.manifest.source.id} -> {e.manifest.target.id}",
            f"{e.manifest.recommended_threshold:.3f}",
            _validation_quality(e.manifest.metrics) or "-",
            "built-in" if e.builtin else str(e.path.parent),
        ]
        for e in entries
    ]
    headers = ["name", "flavor", "source -> target", "threshold", "validation", "from"]
    typer.echo(format_table(headers, rows))
    typer.echo(f"{len(entries)} adapters (full manifests: registry --json)")


def adapter_hint(adapter: str) -> str:
    """The adapter argument as a user could type it again (quoted when needed)."""
    import shlex

    return printable(shlex.quote(adapter))


def _validation_quality(metrics: dict[str, Any]) -> str:
    validation = metrics.get("validation", {})
    parts = []
    if isinstance(validation.get("mean_centred_cosine"), int | float):
        parts.append(f"centred cosine {validation['mean_centred_cosine']:.3f}")
    agreement = validation.get("neighbour_agreement", {})
    if isinstance(agreement, dict) and isinstance(agreement.get("r@10"), int | float):
        parts.append(f"neighbour r@10 {agreement['r@10']:.3f}")
    return ", ".join(parts)
