"""Build-once artefacts: concurrent callers build once and share it; a killed builder leaves no stale lock."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fsynth.cache import artefact_lock, atomic_write_bytes, ensure_built


def test_concurrent_callers_build_once_and_all_get_the_published_artefact(tmp_path):
    final, builds, results = tmp_path / "artefact", [], []
    start = threading.Barrier(4)

    def build():
        builds.append(threading.get_ident())
        time.sleep(0.5)  # the other callers arrive while this one builds
        final.write_text("made once")
        return final

    def caller():
        start.wait(timeout=30)
        results.append(ensure_built(final, lambda: final if final.exists() else None, build))

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(builds) == 1 and len(results) == 4
    assert sorted(built for _, built in results) == [False, False, False, True]
    assert {path for path, _ in results} == {final} and final.read_text() == "made once"


def test_a_failed_build_publishes_nothing_and_the_next_caller_builds(tmp_path):
    final = tmp_path / "artefact"

    def broken():
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_built(final, lambda: final if final.exists() else None, broken)
    got, built = ensure_built(final, lambda: final if final.exists() else None,
                              lambda: (final.write_text("ok"), final)[1])
    assert built and got == final and final.read_text() == "ok"


def test_a_builder_killed_while_holding_the_lock_leaves_it_free(tmp_path):
    """SIGKILL (a lost node, an OOM kill) cannot run cleanup; the kernel drops flock locks with the process."""
    final = tmp_path / "artefact"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fsynth.cache import artefact_lock\n"
         f"with artefact_lock({str(final)!r}):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert holder.stdout.readline().strip() == "held"
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(ensure_built(final, lambda: None, lambda: "built")))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and not waited  # blocked on the live holder's lock
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    waiter.join(timeout=30)
    assert waited == [("built", True)]


def test_artefact_lock_tells_the_waiter_what_it_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr("fsynth.cache.WAIT_NOTICE_S", 0.0)
    final, lines = tmp_path / "regions-abc", []
    with artefact_lock(final):
        def wait_for_it():
            with artefact_lock(final, lines.append):
                pass

        other = threading.Thread(target=wait_for_it)
        other.start()
        time.sleep(0.3)
    other.join(timeout=30)
    assert len(lines) == 1 and lines[0].startswith("waited") and "regions-abc" in lines[0]


def test_atomic_write_replaces_whole_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # a write that fails half-way keeps the previous file
    assert path.read_bytes() == b"new contents" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_content_key_is_stable_and_sees_every_field():
    from fsynth.cache import content_key

    assert content_key({"b": 1, "a": [1, 2]}) == content_key({"a": [1, 2], "b": 1})  # key order does not matter
    assert content_key({"a": 1}) != content_key({"a": 2}) and len(content_key({"a": 1}, 10)) == 10
    # a str and bytes are hashed as they are (the names that hashed raw text keep their value)
    import hashlib

    assert content_key("x\ny") == hashlib.sha256(b"x\ny").hexdigest()[:16] == content_key(b"x\ny")
    assert content_key({"p": Path("/a")}) == content_key({"p": "/a"})  # str() of what JSON cannot hold


def test_publish_dir_is_whole_or_nothing(tmp_path):
    from fsynth.cache import publish_dir

    final = tmp_path / "art"

    def fill(folder, text="one"):
        (folder / "sub").mkdir()
        (folder / "sub" / "f.txt").write_text(text)

    assert publish_dir(final, fill) == final and (final / "sub" / "f.txt").read_text() == "one"
    publish_dir(final, lambda d: fill(d, "two"), replace=False)  # someone published first: theirs stays
    assert (final / "sub" / "f.txt").read_text() == "one"
    publish_dir(final, lambda d: fill(d, "two"))  # replace: the new copy, whole
    assert (final / "sub" / "f.txt").read_text() == "two"

    def broken(folder):
        (folder / "half.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_dir(tmp_path / "never", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no partial copy, no temp sibling left


def test_publish_dir_fsyncs_files_their_folders_and_the_parent(tmp_path, monkeypatch):
    import fsynth.cache as cache

    synced = []
    monkeypatch.setattr(cache, "_fsync", lambda p: synced.append(Path(p)))
    final = tmp_path / "art"

    def fill(folder):
        (folder / "sub").mkdir()
        (folder / "sub" / "f.txt").write_text("x")
        (folder / "g.txt").write_text("y")

    cache.publish_dir(final, fill)
    tmp = next(p for p in synced if p.name.endswith(".tmp"))  # the temp sibling, renamed to `final` since
    assert tmp.parent == tmp_path and tmp.name.startswith(".art.")
    names = [p.relative_to(tmp).as_posix() if p.is_relative_to(tmp) else p for p in synced]
    assert sorted(names[:2]) == ["g.txt", "sub/f.txt"]  # the files first
    assert names[2:] == ["sub", ".", tmp_path]  # then their folders, the temp folder itself, the parent after rename
