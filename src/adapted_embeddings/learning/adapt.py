"""``adapt()``: fit a domain adapter from the pairs the provider was already paid for.

What it aims at is the user's **fidelity target** (``learning.fidelity_target``, default
0.9): the share of native retrieval quality the returned vectors keep on the user's own
data, as defined in :mod:`adapted_embeddings.learning.fidelity`. The threshold it chooses is
the lowest call rate whose fidelity meets the target, measured on pairs the judged adapter
was not fitted on.

Before anything is fitted, the provider's vectors are checked
(:mod:`adapted_embeddings.learning.plausibility`): a provider that answers in the wrong space
(a constant vector, a rotated or another model's space, vectors of the wrong texts) is
never learned from; the pairs are marked suspect and the current adapter is kept.

The fit (warm start, an adapter exists). The parent's encoder and residual MLP are kept, so
the new adapter computes the same basis coefficients ``c(x)``; when the parent's basis is
narrower than its input, it is widened with the principal directions of the user's sources,
so the map can move where the parent could not. Only the decoder is refitted, in closed form:

    min  |C_user D - Y_user|^2  +  w |C_old (D - D_parent)|^2  +  l |D - D_prior|^2

The middle term keeps it from forgetting: ``C_old`` are coefficients of samples drawn from
the parent's recorded training distribution (the Gaussian of its OOD subspace), on which
the new decoder must reproduce the parent's outputs (distillation). The ridge ``l`` and the
replay weight ``w`` (the parent's, a quarter of it, or none: a domain far from the parent's
is better fitted without it) are chosen on an inner split. The OOD subspace and gate (the
*novelty* term: texts unlike anything learned from score low) are refitted on the sources
learned from, and the quality head on the user's pairs by cross-fitting: its target is
whether each pair, translated by a decoder that never saw it, kept its native nearest
neighbour in the top 10, i.e. the fidelity measure itself.

Cold start (no adapter yet): the same fit from a blank adapter whose basis is the source
space itself, i.e. a ridge map from the pairs alone, usable from :data:`MIN_ADAPT_PAIRS`.

Calibration and the decision. Every pair is scored out of fold: the fit is repeated
``folds`` times, each time without one fold, which is then translated and scored; the
candidate is the first of those fits, and its threshold is read off its own held-out fold
at the share routed that the pooled scores chose. Every pair counts for the traffic it
stands for (:func:`~adapted_embeddings.learning.fidelity.traffic_weights`), in an index of
``learning.index_size`` vectors. The candidate is used **only if it is better** than the
current adapter on the same pairs (which the current adapter never learned from): a lower
call rate at the fidelity target, or a routing curve higher on average. The report says
why when it is not.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.adapter.manifest import AdapterManifest, ArchitectureConfig
from adapted_embeddings.adapter.network import (
    centred_cosine_rows,
    expected_shapes,
    gelu,
    l2_normalize,
    prepare,
    translate_with_features,
)
from adapted_embeddings.errors import AdaptationError
from adapted_embeddings.learning.fidelity import (
    FidelityCurve,
    FidelityPoint,
    index_weights,
    neighbour_hits,
    routing_threshold,
    traffic_call_rate,
    traffic_weights,
    wilson_interval,
)
from adapted_embeddings.learning.lineage import LINEAGE_KEY, lineage
from adapted_embeddings.learning.memory import NEIGHBOURS, TEMPERATURE, fit_memory
from adapted_embeddings.learning.pairs import MAX_LOCAL_SOURCES, PairSet, PairStore
from adapted_embeddings.learning.plausibility import ProviderCheck, check_provider_vectors
from adapted_embeddings.settings import LearningSettings
from adapted_embeddings.spaces import EmbeddingSpace

logger = logging.getLogger(__name__)

_RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
_REPLAY_SHARES = (1.0, 0.25, 0.0)
_SHA_PLACEHOLDER = "0" * 64
CURVE_SHARES = (0.0, 0.1, 0.2, 0.3, 0.5)
_ROWS_PER_OOD_DIRECTION = 10

MIN_ADAPT_PAIRS = 100
"""Fewest stored pairs ``adapt()`` accepts, warm or cold start: the one minimum.

