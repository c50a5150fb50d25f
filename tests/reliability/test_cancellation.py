"""Cancellation: a cancelled caller releases its leases, and its waiters carry on.

Uses a real second process that holds the cache's SQLite write lock, and the real
loopback fault server as a slow provider.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import Rig
from .faultserver import Fault, FaultServer, reference_vectors

# Holds a write transaction on the cache's database for argv[2] seconds.
LOCK_HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def hold_write_lock(database: Path, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(database), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    return holder


def wait_until(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


async def test_a_caller_cancelled_while_claiming_releases_its_leases(
    make_rig: Any, server: FaultServer, tmp_path: Path
) -> None:
    directory = tmp_path / "locked-cache"
    rig: Rig = make_rig(server.base_url, cache_dir=directory)
    texts = [f"cancelled during the claim {i}" for i in range(5)]
    reference_vectors(texts)
    keys = rig.provider_keys(texts)

    holder = hold_write_lock(directory / "cache.db", 3.0)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rig.pipeline.aembed(texts), 1.0)
    finally:
        holder.wait(timeout=30)

    # The claim finishes in its thread once the lock is gone; what it took is released.
    released = await asyncio.to_thread(
        wait_until, lambda: rig.cache.holders(keys) == [None] * len(keys), 10.0
    )
    assert released, rig.cache.holders(keys)
    assert server.recorded() == []  # the cancelled caller never sent anything

    # A second instance on the same directory gets the texts at once, not after a lease.
    other: Rig = make_rig(server.base_url, cache_dir=directory)
    started = time.monotonic()
    results = await other.pipeline.aembed(texts)
    assert time.monotonic() - started < 10
    assert [r.route for r in results] == ["provider"] * len(texts)
    assert len(server.texts_embedded()) == len(texts)


@pytest.mark.parametrize("policy", ["raise", "local"])
async def test_a_waiter_whose_leader_is_cancelled_fetches_the_text_itself(
    make_rig: Any, server: FaultServer, policy: str
) -> None:
    rig: Rig = make_rig(server.base_url, timeout=10.0, on_provider_error=policy)
    text = f"a slow text whose first caller gives up ({policy})"
    reference_vectors([text])
    (key,) = rig.provider_keys([text])
    server.slow_seconds = 3.0
    server.inject(Fault.SLOW, times=1)  # the leader's request hangs; the waiter's is fine

    leader = asyncio.create_task(rig.pipeline.aembed([text]))
    while rig.cache.holders([key]) == [None]:  # the leader holds the lease, request in flight
        await asyncio.sleep(0.01)
    waiter = asyncio.create_task(rig.pipeline.aembed([text]))
    await asyncio.sleep(0.3)  # the waiter is now following the leader
    leader.cancel()

    (result,) = await waiter

    assert result.route == "provider"  # not a ProviderError, not local_degraded
    np.testing.assert_array_equal(result.vector, reference_vectors([text])[0])
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert [r.fault for r in server.recorded()] == [Fault.SLOW, Fault.OK]
    assert rig.cache.holders([key]) == [None]
