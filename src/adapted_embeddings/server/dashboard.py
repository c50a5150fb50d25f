"""``GET /dashboard`` and ``GET /v1/usage``: the usage report, live, on the server.

``/v1/usage?since=7d&by=day`` answers :meth:`UsageReport.as_dict` (the same figures as
``usage_report()`` and ``adapted-embeddings report --json``), read from the ledger every
worker sharing the cache directory writes to. ``/dashboard`` is one static page (inline
CSS, JavaScript and SVG; nothing fetched but ``/v1/usage``) that draws it and refreshes
every 10 seconds.

Both are behind the server's key when one is set. A browser cannot send a bearer token when
it opens a page, so besides ``Authorization: Bearer KEY`` these two routes accept HTTP Basic
with the key as the password (any user name): the 401 asks the browser for it, and it then
sends the same credentials with the page's requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from fastapi import FastAPI, Request
from pydantic import SecretStr
from starlette.responses import HTMLResponse, Response

from adapted_embeddings.errors import InvalidInputError, UsageLedgerError
from adapted_embeddings.pipeline import EmbeddingPipeline
from adapted_embeddings.server.auth import check_bearer
from adapted_embeddings.server.openai_errors import SERVER_ERROR, OpenAIStyleError, bad_request

BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="adapted-embeddings", charset="UTF-8"'}


def add_dashboard(app: FastAPI, pipeline: EmbeddingPipeline, api_key: SecretStr | None) -> None:
    """Add ``GET /dashboard`` and ``GET /v1/usage`` to ``app``."""

    def authorize(request: Request) -> None:
        try:
            check_bearer(_as_bearer(request.headers.get("authorization")), api_key)
        except OpenAIStyleError as exc:
            exc.headers.update(BASIC_CHALLENGE)
            raise

    @app.get("/v1/usage")
    async def usage(request: Request, since: str = "7d", by: str = "day") -> Response:
        authorize(request)
        from adapted_embeddings.usage.report import pipeline_usage_report

        if pipeline.ledger is None:
            raise OpenAIStyleError(
                404,
                "This server keeps no usage ledger (it needs the cache, and "
                "ADAPTED_EMBEDDINGS_USAGE__ENABLED true).",
                code="usage_ledger_off",
            )
        try:
            report = await asyncio.to_thread(
                pipeline_usage_report,
                pipeline,
                since=None if since == "all" else since,
                by=by,  # type: ignore[arg-type]  # checked by the report
            )
        except InvalidInputError as exc:
            param = "by" if str(exc).startswith("by=") else "since"
            raise bad_request(str(exc), param=param) from None
        except UsageLedgerError as exc:
            raise OpenAIStyleError(503, str(exc), type=SERVER_ERROR) from None
        return _json(report.as_dict())

    @app.get("/dashboard")
    async def dashboard(request: Request) -> Response:
        authorize(request)
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})


def _as_bearer(authorization: str | None) -> str | None:
    """``Basic base64(user:KEY)`` as ``Bearer KEY``; anything else unchanged."""
    if not authorization:
        return authorization
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return authorization
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "Bearer "  # refused as an empty key
    return f"Bearer {decoded.partition(':')[2]}"


def _json(body: dict[str, Any]) -> Response:
    import orjson

    return Response(orjson.dumps(body), media_type="application/json")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>adapted-embeddings: savings and quality</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em .9em;min-width:9em}
.card b{display:block;font-size:1.3em}.card span{color:#666;font-size:.85em}
table{border-collapse:collapse;margin-top:1em}td,th{border:1px solid #ddd;padding:.3em .6em;
text-align:right}th{background:#f5f5f5}#error{color:#b00}svg{max-width:100%}
.local{fill:#2a9d8f}.cache{fill:#8ab17d}.provider{fill:#e76f51}
</style></head><body>
<h1>Savings and quality</h1>
<p>Period: <select id="since"><option value="24h">24 hours</option>
<option value="7d" selected>7 days</option><option value="30d">30 days</option>
<option value="all">everything</option></select>
<span id="updated"></span> <span id="error"></span></p>
<div class="cards">
<div class="card"><b id="texts">-</b><span>texts</span></div>
<div class="card"><b id="share-local">-</b><span>share local</span></div>
<div class="card"><b id="tokens">-</b><span>tokens</span></div>
<div class="card"><b id="cost-paid">-</b><span>cost paid (USD)</span></div>
<div class="card"><b id="cost-avoided">-</b><span>cost avoided (USD)</span></div>
<div class="card"><b id="fidelity">-</b><span>audited fidelity, 95% CI</span></div>
<div class="card"><b id="guard-trips">-</b><span>guard trips</span></div>
<div class="card"><b id="adapters">-</b><span>adapters</span></div>
</div>
<p id="prices"></p>
<svg id="chart" width="720" height="200" role="img" aria-label="texts by route"></svg>
<table><thead><tr><th>day</th><th>texts</th><th>local</th><th>cache</th><th>provider</th>
<th>tokens</th><th>paid $</th><th>avoided $</th><th>audited fidelity</th>
<th>guard trips</th></tr></thead><tbody id="days"></tbody></table>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const money = (v) => v === null ? "n/a" : v.toFixed(6);
const share = (v) => v === null ? "-" : (100 * v).toFixed(1) + "%";
function fidelity(f) {
  if (f.fidelity === null) return "no audits";
  return f.fidelity.toFixed(3) + " [" + f.fidelity_low.toFixed(3) + ", " +
    f.fidelity_high.toFixed(3) + "] n=" + f.audits;
}
function cell(row, text) {
  const td = document.createElement("td"); td.textContent = text; row.appendChild(td);
}
function chart(lines) {
  const svg = $("chart"), ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const top = Math.max(1, ...lines.map((l) => l.texts));
  const width = 720 / Math.max(lines.length, 1);
  lines.forEach((line, i) => {
    let y = 180;
    for (const route of ["local", "cache", "provider"]) {
      const h = 170 * line[route] / top;
      const bar = document.createElementNS(ns, "rect");
      bar.setAttribute("x", i * width + 2); bar.setAttribute("width", Math.max(width - 4, 1));
      bar.setAttribute("y", y - h); bar.setAttribute("height", h);
      bar.setAttribute("class", route);
      const title = document.createElementNS(ns, "title");
      title.textContent = line.label + " " + route + ": " + line[route];
      bar.appendChild(title); svg.appendChild(bar); y -= h;
    }
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", i * width + 2); label.setAttribute("y", 196);
    label.setAttribute("font-size", "10"); label.textContent = line.label;
    svg.appendChild(label);
  });
}
async function refresh() {
  const response = await fetch("/v1/usage?since=" + $("since").value + "&by=day",
                               {credentials: "same-origin"});
  if (!response.ok) {
    $("error").textContent = "the server answered " + response.status;
    return;
  }
  const report = await response.json(), total = report.total;
  $("error").textContent = "";
  $("texts").textContent = total.texts;
  $("share-local").textContent = share(total.share_local);
  $("tokens").textContent = total.tokens;
  $("cost-paid").textContent = money(total.cost_paid);
  $("cost-avoided").textContent = money(total.cost_avoided);
  $("fidelity").textContent = fidelity(total);
  $("guard-trips").textContent = total.guard_trips;
  $("adapters").textContent = total.adapters.join(", ") || "-";
  const prices = Object.entries(report.prices_per_million_tokens)
    .map(([model, price]) => model + " $" + price + " per 1M tokens");
  $("prices").textContent = "Prices: " + (prices.join(", ") || "none known") +
    (report.unpriced_models.length ? "; no price for " + report.unpriced_models.join(", ") : "");
  const body = $("days");
  body.replaceChildren();
  for (const g of report.groups) {
    const row = document.createElement("tr");
    [g.label, g.texts, g.local, g.cache, g.provider, g.tokens, money(g.cost_paid),
     money(g.cost_avoided), fidelity(g), g.guard_trips].forEach((v) => cell(row, String(v)));
    body.appendChild(row);
  }
  chart(report.daily.length >= 3 ? report.daily : report.hourly);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  document.body.dataset.loaded = "true";
}
const run = () => refresh().catch((e) => { $("error").textContent = String(e); });
$("since").addEventListener("change", run);
run();
setInterval(run, 10000);
</script>
</body></html>
"""
