"""Samples and split datasets: what a loader returns, and how one sample's image is read."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fsynth.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One real image: a stable id, its label, and where it is (a file, or row `index` of an IDX array file)."""

    id: str
    label: int
    path: str
    index: int = -1


@dataclass
class RealDataset:
    """A dataset resolved on disk: class names in label order and the train/val/test partitions."""

    name: str
    classnames: tuple[str, ...]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    root: str
    split_source: str  # where the partition came from, e.g. "split_zhou_DescribableTextures.json"
    domain: str = ""
    templates: tuple[str, ...] = field(default_factory=lambda: ("a photo of a {}.",))

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> list[Sample]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


@lru_cache(maxsize=8)
def load_idx(path: str) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally gzipped) into a uint8 array [N, H, W] or [N]."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise DataError(f"cannot read IDX file {path} ({exc}); replace it with an intact copy") from None


def load_image(sample: Sample) -> Image.Image:
    """The sample's image as RGB; an unreadable file is a one-line DataError naming it."""
    if sample.index >= 0:
        return Image.fromarray(load_idx(sample.path)[sample.index]).convert("RGB")
    try:
        with Image.open(sample.path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        reason = type(exc).__name__ if isinstance(exc, UnidentifiedImageError) else str(exc).split("\n")[0]
        raise DataError(
            f"cannot read image {sample.path} ({reason}); replace or delete the file and run again"
        ) from None


def relative_id(dataset: str, path: Path, image_dir: Path) -> str:
    """The stable sample id of a file: dataset name and its path under the image directory."""
    return f"{dataset}/{path.relative_to(image_dir).as_posix()}"
