"""Tiny fake data roots in each dataset's real on-disk layout (CoOp's, or torchvision's), written by the tests."""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

from fsynth.data.registry import FASHION_MNIST_CLASSES, get_spec

_JPEG_CACHE: dict[int, bytes] = {}


def jpeg_bytes(label: int) -> bytes:
    """An 8x8 JPEG whose colour depends on the label (cached: thousands of files are written per root)."""
    if label not in _JPEG_CACHE:
        rng = np.random.default_rng(label)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
        _JPEG_CACHE[label] = buf.getvalue()
    return _JPEG_CACHE[label]


def write_image(path: Path, label: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(label))
    return path


def num_classes(name: str) -> int:
    return get_spec(name).num_classes


def class_dirs(image_dir: Path, n_classes: int, per_class: int, prefix: str = "c") -> None:
    """image_dir/c000/img0.jpg ... : sorted folder order is the label order."""
    for label in range(n_classes):
        for j in range(per_class):
            write_image(image_dir / f"{prefix}{label:03d}" / f"img{j}.jpg", label)


def fake_imagenet(root: Path, per_class: int) -> Path:
    base = root / "imagenet" / "images"
    for label in range(1000):
        wnid = f"n{label:08d}"
        for j in range(per_class):
            write_image(base / "train" / wnid / f"{wnid}_{j}.JPEG", label)
        write_image(base / "val" / wnid / f"ILSVRC2012_val_{label:08d}.JPEG", label)
    return root


def fake_caltech101(root: Path, per_class: int) -> Path:
    image_dir = root / "caltech-101" / "101_ObjectCategories"
    class_dirs(image_dir, 100, per_class)
    for ignored in ("BACKGROUND_Google", "Faces_easy"):  # CoOp drops both folders
        write_image(image_dir / ignored / "image_0001.jpg", 0)
    return root


def fake_dtd(root: Path, per_class: int, layout: str = "coop") -> Path:
    image_dir = root / "dtd" / "images" if layout == "coop" else root / "dtd" / "dtd" / "images"
    class_dirs(image_dir, 47, per_class)
    return root


def fake_eurosat(root: Path, per_class: int) -> Path:
    class_dirs(root / "eurosat" / "2750", 10, per_class)
    return root


