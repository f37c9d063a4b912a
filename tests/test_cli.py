"""Bad input in any CLI is one line on stderr and exit status 2."""

from fsynth.cli import run_main
from fsynth.errors import DataError


def test_fsynth_error_is_one_line_and_status_2(capsys):
    def main(argv):
        raise DataError("data root /nowhere does not exist; pass --root DIR")

    assert run_main(main, []) == 2
    err = capsys.readouterr().err
    assert err == "error: data root /nowhere does not exist; pass --root DIR\n"


def test_success_returns_zero():
    assert run_main(lambda argv: None, []) == 0
    assert run_main(lambda argv: 0, []) == 0


def test_sigterm_is_an_interrupt_that_keeps_the_work(tmp_path):
    """`ray job stop` sends SIGTERM: the CLI stops like Ctrl-C (exit 130, one line), cleanup code runs."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from fsynth.cli import run_main

        def main(argv):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                Path({str(tmp_path / "cleaned")!r}).write_text("yes")

        raise SystemExit(run_main(main, []))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and (tmp_path / "cleaned").read_text() == "yes"
    assert proc.stderr.strip().startswith("error: interrupted;") and len(proc.stderr.strip().splitlines()) == 1


def test_a_usage_error_is_one_line_and_help_still_prints(capsys):
    import pytest

    from fsynth.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m fsynth.x")
    parser.add_argument("--n", type=int, required=True)
    assert run_main(parser.parse_args, ["--n", "two"]) == 2
    assert capsys.readouterr().err == "error: argument --n: invalid int value: 'two'; run with --help for the options\n"
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--help"])
    assert info.value.code == 0 and "--n N" in capsys.readouterr().out