From 100 pairs the fit is a ridge map (warm-started from the parent where there is one);
with fewer, the out-of-fold calibration has too few texts to say anything about fidelity.
"""


@dataclass(frozen=True)
class AdaptOptions:
    """How :func:`adapt` fits and judges a domain adapter."""

    min_pairs: int = MIN_ADAPT_PAIRS
    """Fewest stored pairs accepted."""
    fidelity_target: float | None = None
    """Share of native retrieval quality wanted (None: ``learning.fidelity_target``)."""
    replay_weight: float = 0.5
    """Largest weight of not forgetting (the parent's outputs on its own domain)."""
    replay_samples: int = 2000
    """Samples drawn from the parent's training distribution for that term."""
    folds: int = 4
    """Cross-fitting folds, for the quality head and for the out-of-fold calibration."""
    min_gain: float = 0.01
    """How much lower the call rate at the target (or higher the fidelity at 0% routed) the
    candidate must reach to be used."""
    memory: bool = True
    """Remember the newest pairs (up to ``MEMORY_ROWS``): their neighbours correct each
    translation and sharpen its confidence (:mod:`adapted_embeddings.adapter.memory`)."""
    seed: int = 0
    save: bool = True
    """Write the adapter to the adapter directory (needed for new instances to find it)."""


@dataclass(frozen=True)
class HeldOutQuality:
    """An adapter judged on pairs it was not fitted on, at the threshold chosen for it."""

    fidelity: float
    """Share of native retrieval quality kept at ``threshold`` (R@10, see ``fidelity``)."""
    fidelity_low: float
    """Lower end of the 95% interval of ``fidelity`` (the threshold's own uncertainty in)."""
    fidelity_high: float
    """Upper end of the 95% interval of ``fidelity``."""
    fallback_rate: float
    """Share of the traffic the threshold sends to the provider: counted on the pairs and
    the unpaid local texts where the store keeps them, else on the weighted pairs."""
    fallback_rate_low: float
    """Lower end of the 95% interval of the share new traffic will route at ``threshold``."""
    fallback_rate_high: float
    """Upper end of that interval."""
    threshold: float
    """The lowest threshold meeting the fidelity target (1.0: no local route meets it)."""
    neighbour_agreement_at_10: float
    """Fidelity at 0% routed: every text local."""
    mean_centred_cosine: float
    """Agreement with the provider's vectors at 0% routed."""
    local_route_quality: float
    """Mean centred cosine of the texts the threshold keeps local."""
    routing_curve: dict[str, float]
    """Fidelity when the least confident 0%, 10%, 20%, 30% and 50% are routed."""
    judged: int
    """Number of texts judged."""


@dataclass
class AdaptationReport:
    """What :func:`adapt` did, and why."""

    switched: bool
    reason: str
    pairs_used: int
    fidelity_target: float
    parent: str | None
    before: HeldOutQuality | None
    after: HeldOutQuality | None
    threshold: float | None
    expected_fallback_rate: float | None
    quality_floor: float | None
    provider_check: dict[str, Any] | None
    path: Path | None
    seconds: float
    adapter: Adapter | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (without the adapter object)."""
        data = asdict(self)
        data.pop("adapter")
        data["path"] = None if self.path is None else str(self.path)
        return data

    def summary(self) -> str:
        """One human line."""
        after = self.after
        if after is None:
            return f"not adapted: {self.reason}"
        before = f"{_short(self.before)} -> " if self.before is not None else "new adapter: "
        verdict = "switched to" if self.switched else "kept the current adapter, not"
        return (
            f"{verdict} {self.path.name if self.path else 'the candidate'} "
            f"({self.pairs_used} pairs; target fidelity {self.fidelity_target:.2f}: "
            f"{before}{_short(after)}): {self.reason}"
        )


def _short(quality: HeldOutQuality) -> str:
    routed = f"{quality.fallback_rate:.0%}"
    if quality.fallback_rate_low < quality.fallback_rate_high:
        routed += f" [{quality.fallback_rate_low:.0%}, {quality.fallback_rate_high:.0%}]"
    return (
        f"{quality.fidelity:.3f} [{quality.fidelity_low:.3f}, {quality.fidelity_high:.3f}] "
        f"at {routed} routed"
    )


def adapted_adapter_dir(settings: LearningSettings, cache_directory: Path) -> Path:
    """Where adapted adapters are saved: the setting, else ``<cache dir>/adapters``."""
    return (settings.adapter_dir or cache_directory / "adapters").expanduser()


def builtin_target_mean(target: EmbeddingSpace) -> np.ndarray | None:
    """The mean target vector a bundled adapter for ``target`` recorded, if one exists.

    Bundled adapters ship inside the package and were fitted on the real provider's vectors,
    so their mean is a trusted reference for the provider check.
    """
    from adapted_embeddings.registry import list_adapters

    for entry in list_adapters(target=target):
        if entry.builtin and entry.manifest.target == target:
            return Adapter.load(entry.path).target_mean
    return None


def adapt(
    store: PairStore,
    *,
    parent: Adapter | None,
    source: EmbeddingSpace,
    target: EmbeddingSpace,
    settings: LearningSettings,
    options: AdaptOptions | None = None,
    adapter_dir: Path | None = None,
    parent_thresholds: dict[str, float] | None = None,
    parent_trusted: bool = True,
    reference_mean: np.ndarray | None = None,
) -> AdaptationReport:
    """Fit a domain adapter from the stored pairs of (source, target).

    Args:
        store: The pair store.
        parent: The adapter in use (warm start), or None (cold start).
        source: The local model's space.
        target: The provider's space.
        settings: Learning settings (the fidelity target, the adapter directory).
        options: Fitting options.
        adapter_dir: Overrides where the adapter is saved.
        parent_trusted: False when audits found the parent wanting on this data (the guard
            tripped): it is then not distilled from, and the decoder is refitted from the
            pairs alone (ridge toward zero), keeping only its encoder.
        parent_thresholds: The parent's thresholds in force, per role (the guard's raise
            included). The new adapter records them, so the parent's accepted local vectors
            keep being served from the cache (see ``ancestors`` in :func:`lineage`).
        reference_mean: The mean target vector of a trusted adapter for ``target``, for the
            provider check; default: a bundled adapter's (:func:`builtin_target_mean`), else
            the parent's when trusted.

    Returns:
        The report; ``report.adapter`` is the new adapter when ``report.switched``.

    Raises:
        AdaptationError: Fewer than ``options.min_pairs`` stored pairs, or the adapter
            cannot be saved.
        PairStoreError: The store cannot be read (naming the bad rows, if any).

    """
    options = options or AdaptOptions()
    goal = options.fidelity_target or settings.fidelity_target
    started = time.perf_counter()
    pairs = store.load(source=source, target=target)
    if len(pairs) < options.min_pairs:
        raise AdaptationError(
            f"adapt() needs at least {options.min_pairs} stored pairs for {source.id} -> "
            f"{target.id}, the store has {len(pairs)}; embed more texts in hybrid mode first "
            "(every provider call adds pairs)"
        )
    trusted = parent is not None and parent_trusted
    if reference_mean is None:
        reference_mean = builtin_target_mean(target)
    if reference_mean is None and trusted:
        assert parent is not None
        reference_mean = parent.target_mean
    check = check_provider_vectors(pairs.source, pairs.target, reference_mean, seed=options.seed)
    report = AdaptationReport(
        switched=False,
        reason="",
        pairs_used=len(pairs),
        fidelity_target=goal,
        parent=None if parent is None else parent.name,
        before=None,
        after=None,
        threshold=None,
        expected_fallback_rate=None,
        quality_floor=None,
        provider_check=asdict(check),
        path=None,
        seconds=0.0,
    )
    if not check.plausible:
        return _refuse(report, check, store, pairs, started)

    base = (
        parent if parent is not None else _blank_adapter(pairs.source, pairs.target, source, target)
    )
    weights = traffic_weights(pairs, settings)
    judged_in = index_weights(weights, settings.index_size)
    traffic = _traffic_sample(store, pairs, source, target)
    candidate, after, floor = _fit_and_calibrate(
        base, pairs, weights, judged_in, options, trusted, goal, traffic, cold=parent is None
    )
    before = None
    if parent is not None:
        translated, confidence = parent.translate(pairs.source)
        # Where the guard tripped, the parent's own confidence was refuted: its call rate is
        # what the guard imposes (often everything), not what its scores would suggest.
        in_force = max((parent_thresholds or {}).values(), default=0.0) if not trusted else 0.0
        before = _judge(
            translated,
            confidence,
            pairs,
            weights,
            judged_in,
            base.target_mean,
            goal,
            at_least=in_force,
        )
        unpaid, in_window = traffic
        if len(unpaid) and in_window.any():
            before = _counted_on_traffic(
                before, confidence[in_window], 1.0, parent.translate(unpaid)[1]
            )
    report.before, report.after = before, after
    report.threshold, report.expected_fallback_rate = after.threshold, after.fallback_rate
    report.quality_floor = floor[0]
    better, report.reason = _verdict(before, after, options.min_gain)
    if better:
        adapter = _finalise(candidate, parent, floor, report, options.seed, parent_thresholds)
        if options.save:
            directory = adapter_dir or adapted_adapter_dir(settings, store.directory)
            report.path = _save(adapter, directory, source, target, settings.keep_adapters)
        report.adapter = adapter
        report.switched = True
    report.seconds = round(time.perf_counter() - started, 2)
    logger.info("adapt(): %s", report.summary())
    return report


def _refuse(
    report: AdaptationReport,
    check: ProviderCheck,
    store: PairStore,
    pairs: PairSet,
    started: float,
) -> AdaptationReport:
    """Keep the current adapter and mark the pairs, when the provider looks wrong."""
    marked = store.mark_suspect(pairs.ids)
    report.reason = (
        f"{check.summary()}. The current adapter is kept, and the {marked} pairs are marked "
        "suspect: never learned from, kept for inspection (PairStore.drop_suspect() or "
        "`adapted-embeddings pairs clear` removes them). Check the provider's base_url and model"
    )
    report.seconds = round(time.perf_counter() - started, 2)
    logger.warning("adapt() refused to learn: %s", report.reason)
    return report


def _traffic_sample(
    store: PairStore, pairs: PairSet, source: EmbeddingSpace, target: EmbeddingSpace
) -> tuple[np.ndarray, np.ndarray]:
    """The unpaid local texts' source vectors, and which pairs are of the same stretch of traffic.

    Both are bounded, oldest first out: where either has lost its oldest rows, only what
    came after the later of the two first rows is counted, so the paid and the unpaid texts
    are of the same traffic.
    """
    unpaid, created = store.local_sources(source=source, target=target)
    since = 0.0
    if len(unpaid) >= MAX_LOCAL_SOURCES:
        since = float(created.min())
    if len(pairs) >= store.max_pairs:
        since = max(since, float(pairs.created.min()))
    return unpaid[created >= since], pairs.created >= since


def _counted_on_traffic(
    quality: HeldOutQuality, paid: np.ndarray, paid_weight: float, unpaid: np.ndarray
) -> HeldOutQuality:
    """``quality`` with the call rate at its threshold counted on the traffic's texts."""
    rate, low, high = traffic_call_rate(paid, paid_weight, unpaid, quality.threshold)
    return replace(quality, fallback_rate=rate, fallback_rate_low=low, fallback_rate_high=high)


