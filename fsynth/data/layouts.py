"""On-disk layouts: how each dataset's images and labels are found under its folder (CoOp's and torchvision's)."""

from __future__ import annotations

from pathlib import Path

from fsynth.data.records import Sample, load_idx, relative_id
from fsynth.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

Parts = dict[str, list[Sample]]


def image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (hidden files skipped)."""
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def class_folders(folder: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Sorted names of the sub-folders of `folder` (hidden and ignored ones skipped): the label order."""
    return sorted(
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in ignore
    )


def scan_class_folders(name: str, image_dir: Path, classes: list[str]) -> list[Sample]:
    """Samples of `image_dir/<class>/*` with label = position of the class in `classes`."""
    samples = []
    for label, cls in enumerate(classes):
        folder = image_dir / cls
        if not folder.is_dir():
            raise DataError(f"{name}: class folder {folder} is missing; the dataset root is incomplete: "
                            "re-extract the dataset")
        samples.extend(Sample(relative_id(name, f, image_dir), label, str(f)) for f in image_files(folder))
    return samples


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty, non-comment lines of a text file that must exist."""
    if not path.is_file():
        raise DataError(f"{what} {path} is missing; the dataset root is incomplete: re-extract the dataset")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def load_mat(path: Path) -> dict:
    """A MATLAB file's variables (scipy.io), with a one-line error when it is missing or unreadable."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        raise DataError(f"label file {path} is missing; the dataset root is incomplete: re-extract the dataset")
    try:
        return loadmat(str(path), squeeze_me=True)
    except (OSError, ValueError, MatReadError) as exc:
        raise DataError(f"label file {path} cannot be read ({exc}); replace it with the original") from None


# ------------------------------------------------------------------------------------------------ per dataset


def scan_folders_pool(name: str, image_dir: Path, ignore: tuple[str, ...] = ()) -> Parts:
    """One folder per class, no official split (Caltech101, DTD, EuroSAT)."""
    return {"all": scan_class_folders(name, image_dir, class_folders(image_dir, ignore))}


def scan_caltech101(name: str, ddir: Path, image_dir: Path) -> Parts:
    return scan_folders_pool(name, image_dir, ignore=("BACKGROUND_Google", "Faces_easy"))


def scan_plain_folders(name: str, ddir: Path, image_dir: Path) -> Parts:
    return scan_folders_pool(name, image_dir)


def scan_imagenet(name: str, ddir: Path, image_dir: Path) -> Parts:
    """images/train/<wnid>/* is the pool; images/val/<wnid>/* is the test set (as in CoOp)."""
    wnids = class_folders(image_dir / "train")
    parts = {"train": scan_class_folders(name, image_dir, [f"train/{w}" for w in wnids])}
    val_dir = image_dir / "val"
    if not val_dir.is_dir():
        raise DataError(f"{name}: {val_dir} is missing; put ImageNet's validation images there, one folder per wnid")
    unknown = sorted(set(class_folders(val_dir)) - set(wnids))
    if unknown:
        raise DataError(f"{name}: {val_dir} has class folders not in train ({unknown[0]}, ...); fix the layout")
    parts["test"] = scan_class_folders(name, image_dir, [f"val/{w}" for w in wnids])
    return parts


def scan_aircraft(name: str, ddir: Path, image_dir: Path) -> Parts:
    """variants.txt gives the label order; images_variant_{train,val,test}.txt the official split."""
    variants = read_lines(ddir / "variants.txt", "class list")
    index = {v: i for i, v in enumerate(variants)}
    parts: Parts = {}
    for split in ("train", "val", "test"):
        samples = []
        for line in read_lines(ddir / f"images_variant_{split}.txt", "split file"):
            image_id, _, variant = line.partition(" ")
            if variant not in index:
                raise DataError(f"{name}: variant {variant!r} of image {image_id} is not in variants.txt")
            f = image_dir / f"{image_id}.jpg"
            samples.append(Sample(relative_id(name, f, image_dir), index[variant], str(f)))
        parts[split] = samples
    return parts


def scan_pets(name: str, ddir: Path, image_dir: Path) -> Parts:
    """annotations/{trainval,test}.txt: '<image> <class id 1..37> <species> <breed id>'."""
    parts: Parts = {}
    for split, file in (("train", "trainval.txt"), ("test", "test.txt")):
        samples = []
        for line in read_lines(ddir / "annotations" / file, "annotation file"):
            image, class_id = line.split()[:2]
            f = image_dir / f"{image}.jpg"
            samples.append(Sample(relative_id(name, f, image_dir), int(class_id) - 1, str(f)))
        parts[split] = samples
    return parts


