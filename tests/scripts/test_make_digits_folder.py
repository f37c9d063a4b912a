"""scripts/make_digits_folder.py: scikit-learn's digits as a `folder` dataset that fsynth's loader reads."""


import numpy as np
from PIL import Image

from fsynth.data.registry import load_dataset
from tests.scripts import load_script


def _script():
    return load_script("make_digits_folder")


def test_writes_every_digit_and_the_loader_reads_them(tmp_path):
    script = _script()
    out = tmp_path / "digits"
    assert script.main(["--out", str(out), "--side", "16"]) == 0
    files = sorted(out.glob("*/*.png"))
    assert len(files) == 1797 and {f.parent.name for f in files} == set(script.NAMES)
    first = np.asarray(Image.open(out / "zero" / "0000.png"))
    assert first.shape == (16, 16) and first.max() > 200 and first.min() < 30  # a real digit, scaled to 0..255
    ds = load_dataset("folder", out)
    assert sorted(ds.classnames) == sorted(script.NAMES)
    assert sum(len(s) for s in (ds.train, ds.val, ds.test)) == 1797
    mtime = files[0].stat().st_mtime_ns
    assert script.main(["--out", str(out), "--side", "16"]) == 0  # idempotent: existing images are kept
    assert files[0].stat().st_mtime_ns == mtime and not list(out.glob("*/.*.tmp"))


def test_refuses_a_side_below_the_digits_own(tmp_path, capsys):
    assert _script().main(["--out", str(tmp_path / "d"), "--side", "4"]) == 2
    assert "--side must be at least 8" in capsys.readouterr().err and not (tmp_path / "d").exists()