def _fit_and_calibrate(
    base: Adapter,
    pairs: PairSet,
    weights: np.ndarray,
    judged_in: np.ndarray,
    options: AdaptOptions,
    trusted: bool,
    goal: float,
    traffic: tuple[np.ndarray, np.ndarray],
    *,
    cold: bool,
) -> tuple[Adapter, HeldOutQuality, tuple[float, float]]:
    """Fit ``folds`` times, each without one fold; choose the threshold on the held-out scores.

    The candidate is the first of those fits: its threshold is then calibrated on scores of
    the same procedure, at the same training size, on texts it did not see. (A final fit on
    every pair scores new texts on a different scale than its own training pairs, and than
    the fold fits; measured, the call rate it gave missed the calibrated one by 40 points.)
    Where the store kept the unpaid local texts (``traffic``, :func:`_traffic_sample`), the
    call rate at that threshold is counted on them and on the held-out fold, which stands
    for every pair: the pairs alone know the texts kept local only through the audits.

    Returns:
        The candidate, the out-of-fold quality at the chosen threshold, and the quality floor
        of its local route (mean centred cosine, 10th percentile) for the guard.

    """
    rng = np.random.default_rng(options.seed + 7)
    folds = rng.permutation(len(pairs)) % options.folds
    translated = np.empty_like(pairs.target)
    confidence = np.empty(len(pairs), dtype=np.float32)
    models: list[Adapter] = []
    for fold in range(options.folds):
        held = folds == fold
        hyper = _hyper(models[0]) if models else None
        train = np.flatnonzero(~held)
        # A cold start's blank base is each fold's own, so nothing of the held-out fold leaks.
        fold_base = (
            _blank_adapter(pairs.source[train], pairs.target[train], base.source, base.target)
            if cold
            else base
        )
        model = _fit(
            fold_base,
            pairs,
            train,
            options,
            trusted=trusted,
            traffic=weights[train],
            judged_in=judged_in[train],
            hyper=hyper,
        )
        translated[held], confidence[held] = model.translate(pairs.source[held])
        models.append(model)
    # Each fold's scores are on its own model's scale: pool them as within-fold ranks, then
    # read the candidate's threshold off its own held-out fold at the chosen share.
    ranks = np.empty(len(pairs), dtype=np.float32)
    for fold in range(options.folds):
        held = np.flatnonzero(folds == fold)
        ranks[held] = (np.argsort(np.argsort(confidence[held])) + 0.5) / len(held)
    first = folds == 0
    # The candidate's threshold is read off the scores of fold 0 alone, a sample of a quarter
    # of the pairs (default): the share it will route is known only that well, and the interval
    # of the predicted fidelity must carry that too (measured: a threshold read off 78 texts
    # routed 60% of new traffic for a predicted 66%, and fidelity 0.84 for 0.90).
    weights_first = weights[first]
    calibrated_on = float(weights_first.sum() ** 2 / (weights_first**2).sum())
    after = _judge(
        translated,
        ranks,
        pairs,
        weights,
        judged_in,
        base.target_mean,
        goal,
        calibrated_on=calibrated_on,
    )
    quality = centred_cosine_rows(translated, pairs.target, base.target_mean)
    local = ranks >= after.threshold
    kept = local if local.any() else np.ones(len(pairs), dtype=bool)
    floor = (
        float(np.average(quality[kept], weights=weights[kept])),  # as the traffic meets it
        float(np.percentile(quality[kept], 10)),
    )
    threshold = min(routing_threshold(confidence[first], weights[first], after.fallback_rate), 1.0)
    after = replace(after, threshold=threshold)
    unpaid, in_window = traffic
    calibration = first & in_window
    if len(unpaid) and calibration.any():
        paid_weight = float(in_window.sum()) / float(calibration.sum())
        after = _counted_on_traffic(
            after, confidence[calibration], paid_weight, models[0].translate(unpaid)[1]
        )
    return models[0], after, floor


