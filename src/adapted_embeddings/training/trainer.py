"""``train_adapter``: parallel vectors in, a complete, calibrated :class:`Adapter` out.

Steps, all seeded:

1. Validate the pairs (:mod:`.data`) — every error before any work.
2. Hold out a validation slice; fit the translation on the rest (:mod:`.translation`),
   early-stopping the MLP on the slice.
3. Cross-fit: refit the same recipe on ``k - 1`` folds of the training rows and translate
   the held-out fold, so every training row gets an honest, held-out translation quality.
4. Fit the OOD subspace and gate on the training sources, and the quality head on the
   final model's features against the cross-fitted quality (:mod:`.quality`).
5. Calibrate on the validation slice (:mod:`.calibration`) and write the recommended
   threshold and the routing curve into the manifest.

Rows may come in *groups*: several surface forms of one text (prefix or none, casing, field
order) paired with the text's one target vector. A group is never split between training
and validation, or between cross-fit folds, so every held-out measure stays honest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from adapted_embeddings.adapter import Adapter, AdapterManifest, ArchitectureConfig
from adapted_embeddings.adapter.network import (
    expected_shapes,
    l2_normalize,
    prepare,
    translate_with_features,
)
from adapted_embeddings.errors import TrainingDataError
from adapted_embeddings.learning import heads
from adapted_embeddings.spaces import EmbeddingSpace
from adapted_embeddings.training import calibration, metrics
from adapted_embeddings.training.data import (
    MIN_PAIRS,
    ParallelData,
    check_output_directory,
    check_parallel,
    grouped_validation_split,
)
from adapted_embeddings.training.evaluation import auroc
from adapted_embeddings.training.translation import (
    TranslationConfig,
    TranslationFit,
    fit_translation,
    linear_config,
)

logger = logging.getLogger(__name__)

_PLACEHOLDER_SHA = "0" * 64


QUALITY_MEASURES = ("centred", "raw", "blend")
"""What the quality head learns to predict (held out, mapped onto [0, 1]).

