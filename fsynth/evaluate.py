"""Evaluation: accuracy, mean loss and the confusion matrix of a classifier on a loader."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    confusion: np.ndarray  # [C, C] int64, rows = true class, columns = predicted

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    def per_class_accuracy(self) -> np.ndarray:
        """[C] recall of each class (nan for a class with no sample)."""
        totals = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion) / totals


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             autocast_dtype: torch.dtype | None = None) -> EvalResult:
    """Top-1 accuracy, mean cross-entropy and confusion matrix over every sample of `loader`."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = 0.0
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    for batch in loader:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        with amp:
            logits = model(images)
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        pred = logits.argmax(dim=1)
        confusion += torch.bincount(labels.cpu() * num_classes + pred.cpu(),
                                    minlength=num_classes**2).reshape(num_classes, num_classes)
    model.train(was_training)
    total = int(confusion.sum())
    accuracy = float(confusion.diag().sum()) / total if total else float("nan")
    return EvalResult(accuracy, loss_sum / total if total else float("nan"), confusion.numpy())