def _hyper(model: Adapter) -> tuple[float, float]:
    """The (ridge, replay share) a fit chose, to repeat it on the other folds."""
    return float(model.manifest.training["ridge"]), float(model.manifest.training["replay_share"])


def _judge(
    translated: np.ndarray,
    confidence: np.ndarray,
    pairs: PairSet,
    weights: np.ndarray,
    judged_in: np.ndarray,
    mean: np.ndarray,
    goal: float,
    *,
    at_least: float = 0.0,
    calibrated_on: float | None = None,
) -> HeldOutQuality:
    """Fidelity of these (out-of-fold) vectors and scores, in the index of all the pairs.

    The threshold is the lowest meeting ``goal``, or ``at_least`` where that is higher.
    ``calibrated_on``: the (effective) number of texts the deployed threshold is read off,
    when that is an estimate; the routed share then gets its 95% interval, and the fidelity
    interval spans the curve's intervals across it.
    """
    rows = np.arange(len(pairs))
    hits = neighbour_hits(translated, pairs.target, pairs.target, rows, judged_in)
    curve = FidelityCurve(confidence, hits, weights)
    point: FidelityPoint = curve.threshold_for(goal)
    if at_least > point.threshold:
        point = curve.at(at_least)
    low, high = point.low, point.high
    routed_low = routed_high = point.routed
    if calibrated_on and 0.0 < point.routed < 1.0:
        routed_low, routed_high = wilson_interval(point.routed * calibrated_on, calibrated_on)
        low = min(low, curve.at_share(routed_low).low)
        high = max(high, curve.at_share(routed_high).high)
    quality = centred_cosine_rows(translated, pairs.target, mean)
    local = confidence >= point.threshold
    curve_points = {f"{p.routed:.2f}": p.fidelity for p in curve.table(CURVE_SHARES)}
    return HeldOutQuality(
        fidelity=point.fidelity,
        fidelity_low=low,
        fidelity_high=high,
        fallback_rate=point.routed,
        fallback_rate_low=routed_low,
        fallback_rate_high=routed_high,
        threshold=float(min(point.threshold, 1.0)),
        neighbour_agreement_at_10=curve.at(0.0).fidelity,
        mean_centred_cosine=float(quality.mean()),
        local_route_quality=float(quality[local].mean()) if local.any() else float("nan"),
        routing_curve=curve_points,
        judged=len(pairs),
    )


