"""The savings and quality report: the ledger's rows added up by day or by adapter.

The same figures everywhere: ``usage_report()`` on both integrations returns a
:class:`UsageReport`, ``adapted-embeddings report`` prints it (or its JSON, or charts), and
the server's ``GET /v1/usage`` answers its :meth:`UsageReport.as_dict`.

* **texts**: inputs answered, by route (``local``, ``cache``, ``provider``, ...);
* **tokens**: the provider's own count for the texts it embedded (*paid*), and the
  provider tokenizer's count for those it did not (local and cache: *avoided*);
* **cost paid / avoided**: those tokens at the model's price (:mod:`.prices`);
* **audited fidelity**: the share of audited texts whose local vector was not *poor*
  (agreement at or above the adapter's calibrated ``poor_below``), with its 95% Wilson
  interval; audits are a uniform sample of the local route, so this estimates all of it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

from adapted_embeddings.errors import ConfigurationError, InvalidInputError
from adapted_embeddings.learning.fidelity import wilson_interval
from adapted_embeddings.settings_check import variable_name
from adapted_embeddings.usage.ledger import DAY, EVENTS, LedgerStore, UsageRow
from adapted_embeddings.usage.prices import dollars, model_of, price_of, price_table

if TYPE_CHECKING:
    from adapted_embeddings.pipeline import EmbeddingPipeline

GroupBy = Literal["day", "adapter"]
_SINCE = re.compile(r"^\s*(\d{1,6})\s*([hdw])\s*$")
"""A period back from now: at most 6 digits (999,999 weeks), so a query string cannot ask for
an integer Python refuses to read (over 4,300 digits)."""
_UNITS = {"h": 3600, "d": DAY, "w": 7 * DAY}


@dataclass(frozen=True)
class UsageFigures:
    """One line of the report: a day, an adapter, or the whole period."""

    label: str
    texts: int = 0
    local: int = 0
    cache: int = 0
    provider: int = 0
    degraded: int = 0
    failed: int = 0
    provider_texts: int = 0
    provider_requests: int = 0
    paid_tokens: int = 0
    avoided_tokens: int = 0
    cost_paid: float | None = 0.0
    cost_avoided: float | None = 0.0
    audits: int = 0
    audit_passes: int = 0
    mean_agreement: float | None = None
    fidelity: float | None = None
    fidelity_low: float | None = None
    fidelity_high: float | None = None
    guard_trips: int = 0
    adapter_switches: int = 0
    adapters: list[str] = field(default_factory=list)

    @property
    def share_local(self) -> float | None:
        """Share of texts answered by the adapter (None when there were none)."""
        return self.local / self.texts if self.texts else None

    @property
    def tokens(self) -> int:
        """Paid and avoided tokens together."""
        return self.paid_tokens + self.avoided_tokens


@dataclass(frozen=True)
class UsageReport:
    """The ledger's figures since a time, grouped by day or adapter, with the prices used."""

    since: datetime | None
    until: datetime
    by: GroupBy
    ledger: str
    prices: dict[str, float]
    """USD per 1M tokens, for every model in the period that has a price."""
    unpriced: list[str]
    """Models in the period with no price (their costs are None): set ``usage.prices``."""
    total: UsageFigures
    groups: list[UsageFigures]
    daily: list[UsageFigures]
    """Always by day, oldest first (what the charts draw)."""
    hourly: list[UsageFigures]
    """By hour, oldest first (the charts draw these when the period covers under 3 days)."""
    switches: list[tuple[str, str]]
    """(hour, adapter) of every adapter switch in the period, oldest first."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every figure, plus ``share_local`` and ``tokens`` of each line."""

        def line(figures: UsageFigures) -> dict[str, Any]:
            return {**asdict(figures), "share_local": figures.share_local, "tokens": figures.tokens}

        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat(),
            "by": self.by,
            "ledger": self.ledger,
            "prices_per_million_tokens": self.prices,
            "unpriced_models": self.unpriced,
            "total": line(self.total),
            "groups": [line(g) for g in self.groups],
            "daily": [line(d) for d in self.daily],
            "hourly": [line(h) for h in self.hourly],
            "adapter_switches": [{"hour": h, "adapter": a} for h, a in self.switches],
        }

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and rows for a terminal table (one row per group, then the total)."""
        headers = [
            self.by,
            "texts",
            "local",
            "cache",
            "provider",
            "tokens",
            "paid $",
            "avoided $",
            "audited fidelity (95% CI, n)",
            "guard trips",
            "adapters",
        ]
        rows = [_table_row(g, self.by) for g in self.groups]
        if len(self.groups) != 1:
            rows.append(_table_row(self.total, self.by))
        return headers, rows


def parse_since(
    since: str | timedelta | datetime | None, *, now: float | None = None
) -> float | None:
    """Epoch seconds of ``since``: '7d', '24h', '2w', a timedelta back from now, a datetime.

    Raises:
        InvalidInputError: Naming the value and the accepted forms.

    """
    now = time.time() if now is None else now
    if since is None:
        return None
    if isinstance(since, datetime):
        return (since if since.tzinfo else since.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(since, timedelta):  # past 1970: everything the ledger holds (it starts later)
        return max(0.0, now - since.total_seconds())
    match = _SINCE.match(since) if isinstance(since, str) else None
    if match is None:
        shown = repr(since) if len(repr(since)) <= 40 else repr(since)[:37] + "..."
        raise InvalidInputError(
            f"since={shown} is not a period: give a number of at most 6 digits and a unit, "
            "e.g. '24h', '7d' or '2w' (or a datetime / timedelta from Python)"
        )
    return max(0.0, now - int(match.group(1)) * _UNITS[match.group(2)])


def build_report(
    store: LedgerStore,
    *,
    since: str | timedelta | datetime | None = "7d",
    by: GroupBy = "day",
    prices: Mapping[str, float] | None = None,
    now: float | None = None,
) -> UsageReport:
    """Add up the ledger's rows since ``since`` (None: everything), grouped ``by``.

    Raises:
        InvalidInputError: If ``since`` or ``by`` is not one of the accepted forms.
        UsageLedgerError: If the ledger cannot be read.

    """
    if by not in ("day", "adapter"):
        raise InvalidInputError(f"by={by!r}: group by 'day' or 'adapter'")
    start = parse_since(since, now=now)
    until = time.time() if now is None else now
    rows = store.rows(since=None if start is None else start - start % 3600)
    table = price_table(prices)
    spaces = sorted({r.space for r in rows})
    used = {model_of(s): p for s in spaces if (p := price_of(s, table)) is not None}
    unpriced = sorted({model_of(s) for s in spaces} - used.keys())

    def group(key: Callable[[UsageRow], str]) -> list[UsageFigures]:
        grouped: dict[str, list[UsageRow]] = {}
        for r in rows:  # one pass: the hourly groups of a long ledger are thousands
            grouped.setdefault(key(r), []).append(r)
        return [_figures(k, grouped[k], table) for k in sorted(grouped)]

    daily = group(lambda r: _day(r.start))
    return UsageReport(
        since=None if start is None else datetime.fromtimestamp(start, timezone.utc),
        until=datetime.fromtimestamp(until, timezone.utc),
        by=by,
        ledger=store.location,
        prices=used,
        unpriced=unpriced,
        total=_figures("total", rows, table),
        groups=daily if by == "day" else group(lambda r: r.adapter),
        daily=daily,
        hourly=group(lambda r: _hour(r.start)),
        switches=[(_hour(r.start), r.adapter) for r in rows if r.adapter_switches],
    )


def _figures(label: str, rows: Iterable[UsageRow], table: Mapping[str, float]) -> UsageFigures:
    rows = list(rows)
    routes: dict[str, int] = {}
    for r in rows:
        routes[r.route] = routes.get(r.route, 0) + r.texts
    paid = [r for r in rows if r.route == "provider"]
    avoided = [r for r in rows if r.route in ("local", "cache")]
    audits = sum(r.audits for r in rows)
    passes = sum(r.audit_passes for r in rows)
    low, high = wilson_interval(passes, audits) if audits else (None, None)
    return UsageFigures(
        label=label,
        texts=sum(r.texts for r in rows if r.route != EVENTS),
        local=routes.get("local", 0),
        cache=routes.get("cache", 0),
        provider=routes.get("provider", 0),
        degraded=routes.get("local_degraded", 0),
        failed=sum(r.failed for r in rows),
        provider_texts=sum(r.provider_texts for r in rows),
        provider_requests=sum(r.provider_requests for r in rows),
        paid_tokens=sum(r.tokens for r in paid),
        avoided_tokens=sum(r.tokens for r in avoided),
        cost_paid=_cost(paid, table),
        cost_avoided=_cost(avoided, table),
        audits=audits,
        audit_passes=passes,
        mean_agreement=sum(r.agreement_sum for r in rows) / audits if audits else None,
        fidelity=passes / audits if audits else None,
        fidelity_low=low,
        fidelity_high=high,
        guard_trips=sum(r.guard_trips for r in rows),
        adapter_switches=sum(r.adapter_switches for r in rows),
        adapters=sorted({r.adapter for r in rows if r.route != EVENTS or r.adapter_switches}),
    )


def _cost(rows: list[UsageRow], table: Mapping[str, float]) -> float | None:
    total = 0.0
    for r in rows:
        cost = dollars(r.tokens, price_of(r.space, table))
        if cost is None:
            if r.tokens:
                return None  # a model with no price: the sum would be wrong
            continue
        total += cost
    return total


def _day(start: int) -> str:
    return datetime.fromtimestamp(start - start % DAY, timezone.utc).strftime("%Y-%m-%d")


def _hour(start: int) -> str:
    return datetime.fromtimestamp(start, timezone.utc).strftime("%Y-%m-%d %H:00")


def _money(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f}"


def short_adapter(adapter_id: str) -> str:
    """'name:<sha256 of the weights>' shown as 'name:<first 8 hex digits>'."""
    name, _, digest = adapter_id.partition(":")
    return f"{name}:{digest[:8]}" if digest else name


def _table_row(g: UsageFigures, by: GroupBy) -> list[str]:
    share = "" if g.share_local is None else f" ({g.share_local:.0%})"
    fidelity = "no audits"
    if g.fidelity is not None:
        fidelity = f"{g.fidelity:.3f} [{g.fidelity_low:.3f}, {g.fidelity_high:.3f}] n={g.audits}"
    return [
        short_adapter(g.label) if by == "adapter" and g.label != "total" else g.label,
        str(g.texts),
        f"{g.local}{share}",
        str(g.cache),
        str(g.provider),
        str(g.tokens),
        _money(g.cost_paid),
        _money(g.cost_avoided),
        fidelity,
        str(g.guard_trips),
        ", ".join(map(short_adapter, g.adapters)) or "-",
    ]


def pipeline_usage_report(
    pipeline: EmbeddingPipeline,
    *,
    since: str | timedelta | datetime | None = "7d",
    by: GroupBy = "day",
) -> UsageReport:
    """The report of ``pipeline``'s ledger (flushed first, so it includes the last call).

    Raises:
        ConfigurationError: If the pipeline keeps no ledger (no cache, or usage off).

    """
    ledger = pipeline.ledger
    if ledger is None:
        raise ConfigurationError(
            "usage_report() reads the usage ledger, which lives beside the cache: turn the "
            f"cache on and keep {variable_name('usage', 'enabled')} true"
        )
    ledger.flush()
    return build_report(ledger.store, since=since, by=by, prices=ledger.prices)
