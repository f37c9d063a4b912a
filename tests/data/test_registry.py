"""The registry's class lists and every loader against a fake root in that dataset's real layout."""

import json
import shutil
from pathlib import Path

import pytest

from fsynth.data.registry import BENCHMARKS, DEBIAN_FASHION_MNIST, get_spec, list_specs, load_dataset
from fsynth.errors import DataError
from tests.data.fake_roots import make_root, write_split_zhou

PAPER_COUNTS = {
    "imagenet": 1000, "caltech101": 100, "dtd": 47, "eurosat": 10, "fgvc_aircraft": 100, "oxford_pets": 37,
    "stanford_cars": 196, "sun397": 397, "food101": 101, "flowers102": 102,
}


def test_registry_has_the_ten_benchmarks_and_the_two_extras():
    assert BENCHMARKS == tuple(PAPER_COUNTS)
    assert [s.name for s in list_specs()] == [*PAPER_COUNTS, "fashion-mnist", "folder"]
    for name, count in PAPER_COUNTS.items():
        spec = get_spec(name)
        names = spec.classnames()
        assert spec.num_classes == count and len(names) == count, name
        assert all(n and n == n.strip() for n in names), name
        assert spec.templates and all("{}" in t for t in spec.templates)
    assert len(get_spec("fashion-mnist").classnames()) == 10
    assert get_spec("folder").num_classes is None


def test_coop_names_in_label_order():
    assert get_spec("dtd").classnames()[:2] == ("banded", "blotchy")
    assert get_spec("eurosat").classnames()[0] == "Annual Crop Land"
    assert get_spec("caltech101").classnames()[:3] == ("face", "leopard", "motorbike")
    assert get_spec("stanford_cars").classnames()[13] == "2012 Audi TTS Coupe"
    assert get_spec("food101").classnames()[16:18] == ("cheese_plate", "cheesecake")
    assert get_spec("sun397").classnames()[0] == "abbey"
    assert get_spec("oxford_pets").classnames()[0] == "abyssinian"
    assert get_spec("imagenet").classnames()[0] == "tench"
    domains = {n: get_spec(n).domain for n in BENCHMARKS}
    assert domains["dtd"] == "texture" and domains["eurosat"] == "satellite" and domains["imagenet"] == ""


def check_dataset(ds, count):
    assert ds.num_classes == count
    ids = [s.id for split in ("train", "val", "test") for s in ds.split(split)]
    assert len(ids) == len(set(ids)), "a sample is in two splits"
    assert {s.label for s in ds.train} == set(range(count))
    for split in ("val", "test"):
        assert ds.split(split) and all(0 <= s.label < count for s in ds.split(split))
    for s in ds.train[:50]:
        assert Path(s.path).is_file()


@pytest.mark.parametrize("name", [*PAPER_COUNTS, "fashion-mnist"])
def test_every_loader_reads_its_layout(tmp_path, name):
    make_root(name, tmp_path)
    ds = load_dataset(name, tmp_path)
    check_dataset(ds, get_spec(name).num_classes)
    again = load_dataset(name, tmp_path)
    assert [s.id for s in again.val] == [s.id for s in ds.val], "split is not deterministic"


@pytest.mark.parametrize("name", ["caltech101", "dtd", "eurosat", "food101", "sun397"])
def test_folder_based_labels_follow_sorted_class_folders(tmp_path, name):
    make_root(name, tmp_path)
    ds = load_dataset(name, tmp_path)
    for s in ds.train:
        assert f"/c{s.label:03d}/" in s.path
    assert not any("BACKGROUND_Google" in s.path or "Faces_easy" in s.path for s in ds.train + ds.test)


def test_label_files_give_labels(tmp_path):
    make_root("oxford_pets", tmp_path)
    ds = load_dataset("oxford_pets", tmp_path)
    names = get_spec("oxford_pets").classnames()
    assert all(Path(s.path).name.startswith(names[s.label] + "_") for s in ds.train)
    make_root("fgvc_aircraft", tmp_path / "air")
    ds = load_dataset("fgvc_aircraft", tmp_path / "air")
    assert ds.split_source == "official train/val/test split" and len(ds.val) == 100


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("dtd", {}), ("fgvc_aircraft", {}), ("oxford_pets", {}), ("flowers102", {})],
)
def test_torchvision_layouts(tmp_path, name, kwargs):
    make_root(name, tmp_path, layout="torchvision")
    ds = load_dataset(name, tmp_path)
    check_dataset(ds, get_spec(name).num_classes)
    if name == "flowers102":
        assert ds.split_source == "official train/val/test split"


