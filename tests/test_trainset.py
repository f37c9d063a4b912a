"""What one run's training data is made of: oversampling, domains, reading the manifests."""

import pandas as pd
import pytest

from fsynth.config import build_config
from fsynth.data.records import Sample
from fsynth.errors import DataError
from fsynth.stages import ensure_fewshot
from fsynth.trainset import load_train_data, real_repeats, training_items
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
