"""What every fsynth command shares: bad input becomes one line on stderr and exit status 2, no traceback."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from fsynth.errors import ConfigError, FsynthError, UsageError
from fsynth.secrets import redact


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are a `UsageError` (one `error:` line from `run_main`, status 2).

    argparse's own report is the usage block plus `prog: error: ...`; every fsynth CLI (and each subcommand, which
    argparse builds with the parent's class) answers bad input the same one-line way instead.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; run with --help for the options")


def writable_folder(path: str | Path, flag: str) -> Path:
    """`path` made absolute, once it is sure a folder can be made and written there; else a one-line ConfigError.

    Checked before any work, so a typo in --out fails in a second and not after the first stage wrote nothing.
    Nothing is created here.
    """
    path = Path(path).expanduser().resolve()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{flag} {path} cannot be a folder: {probe} is a file; pass a folder path (one whose "
                          "parents are folders)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} is not writable ({probe} refuses writes); pass a folder you can write to")
    return path


def require_gpus(requested: float, key: str) -> None:
    """Refuse a GPU request this machine cannot meet (a local run would wait for it forever or ignore it)."""
    if requested <= 0:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < requested:
        raise ConfigError(f"{key}={requested:g} asks for a GPU but this machine has {have}; set --set {key}=0 to "
                          "run on the CPUs, or run on a machine with a GPU")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI `main`; a `FsynthError` (a usage error included) prints `error: <message>` and returns 2.

    SIGTERM (`ray job stop`, a scheduler's kill) is handled like Ctrl-C, so open MLflow runs end as KILLED and the
    partial work is kept for the next run of the same command.
    """
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, _interrupt)
        except ValueError:  # not the main thread (a CLI called from a worker thread): keep the default
            pass
    try:
        return main(argv) or 0
    except FsynthError as exc:
        # One line even if a message quotes a multi-line text (a library's error), and a URI in it shows no password.
        line = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"error: {redact(line)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; what was written so far is kept, run the same command to continue",
              file=sys.stderr)
        return 130
