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


def test_save_final_replaces_whole_and_a_failed_save_leaves_the_previous_copy(tmp_path, monkeypatch):
    import numpy as np

    import fsynth.checkpoints as checkpoints
    from fsynth.checkpoints import save_final
    from fsynth.config import build_config

    def fake_adapters(model, path, metadata=None):
        if model == "broken":
            raise RuntimeError("disk full")
        path.write_bytes(model.encode())

    monkeypatch.setattr(checkpoints, "save_adapters", fake_adapters)
    cfg, final = build_config("embedded"), tmp_path / "final"
    assert save_final(final, "one", cfg, np.eye(2, dtype=int)) == str(final)
    save_final(final, "two", cfg, None)  # a rerun: the new copy, whole (no stale confusion matrix)
    assert sorted(p.name for p in final.iterdir()) == ["adapters.safetensors", "config.yaml"]
    assert (final / "adapters.safetensors").read_bytes() == b"two"
    with pytest.raises(RuntimeError, match="disk full"):
        save_final(final, "broken", cfg, None)
    assert (final / "adapters.safetensors").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temp sibling left
