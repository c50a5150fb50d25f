"""``GET /v1/usage``, ``GET /dashboard`` and the usage lines of ``/metrics``, on a real server.

The dashboard is loaded in a real browser: Playwright driving Debian's ``chromium`` (its own
browser download is not reachable here), skipped only where no Chromium executable exists.
"""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from adapted_embeddings.server import create_app
from adapted_embeddings.server.config import ServerSettings
from adapted_embeddings.tokens import default_token_counter

from ..server_helpers import ThreadedServer

KEY = "dashboard-test-key"
ADA = "text-embedding-ada-002"
TEXTS = ["The Nile is the longest river in Africa.", "Der Hund bellt laut.", "zxq 8123 !!"]
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    cache = tmp_path_factory.mktemp("usage-server-cache")
    settings = ServerSettings(api_key=SecretStr(KEY))
    app = create_app(settings, model=ADA, mode="local", cache_dir=cache)
    server = ThreadedServer(app)
    server.app = app  # type: ignore[attr-defined]
    yield server
    server.close()


def embed(server: ThreadedServer, texts: list[str]) -> None:
    answer = httpx.post(
        f"{server.base_url}/embeddings",
        json={"model": ADA, "input": texts},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    server.app.state.pipeline.ledger.flush()  # type: ignore[attr-defined]


def usage(server: ThreadedServer, **params: str) -> dict[str, Any]:
    answer = httpx.get(
        f"{server.base_url}/usage", params=params, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def test_usage_endpoint_answers_the_report_behind_the_key(server: ThreadedServer) -> None:
    before = usage(server, since="all")["total"]
    embed(server, TEXTS)
    total = usage(server, since="all")["total"]
    assert total["texts"] - before["texts"] == 3
    assert total["local"] == total["texts"] and total["share_local"] == 1.0

    refused = httpx.get(f"{server.base_url}/usage")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Basic ")
    wrong = httpx.get(f"{server.base_url}/usage", auth=("me", "not-the-key"))
    assert wrong.status_code == 401
    basic = httpx.get(f"{server.base_url}/usage", params={"since": "all"}, auth=("me", KEY))
    assert basic.json()["total"] == total
    bad = httpx.get(f"{server.base_url}/usage", params={"since": "soon"}, auth=("me", KEY)).json()
    assert bad["error"]["param"] == "since" and "since='soon'" in bad["error"]["message"]
    huge = httpx.get(  # past Python's 4,300-digit integer limit, and past the 6 allowed
        f"{server.base_url}/usage", params={"since": "9" * 5000 + "d"}, auth=("me", KEY)
    )
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "since"
    assert len(huge.json()["error"]["message"]) < 300
    garbled = httpx.get(
        f"{server.base_url}/usage",
        headers={"Authorization": "Basic !!" + base64.b64encode(b"x").decode()},
    )
    assert garbled.status_code == 401


def test_metrics_gain_cost_avoided(server: ThreadedServer) -> None:
    embed(server, ["a text only this test sends"])
    total = usage(server, since="all")["total"]
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    value = re.search(r"^adapted_embeddings_cost_avoided_usd_total (\S+)$", metrics, re.M)
    assert value is not None
    assert float(value.group(1)) == pytest.approx(total["avoided_tokens"] * 0.10 / 1e6)
    assert total["avoided_tokens"] >= default_token_counter().count(TEXTS[0])
    assert "adapted_embeddings_audited_quality" not in metrics  # local mode: no audits


def test_dashboard_is_one_offline_page_behind_the_key(server: ThreadedServer) -> None:
    assert httpx.get(f"{server.url}/dashboard").status_code == 401
    page = httpx.get(f"{server.url}/dashboard", auth=("", KEY))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Nothing fetched: no script, style, font or icon but inline ones.
    assert not re.search(r"""\b(src|href)\s*=\s*(?!["']?data:)""", page.text)
    assert "@import" not in page.text and "url(" not in page.text


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium executable (apt-get install chromium)")
def test_dashboard_in_a_real_browser(server: ThreadedServer, tmp_path: Path) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    embed(server, [*TEXTS, "one more text for the browser"])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(http_credentials={"username": "me", "password": KEY})
            page = context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            response = page.goto(f"{server.url}/dashboard")
            assert response is not None and response.status == 200
            page.wait_for_selector("body[data-loaded=true]", timeout=30_000)
            report = usage(server, since="7d")
            total = report["total"]
            shown = {name: page.text_content(f"#{name}") for name in
                     ("texts", "share-local", "tokens", "cost-paid", "cost-avoided", "fidelity",
                      "guard-trips", "adapters")}  # fmt: skip
            assert shown == {
                "texts": str(total["texts"]),
                "share-local": f"{100 * total['share_local']:.1f}%",
                "tokens": str(total["tokens"]),
                "cost-paid": f"{total['cost_paid']:.6f}",
                "cost-avoided": f"{total['cost_avoided']:.6f}",
                "fidelity": "no audits",
                "guard-trips": str(total["guard_trips"]),
                "adapters": ", ".join(total["adapters"]),
            }
            rows = page.locator("#days tr").all_inner_texts()
            assert [r.split("\t")[:2] for r in rows] == [
                [g["label"], str(g["texts"])] for g in report["groups"]
            ]
            assert page.locator("#chart rect").count() == 3 * len(report["hourly"])
            # Live: new traffic shows on the next refresh (here: choosing another period).
            embed(server, ["a text sent while the dashboard is open"])
            page.select_option("#since", "30d")
            page.wait_for_function(
                f"document.getElementById('texts').textContent === '{total['texts'] + 1}'"
            )
            assert problems == []

            # Without the key the browser gets the 401 and its Basic challenge, and (having
            # no credentials to answer with) refuses to show the page.
            anonymous = browser.new_context().new_page()
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                anonymous.goto(f"{server.url}/dashboard")
            assert anonymous.locator("#texts").count() == 0
            refused = anonymous.request.get(f"{server.url}/dashboard")
            assert refused.status == 401 and "texts" not in refused.text()
        finally:
            browser.close()
