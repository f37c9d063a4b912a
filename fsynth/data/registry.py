"""The dataset registry: the ten benchmarks of the paper, `fashion-mnist` and `folder`, and `load_dataset`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fsynth.data import layouts
from fsynth.data.records import SPLITS, RealDataset
from fsynth.data.splits import complete_splits, read_split_file
from fsynth.errors import DataError

CLASSNAME_DIR = Path(__file__).parent / "classnames"
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

Scan = Callable[[str, Path, Path], layouts.Parts]


@dataclass(frozen=True)
class DatasetSpec:
    """How a dataset is named, prompted and found on disk.

    `layouts` lists (dataset folder, image folder) pairs relative to the data root, CoOp's layout first, then
    torchvision's; the first whose image folder exists is used. `scan(name, dataset_dir, image_dir)` returns the
    labelled samples as {all} / {train, test} / {train, val, test}; a CoOp `split_file` beside them wins.
    """

    name: str
    title: str
    num_classes: int | None  # None: read from the data (`folder`)
    domain: str  # the word in the generation prompt "a {domain }photo of a {class}"
    templates: tuple[str, ...]  # zero-shot head prompts, "{}" is the class name
    layouts: tuple[tuple[str, str], ...]
    scan: Scan
    split_file: str = ""
    torchvision_class: str = ""  # torchvision.datasets class that can download it ("" = none can)

    def classnames(self) -> tuple[str, ...] | None:
        """Canonical class names in label order (CoOp's), or None when they come from the data."""
        if self.name == "fashion-mnist":
            return FASHION_MNIST_CLASSES
        if self.num_classes is None:
            return None
        return _classname_file(self.name)


@cache
def _classname_file(name: str) -> tuple[str, ...]:
    return tuple((CLASSNAME_DIR / f"{name}.txt").read_text(encoding="utf-8").splitlines())


def _spec(name, title, classes, domain, template, layouts_, scan, split_file="", tv=""):
    return DatasetSpec(name, title, classes, domain, (template,), tuple(layouts_), scan, split_file, tv)


_SPECS = [
    _spec("imagenet", "ImageNet", 1000, "", "a photo of a {}.",
          [("imagenet", "imagenet/images"), ("imagenet", "imagenet"), ("", "images"), ("", "")],
          layouts.scan_imagenet),
    _spec("caltech101", "Caltech101", 100, "", "a photo of a {}.",
          [("caltech-101", "caltech-101/101_ObjectCategories"), ("caltech101", "caltech101/101_ObjectCategories"),
           ("", "101_ObjectCategories")],
          layouts.scan_caltech101, "split_zhou_Caltech101.json", "Caltech101"),
    _spec("dtd", "DTD", 47, "texture", "{} texture.",
          [("dtd", "dtd/images"), ("dtd/dtd", "dtd/dtd/images"), ("", "images")],
          layouts.scan_plain_folders, "split_zhou_DescribableTextures.json", "DTD"),
    _spec("eurosat", "EuroSAT", 10, "satellite", "a centered satellite photo of {}.",
          [("eurosat", "eurosat/2750"), ("", "2750")],
          layouts.scan_plain_folders, "split_zhou_EuroSAT.json", "EuroSAT"),
    _spec("fgvc_aircraft", "FGVC Aircraft", 100, "aircraft", "a photo of a {}, a type of aircraft.",
          [("fgvc_aircraft", "fgvc_aircraft/images"),
           ("fgvc-aircraft-2013b/data", "fgvc-aircraft-2013b/data/images"), ("", "images")],
          layouts.scan_aircraft, "", "FGVCAircraft"),
    _spec("oxford_pets", "Oxford Pets", 37, "pet", "a photo of a {}, a type of pet.",
          [("oxford_pets", "oxford_pets/images"), ("oxford-iiit-pet", "oxford-iiit-pet/images"), ("", "images")],
          layouts.scan_pets, "split_zhou_OxfordPets.json", "OxfordIIITPet"),
    _spec("stanford_cars", "Stanford Cars", 196, "car", "a photo of a {}.",
          [("stanford_cars", "stanford_cars"), ("", "")],
          layouts.scan_cars, "split_zhou_StanfordCars.json"),
    _spec("sun397", "SUN397", 397, "scene", "a photo of a {}.",
          [("sun397", "sun397/SUN397"), ("", "SUN397")],
          layouts.scan_sun397, "split_zhou_SUN397.json", "SUN397"),
    _spec("food101", "Food101", 101, "food", "a photo of {}, a type of food.",
          [("food-101", "food-101/images"), ("", "images")],
          layouts.scan_food101, "split_zhou_Food101.json", "Food101"),
    _spec("flowers102", "Flowers102", 102, "flower", "a photo of a {}, a type of flower.",
          [("oxford_flowers", "oxford_flowers/jpg"), ("flowers-102", "flowers-102/jpg"), ("", "jpg")],
          layouts.scan_flowers102, "split_zhou_OxfordFlowers.json", "Flowers102"),
    _spec("fashion-mnist", "Fashion-MNIST", 10, "", "a photo of a {}.",
          [("", ""), ("FashionMNIST/raw", "FashionMNIST/raw"), ("fashion-mnist", "fashion-mnist")],
          layouts.scan_fashion_mnist, "", "FashionMNIST"),
    _spec("folder", "your own images (one folder per class)", None, "", "a photo of a {}.",
          [("", "")], layouts.scan_user_folder),
]
REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in _SPECS}
BENCHMARKS = tuple(s.name for s in _SPECS[:10])  # the ten benchmarks of the paper, in its table order