def test_root_may_be_the_dataset_folder_itself(tmp_path):
    make_root("dtd", tmp_path)
    assert load_dataset("dtd", tmp_path / "dtd").num_classes == 47


def test_split_file_wins_and_is_checked(tmp_path):
    make_root("dtd", tmp_path)
    image_dir = tmp_path / "dtd" / "images"
    names = get_spec("dtd").classnames()
    split_file = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    write_split_zhou(split_file, image_dir, names, {"train": 3, "val": 1, "test": 2})
    ds = load_dataset("dtd", tmp_path)
    assert ds.split_source == "split_zhou_DescribableTextures.json"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3 * 47, 47, 2 * 47)

    (image_dir / "c000" / "img0.jpg").unlink()
    with pytest.raises(DataError, match="1 images named in split_zhou_DescribableTextures.json are missing"):
        load_dataset("dtd", tmp_path)

    table = {"train": [["c001/img1.jpg", 99, "x"]], "val": [], "test": []}
    split_file.write_text(json.dumps(table))
    with pytest.raises(DataError, match="label 99 of c001/img1.jpg is outside 0..46"):
        load_dataset("dtd", tmp_path)
    split_file.write_text("{not json")
    with pytest.raises(DataError, match="cannot be read"):
        load_dataset("dtd", tmp_path)


def test_missing_and_incomplete_roots(tmp_path):
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist; pass --root DIR .* or add --download"):
        load_dataset("dtd", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"DTD not found under .*; put it there in CoOp's layout"):
        load_dataset("dtd", tmp_path)
    make_root("dtd", tmp_path)
    shutil.rmtree(tmp_path / "dtd" / "images" / "c046")
    with pytest.raises(DataError, match="class 'zigzagged' has no training image"):
        load_dataset("dtd", tmp_path)
    make_root("oxford_pets", tmp_path / "p")
    (tmp_path / "p" / "oxford_pets" / "annotations" / "test.txt").unlink()
    with pytest.raises(DataError, match="annotation file .*test.txt is missing; the dataset root is incomplete"):
        load_dataset("oxford_pets", tmp_path / "p")
    make_root("flowers102", tmp_path / "f")
    (tmp_path / "f" / "oxford_flowers" / "imagelabels.mat").write_text("garbage")
    with pytest.raises(DataError, match="imagelabels.mat cannot be read"):
        load_dataset("flowers102", tmp_path / "f")


def test_datasets_torchvision_cannot_fetch_say_so(tmp_path):
    with pytest.raises(DataError, match="Stanford Cars cannot be downloaded by torchvision"):
        load_dataset("stanford_cars", tmp_path, fetch=True)
    with pytest.raises(DataError, match="unknown dataset 'cifar'; known datasets: imagenet, caltech101"):
        load_dataset("cifar", tmp_path)


def test_user_folder_with_and_without_split_folders(tmp_path):
    make_root("folder", tmp_path / "flat")
    flat = load_dataset("folder", tmp_path / "flat")
    assert flat.classnames == ("grey wolf", "lynx", "red fox")
    assert flat.split_source.startswith("seeded split per class")
    make_root("folder", tmp_path / "split", splits=True)
    split = load_dataset("folder", tmp_path / "split")
    assert split.split_source == "official train/val/test split"
    assert (len(split.train), len(split.val), len(split.test)) == (18, 3, 6)
    assert all(f"/{split.classnames[s.label].replace(' ', '_')}/" in s.path for s in split.train + split.test)
    shutil.rmtree(tmp_path / "split" / "val")
    held = load_dataset("folder", tmp_path / "split", val_fraction=0.25)
    assert held.split_source == "official train/test split; val = 0.25 of train per class (seed 0)"
    assert {s.id for s in held.val} <= {s.id for s in split.train}


@pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST).is_dir(), reason="Debian's dataset-fashion-mnist is absent")
def test_fashion_mnist_debian_copy_is_the_default_root():
    ds = load_dataset("fashion-mnist")
    assert ds.root == DEBIAN_FASHION_MNIST
    assert len(ds.train) + len(ds.val) == 60000 and len(ds.test) == 10000
    assert ds.classnames[0] == "T-shirt/top"
