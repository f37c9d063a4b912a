"""Image transforms (DataDream's training augmentations, evaluation resize) and CutMix/MixUp within one domain."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

Transform = Callable[[Image.Image], torch.Tensor]


def build_eval_transform(image_size: int, mean: tuple, std: tuple) -> Transform:
    """Resize the short side, centre-crop, normalise: PIL -> [3, S, S]."""
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def build_train_transform(image_size: int, mean: tuple, std: tuple, kind: str = "datadream") -> Transform:
    """DataDream's augmentations: random resized crop, flip, colour jitter, grayscale, blur, solarize."""
    if kind == "none":
        return build_eval_transform(image_size, mean, std)
    blur_kernel = max(3, (image_size // 10) | 1)  # odd, about a tenth of the side as in SimCLR-style recipes
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.25, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.2),
        T.RandomSolarize(threshold=128, p=0.2),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def _mix(images: torch.Tensor, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix (even odds) of `images` [n, 3, H, W] with a permutation of themselves; soft targets [n, C]."""
    n, _, h, w = images.shape
    perm = torch.randperm(n, generator=gen)
    lam = float(torch.rand((), generator=gen))  # Beta(1, 1): the usual alpha = 1 for both MixUp and CutMix
    if torch.rand((), generator=gen) < 0.5:
        mixed = lam * images + (1 - lam) * images[perm]
    else:
        cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(h, (), generator=gen)), int(torch.randint(w, (), generator=gen))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
    return mixed, lam * targets + (1 - lam) * targets[perm]


def mix_within_domains(
    images: torch.Tensor, targets: torch.Tensor, is_synthetic: torch.Tensor, prob: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability `prob` per batch, CutMix/MixUp the real part and, separately, the synthetic part.

    images [B, 3, H, W], targets [B, C] one-hot or soft, is_synthetic [B] bool -> (images, soft targets [B, C]).
    Mixing never crosses domains, so a sample stays real or synthetic for the loss.
    """
    if prob <= 0 or float(torch.rand((), generator=gen)) >= prob:
        return images, targets
    images, targets = images.clone(), targets.clone()
    for mask in (~is_synthetic, is_synthetic):
        idx = mask.nonzero().flatten()
        if len(idx) > 1:
            images[idx], targets[idx] = _mix(images[idx], targets[idx], gen)
    return images, targets
