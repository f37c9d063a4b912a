"""What every fsynth command shares: bad input becomes one line on stderr and exit status 2, no traceback."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence

from fsynth.errors import FsynthError


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI `main`; a `FsynthError` prints `error: <message>` and returns 2.

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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; what was written so far is kept, run the same command to continue",
              file=sys.stderr)
        return 130
