"""Accuracy and confusion matrix."""

import numpy as np
import torch
from torch import nn

from fsynth.evaluate import evaluate


class Fixed(nn.Module):
    def forward(self, images):
        return images.flatten(1)[:, :3]


def test_accuracy_and_confusion():
    logits = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 5, 0], [0, 0, 5]])
    loader = [{"image": logits.reshape(4, 3, 1, 1), "label": torch.tensor([0, 1, 2, 2])}]
    result = evaluate(Fixed(), loader, 3, torch.device("cpu"))
    assert result.accuracy == 0.75 and result.count == 4
    assert np.array_equal(result.confusion, [[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    assert np.allclose(result.per_class_accuracy(), [1, 1, 0.5])
