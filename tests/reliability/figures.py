"""Counters the reliability tests fill in and the terminal summary prints (README figures)."""

from __future__ import annotations

import threading

_lock = threading.Lock()
counts: dict[str, int] = {}


def add(name: str, amount: int = 1) -> None:
    """Add ``amount`` to the counter ``name``."""
    with _lock:
        counts[name] = counts.get(name, 0) + amount
