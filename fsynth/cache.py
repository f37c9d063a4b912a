"""Build-once artefacts: a lock per artefact, so concurrent callers build it once and all use the one copy."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
LOCK_DIR = ".locks"  # one hidden folder of lock files beside the artefacts they guard
WAIT_NOTICE_S = 2.0  # say that we wait (and for what) only when the wait is noticeable


@contextmanager
def artefact_lock(final: str | Path, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock of artefact `final` (the file `.locks/<name>.lock` beside it) until the block ends.

    `flock` locks die with their process: a builder that is killed (SIGKILL, a lost node) never leaves a stale
    lock, and the next caller simply builds again. On NFS (EFS) Linux maps `flock` to NFS byte-range locks, which
    every client sees.
    """
    final = Path(final)
    locks = final.parent / LOCK_DIR
    locks.mkdir(parents=True, exist_ok=True)
    # The lock file is never removed: unlinking it while another process waits on it would let a third lock a
    # new file of the same name, and two builders would run at once.
    fd = os.open(locks / f"{final.name.lstrip('.')}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            start = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)  # another process is building it: wait for its result
            if log is not None and time.monotonic() - start > WAIT_NOTICE_S:
                log(f"waited {time.monotonic() - start:.0f} s for another process building {final.name}")
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_built(final: str | Path, done: Callable[[], T | None], build: Callable[[], T],
                 log: Callable[[str], None] | None = None) -> tuple[T, bool]:
    """(artefact, built_here): `done()` when it is already there, else `build()` under the lock named by `final`.

    `done()` returns the finished artefact or None; it is asked again once the lock is held, so of several
    callers that start together exactly one builds and the others return what it published.
    """
    found = done()
    if found is not None:
        return found, False
    with artefact_lock(final, log):
        found = done()
        if found is not None:
            return found, False
        return build(), True


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a unique sibling temp file and a rename: readers see all of it or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
