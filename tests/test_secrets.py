"""Credentials stay out of output: passwords in URIs are masked in messages, tags, params and printed commands."""

from fsynth.cli import run_main
from fsynth.config import build_config
from fsynth.errors import ConfigError
from fsynth.secrets import redact

URI = "http://alice:s3cr%40t@mlflow.internal:5000"


def test_redact_masks_only_the_password():
    masked = "--tracking-uri http://alice:***@mlflow.internal:5000 --out runs"
    assert redact(f"--tracking-uri {URI} --out runs") == masked
    assert redact("postgresql://u:pw@db/x and https://a:b@h") == "postgresql://u:***@db/x and https://a:***@h"
    for clean in ("http://head:5000", "sqlite:////abs/runs/mlflow.db", "s3://bucket/runs", "user@host:/path"):
        assert redact(clean) == clean


def test_params_and_printed_commands_never_carry_the_password():
    from fsynth.jobs.tracking import flat_params, ui_command

    cfg = build_config("embedded", overrides=[f"tracking.uri={URI}"])
    assert flat_params(cfg)["tracking.uri"] == "http://alice:***@mlflow.internal:5000"
    assert "s3cr" not in ui_command(URI)


def test_an_error_naming_a_uri_prints_no_password(capsys):
    def main(argv):
        raise ConfigError(f"MLflow tracking server {URI} is unreachable; start it")

    assert run_main(main, []) == 2
    err = capsys.readouterr().err
    assert "s3cr" not in err and "alice:***@mlflow.internal" in err


def test_the_sweep_command_tag_is_redacted(monkeypatch):
    """fsynth.tune tags the sweep with its command line; the password on it is masked before it is stored."""
    from fsynth import tune
    from fsynth.jobs import experiment

    seen = {}
    monkeypatch.setattr(experiment, "run_tune", lambda plan, args: seen.setdefault("command", plan.command))
    tune.main(["--dataset", "fashion-mnist", "--tracking-uri", URI])
    assert seen["command"].endswith("--tracking-uri http://alice:***@mlflow.internal:5000")
