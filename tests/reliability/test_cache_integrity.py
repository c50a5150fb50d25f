"""The cache's storage: damaged databases, tampered values, a long-held lock, and directories.

Real SQLite files damaged on disk, a real second process holding or dropping the
database, real symlinks and directories of other users.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
import pytest

from adapted_embeddings.cache import EmbeddingCache
from adapted_embeddings.errors import ConfigurationError

from .conftest import Rig
from .faultserver import FaultServer

TEXTS = [f"cached text number {i}: something worth keeping" for i in range(40)]


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def filled_cache(make_rig: Any, server: FaultServer, directory: Path) -> np.ndarray:
    """Embed TEXTS locally into a cache in ``directory``; returns the vectors."""
    rig: Rig = make_rig(server.base_url, mode="local", cache_dir=directory)
    vectors = np.stack([r.vector for r in rig.pipeline.embed(TEXTS)])
    assert rig.entry_count() == len(TEXTS)
    rig.cache.close()
    return vectors


def overwrite_header(database: Path) -> None:
    with open(database, "r+b") as handle:
        handle.write(os.urandom(4096))


def truncate(database: Path) -> None:
    os.truncate(database, 6000)


def drop_table(database: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sqlite3; sqlite3.connect({str(database)!r}).execute("
            "'DROP TABLE Cache').connection.commit()",
        ],
        check=True,
    )


@pytest.mark.parametrize("damage", [overwrite_header, truncate, drop_table])
def test_a_damaged_database_is_moved_aside_and_rebuilt_with_one_warning(
    make_rig: Any,
    server: FaultServer,
    tmp_path: Path,
    damage: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "damaged"
    expected = filled_cache(make_rig, server, directory)
    damage(directory / "cache.db")

    with caplog.at_level(logging.WARNING, logger="adapted_embeddings"):
        rig: Rig = make_rig(server.base_url, mode="local", cache_dir=directory)
        first = rig.pipeline.embed(TEXTS)
        second = rig.pipeline.embed(TEXTS)
        stats = rig.cache.stats()

    np.testing.assert_allclose(np.stack([r.vector for r in first]), expected, atol=1e-6)
    assert [r.route for r in second] == ["cache"] * len(TEXTS)  # rebuilt, used again
    assert stats.entries == len(TEXTS)
    messages = warnings_from(caplog)
    assert len(messages) == 1 and "moved it aside" in messages[0], messages
    kept = sorted(p.name for p in directory.glob("cache.db.damaged-*"))
    assert kept and kept[0].startswith("cache.db.damaged-20"), kept  # kept for inspection


def test_stats_and_clear_recover_a_database_damaged_while_open(
    make_rig: Any, server: FaultServer, tmp_path: Path
) -> None:
    directory = tmp_path / "damaged-while-open"
    rig: Rig = make_rig(server.base_url, mode="local", cache_dir=directory)
    rig.pipeline.embed(TEXTS[:5])
    drop_table(directory / "cache.db")  # another process breaks it under us

    rig.cache.stats()  # no DatabaseError
    assert rig.cache.clear() == 0  # finds the damage, moves the database aside
    assert rig.cache.stats().entries == 0
    rig.pipeline.embed(TEXTS[:5])
    assert rig.cache.stats().entries == 5


def test_swapped_or_flipped_values_are_misses_logged_once(
    make_rig: Any, server: FaultServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "tampered"
    expected = filled_cache(make_rig, server, directory)
    rig: Rig = make_rig(server.base_url, mode="local", cache_dir=directory)
    keys = rig.keys(TEXTS)
    with diskcache.Cache(str(directory)) as raw:  # someone who can write the directory
        a, b = raw[keys[0]], raw[keys[1]]
        raw[keys[0]], raw[keys[1]] = b, a  # two values swapped
        flipped = bytearray(raw[keys[2]])
        flipped[12 + 4 * 7 + 3] ^= 0x40  # an exponent bit of one float
        raw[keys[2]] = bytes(flipped)

    with caplog.at_level(logging.WARNING, logger="adapted_embeddings"):
        results = rig.pipeline.embed(TEXTS)

    routes = [r.route for r in results]
    assert routes[:3] == ["local"] * 3 and routes[3:] == ["cache"] * (len(TEXTS) - 3)
    got = np.stack([r.vector for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.isfinite(np.linalg.norm(got, axis=1)).all()
    messages = [m for m in warnings_from(caplog) if "integrity" in m]
    assert len(messages) == 1, messages
    assert [r.route for r in rig.pipeline.embed(TEXTS[:3])] == ["cache"] * 3  # rewritten


def test_a_truncated_value_with_stored_text_is_dropped(
    make_rig: Any, server: FaultServer, tmp_path: Path
) -> None:
    directory = tmp_path / "truncated-text"
    rig: Rig = make_rig(server.base_url, mode="local", cache_dir=directory, store_text=True)
    text = "naïve café – ünïcode text kept in the cache"
    rig.pipeline.embed([text])
    (key,) = rig.keys([text])
    with diskcache.Cache(str(directory)) as raw:
        raw[key] = raw[key][:-1]

    for _ in range(2):  # every later call works too
        (result,) = rig.pipeline.embed([text])
    assert result.route == "cache"  # dropped, rebuilt by the first call, served by the second
    (entry,) = rig.cached([text])
    assert entry is not None and entry.text == text


LOCK_HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def test_a_write_lock_held_past_the_timeout_skips_the_write_not_the_results(
    make_rig: Any, server: FaultServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "held"
    rig: Rig = make_rig(server.base_url, mode="local", cache_dir=directory, lock_timeout=0.5)
    texts = ["computed while another process holds the lock"]
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(directory / "cache.db"), "4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with caplog.at_level(logging.WARNING, logger="adapted_embeddings"):
            (result,) = rig.pipeline.embed(texts)
    finally:
        holder.wait(timeout=30)
    assert result.route == "local"
    np.testing.assert_allclose(result.vector, rig.local_vectors(texts)[0], atol=1e-6)
    assert "write lock" in caplog.text
    assert rig.entry_count() == 0


# -- directories ---------------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_file_or_dangling_symlink_is_not_a_directory(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a cache")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for path, message in [
        (a_file, "is a file, not a directory"),
        (dangling, "does not exist: not a directory"),
        (a_file / "cache", "cannot exist"),
    ]:
        with pytest.raises(ConfigurationError, match=message) as caught:
            EmbeddingCache(path)
        assert str(path) in str(caught.value)
        assert "cache_dir=" in str(caught.value) and "cache=False" in str(caught.value)
    assert a_file.read_text() == "not a cache" and not (tmp_path / "nowhere").exists()


def test_an_impossible_directory_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="cannot create the cache directory"):
        EmbeddingCache("/proc/adapted-embeddings-no-such-place/cache")


def test_the_factory_names_the_ways_out_before_loading_a_model(
    tmp_path: Path, server: FaultServer
) -> None:
    from adapted_embeddings.langchain import AdaptedEmbeddings

    a_file = tmp_path / "cache-file"
    a_file.write_text("")
    with pytest.raises(ConfigurationError, match=r"cache_dir=.*cache=False"):
        AdaptedEmbeddings(mode="local", cache_dir=a_file, base_url=server.base_url)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create another user's directory")
def test_a_world_writable_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    os.chown(shared, 65534, 65534)  # nobody
    shared.chmod(0o1777)
    with pytest.raises(ConfigurationError, match="writable by everyone and owned by another"):
        EmbeddingCache(shared)
    assert mode_of(shared) == 0o1777 and list(shared.iterdir()) == []


@pytest.mark.parametrize("mode", [0o1777, 0o2775, 0o755])
def test_an_open_directory_of_ours_keeps_its_mode(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / f"open-{mode:o}"
    directory.mkdir()
    directory.chmod(mode)
    link = tmp_path / f"link-{mode:o}"
    link.symlink_to(directory)

    cache = EmbeddingCache(link)
    cache.close()

    assert mode_of(directory) == mode  # sticky, setgid and group bits all kept
    assert cache.directory == link / "adapted-embeddings-private"
    assert mode_of(cache.directory) == 0o700


def test_a_directory_the_library_creates_is_private(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        cache = EmbeddingCache(tmp_path / "new" / "cache")
    finally:
        os.umask(previous)
    cache.close()
    assert cache.directory == tmp_path / "new" / "cache"
    assert mode_of(cache.directory) == 0o700
    # Opening it again uses it as is.
    assert EmbeddingCache(cache.directory).directory == cache.directory


def test_sqlite_sees_the_recreated_database(tmp_path: Path) -> None:
    directory = tmp_path / "fresh"
    EmbeddingCache(directory).close()
    overwrite_header(directory / "cache.db")
    cache = EmbeddingCache(directory)
    cache.close()
    with sqlite3.connect(directory / "cache.db") as db:
        assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
