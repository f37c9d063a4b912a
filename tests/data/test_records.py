"""Reading one sample's image, from a file or from an IDX array."""

import gzip

import numpy as np
import pytest

from fsynth.data.records import Sample, load_idx, load_image
from fsynth.errors import DataError
from tests.data.fake_roots import write_idx, write_image


def test_file_image_is_rgb(tmp_path):
    path = write_image(tmp_path / "a.jpg", 3)
    img = load_image(Sample("d/a.jpg", 0, str(path)))
    assert img.mode == "RGB" and img.size == (8, 8)


def test_idx_image(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "x-images-idx3-ubyte.gz", array)
    path = str(tmp_path / "x-images-idx3-ubyte.gz")
    assert np.array_equal(load_idx(path), array)
    img = load_image(Sample("fm/train/1", 0, path, index=1))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 0], array[1])


def test_unreadable_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00\x01 not a jpeg")
    with pytest.raises(DataError) as info:
        load_image(Sample("d/bad.jpg", 0, str(bad)))
    assert str(info.value).startswith(f"cannot read image {bad}") and "\n" not in str(info.value)
    with pytest.raises(DataError, match="cannot read image .*missing.jpg"):
        load_image(Sample("d/missing.jpg", 0, str(tmp_path / "missing.jpg")))
    broken = tmp_path / "broken-idx3-ubyte.gz"
    with gzip.open(broken, "wb") as fh:
        fh.write(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="cannot read IDX file .* replace it with an intact copy"):
        load_idx(str(broken))
