"""What one run's training data is made of: oversampling, domains, reading the manifests."""

import pandas as pd
import pytest

from fsynth.config import build_config
from fsynth.data.records import Sample
from fsynth.errors import ConfigError, DataError
from fsynth.stages import ensure_fewshot
from fsynth.trainset import check_regions, load_train_data, real_repeats, training_items
from tests.data.fake_roots import make_root


def test_real_oversampling():
    assert real_repeats(160, 640, 1.0) == 4  # about one real per synthetic image
    assert real_repeats(160, 640, 0.0) == 1 and real_repeats(160, 0, 1.0) == 1 and real_repeats(0, 10, 1.0) == 1
    assert real_repeats(100, 30, 1.0) == 1
    real = [Sample(f"r{i}", 0, "x") for i in range(2)]
    synth = [Sample(f"s{i}", 0, "y") for i in range(3)]
    items, flags = training_items(real, synth, 2)
    assert [s.id for s in items] == ["r0", "r1", "r0", "r1", "s0", "s1", "s2"]
    assert flags.tolist() == [False] * 4 + [True] * 3


def test_load_train_data_reads_both_manifests(tmp_path):
    make_root("eurosat", tmp_path / "data")
    cfg = build_config(overrides=["data.dataset=eurosat", f"data.root={tmp_path / 'data'}", "data.shots=2"])
    fewshot = ensure_fewshot(cfg, tmp_path / "fs")
    synth = pd.DataFrame({"sample_id": ["synthetic/a/0"], "path": ["/x.png"], "index": [-1], "label": [3],
                          "class_name": ["Highway or Road"], "domain": ["synthetic"],
                          "prompt": ["a satellite photo of a Highway or Road"], "seed": [7], "generator": ["abc"]})
    synth.to_parquet(tmp_path / "synth.parquet")
    data = load_train_data(fewshot, tmp_path / "synth.parquet")
    assert data.num_classes == 10 and len(data.real) == 20 and len(data.synthetic) == 1
    assert data.templates == ("a centered satellite photo of {}.",)
    assert data.synthetic_per_class == 1
    synth.assign(label=[10]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="labels beyond the dataset's classes"):
        load_train_data(fewshot, tmp_path / "bad.parquet")
    synth.drop(columns=["generator"]).to_parquet(tmp_path / "old.parquet")
    with pytest.raises(DataError, match="synthetic manifest .* lacks columns"):
        load_train_data(fewshot, tmp_path / "old.parquet")
    with pytest.raises(DataError, match="fewshot.json is missing; run `python -m fsynth.data prepare"):
        load_train_data(tmp_path / "nowhere")



def test_more_regions_than_images_is_refused_where_a_loss_term_reads_them():
    cfg = build_config(overrides=["partition.cluster_multiple=4"])  # K = 4 x 3 classes = 12 regions
    check_regions(cfg, 3, 6, 6)  # 12 images, one a region: allowed
    with pytest.raises(ConfigError, match=r"K = 12 regions for only 9 training images \(3 classes\); lower "
                                          r"partition\.cluster_multiple to 3 or less"):
        check_regions(cfg, 3, 6, 3)
    unread = (["partition.mode=single"], ["loss.lambda_discrepancy=0", "loss.lambda_robustness=0"],
              ["training.epochs=0"])  # one region, no regulariser, zero-shot: no loss term reads the regions
    for overrides in unread:
        check_regions(build_config(overrides=["partition.cluster_multiple=4", *overrides]), 3, 6, 3)
    real_only = build_config(overrides=["partition.cluster_multiple=4", "training.use_synthetic=false"])
    with pytest.raises(ConfigError, match="for only 6 training images"):  # the unused synthetic set does not count
        check_regions(real_only, 3, 6, 100)


def test_every_baseline_gets_the_methods_number_of_steps():
    """training.match_steps (default): real-only and synthetic-only cycle their images up to the method's epoch."""
    from fsynth.baselines import apply_baseline
    from fsynth.trainset import TrainData, epoch_items

    real = [Sample(f"r{i}", i % 2, "x") for i in range(4)]
    synth = [Sample(f"s{i}", i % 2, "y") for i in range(8)]
    data = TrainData("folder", ("a", "b"), ("{}",), real, synth, [], [])
    no_synthetic = TrainData("folder", ("a", "b"), ("{}",), real, [], [], [])  # real-only loads no synthetic set
    base = build_config(overrides=["generator.images_per_class=4"])
    method, _ = epoch_items(base, data)
    assert len(method) == 4 * 2 + 8  # shots repeated twice against 8 synthetic images
    real_only, flags = epoch_items(apply_baseline(base, "real-only"), no_synthetic)
    assert len(real_only) == len(method) and not flags.any()  # the size comes from images_per_class x classes
    assert sorted(s.id for s in real_only) == sorted([s.id for s in real] * 4)  # its own images, each 4 times
    synth_only, flags = epoch_items(apply_baseline(base, "synthetic-only"), data)
    assert len(synth_only) == len(method) and flags.all()
    natural = build_config(overrides=["generator.images_per_class=4", "training.match_steps=false"])
    assert len(epoch_items(apply_baseline(natural, "real-only"), no_synthetic)[0]) == 4
    assert len(epoch_items(natural, data)[0]) == len(method)