def scan_cars(name: str, ddir: Path, image_dir: Path) -> Parts:
    """devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat: 'fname' and 1-based 'class'."""
    test_annos = next(
        (p for p in (ddir / "cars_test_annos_withlabels.mat", ddir / "devkit" / "cars_test_annos_withlabels.mat")
         if p.is_file()),
        ddir / "cars_test_annos_withlabels.mat",
    )
    parts: Parts = {}
    for split, mat, folder in (
        ("train", ddir / "devkit" / "cars_train_annos.mat", "cars_train"),
        ("test", test_annos, "cars_test"),
    ):
        annos = load_mat(mat)["annotations"]
        samples = []
        for fname, cls in zip(annos["fname"], annos["class"], strict=True):
            f = image_dir / folder / str(fname)
            samples.append(Sample(relative_id(name, f, image_dir), int(cls) - 1, str(f)))
        parts[split] = samples
    return parts


def scan_sun397(name: str, ddir: Path, image_dir: Path) -> Parts:
    """ClassName.txt ('/a/abbey', '/b/bakery/shop', ...) gives the label order and the class folders."""
    class_file = next((p for p in (ddir / "ClassName.txt", image_dir / "ClassName.txt") if p.is_file()), None)
    classes = read_lines(class_file or ddir / "ClassName.txt", "class list")
    return {"all": scan_class_folders(name, image_dir, [c.strip("/") for c in classes])}


def scan_food101(name: str, ddir: Path, image_dir: Path) -> Parts:
    """images/<class>/*; meta/{train,test}.txt ('apple_pie/1005649') give the official split when present."""
    classes = class_folders(image_dir)
    if not (ddir / "meta" / "train.txt").is_file():
        return {"all": scan_class_folders(name, image_dir, classes)}
    index = {c: i for i, c in enumerate(classes)}
    parts: Parts = {}
    for split in ("train", "test"):
        samples = []
        for line in read_lines(ddir / "meta" / f"{split}.txt", "split file"):
            f = image_dir / f"{line}.jpg"
            samples.append(Sample(relative_id(name, f, image_dir), index[line.split("/")[0]], str(f)))
        parts[split] = samples
    return parts


def scan_flowers102(name: str, ddir: Path, image_dir: Path) -> Parts:
    """jpg/image_00001.jpg ...; imagelabels.mat 'labels' (1..102); setid.mat trnid/valid/tstid if present."""
    labels = load_mat(ddir / "imagelabels.mat")["labels"]

    def sample(number: int) -> Sample:
        f = image_dir / f"image_{number:05d}.jpg"
        return Sample(relative_id(name, f, image_dir), int(labels[number - 1]) - 1, str(f))

    if not (ddir / "setid.mat").is_file():
        return {"all": [sample(i + 1) for i in range(len(labels))]}
    setid = load_mat(ddir / "setid.mat")
    return {
        split: [sample(int(i)) for i in setid[key]]
        for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))
    }


def fashion_file(ddir: Path, stem: str) -> Path:
    for candidate in (ddir / f"{stem}.gz", ddir / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"fashion-mnist: {stem}(.gz) is missing in {ddir}; the dataset root is incomplete: copy "
                    "the four IDX files there, or add --download")


def scan_fashion_mnist(name: str, ddir: Path, image_dir: Path) -> Parts:
    """The four IDX files (gzipped or not): official train (60k) and test (10k); samples index into them."""
    parts: Parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = fashion_file(ddir, f"{prefix}-images-idx3-ubyte")
        labels = load_idx(str(fashion_file(ddir, f"{prefix}-labels-idx1-ubyte")))
        if len(load_idx(str(images))) != len(labels):
            raise DataError(f"fashion-mnist: {images} and its label file disagree in length; replace both")
        parts[split] = [
            Sample(f"{name}/{split}/{i}", int(label), str(images), index=i) for i, label in enumerate(labels)
        ]
    return parts


def scan_user_folder(name: str, ddir: Path, image_dir: Path) -> Parts:
    """A user's images: root/<class>/* or root/{train,val,test}/<class>/* (val and test optional)."""
    if not (image_dir / "train").is_dir():
        return {"all": scan_class_folders(name, image_dir, class_folders(image_dir))}
    classes = class_folders(image_dir / "train")
    parts: Parts = {}
    for split in ("train", "val", "test"):
        split_dir = image_dir / split
        if split_dir.is_dir():
            extra = sorted(set(class_folders(split_dir)) - set(classes))
            if extra:
                raise DataError(f"folder: {split_dir} has classes not in train ({extra[0]}); add them to train")
            present = [c for c in classes if (split_dir / c).is_dir()]
            parts[split] = [
                Sample(s.id, classes.index(s.path.split("/")[-2]), s.path)
                for s in scan_class_folders(name, image_dir, [f"{split}/{c}" for c in present])
            ]
    return parts


def folder_classnames(image_dir: Path) -> tuple[str, ...]:
    """Class names of a user's folder dataset: the class folder names, '_' read as a space."""
    base = image_dir / "train" if (image_dir / "train").is_dir() else image_dir
    return tuple(c.replace("_", " ") for c in class_folders(base))
