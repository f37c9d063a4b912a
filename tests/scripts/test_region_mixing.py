"""scripts/region_mixing.py: the share of synthetic samples in regions that also hold a real one."""

import json

import numpy as np

from tests.scripts import load_script


def _script():
    return load_script("region_mixing")


IDS = np.array(["fm/train/1", "fm/train/2", "synthetic/fm/x/a/0", "synthetic/fm/x/a/1", "synthetic/fm/x/b/2"])


def test_separated_regions_leave_no_synthetic_sample_in_t():
    m = _script().mixing(IDS, np.array([0, 0, 1, 1, 2]))
    assert m == {"k": 3, "real": 2, "synthetic": 3, "regions_with_both": 0, "synthetic_in_real_regions": 0.0}


def test_mixed_regions_are_counted(tmp_path, capsys):
    script = _script()
    m = script.mixing(IDS, np.array([0, 1, 0, 1, 2]))
    assert m["regions_with_both"] == 2 and m["synthetic_in_real_regions"] == 2 / 3
    folder = tmp_path / "regions-0123"
    folder.mkdir()
    np.savez(folder / "regions.npz", ids=IDS, assignments=np.array([0, 1, 0, 1, 2]))
    parts = {"dataset": "fm", "features": "embedding", "image_size": 64}
    (folder / "key.json").write_text(json.dumps({"parts": parts}))
    assert script.main(["--cache", str(tmp_path)]) == 0
    assert "| regions-0123 | fm | embedding | 64 | 3 | 2 | 3 | 2 | 67% |" in capsys.readouterr().out
    assert script.main(["--cache", str(tmp_path / "none")]) == 2
