"""``report``: what the usage ledger says was embedded, paid, avoided and measured.

Reads the ledger beside the cache (every process sharing the cache directory writes to
it), adds it up by day or by adapter, and prints a table, JSON, or writes charts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapted_embeddings.cli.app import app, handle_errors
from adapted_embeddings.cli.output import format_table, print_json
from adapted_embeddings.settings import load_settings


@app.command("report")
@handle_errors
def report_command(
    since: Annotated[
        str, typer.Option(metavar="PERIOD", help="How far back: e.g. 24h, 7d, 2w.")
    ] = "7d",
    by: Annotated[
        str, typer.Option(metavar="day|adapter", help="One row per day or per adapter.")
    ] = "day",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    png: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Write the charts as a PNG.")
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Write one self-contained HTML page: table, charts."),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Cache directory, where the ledger lives."),
    ] = None,
) -> None:
    """Show texts, share local, tokens, cost paid and avoided, audited fidelity, guard trips.

    Prices: OpenAI's list prices per 1M tokens unless ADAPTED_EMBEDDINGS_USAGE__PRICES
    overrides them; the report names the prices it used.
    """
    from adapted_embeddings.usage.ledger import SQLiteLedgerStore
    from adapted_embeddings.usage.report import build_report

    settings = load_settings()
    directory = cache_dir or settings.cache.directory
    report = build_report(
        SQLiteLedgerStore(directory),
        since=since,
        by=by,  # type: ignore[arg-type]  # checked by build_report
        prices=settings.usage.prices,
    )
    if png is not None or html is not None:
        from adapted_embeddings.usage.charts import render_html, render_png

        if png is not None:
            render_png(report, png)
        if html is not None:
            render_html(report, html)
    if as_json:
        print_json(report.as_dict())
        return
    typer.echo(format_table(*report.table()))
    prices = ", ".join(f"{model} ${price:g}" for model, price in sorted(report.prices.items()))
    typer.echo(f"prices per 1M tokens: {prices or 'none known'}")
    if report.unpriced:
        typer.echo(
            f"no price for {', '.join(report.unpriced)}: set ADAPTED_EMBEDDINGS_USAGE__PRICES "
            """(e.g. '{"model": 0.02}') to count their cost"""
        )
    for written in (png, html):
        if written is not None:
            typer.echo(f"wrote {written}")