``centred``: the centred cosine to the true vector; ``raw``: the plain cosine; ``blend``: the
mean of the two mapped targets, so confidence ranks both kinds of poor translation.
"""


@dataclass(frozen=True)
class AdapterTrainingConfig:
    """Everything :func:`train_adapter` needs besides the data, spaces and flavor.

    Attributes:
        name: Adapter name (default ``<source model>-to-<target model>-<flavor>``).
        seed: Seeds the split, initialisation, batch order and folds.
        translation: Translation hyper-parameters (:class:`TranslationConfig`).
        validation_fraction: Share of groups held out for early stopping and calibration.
        cross_fit_folds: Folds used to measure held-out quality for the quality head.
        ood_rank: Principal directions in the OOD subspace (default: ``min(256, d)``).
        gate_percentile: Training percentile of the OOD score where the gate is 0.5.
        quality_measure: What confidence predicts, one of :data:`QUALITY_MEASURES`.
        max_fallback_rate: Calibrate the threshold to route at most this share...
        quality_floor: ...or to reach this neighbour agreement relative to native.
        max_source_tokens: The source model's window (recorded; scales confidence of
            longer texts when the caller passes token counts).
        max_target_tokens: The target model's window (0 = far longer than the source's).
        description: Free text for the manifest.
        training_info: Extra facts for the manifest's ``training`` section (data, split).
        output_dir: If given, save the adapter there.
        overwrite: Allow replacing an existing ``output_dir``.
        routing_curve_png: If given, plot the calibration routing curve to this file.

    """

    name: str | None = None
    seed: int = 0
    translation: TranslationConfig = field(default_factory=TranslationConfig)
    validation_fraction: float = 0.1
    cross_fit_folds: int = 4
    ood_rank: int | None = None
    gate_percentile: float = 99.0
    quality_measure: str = "centred"
    max_fallback_rate: float | None = 0.10
    quality_floor: float | None = None
    max_source_tokens: int = 0
    max_target_tokens: int = 0
    description: str = ""
    training_info: dict[str, Any] | None = None
    output_dir: str | Path | None = None
    overwrite: bool = False
    routing_curve_png: str | Path | None = None

    def updated(self, **options: Any) -> AdapterTrainingConfig:
        """A copy with ``options`` replaced (``config=`` is accepted for ``translation=``).

        Raises:
            TypeError: For a name that is not a field, naming the accepted ones.

        """
        if "config" in options:
            translation = options.pop("config")
            options["translation"] = translation or TranslationConfig()
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"train_adapter got unknown option(s) {unknown}; accepted: {sorted(known)}"
            )
        return replace(self, **options)


def train_adapter(
    source_vectors: np.ndarray,
    target_vectors: np.ndarray,
    *,
    source: EmbeddingSpace | str,
    target: EmbeddingSpace | str,
    flavor: str = "mlp",
    settings: AdapterTrainingConfig | None = None,
    groups: np.ndarray | None = None,
    **options: Any,
) -> Adapter:
    """Train an adapter from row-aligned source and target vectors of the same texts.

    Args:
        source_vectors: ``(n, source.dimensions)`` vectors from the local encoder.
        target_vectors: ``(n, target.dimensions)`` vectors of the same texts from the target.
        source: Source space (or id, e.g. ``sentence-transformers/all-MiniLM-L6-v2@384``).
        target: Target space (or id).
        flavor: ``"mlp"`` (default, residual MLP) or ``"linear"`` (closed form).
        settings: Every other choice, grouped (:class:`AdapterTrainingConfig`).
        groups: Optional ``(n,)`` group id per row: rows of one group (surface forms of
            one text) stay together in every split. Default: each row is its own group.
        **options: Any :class:`AdapterTrainingConfig` field by name, overriding
            ``settings`` (``config=`` stands for ``translation=``), so keyword calls such
            as ``train_adapter(x, y, source=..., target=..., seed=1, output_dir=...)`` work.

    Returns:
        The trained adapter (saved if ``output_dir`` was given).

    Raises:
        TrainingDataError: Bad data (row counts, widths, NaN/Inf, too few pairs, flavor,
            groups that do not fit the rows) or bad settings.
        FileExistsError: ``output_dir`` exists and ``overwrite`` is False (checked first).
        TypeError: An option that is not an :class:`AdapterTrainingConfig` field.

    """
    settings = (settings or AdapterTrainingConfig()).updated(**options)
    return _train(source_vectors, target_vectors, source, target, flavor, settings, groups)


def _train(
    source_vectors: np.ndarray,
    target_vectors: np.ndarray,
    source: EmbeddingSpace | str,
    target: EmbeddingSpace | str,
    flavor: str,
    settings: AdapterTrainingConfig,
    groups: np.ndarray | None,
) -> Adapter:
    started = time.perf_counter()
    if settings.output_dir is not None:
        check_output_directory(settings.output_dir, overwrite=settings.overwrite)
    data = check_parallel(
        source_vectors, target_vectors, source=source, target=target, flavor=flavor
    )
    group_ids = _check_groups(groups, len(data))
    if not 0.0 < settings.validation_fraction < 0.5:
        raise TrainingDataError(
            f"validation_fraction must be in (0, 0.5), got {settings.validation_fraction}"
        )
    if settings.cross_fit_folds < 2:
        raise TrainingDataError(f"cross_fit_folds must be >= 2, got {settings.cross_fit_folds}")
    if settings.quality_measure not in QUALITY_MEASURES:
        raise TrainingDataError(
            f"unknown quality_measure {settings.quality_measure!r}; choose one of "
            f"{list(QUALITY_MEASURES)}"
        )
    seed, cross_fit_folds = settings.seed, settings.cross_fit_folds
    config = settings.translation
    if flavor == "linear":
        config = linear_config(config)
    train_rows, validation_rows = grouped_validation_split(
        group_ids, settings.validation_fraction, seed
    )
    train, validation = data.subset(train_rows), data.subset(validation_rows)

    fit = fit_translation(
        train.source,
        train.target,
        config,
        validation=(validation.source, validation.target),
        seed=seed,
        groups=None if groups is None else group_ids[train_rows],
    )
    held_out = _cross_fitted_quality(
        train.source,
        train.target,
        None if groups is None else group_ids[train_rows],
        config,
        fit,
        cross_fit_folds,
        seed,
    )

    input_dim, output_dim = data.source_space.dimensions, data.target_space.dimensions
    arch = ArchitectureConfig(
        input_dim=input_dim,
        output_dim=output_dim,
        basis_rank=fit.basis_rank,
        hidden_dim=fit.hidden_dim,
        ood_rank=min(settings.ood_rank or 256, input_dim),
        max_source_tokens=settings.max_source_tokens,
        max_target_tokens=settings.max_target_tokens,
    )
    weights = dict(fit.tensors)
    centred_train = l2_normalize(train.source) - weights["source_mean"]
    weights.update(heads.fit_ood_subspace(centred_train, arch.ood_rank))
    weights.update(_placeholder_head(arch))
    _, features, ood = translate_with_features(train.source, prepare(weights), arch)
    weights.update(heads.fit_gate(ood, percentile=settings.gate_percentile))
    targets, scale = _quality_targets(held_out, settings.quality_measure)
    weights.update(heads.fit_quality_head(features, targets))

    source_space, target_space = data.source_space, data.target_space
    manifest = AdapterManifest(
        name=settings.name or f"{source_space.model}-to-{target_space.model}-{flavor}".lower(),
        flavor=flavor,
        source=source_space,
        target=target_space,
        architecture=arch,
        recommended_threshold=0.0,
        weights_sha256=_PLACEHOLDER_SHA,
        description=settings.description,
        training={
            **(settings.training_info or {}),
            "pairs": len(data),
            "groups": len(np.unique(group_ids)),
            "train_rows": len(train_rows),
            "validation_rows": len(validation_rows),
            "seed": seed,
            "flavor": flavor,
            "config": asdict(config),
            "cross_fit_folds": cross_fit_folds,
            "epochs_run": fit.epochs_run,
            "best_epoch": fit.best_epoch,
            "gate_percentile": settings.gate_percentile,
            "quality_target": {
                "measure": _QUALITY_MEASURE_NAMES[settings.quality_measure],
                **scale,
            },
            "seconds": None,
        },
    )
    adapter = Adapter(manifest, weights)
    adapter = calibrate_on_validation(
        adapter, validation, group_ids[validation_rows], settings, grouped=groups is not None
    )
    adapter.manifest.training["seconds"] = round(time.perf_counter() - started, 1)
    if settings.output_dir is not None:
        adapter.save(settings.output_dir, overwrite=settings.overwrite)
    if settings.routing_curve_png is not None:
        write_curve_png(adapter, Path(settings.routing_curve_png))
    return adapter


def calibrate_on_validation(
    adapter: Adapter,
    validation: ParallelData,
    groups: np.ndarray,
    settings: AdapterTrainingConfig,
    *,
    grouped: bool,
) -> Adapter:
    """Threshold, routing curve and validation metrics from one row per validation group.

    Several rows of one group share one target vector, so with all of them in the sample a
    row's "nearest other target" would be its own twin and neighbour agreement would read
    ~1.0. The first row of each group (the first surface form) stands for the group.
    """
    _, first = np.unique(groups, return_index=True)
    sample = validation.subset(np.sort(first))
    name = "validation slice of the training pairs"
    if grouped:
        name += " (first surface form of each text)"
    calibrated = recalibrate(
        adapter,
        sample.source,
        sample.target,
        max_fallback_rate=settings.max_fallback_rate,
        quality_floor=settings.quality_floor,
        sample_name=name,
    )
    calibrated.manifest.metrics.update(_training_metrics(calibrated, sample.source, sample.target))
    return calibrated


def recalibrate(
    adapter: Adapter,
    source_vectors: np.ndarray,
    target_vectors: np.ndarray,
    *,
    max_fallback_rate: float | None = 0.10,
    quality_floor: float | None = None,
    sample_name: str = "user sample",
) -> Adapter:
    """Re-derive the recommended threshold of ``adapter`` from a held-out parallel sample.

    Works for registry adapters: calibrate on your own texts (their source vectors and the
    provider's vectors) and save the result under a new directory.

    Returns:
        A new :class:`Adapter` with the same weights and an updated manifest (threshold and
        ``calibration`` section). The input adapter is not modified.

    Raises:
        TrainingDataError: If the sample does not fit the adapter's spaces or is too small.

    """
    data = check_parallel(
        source_vectors, target_vectors, source=adapter.source, target=adapter.target
    )
    # Translate the vectors exactly as given (not the re-normalised copy) so that the
    # threshold splits the very confidences a caller will compute for them.
    translated, confidence = adapter.translate(np.asarray(source_vectors, dtype=np.float32))
    curve = calibration.routing_curve(
        translated, confidence, data.target, target_mean=adapter.weights["decoder.bias"]
    )
    choice = calibration.recommend_threshold(
        curve, max_fallback_rate=max_fallback_rate, quality_floor=quality_floor
    )
    manifest = adapter.manifest.model_copy(deep=True)
    manifest.recommended_threshold = float(np.clip(choice["threshold"], 0.0, 1.0))
    manifest.calibration = {
        "sample": sample_name,
        "recommended": choice,
        "curve": curve.as_dict(),
    }
    return Adapter(manifest, {k: np.array(v) for k, v in adapter.weights.items()})


def write_curve_png(adapter: Adapter, path: Path) -> Path:
    """Plot the routing curve stored in the adapter's manifest."""
    stored = adapter.manifest.calibration
    curve = calibration.RoutingCurve(
        **{
            k: stored["curve"][k]
            for k in (
                "shares",
                "thresholds",
                "centred_cosine",
                "neighbour_agreement_at_10",
                "oracle_centred_cosine",
                "sample_size",
            )
        }
    )
    return calibration.plot_routing_curve(
        curve,
        path,
        title=f"{adapter.name}: routing curve ({stored['sample']})",
        recommended=stored["recommended"],
    )


def _cross_fitted_quality(
    source: np.ndarray,
    target: np.ndarray,
    groups: np.ndarray | None,
    config: TranslationConfig,
    fit: TranslationFit,
    folds: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Held-out centred and raw cosine of every training row, from models that never saw it.

    Folds are drawn over groups, so no surface form of a held-out text is in training.
    """
    rng = np.random.default_rng(seed + 1)
    ids = np.arange(len(source)) if groups is None else groups
    unique, inverse = np.unique(ids, return_inverse=True)
    assignment = (rng.permutation(len(unique)) % folds)[inverse]
    centred, raw = np.empty(len(source)), np.empty(len(source))
    mean = fit.tensors["decoder.bias"]
    for fold in range(folds):
        held = assignment == fold
        fold_fit = fit_translation(
            source[~held],
            target[~held],
            config,
            fixed_epochs=fit.best_epoch if config.hidden_dim else None,
            seed=seed + 100 + fold,
            groups=None if groups is None else groups[~held],
        )
        predicted = translate_only(fold_fit, source[held], target.shape[1])
        centred[held] = metrics.centred_cosine_rows(predicted, target[held], mean)
        raw[held] = metrics.cosine_rows(predicted, target[held])
        logger.info("cross-fit fold %d/%d done", fold + 1, folds)
    return {"centred": centred, "raw": raw}


_QUALITY_MEASURE_NAMES = {
    "centred": "held-out centred cosine",
    "raw": "held-out raw cosine",
    "blend": "mean of the mapped held-out centred and raw cosines",
}


def _quality_targets(
    held_out: dict[str, np.ndarray], measure: str
) -> tuple[np.ndarray, dict[str, float]]:
    """Soft [0, 1] targets of the quality head for one of :data:`QUALITY_MEASURES`."""
    if measure != "blend":
        return heads.quality_targets(held_out[measure])
    centred, centred_scale = heads.quality_targets(held_out["centred"])
    raw, raw_scale = heads.quality_targets(held_out["raw"])
    scale = {f"centred_{k}": v for k, v in centred_scale.items()}
    scale.update({f"raw_{k}": v for k, v in raw_scale.items()})
    return ((centred + raw) / 2).astype(np.float32), scale


def _check_groups(groups: np.ndarray | None, rows: int) -> np.ndarray:
    """Group id per row (each row its own group when None)."""
    if groups is None:
        return np.arange(rows)
    ids = np.asarray(groups)
    if ids.shape != (rows,) or ids.dtype.kind not in "iu":
        raise TrainingDataError(
            f"groups must be {rows} integer ids, one per row; got shape {ids.shape}, "
            f"dtype {ids.dtype}"
        )
    return ids


def translate_only(fit: TranslationFit, source: np.ndarray, output_dim: int) -> np.ndarray:
    """Run the runtime forward of a translation-only fit (quality parts zeroed)."""
    arch = ArchitectureConfig(
        input_dim=source.shape[1],
        output_dim=output_dim,
        basis_rank=fit.basis_rank,
        hidden_dim=fit.hidden_dim,
        ood_rank=1,
    )
    weights = dict(fit.tensors)
    weights["ood.projection"] = np.zeros((arch.input_dim, 1), np.float32)
    weights["ood.variance"] = np.ones(1, np.float32)
    weights.update(_placeholder_head(arch))
    return translate_with_features(np.asarray(source, np.float32), prepare(weights), arch)[0]


def _placeholder_head(arch: ArchitectureConfig) -> dict[str, np.ndarray]:
    shapes = expected_shapes(arch)
    names = [n for n in shapes if n.startswith(("quality.", "gate."))]
    return {
        n: (np.ones if n == "quality.feature_scale" else np.zeros)(shapes[n], np.float32)
        for n in names
    }


def _training_metrics(adapter: Adapter, source: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    """Collapse and fidelity indicators on the validation slice (reported, not asserted)."""
    translated, confidence = adapter.translate(source)
    mean = adapter.weights["decoder.bias"]
    index = np.arange(len(source))
    raw = metrics.cosine_rows(translated, target)
    centred = metrics.centred_cosine_rows(translated, target, mean)
    native_top1 = metrics.top_k_excluding_self(target, target, index, 1)[:, 0]
    neighbours = metrics.top_k_excluding_self(translated, target, index, 10)
    return {
        "validation": {
            "rows": len(source),
            "mean_cosine": float(raw.mean()),
            "mean_centred_cosine": float(centred.mean()),
            "neighbour_agreement": {
                f"r@{k}": v for k, v in metrics.neighbour_agreement(neighbours, native_top1).items()
            },
            "effective_rank_translated": metrics.effective_rank(translated),
            "effective_rank_native": metrics.effective_rank(target),
            "mean_confidence": float(confidence.mean()),
            # How well confidence finds the worst 10% of translations (1.0 = perfectly).
            "auroc_poor_raw_cosine": auroc(raw < np.percentile(raw, 10), -confidence),
            "auroc_poor_centred_cosine": auroc(centred < np.percentile(centred, 10), -confidence),
        }
    }


__all__ = [
    "MIN_PAIRS",
    "QUALITY_MEASURES",
    "AdapterTrainingConfig",
    "recalibrate",
    "train_adapter",
]
