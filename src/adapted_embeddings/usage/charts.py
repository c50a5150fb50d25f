"""Charts of a :class:`~adapted_embeddings.usage.report.UsageReport`: a PNG, or one HTML file.

Three panels, by day: texts by route; cost paid vs avoided; audited fidelity with its 95%
interval, a dashed line at each adapter switch. matplotlib is imported only here (the
``report`` extra); the HTML file embeds the PNG as base64 and the table, so it opens
offline with nothing beside it.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from adapted_embeddings.extras import require
from adapted_embeddings.usage.report import UsageReport, short_adapter

ROUTE_COLOURS = {"local": "#2a9d8f", "cache": "#8ab17d", "provider": "#e76f51"}


def render_png(report: UsageReport, path: str | Path | None = None, *, dpi: int = 100) -> bytes:
    """The charts as PNG bytes (also written to ``path`` if given).

    Raises:
        MissingExtraError: If matplotlib is not installed (naming the ``report`` extra).

    """
    figure = _figure(report)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(figure)
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def render_html(report: UsageReport, path: str | Path | None = None) -> str:
    """One self-contained HTML page: the table and the charts (no external resource)."""
    headers, rows = report.table()
    png = base64.b64encode(render_png(report)).decode("ascii")
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    prices = ", ".join(f"{m} ${p:g}/1M tokens" for m, p in sorted(report.prices.items()))
    since = report.since.strftime("%Y-%m-%d %H:%M UTC") if report.since else "the start"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>adapted-embeddings: savings and quality</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}th{{background:#f4f4f4}}
</style></head><body>
<h1>Savings and quality</h1>
<p>From {html.escape(since)} to {html.escape(report.until.strftime("%Y-%m-%d %H:%M UTC"))};
ledger {html.escape(report.ledger)}. Prices: {html.escape(prices or "none known")}.</p>
<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>
<p><img alt="Daily texts by route, cost paid and avoided, audited fidelity"
 src="data:image/png;base64,{png}"></p>
</body></html>
"""
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page


def _pyplot() -> Any:
    require("matplotlib", "report", needed_for="the report's charts (--png, --html)")
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _figure(report: UsageReport) -> Any:
    plt = _pyplot()
    # By day; by hour when the period has under 3 days of traffic (a bar a day says little).
    timeline, unit = (report.daily, "day") if len(report.daily) >= 3 else (report.hourly, "hour")
    days = [d.label for d in timeline]
    x = list(range(len(days)))
    figure, (texts, cost, quality) = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    bottom = [0] * len(days)
    for route, colour in ROUTE_COLOURS.items():
        counts = [getattr(d, route) for d in timeline]
        texts.bar(x, counts, bottom=bottom, color=colour, label=route)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    texts.set_ylabel("texts")
    texts.set_title(f"Texts by route, by {unit} (UTC)")
    texts.legend(loc="upper left", fontsize="small")
    width = 0.4
    paid = [d.cost_paid or 0.0 for d in timeline]
    avoided = [d.cost_avoided or 0.0 for d in timeline]
    cost.bar([i - width / 2 for i in x], paid, width, color="#e76f51", label="paid")
    cost.bar([i + width / 2 for i in x], avoided, width, color="#2a9d8f", label="avoided")
    cost.set_ylabel("USD")
    cost.set_title("Provider cost: paid vs avoided")
    cost.legend(loc="upper left", fontsize="small")
    audited = [(i, d) for i, d in zip(x, timeline, strict=True) if d.fidelity is not None]
    if audited:
        quality.errorbar(
            [i for i, _ in audited],
            [d.fidelity for _, d in audited],
            yerr=[  # clipped: at 0 or 1 the interval's end may differ in the last bit
                [max(0.0, d.fidelity - d.fidelity_low) for _, d in audited],  # type: ignore[operator]
                [max(0.0, d.fidelity_high - d.fidelity) for _, d in audited],  # type: ignore[operator]
            ],
            fmt="o-",
            color="#264653",
            capsize=3,
            label="audited fidelity (95% CI)",
        )
    for hour, adapter in report.switches:
        when = hour[:10] if unit == "day" else hour
        if when in days:
            quality.axvline(days.index(when), color="#999", linestyle="--")
            quality.annotate(
                short_adapter(adapter),
                (days.index(when), 0.02),
                rotation=90,
                fontsize="x-small",
                color="#555",
            )
    quality.set_ylim(0, 1.05)
    quality.set_ylabel("share not poor")
    quality.set_title("Audited quality of the local route (dashed: adapter switch)")
    quality.set_xticks(x, days, rotation=45, ha="right", fontsize="small")
    figure.tight_layout()
    return figure
