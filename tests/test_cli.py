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