def _verdict(
    before: HeldOutQuality | None, after: HeldOutQuality, min_gain: float
) -> tuple[bool, str]:
    """Whether the candidate is better than the current adapter, and why (not).

    Better means a lower call rate at the fidelity target, or a routing curve that is higher
    on average (fidelity at 0-50% routed): near a strict target a few texts decide the call
    rate, while the curve's mean uses every judged text.
    """
    if before is None:
        return True, "no adapter existed for this pair of spaces (cold start)"
    saved = before.fallback_rate - after.fallback_rate
    lift = np.mean(list(after.routing_curve.values())) - np.mean(
        list(before.routing_curve.values())
    )
    if saved >= min_gain and lift >= 0:
        return True, (
            f"it meets the fidelity target with {saved:.0%} fewer texts routed "
            f"({before.fallback_rate:.0%} -> {after.fallback_rate:.0%})"
        )
    if lift >= min_gain / 2 and saved > -min_gain * 5:
        return True, (
            f"its routing curve keeps more of native quality ({lift:+.3f} on average at "
            f"0-50% routed; {after.neighbour_agreement_at_10:.3f} with nothing routed)"
        )
    return False, (
        f"the candidate is not better on the out-of-fold pairs (routed {saved:+.0%} fewer at "
        f"the target, routing curve {lift:+.3f}): the current adapter already fits this data"
    )


# -- warm start ---------------------------------------------------------------------------


