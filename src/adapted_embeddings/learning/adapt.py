"""``adapt()``: fit a domain adapter from the pairs the provider was already paid for.

Warm start (an adapter exists). The parent's encoder and residual MLP are kept, so the new
adapter computes the same basis coefficients ``c(x)``; when the parent's basis is narrower
than its input, it is widened with the principal directions of the user's sources, so the
map can move where the parent could not. Only the decoder is refitted, in closed form:

    min  |C_user D - Y_user|^2  +  w |C_old (D - D_parent)|^2  +  l |D - D_prior|^2

The middle term keeps it from forgetting: ``C_old`` are coefficients of samples drawn from
the parent's recorded training distribution (the Gaussian of its OOD subspace), on which
the new decoder must reproduce the parent's outputs (distillation). The ridge ``l`` is
chosen on an inner split. Then the OOD subspace and gate are refitted on old and new
sources together, the quality head on the user's pairs by cross-fitting (each pair scored
by a decoder that never saw it), and the threshold on held-out pairs so that the local
route meets the parent's calibrated quality floor.

Cold start (no adapter yet). A ``linear`` adapter is trained from the pairs with
:func:`adapted_embeddings.training.train_adapter` and calibrated for a 10% fallback budget.

Either way the candidate is evaluated on held-out pairs against the current adapter, and
it is saved and used **only if it is better**; the report says why when it is not.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.adapter.network import (
    centred_cosine_rows,
    gelu,
    l2_normalize,
    prepare,
    translate_with_features,
)
from adapted_embeddings.errors import AdaptationError
from adapted_embeddings.learning.audit import QualityFloor, lowest_threshold_meeting
from adapted_embeddings.learning.lineage import LINEAGE_KEY, lineage
from adapted_embeddings.learning.pairs import PairSet, PairStore
from adapted_embeddings.settings import LearningSettings
from adapted_embeddings.spaces import EmbeddingSpace

logger = logging.getLogger(__name__)

_RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
_SHA_PLACEHOLDER = "0" * 64


@dataclass(frozen=True)
class AdaptOptions:
    """How :func:`adapt` fits and judges a domain adapter."""

    held_out_fraction: float = 0.2
    """Share of the pairs kept aside to judge old against new and to set the threshold."""
    min_pairs: int = 100
    """Fewest pairs a warm start accepts (a cold start needs the linear flavor's minimum)."""
    replay_weight: float = 0.5
    """Weight of not forgetting (the parent's outputs on its own domain) against the user's."""
    replay_samples: int = 2000
    """Samples drawn from the parent's training distribution for that term."""
    folds: int = 4
    """Cross-fitting folds for the quality head."""
    min_gain: float = 0.002
    """How much better (held-out mean centred cosine) the new adapter must be to be used."""
    cold_start_fallback_rate: float = 0.10
    """Calibration budget of an adapter created from scratch."""
    seed: int = 0
    save: bool = True
    """Write the adapter to the adapter directory (needed for new instances to find it)."""


@dataclass(frozen=True)
class HeldOutQuality:
    """An adapter on the held-out pairs."""

    mean_centred_cosine: float
    """Agreement with the provider's vectors at 0% fallback."""
    neighbour_agreement_at_10: float
    """Share of held-out texts whose native nearest neighbour is in the translated top 10."""
    local_route_quality: float
    """Mean centred cosine of the texts the threshold keeps local."""
    fallback_rate: float
    """Share of held-out texts the threshold sends to the provider."""


@dataclass
class AdaptationReport:
    """What :func:`adapt` did, and why."""

    switched: bool
    reason: str
    pairs_used: int
    train_pairs: int
    held_out_pairs: int
    parent: str | None
    before: HeldOutQuality | None
    after: HeldOutQuality | None
    threshold: float | None
    expected_fallback_rate: float | None
    quality_floor: float | None
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
        before = (
            f"{self.before.mean_centred_cosine:.3f} -> " if self.before is not None else "new: "
        )
        verdict = "switched to" if self.switched else "kept the current adapter, not"
        return (
            f"{verdict} {self.path.name if self.path else 'the candidate'} "
            f"({self.pairs_used} pairs; held-out agreement {before}"
            f"{after.mean_centred_cosine:.3f}; threshold {self.threshold:.3f}, expected "
            f"fallback {self.expected_fallback_rate:.0%}): {self.reason}"
        )


def adapted_adapter_dir(settings: LearningSettings, cache_directory: Path) -> Path:
    """Where adapted adapters are saved: the setting, else ``<cache dir>/adapters``."""
    return (settings.adapter_dir or cache_directory / "adapters").expanduser()


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
) -> AdaptationReport:
    """Fit a domain adapter from the stored pairs of (source, target).

    Args:
        store: The pair store.
        parent: The adapter in use (warm start), or None (cold start).
        source: The local model's space.
        target: The provider's space.
        settings: Learning settings (for the adapter directory).
        options: Fitting options.
        adapter_dir: Overrides where the adapter is saved.
        parent_trusted: False when audits found the parent wanting on this data (the guard
            tripped): it is then not distilled from, and the decoder is refitted from the
            pairs alone (ridge toward zero), keeping only its encoder.
        parent_thresholds: The parent's thresholds in force, per role (the guard's raise
            included). The new adapter records them, so the parent's accepted local vectors
            keep being served from the cache (see ``ancestors`` in :func:`lineage`).

    Returns:
        The report; ``report.adapter`` is the new adapter when ``report.switched``.

    Raises:
        AdaptationError: Too few pairs to fit or judge anything.
        PairStoreError: The store cannot be read (naming the bad rows, if any).

    """
    options = options or AdaptOptions()
    started = time.perf_counter()
    pairs = store.load(source=source, target=target)
    needed = options.min_pairs if parent is not None else _cold_start_minimum()
    if len(pairs) < needed:
        raise AdaptationError(
            f"adapt() needs at least {needed} stored pairs for {source.id} -> {target.id}, "
            f"the store has {len(pairs)}; embed more texts in hybrid mode first (every "
            "provider call adds pairs)"
        )
    train, held = _split(len(pairs), options)
    if parent is not None:
        candidate = _warm_start(parent, pairs, train, options, trusted=parent_trusted)
        floor = QualityFloor.of(parent)
    else:
        candidate = _cold_start(pairs, train, source, target, options)
        floor = QualityFloor.of(candidate)
    mean = (parent or candidate).target_mean
    threshold, after = _choose_threshold(candidate, pairs, held, floor.mean, mean)
    before = None
    if parent is not None:
        before = _judge(parent, pairs, held, parent.recommended_threshold, mean)
    better = (
        before is None or after.mean_centred_cosine >= before.mean_centred_cosine + options.min_gain
    )
    reason = _reason(before, after, options.min_gain, floor)
    report = AdaptationReport(
        switched=False,
        reason=reason,
        pairs_used=len(pairs),
        train_pairs=len(train),
        held_out_pairs=len(held),
        parent=None if parent is None else parent.name,
        before=before,
        after=after,
        threshold=threshold,
        expected_fallback_rate=after.fallback_rate,
        quality_floor=floor.mean,
        path=None,
        seconds=0.0,
    )
    if better:
        adapter = _finalise(
            candidate, parent, threshold, floor, report, options.seed, parent_thresholds
        )
        if options.save:
            directory = adapter_dir or adapted_adapter_dir(settings, store.directory)
            report.path = _save(adapter, directory, parent, source, target)
        report.adapter = adapter
        report.switched = True
    report.seconds = round(time.perf_counter() - started, 2)
    logger.info("adapt(): %s", report.summary())
    return report


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


