"""Build-once artefacts: a lock per artefact, so concurrent callers build it once and all use the one copy."""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

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


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a unique temp file beside `path`, then rename it over `path`: readers (and a rerun after
    a kill) see the whole file or none of it. Creates the folder; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid + uuid: unique across processes and threads; "xb" keeps the umask's permissions (mkstemp forces 0600).
    # The name ends in .tmp, hidden: no glob for the real files (*.png, *.parquet) ever matches it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`atomic_write` of a bytes payload."""
    if not isinstance(data, bytes):
        raise TypeError(f"atomic_write_bytes takes bytes, got {type(data).__name__}")
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, payload: object, **dumps) -> Path:
    """`atomic_write` of `payload` as JSON text (json.dumps keyword arguments in `dumps`)."""
    return atomic_write_bytes(path, json.dumps(payload, **dumps).encode())