def basis_coefficients(adapter: Adapter, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The centred input and the basis coefficients the decoder reads, as the runtime computes."""
    weights, arch = adapter.weights, adapter.manifest.architecture
    centred = l2_normalize(np.asarray(source, dtype=np.float32)) - weights["source_mean"]
    activations = centred @ weights["encoder.weight"] + weights["encoder.bias"]
    rank, width = arch.basis_rank, arch.basis_rank + arch.hidden_dim
    coefficients = np.array(activations[:, :rank])
    if arch.hidden_dim:
        hidden = gelu(activations[:, rank:width])
        coefficients += hidden @ weights["residual.weight"] + weights["residual.bias"]
    return centred, coefficients


def _fit(
    parent: Adapter,
    pairs: PairSet,
    rows: np.ndarray,
    options: AdaptOptions,
    *,
    trusted: bool,
    traffic: np.ndarray | None = None,
    judged_in: np.ndarray | None = None,
    hyper: tuple[float, float] | None = None,
) -> Adapter:
    """Refit ``parent``'s decoder, OOD gate and quality head on the pairs ``rows``.

    ``traffic`` (:func:`traffic_weights` of ``rows``) makes the decoder fit and the novelty
    statistics describe the traffic, not just the stored pairs: an audit stands for the
    local texts it was drawn among, so texts like the ones the parent kept local are not
    called novel. ``judged_in`` weighs the index the quality head's hits are counted in
    (:func:`index_weights`). ``hyper``
    fixes the (ridge, replay share) instead of choosing them on an inner split, so the
    out-of-fold fits repeat the first one's procedure.
    """
    from adapted_embeddings.learning import heads

    arch = parent.manifest.architecture
    weights = {name: np.array(tensor) for name, tensor in parent.weights.items()}
    rng = np.random.default_rng(options.seed)
    user_source, user_target = pairs.source[rows], pairs.target[rows]
    centred, coefficients = basis_coefficients(parent, user_source)
    widening = _widening(centred, arch.input_dim - arch.basis_rank)
    decoder, bias = weights["decoder.weight"], weights["decoder.bias"]
    user_features = np.hstack([coefficients, centred @ widening])
    prior = np.vstack([decoder, np.zeros((widening.shape[1], decoder.shape[1]), np.float32)])
    if trusted:
        replay_source = _replay_sources(parent, options.replay_samples, rng)
        replay_centred, replay_coefficients = basis_coefficients(parent, replay_source)
        replay_features = np.hstack([replay_coefficients, replay_centred @ widening])
        replay_goal = replay_coefficients @ decoder
        replay_weight = options.replay_weight * len(rows) / max(len(replay_source), 1)
    else:  # what the parent "knew" is what the audits refuted (or a blank): do not keep it
        replay_source = np.zeros((0, arch.input_dim), np.float32)
        replay_centred = replay_source
        replay_features = np.zeros((0, user_features.shape[1]), np.float32)
        replay_goal = np.zeros((0, decoder.shape[1]), np.float32)
        prior, replay_weight = np.zeros_like(prior), 0.0
    # Regress onto the provider's direction at the parent's own output scale, so a row the
    # parent already gets right costs nothing.
    scale = np.linalg.norm(coefficients @ decoder + bias, axis=1, keepdims=True)
    user_goal = l2_normalize(user_target) * scale - bias
    # Rows weighted by the traffic they stand for: fitted on the routed texts alone, a
    # decoder drifts away from what the parent did well on the texts it kept local.
    system = _DecoderSystem(
        user_features, user_goal, replay_features, replay_goal, prior, replay_weight, traffic
    )
    ridge, replay_share = hyper or system.choose(user_target, bias, rng)

    # Cross-fit: each training pair translated by a decoder fitted without it. Whether it
    # then kept its native nearest neighbour in the top 10 is what the quality head learns.
    folds = rng.permutation(len(rows)) % options.folds
    predicted = np.empty_like(user_target)
    for fold in range(options.folds):
        held = folds == fold
        fold_decoder = system.solve(ridge, replay_share, rows=~held)
        predicted[held] = user_features[held] @ fold_decoder + bias
    hits = neighbour_hits(predicted, user_target, user_target, np.arange(len(rows)), judged_in)

    repeats = np.ones(len(rows), int) if traffic is None else np.clip(np.rint(traffic), 1, 50)
    traffic_centred = np.repeat(centred, repeats.astype(int), axis=0)
    traffic_source = np.repeat(user_source, repeats.astype(int), axis=0)
    learned_from = np.vstack([replay_centred, traffic_centred]) if replay_share else traffic_centred
    distinct = len(rows) + (len(replay_source) if replay_share else 0)
    rank = arch.basis_rank
    widened = arch.model_copy(
        update={
            "basis_rank": rank + widening.shape[1],
            # A whitened distance over many directions, estimated from few rows, calls
            # every new text novel: keep ten rows per direction.
            "ood_rank": max(min(arch.ood_rank, distinct // _ROWS_PER_OOD_DIRECTION), 1),
        }
    )
    encoder = weights["encoder.weight"]
    encoder_bias = weights["encoder.bias"]
    zeros = np.zeros(widening.shape[1], np.float32)
    weights["encoder.weight"] = np.hstack([encoder[:, :rank], widening, encoder[:, rank:]])
    weights["encoder.bias"] = np.concatenate([encoder_bias[:rank], zeros, encoder_bias[rank:]])
    if arch.hidden_dim:
        residual = weights["residual.weight"]
        weights["residual.weight"] = np.hstack(
            [residual, np.zeros((residual.shape[0], widening.shape[1]), np.float32)]
        )
        weights["residual.bias"] = np.concatenate([weights["residual.bias"], zeros])
    weights["decoder.weight"] = system.solve(ridge, replay_share).astype(np.float32)

    # Novelty: OOD statistics and gate over the sources learned from; then the head.
    weights.update(heads.fit_ood_subspace(learned_from, widened.ood_rank))
    gate_sources = np.vstack([replay_source, traffic_source]) if replay_share else traffic_source
    _, _, ood = translate_with_features(gate_sources, prepare(weights), widened)
    weights.update(heads.fit_gate(ood, percentile=99.0))
    _, features, _ = translate_with_features(user_source, prepare(weights), widened)
    weights.update(heads.fit_quality_head(features, hits.astype(np.float32), l2=0.1))

    memory_report: dict[str, Any] = {"rows": 0}
    if options.memory:
        plain = parent.manifest.model_copy(
            update={"architecture": widened, "weights_sha256": _SHA_PLACEHOLDER}, deep=True
        )
        _, confidence = Adapter(plain, weights).translate(user_source)
        memory = fit_memory(
            user_source,
            predicted,
            user_target,
            confidence,
            row_weights=traffic,
            judged_in=judged_in,
            seed=options.seed,
        )
        widened = widened.model_copy(
            update={
                "memory_rows": memory.rows,
                "memory_neighbours": NEIGHBOURS,
                "memory_temperature": TEMPERATURE,
                "memory_step": memory.step,
            }
        )
        weights.update(memory.tensors)
        memory_report = {
            "rows": memory.rows,
            "step": memory.step,
            "cross_fitted_hit_rate_by_step": {str(k): v for k, v in memory.hit_rate.items()},
        }

    manifest = parent.manifest.model_copy(
        update={
            "architecture": widened,
            "weights_sha256": _SHA_PLACEHOLDER,
            "training": {
                "method": "decoder refit in closed form (ridge, with replay of the parent's "
                "domain where it helps), OOD gate refit on the sources learned from, quality "
                "head fitted on cross-fitted neighbour hits of the user's pairs",
                "ridge": ridge,
                "widened_by": int(widening.shape[1]),
                "replay_share": replay_share,
                "replay_weight": options.replay_weight * replay_share if trusted else 0.0,
                "parent_trusted": trusted,
                "quality_target": {
                    "measure": "cross-fitted R@10 neighbour hit",
                    "hit_rate": float(hits.mean()),
                },
                "memory": memory_report,
            },
            "metrics": {},
        },
        deep=True,
    )
    return Adapter(manifest, {k: v.astype(np.float32) for k, v in weights.items()})


class _DecoderSystem:
    """Normal equations of the decoder refit, solved for any ridge and subset of user rows."""

    def __init__(
        self,
        user: np.ndarray,
        user_goal: np.ndarray,
        replay: np.ndarray,
        replay_goal: np.ndarray,
        prior: np.ndarray,
        replay_weight: float,
        row_weights: np.ndarray | None = None,
    ) -> None:
        self.row_weights = np.ones(len(user)) if row_weights is None else row_weights
        root = np.sqrt(self.row_weights)
        self.features = user.astype(np.float64)
        self.user = self.features * root[:, None]
        self.user_goal = user_goal.astype(np.float64) * root[:, None]
        self.prior = prior.astype(np.float64)
        replay64 = replay.astype(np.float64)
        self.replay_gram = replay_weight * replay64.T @ replay64
        # The replay goal is replay @ parent decoder: written against the prior's rows.
        goal = replay_goal.astype(np.float64)
        self.replay_moment = replay_weight * replay64.T @ goal
        self.scale = float(np.trace(self.user.T @ self.user + self.replay_gram)) / user.shape[1]

    def solve(
        self, ridge: float, replay_share: float = 1.0, rows: np.ndarray | None = None
    ) -> np.ndarray:
        user = self.user if rows is None else self.user[rows]
        goal = self.user_goal if rows is None else self.user_goal[rows]
        penalty = ridge * self.scale
        gram = user.T @ user + replay_share * self.replay_gram + penalty * np.eye(user.shape[1])
        moment = user.T @ goal + replay_share * self.replay_moment + penalty * self.prior
        return np.linalg.solve(gram, moment)

    def choose(
        self, target: np.ndarray, bias: np.ndarray, rng: np.random.Generator
    ) -> tuple[float, float]:
        """The ridge and replay share with the best agreement on an inner split."""
        inner = rng.random(len(self.user)) < 0.2
        shares = _REPLAY_SHARES if self.replay_gram.any() else (0.0,)
        if inner.sum() < 10 or (~inner).sum() < 10:
            return _RIDGE_GRID[1], shares[0]
        scores = {}
        for ridge in _RIDGE_GRID:
            for share in shares:
                predicted = self.features[inner] @ self.solve(ridge, share, rows=~inner) + bias
                agreement = centred_cosine_rows(predicted, target[inner], bias)
                scores[ridge, share] = np.average(agreement, weights=self.row_weights[inner])
        ridge, share = max(scores, key=lambda key: scores[key])
        return float(ridge), float(share)


def _widening(centred: np.ndarray, width: int) -> np.ndarray:
    """Principal directions of the user's centred sources, to widen a narrow basis."""
    width = min(width, len(centred) - 1)
    if width <= 0:
        return np.zeros((centred.shape[1], 0), np.float32)
    _, _, directions = np.linalg.svd(centred - centred.mean(axis=0), full_matrices=False)
    return np.ascontiguousarray(directions[:width].T, dtype=np.float32)


def _replay_sources(parent: Adapter, count: int, rng: np.random.Generator) -> np.ndarray:
    """Samples from the Gaussian the parent recorded of its training sources."""
    weights = parent.weights
    projection, variance = weights["ood.projection"], weights["ood.variance"]
    # projection = eigenvectors / sqrt(variance), so eigenvector * sqrt(variance) * z is
    # (z * variance) @ projection.T.
    draws = rng.standard_normal((count, len(variance))).astype(np.float32)
    return (draws * variance) @ projection.T + weights["source_mean"]


# -- cold start ---------------------------------------------------------------------------


def _blank_adapter(
    sources: np.ndarray, targets: np.ndarray, source: EmbeddingSpace, target: EmbeddingSpace
) -> Adapter:
    """An adapter with no knowledge: its basis is the source space itself (identity).

    Refitting its decoder (untrusted: no prior, no replay) is a ridge map from the pairs.
    Its means are those of ``sources`` and ``targets``: of the pairs it will be fitted on
    only, or the texts held out to calibrate it look familiar (measured: median confidence
    0.92 held out against 0.63 on new texts, with the means of every pair).
    """
    arch = ArchitectureConfig(
        input_dim=source.dimensions,
        output_dim=target.dimensions,
        basis_rank=source.dimensions,
        hidden_dim=0,
        ood_rank=min(256, source.dimensions),
    )
    shapes = expected_shapes(arch)
    weights = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    weights["source_mean"] = l2_normalize(sources).mean(axis=0)
    weights["encoder.weight"] = np.eye(source.dimensions, dtype=np.float32)
    weights["decoder.bias"] = l2_normalize(targets).mean(axis=0)
    weights["quality.feature_scale"] = np.ones(shapes["quality.feature_scale"], np.float32)
    weights["ood.variance"] = np.ones(shapes["ood.variance"], np.float32)
    manifest = AdapterManifest(
        name=f"{source.model}-to-{target.model}".lower(),
        flavor="linear",
        source=source,
        target=target,
        architecture=arch,
        recommended_threshold=1.0,
        weights_sha256=_SHA_PLACEHOLDER,
        description=f"{source.model} -> {target.model}, learned from provider calls",
    )
    return Adapter(manifest, weights)


def _finalise(
    candidate: Adapter,
    parent: Adapter | None,
    floor: tuple[float, float],
    report: AdaptationReport,
    seed: int,
    parent_thresholds: dict[str, float] | None,
) -> Adapter:
    assert report.after is not None
    manifest = candidate.manifest.model_copy(deep=True)
    manifest.recommended_threshold = float(np.clip(report.after.threshold, 0.0, 1.0))
    manifest.calibration = {
        "sample": f"{report.pairs_used} pairs from the user's provider calls, scored out of fold",
        "recommended": {
            "threshold": manifest.recommended_threshold,
            "fallback_rate": report.after.fallback_rate,
            "fallback_rate_interval": [
                report.after.fallback_rate_low,
                report.after.fallback_rate_high,
            ],
            "fidelity": report.after.fidelity,
            "fidelity_interval": [report.after.fidelity_low, report.after.fidelity_high],
            "criterion": f"fidelity (R@10 share of native) >= {report.fidelity_target}",
        },
        "fidelity_target": report.fidelity_target,
        "quality_floor": {"mean": floor[0], "poor_below": floor[1]},
    }
    manifest.metrics = {
        "held_out": {
            "before": None if report.before is None else asdict(report.before),
            "after": None if report.after is None else asdict(report.after),
        }
    }
    now = time.time()
    manifest.training = {
        **manifest.training,
        LINEAGE_KEY: {
            "parent": None if parent is None else parent.id,
            "parent_name": None if parent is None else parent.name,
            "root": _root_name(parent, candidate),
            "pairs": report.pairs_used,
            "created": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(),
            "created_unix": now,
            "seed": seed,
            "ancestors": _ancestors(parent, parent_thresholds),
        },
    }
    return Adapter(manifest, {k: np.array(v) for k, v in candidate.weights.items()})


MAX_ANCESTORS = 3
"""Generations whose accepted local vectors stay servable from the cache after adapt()."""


def _ancestors(parent: Adapter | None, thresholds: dict[str, float] | None) -> list[dict[str, Any]]:
    """The parent (with the thresholds it was held to) and its own nearest ancestors."""
    if parent is None:
        return []
    held_to = thresholds or {role: parent.recommended_threshold for role in ("query", "document")}
    inherited = (lineage(parent.manifest) or {}).get("ancestors", [])
    return [{"id": parent.id, "thresholds": held_to}, *inherited][:MAX_ANCESTORS]


def _root_name(parent: Adapter | None, candidate: Adapter) -> str:
    if parent is None:
        return f"{candidate.source.model}-to-{candidate.target.model}".lower()
    lineage = parent.manifest.training.get(LINEAGE_KEY)
    return str(lineage["root"]) if isinstance(lineage, dict) else parent.name


_SAVE_ATTEMPTS = 20


def _save(
    adapter: Adapter,
    directory: Path,
    source: EmbeddingSpace,
    target: EmbeddingSpace,
    keep: int,
) -> Path:
    """Save under ``<root>-adapted-v<N>`` (the next free N), private (0700/0600).

    Two processes adapting at once take different versions: a version another writer took
    first is skipped. Any I/O failure (a full disk, a read-only directory) is an
    :class:`AdaptationError` naming the directory; nothing half-written is left behind.
    Then only the ``keep`` newest adapted adapters for (source, target) stay there.
    """
    from adapted_embeddings.registry import prune_adapted

    root = _safe_name(adapter.manifest.training[LINEAGE_KEY]["root"])
    pattern = re.compile(re.escape(root) + r"-adapted-v(\d+)")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for _ in range(_SAVE_ATTEMPTS):
            versions = [
                int(match.group(1))
                for child in directory.iterdir()
                if (match := pattern.fullmatch(child.name))
            ]
            name = f"{root}-adapted-v{max(versions, default=0) + 1}"
            adapter.manifest = adapter.manifest.model_copy(update={"name": name})
            try:
                path = adapter.save(directory / name, private=True)
            except FileExistsError:
                continue  # another process took this version first
            logger.info("saved adapted adapter %s (%s -> %s)", path, source.id, target.id)
            prune_adapted(directory, source=source, target=target, keep=keep)
            return path
    except OSError as exc:
        raise AdaptationError(
            f"adapt() could not save the adapter in {directory}: {exc.strerror or exc}; "
            "free space or choose another directory (learning.adapter_dir, "
            "ADAPTED_EMBEDDINGS_LEARNING__ADAPTER_DIR)"
        ) from exc
    raise AdaptationError(
        f"adapt() could not take a free version in {directory} after {_SAVE_ATTEMPTS} tries"
    )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "adapter"


__all__ = [
    "MIN_ADAPT_PAIRS",
    "AdaptOptions",
    "AdaptationReport",
    "HeldOutQuality",
    "adapt",
    "adapted_adapter_dir",
    "basis_coefficients",
    "builtin_target_mean",
]
