"""Transforms and CutMix/MixUp within a domain."""

import torch
from PIL import Image

from fsynth.augment import build_eval_transform, build_train_transform, mix_within_domains


def test_transforms_shape():
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    for tf in (build_eval_transform(32, (0.5,) * 3, (0.5,) * 3), build_train_transform(32, (0.5,) * 3, (0.5,) * 3)):
        assert tf(img).shape == (3, 32, 32)


def test_mixing_never_crosses_domains_and_keeps_target_mass():
    images = torch.cat([torch.zeros(4, 3, 8, 8), torch.ones(4, 3, 8, 8)])
    targets = torch.eye(2)[[0, 1, 0, 1, 0, 1, 0, 1]]
    synthetic = torch.tensor([False] * 4 + [True] * 4)
    for seed in range(20):
        mixed, soft = mix_within_domains(images, targets, synthetic, 1.0, torch.Generator().manual_seed(seed))
        assert torch.all(mixed[:4] == 0) and torch.all(mixed[4:] == 1)  # real only with real, synthetic with synthetic
        assert torch.allclose(soft.sum(1), torch.ones(8))
    same, _ = mix_within_domains(images, targets, synthetic, 0.0, torch.Generator())
    assert same is images
