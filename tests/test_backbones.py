"""fsynth.backbones: which open_clip architecture a tag is built as (the activation its weights need)."""

import pytest

from fsynth import backbones


def test_openai_weights_on_plain_vit_b_16_become_quickgelu():
    with pytest.warns(UserWarning, match="ViT-B-16-quickgelu"):
        assert backbones.resolve_arch("ViT-B-16", "openai") == "ViT-B-16-quickgelu"
    assert backbones.resolve_arch("ViT-B-16-quickgelu", "openai") == "ViT-B-16-quickgelu"
    assert backbones.resolve_arch("ViT-B-16", "laion2b_s34b_b88k") == "ViT-B-16"