def _warm_start(
    parent: Adapter, pairs: PairSet, train: np.ndarray, options: AdaptOptions, *, trusted: bool
) -> Adapter:
    from adapted_embeddings.training import quality

    arch = parent.manifest.architecture
    weights = {name: np.array(tensor) for name, tensor in parent.weights.items()}
    rng = np.random.default_rng(options.seed)
    user_source, user_target = pairs.source[train], pairs.target[train]
    centred, coefficients = basis_coefficients(parent, user_source)
    widening = _widening(centred, arch.input_dim - arch.basis_rank)
    replay_source = _replay_sources(parent, options.replay_samples, rng)
    replay_centred, replay_coefficients = basis_coefficients(parent, replay_source)

    decoder, bias = weights["decoder.weight"], weights["decoder.bias"]
    user_features = np.hstack([coefficients, centred @ widening])
    replay_features = np.hstack([replay_coefficients, replay_centred @ widening])
    # Regress onto the provider's direction at the parent's own output scale, so a row the
    # parent already gets right costs nothing.
    scale = np.linalg.norm(coefficients @ decoder + bias, axis=1, keepdims=True)
    user_goal = l2_normalize(user_target) * scale - bias
    replay_goal = replay_coefficients @ decoder
    prior = np.vstack([decoder, np.zeros((widening.shape[1], decoder.shape[1]), np.float32)])
    replay_weight = options.replay_weight * len(train) / max(len(replay_source), 1)
    if not trusted:  # what the parent "knew" is what the audits refuted: do not keep it
        prior, replay_weight = np.zeros_like(prior), 0.0
    system = _DecoderSystem(
        user_features, user_goal, replay_features, replay_goal, prior, replay_weight
    )
    ridge = system.choose_ridge(user_target, bias, rng)

    # Cross-fit: each training pair scored by a decoder fitted without it.
    folds = rng.permutation(len(train)) % options.folds
    held_out_quality = np.empty(len(train))
    for fold in range(options.folds):
        held = folds == fold
        fold_decoder = system.solve(ridge, rows=~held)
        predicted = user_features[held] @ fold_decoder + bias
        held_out_quality[held] = centred_cosine_rows(predicted, user_target[held], bias)

    rank = arch.basis_rank
    widened = arch.model_copy(update={"basis_rank": rank + widening.shape[1]})
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
    weights["decoder.weight"] = system.solve(ridge).astype(np.float32)

    # Out-of-distribution statistics over both domains, then the gate and the head.
    both = np.vstack([replay_centred, centred])
    weights.update(quality.fit_ood_subspace(both, widened.ood_rank))
    both_sources = np.vstack([replay_source, user_source])
    _, _, ood = translate_with_features(both_sources, prepare(weights), widened)
    weights.update(quality.fit_gate(ood, percentile=99.0))
    _, features, _ = translate_with_features(user_source, prepare(weights), widened)
    targets, target_scale = quality.quality_targets(held_out_quality)
    weights.update(quality.fit_quality_head(features, targets, seed=options.seed))

    manifest = parent.manifest.model_copy(
        update={
            "architecture": widened,
            "weights_sha256": _SHA_PLACEHOLDER,
            "training": {
                "method": "warm start: decoder refit with replay of the parent's domain, OOD "
                "gate and quality head refit (cross-fitted) on the user's pairs",
                "ridge": ridge,
                "widened_by": int(widening.shape[1]),
                "replay_weight": options.replay_weight if trusted else 0.0,
                "parent_trusted": trusted,
                "quality_target": {"measure": "held-out centred cosine", **target_scale},
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
    ) -> None:
        self.user = user.astype(np.float64)
        self.user_goal = user_goal.astype(np.float64)
        self.prior = prior.astype(np.float64)
        replay64 = replay.astype(np.float64)
        self.replay_gram = replay_weight * replay64.T @ replay64
        # The replay goal is replay @ parent decoder: written against the prior's rows.
        goal = replay_goal.astype(np.float64)
        self.replay_moment = replay_weight * replay64.T @ goal
        self.scale = float(np.trace(self.user.T @ self.user + self.replay_gram)) / user.shape[1]

    def solve(self, ridge: float, rows: np.ndarray | None = None) -> np.ndarray:
        user = self.user if rows is None else self.user[rows]
        goal = self.user_goal if rows is None else self.user_goal[rows]
        penalty = ridge * self.scale
        gram = user.T @ user + self.replay_gram + penalty * np.eye(user.shape[1])
        moment = user.T @ goal + self.replay_moment + penalty * self.prior
        return np.linalg.solve(gram, moment)

    def choose_ridge(self, target: np.ndarray, bias: np.ndarray, rng: np.random.Generator) -> float:
        """The ridge with the best agreement on an inner split of the training pairs."""
        inner = rng.random(len(self.user)) < 0.2
        if inner.sum() < 10 or (~inner).sum() < 10:
            return _RIDGE_GRID[1]
        scores = []
        for ridge in _RIDGE_GRID:
            predicted = self.user[inner] @ self.solve(ridge, rows=~inner) + bias
            scores.append(centred_cosine_rows(predicted, target[inner], bias).mean())
        return float(_RIDGE_GRID[int(np.argmax(scores))])


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


def _cold_start_minimum() -> int:
    from adapted_embeddings.training.data import MIN_PAIRS

    return int(MIN_PAIRS["linear"])


def _cold_start(
    pairs: PairSet,
    train: np.ndarray,
    source: EmbeddingSpace,
    target: EmbeddingSpace,
    options: AdaptOptions,
) -> Adapter:
    from adapted_embeddings.training import train_adapter

    return train_adapter(
        pairs.source[train],
        pairs.target[train],
        source=source,
        target=target,
        flavor="linear",
        seed=options.seed,
        max_fallback_rate=options.cold_start_fallback_rate,
        description=f"{source.model} -> {target.model}, learned from provider calls",
    )


# -- judging ------------------------------------------------------------------------------


def _split(n: int, options: AdaptOptions) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(options.seed + 7)
    order = rng.permutation(n)
    held = max(round(options.held_out_fraction * n), min(20, n // 2))
    return np.sort(order[held:]), np.sort(order[:held])


def _judge(
    adapter: Adapter, pairs: PairSet, rows: np.ndarray, threshold: float, mean: np.ndarray
) -> HeldOutQuality:
    translated, confidence = adapter.translate(pairs.source[rows])
    native = pairs.target[rows]
    quality = centred_cosine_rows(translated, native, mean)
    local = confidence >= threshold
    return HeldOutQuality(
        mean_centred_cosine=float(quality.mean()),
        neighbour_agreement_at_10=_neighbour_agreement(translated, native),
        local_route_quality=float(quality[local].mean()) if local.any() else float("nan"),
        fallback_rate=float(1.0 - local.mean()),
    )


def _choose_threshold(
    adapter: Adapter, pairs: PairSet, rows: np.ndarray, floor: float, mean: np.ndarray
) -> tuple[float, HeldOutQuality]:
    """The lowest threshold whose local route meets ``floor`` on the held-out pairs."""
    translated, confidence = adapter.translate(pairs.source[rows])
    quality = centred_cosine_rows(translated, pairs.target[rows], mean)
    threshold = lowest_threshold_meeting(confidence, quality, floor, min_kept=5)
    return threshold, _judge(adapter, pairs, rows, threshold, mean)


def _reason(
    before: HeldOutQuality | None, after: HeldOutQuality, min_gain: float, floor: QualityFloor
) -> str:
    if before is None:
        return "no adapter existed for this pair of spaces (cold start)"
    gain = after.mean_centred_cosine - before.mean_centred_cosine
    if gain >= min_gain:
        return (
            f"held-out agreement improved by {gain:+.3f}; the local route meets the floor "
            f"{floor.mean:.3f} with {after.fallback_rate:.0%} routed"
        )
    return (
        f"the candidate is not better on the held-out pairs ({gain:+.3f} mean centred cosine, "
        f"{min_gain} needed): the current adapter already fits this data as well"
    )


def _finalise(
    candidate: Adapter,
    parent: Adapter | None,
    threshold: float,
    floor: QualityFloor,
    report: AdaptationReport,
    seed: int,
    parent_thresholds: dict[str, float] | None,
) -> Adapter:
    manifest = candidate.manifest.model_copy(deep=True)
    manifest.recommended_threshold = float(np.clip(threshold, 0.0, 1.0))
    manifest.calibration = {
        "sample": f"{report.held_out_pairs} held-out pairs from the user's provider calls",
        "recommended": {
            "threshold": manifest.recommended_threshold,
            "fallback_rate": report.expected_fallback_rate,
            "criterion": f"local route mean centred cosine >= {floor.mean:.4f}",
        },
        "quality_floor": {"mean": floor.mean, "poor_below": floor.poor_below},
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
            "train_pairs": report.train_pairs,
            "held_out_pairs": report.held_out_pairs,
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


def _save(
    adapter: Adapter,
    directory: Path,
    parent: Adapter | None,
    source: EmbeddingSpace,
    target: EmbeddingSpace,
) -> Path:
    """Save under ``<root>-adapted-v<N>`` (N one more than any there), private directory."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = _safe_name(adapter.manifest.training[LINEAGE_KEY]["root"])
    versions = [
        int(match.group(1))
        for child in directory.iterdir()
        if (match := re.fullmatch(re.escape(root) + r"-adapted-v(\d+)", child.name))
    ]
    name = f"{root}-adapted-v{max(versions, default=0) + 1}"
    adapter.manifest = adapter.manifest.model_copy(update={"name": name})
    path = adapter.save(directory / name)
    logger.info("saved adapted adapter %s (%s -> %s)", path, source.id, target.id)
    return path


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "adapter"


def _neighbour_agreement(translated: np.ndarray, native: np.ndarray) -> float:
    from adapted_embeddings.training.metrics import neighbour_agreement, top_k_excluding_self

    n = len(native)
    if n < 12:
        return float("nan")
    index = np.arange(n)
    native_top1 = top_k_excluding_self(native, native, index, 1)[:, 0]
    neighbours = top_k_excluding_self(translated, native, index, 10)
    return float(neighbour_agreement(neighbours, native_top1, ks=(10,))[10])


__all__ = [
    "AdaptOptions",
    "AdaptationReport",
    "HeldOutQuality",
    "adapt",
    "adapted_adapter_dir",
    "basis_coefficients",
]
