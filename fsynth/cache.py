"""Build-once artefacts: a lock per artefact (concurrent callers build it once and all use the one copy), the one
publisher of files and folders (temp sibling, fsync, rename) and the one content key that names every cache."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
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


def content_key(payload: object, n: int = 16) -> str:
    """The first `n` hex digits of the SHA-256 of `payload`: bytes as they are, a str as its UTF-8, anything else
    as its JSON (sorted keys; str() of what JSON cannot hold). What names every cache folder, fingerprint, run and
    sweep: the same inputs give the same name on every machine."""
    if isinstance(payload, bytes):
        blob = payload
    elif isinstance(payload, str):
        blob = payload.encode()
    else:
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def temp_sibling(path: str | Path) -> Path:
    """A unique hidden name beside `path` for its copy in progress (pid + uuid: unique across processes and
    threads; the .tmp suffix keeps it out of every glob for the real files, *.png, *.parquet)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temp sibling of `path`, fsync it, then rename it over `path`: readers (and a rerun after
    a kill or a power loss) see the whole file or none of it. Creates the folder; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as f:  # "xb" keeps the umask's permissions (mkstemp forces 0600)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def publish_dir(final: str | Path, fill: Callable[[Path], object], replace: bool = True) -> Path:
    """Build the folder `final` whole or not at all: `fill(tmp)` writes into an empty temp sibling, whose files and
    folders are fsynced, then one rename puts it in place (and the parent folder is fsynced, so the rename survives
    a power loss). An existing `final` is replaced (`replace=True`: e.g. a checkpoint of the same epoch written
    again) or kept, the new copy dropped (`replace=False`: another builder published the same content first). A
    partial copy is removed on any error. Returns `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        fill(tmp)
        # Files, then the folders that list them: a folder's entries are only durable once it is fsynced itself.
        entries = list(tmp.rglob("*"))
        for entry in [*(p for p in entries if p.is_file()), *(p for p in entries if p.is_dir()), tmp]:
            _fsync(entry)
        if final.exists():
            if not replace:
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`atomic_write` of a bytes payload."""
    if not isinstance(data, bytes):
        raise TypeError(f"atomic_write_bytes takes bytes, got {type(data).__name__}")
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, payload: object, **dumps) -> Path:
    """`atomic_write` of `payload` as JSON text (json.dumps keyword arguments in `dumps`)."""
    return atomic_write_bytes(path, json.dumps(payload, **dumps).encode())