def list_specs() -> list[DatasetSpec]:
    """Every registered dataset, benchmarks first."""
    return list(REGISTRY.values())


def get_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset; an unknown name is a one-line error listing the known ones."""
    if name not in REGISTRY:
        raise DataError(f"unknown dataset '{name}'; known datasets: {', '.join(REGISTRY)} "
                        "(`python -m fsynth.data list` shows them)")
    return REGISTRY[name]


def default_root(name: str) -> Path:
    """Where a dataset is looked for when no root is given: Debian's Fashion-MNIST, else $FSYNTH_DATA_ROOT."""
    if name == "fashion-mnist" and Path(DEBIAN_FASHION_MNIST).is_dir():
        return Path(DEBIAN_FASHION_MNIST)
    return Path(os.environ.get("FSYNTH_DATA_ROOT", Path.home() / ".cache" / "fsynth" / "data"))


def _image_ready(spec: DatasetSpec, path: Path) -> bool:
    if spec.name == "fashion-mnist":
        return any((path / f"train-images-idx3-ubyte{ext}").is_file() for ext in (".gz", ""))
    if spec.name == "stanford_cars":
        return (path / "cars_train").is_dir()
    if spec.name == "imagenet":
        return (path / "train").is_dir()
    return path.is_dir() and (spec.name != "folder" or any(path.iterdir()))


def locate(spec: DatasetSpec, root: Path) -> tuple[Path, Path]:
    """(dataset folder, image folder) of `spec` under `root`, or a one-line error saying what was expected."""
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; pass --root DIR pointing at your data"
                        + (" or add --download" if spec.torchvision_class else ""))
    for ddir, idir in spec.layouts:
        if _image_ready(spec, root / idir):
            return root / ddir, root / idir
    expected = " or ".join(str(root / idir) for _, idir in spec.layouts if idir)
    hint = " or add --download" if spec.torchvision_class else ""
    raise DataError(f"{spec.title} not found under {root} (expected {expected or root}); "
                    f"put it there in CoOp's layout (see README){hint}")


def download(spec: DatasetSpec, root: Path) -> None:
    """Fetch the dataset with torchvision into `root` (needs the network)."""
    if not spec.torchvision_class:
        raise DataError(f"{spec.title} cannot be downloaded by torchvision; place it under {root} by hand "
                        "(README, 'Datasets')")
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.torchvision_class)
    root.mkdir(parents=True, exist_ok=True)
    try:
        cls(root=str(root), download=True)
    except Exception as exc:  # noqa: BLE001 - any download failure becomes one line with the fix
        reason = str(exc).split("\n")[0] or type(exc).__name__
        raise DataError(f"could not download {spec.title} into {root} ({reason}); check the network, "
                        "or place the data there by hand") from None


def load_dataset(
    name: str, root: str | Path = "", *, split_seed: int = 0, val_fraction: float = 0.2, fetch: bool = False
) -> RealDataset:
    """Resolve a dataset on disk: class names, and train/val/test samples with their provenance."""
    spec = get_spec(name)
    root = Path(root).expanduser().resolve() if str(root) else default_root(name)
    if fetch:
        download(spec, root)
    ddir, image_dir = locate(spec, root)
    classnames = spec.classnames() or layouts.folder_classnames(image_dir)
    split_file = next((p / spec.split_file for p in (ddir, ddir.parent) if spec.split_file
                       and (p / spec.split_file).is_file()), None)
    if split_file is not None:
        parts, source = read_split_file(split_file, image_dir, name, len(classnames)), split_file.name
    else:
        parts, source = complete_splits(spec.scan(name, ddir, image_dir), split_seed, val_fraction)
    _check_labels(spec, parts, classnames, root)
    return RealDataset(name, classnames, parts["train"], parts["val"], parts["test"], str(root), source,
                       spec.domain, spec.templates)


def _check_labels(spec: DatasetSpec, parts: dict, classnames: tuple[str, ...], root: Path) -> None:
    if spec.num_classes is not None and len(classnames) != spec.num_classes:
        raise DataError(f"{spec.name}: {len(classnames)} class names for {spec.num_classes} classes; "
                        "reinstall fsynth (its class-name files are damaged)")
    for split in SPLITS:
        if not parts[split]:
            raise DataError(f"{spec.title}: the {split} split under {root} is empty; the root is incomplete: "
                            "re-extract the dataset, or add images to that split")
    bad = next((s for split in SPLITS for s in parts[split] if not 0 <= s.label < len(classnames)), None)
    if bad is not None:
        raise DataError(f"{spec.title}: label {bad.label} of {bad.path} is outside 0..{len(classnames) - 1}; "
                        "the label files do not match the class list")
    missing = sorted(set(range(len(classnames))) - {s.label for s in parts["train"]})
    if missing:
        raise DataError(f"{spec.title}: class '{classnames[missing[0]]}' has no training image under {root} "
                        f"({len(missing)} classes missing); the root is incomplete: add that class's images "
                        "(or remove its empty folder), or re-extract the dataset")
