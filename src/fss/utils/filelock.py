"""A tiny inter-process lock so parallel multirun jobs do not build one cache entry twice."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - closed below
    try:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows: best effort, no lock
            pass
        yield
    finally:
        # The lock file is left in place: unlinking it would let a waiting process and a
        # newcomer lock two different inodes at once.
        handle.close()
