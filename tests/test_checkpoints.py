"""Checkpoint directories: what is not one is refused, and the newest complete one is found."""

import pytest

from fsynth.checkpoints import latest, load
from fsynth.errors import FsynthError


def test_not_a_checkpoint_is_one_line(tmp_path):
    with pytest.raises(FsynthError, match="is not a training checkpoint"):
        load(tmp_path, None, None, None, None)


def test_latest_skips_incomplete(tmp_path):
    assert latest(tmp_path) is None
    for name, complete in (("epoch_0000", True), ("epoch_0001", True), ("epoch_0002", False)):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        if complete:
            (tmp_path / "checkpoints" / name / "state.json").write_text("{}")
    assert latest(tmp_path).name == "epoch_0001"