def fake_fgvc_aircraft(root: Path, per_class: int, layout: str = "coop") -> Path:
    ddir = root / "fgvc_aircraft" if layout == "coop" else root / "fgvc-aircraft-2013b" / "data"
    variants = get_spec("fgvc_aircraft").classnames()
    (ddir / "images").mkdir(parents=True, exist_ok=True)
    (ddir / "variants.txt").write_text("\n".join(variants) + "\n")
    image_id = 1000000
    for split in ("train", "val", "test"):
        lines = []
        for label, variant in enumerate(variants):
            for _ in range(per_class if split == "train" else 1):
                write_image(ddir / "images" / f"{image_id}.jpg", label)
                lines.append(f"{image_id} {variant}")
                image_id += 1
        (ddir / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def fake_oxford_pets(root: Path, per_class: int, layout: str = "coop") -> Path:
    ddir = root / ("oxford_pets" if layout == "coop" else "oxford-iiit-pet")
    breeds = get_spec("oxford_pets").classnames()
    lines: dict[str, list[str]] = {"trainval.txt": ["#Image CLASS-ID SPECIES BREED ID"], "test.txt": []}
    for label, breed in enumerate(breeds):
        for j in range(per_class + 1):
            stem = f"{breed}_{j + 1}"
            write_image(ddir / "images" / f"{stem}.jpg", label)
            lines["test.txt" if j == per_class else "trainval.txt"].append(f"{stem} {label + 1} 1 {label + 1}")
    (ddir / "annotations").mkdir(parents=True, exist_ok=True)
    for file, rows in lines.items():
        (ddir / "annotations" / file).write_text("\n".join(rows) + "\n")
    return root


def _annotations(fnames: list[str], classes: list[int]) -> np.ndarray:
    table = np.zeros(len(fnames), dtype=[("fname", object), ("class", object)])
    table["fname"] = fnames
    table["class"] = [np.uint8(c) for c in classes]
    return table


def fake_stanford_cars(root: Path, per_class: int) -> Path:
    ddir = root / "stanford_cars"
    (ddir / "devkit").mkdir(parents=True, exist_ok=True)
    counter = 0
    for split, n, mat in (("train", per_class, ddir / "devkit" / "cars_train_annos.mat"),
                          ("test", 1, ddir / "cars_test_annos_withlabels.mat")):
        fnames, classes = [], []
        for label in range(196):
            for _ in range(n):
                counter += 1
                write_image(ddir / f"cars_{split}" / f"{counter:05d}.jpg", label)
                fnames.append(f"{counter:05d}.jpg")
                classes.append(label + 1)
        savemat(str(mat), {"annotations": _annotations(fnames, classes)})
    savemat(str(ddir / "devkit" / "cars_meta.mat"),
            {"class_names": np.array([f"Make Model {i} 2012" for i in range(196)], dtype=object)})
    return root


def fake_sun397(root: Path, per_class: int) -> Path:
    ddir = root / "sun397"
    classes = [f"/c/c{label:03d}" + ("/indoor" if label % 50 == 0 else "") for label in range(397)]
    for label, cls in enumerate(classes):
        for j in range(per_class):
            write_image(ddir / "SUN397" / cls.strip("/") / f"sun_{j}.jpg", label)
    (ddir / "ClassName.txt").write_text("\n".join(classes) + "\n")
    return root


def fake_food101(root: Path, per_class: int, with_meta: bool = True) -> Path:
    ddir = root / "food-101"
    class_dirs(ddir / "images", 101, per_class + 1)
    if with_meta:
        (ddir / "meta").mkdir(parents=True, exist_ok=True)
        train = [f"c{label:03d}/img{j}" for label in range(101) for j in range(per_class)]
        test = [f"c{label:03d}/img{per_class}" for label in range(101)]
        (ddir / "meta" / "train.txt").write_text("\n".join(train) + "\n")
        (ddir / "meta" / "test.txt").write_text("\n".join(test) + "\n")
    return root


def fake_flowers102(root: Path, per_class: int, layout: str = "coop") -> Path:
    ddir = root / ("oxford_flowers" if layout == "coop" else "flowers-102")
    labels = np.repeat(np.arange(1, 103), per_class + 2)
    for number, label in enumerate(labels, start=1):
        write_image(ddir / "jpg" / f"image_{number:05d}.jpg", int(label) - 1)
    savemat(str(ddir / "imagelabels.mat"), {"labels": labels.astype(np.uint8)})
    if layout == "torchvision":  # torchvision's copy comes with the official setid.mat
        ids = np.arange(1, len(labels) + 1).reshape(102, per_class + 2)
        savemat(str(ddir / "setid.mat"), {"trnid": ids[:, :per_class].ravel(), "valid": ids[:, per_class],
                                          "tstid": ids[:, per_class + 1]})
    (ddir / "cat_to_name.json").write_text(json.dumps({str(i + 1): f"flower {i}" for i in range(102)}))
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root: Path, per_class: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", per_class), ("t10k", 2)):
        labels = np.tile(np.arange(len(FASHION_MNIST_CLASSES)), n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (len(labels), 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def fake_folder(root: Path, per_class: int, splits: bool = False) -> Path:
    classes = ["red_fox", "grey_wolf", "lynx"]
    for label, cls in enumerate(classes):
        if splits:
            for split, n in (("train", per_class), ("val", 1), ("test", 2)):
                for j in range(n):
                    write_image(root / split / cls / f"{split}{j}.png", label)
        else:
            for j in range(per_class):
                write_image(root / cls / f"img{j}.jpg", label)
    return root


FAKERS = {
    "imagenet": fake_imagenet, "caltech101": fake_caltech101, "dtd": fake_dtd, "eurosat": fake_eurosat,
    "fgvc_aircraft": fake_fgvc_aircraft, "oxford_pets": fake_oxford_pets, "stanford_cars": fake_stanford_cars,
    "sun397": fake_sun397, "food101": fake_food101, "flowers102": fake_flowers102,
    "fashion-mnist": fake_fashion_mnist, "folder": fake_folder,
}


def make_root(name: str, root: Path, per_class: int = 6, **kwargs) -> Path:
    """Write a fake root for dataset `name` under `root` (per_class images per class in its pool/train)."""
    return FAKERS[name](root, per_class, **kwargs)


def write_split_zhou(path: Path, image_dir: Path, classnames: tuple[str, ...], per_split: dict[str, int]) -> None:
    """A CoOp split file over the class folders c000.. of image_dir: [[relative path, label, classname]]."""
    table: dict[str, list] = {split: [] for split in per_split}
    for label, name in enumerate(classnames):
        files = sorted((image_dir / f"c{label:03d}").iterdir())
        start = 0
        for split, n in per_split.items():
            table[split] += [[f.relative_to(image_dir).as_posix(), label, name] for f in files[start:start + n]]
            start += n
    path.write_text(json.dumps(table))
