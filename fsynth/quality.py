"""How far a synthetic set is from the real shots in the frozen pretrained encoder's embedding space, and how often
the starting classifier (frozen encoder + its zero-shot or prototype head) labels a synthetic image as its class."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fsynth.augment import build_eval_transform
from fsynth.cache import atomic_write_bytes
from fsynth.config import ExperimentConfig
from fsynth.errors import FsynthError
from fsynth.partition import embedding_features
from fsynth.stages import LazyImages, build_model
from fsynth.trainset import TrainData

QUALITY_NAME = "quality.json"
_CHUNK = 4096  # rows of a similarity matrix computed at a time: [chunk, C] stays small for any set size
_EPS = 1e-12


# ---------------------------------------------------------------------------------------------------- the maths


def _check(real: np.ndarray, real_labels: np.ndarray, synth: np.ndarray, synth_labels: np.ndarray,
           num_classes: int) -> None:
    """One-line FsynthError for empty sets, mismatched lengths or dims, labels out of range, non-finite values."""
    for name, x, y in (("real", real, real_labels), ("synthetic", synth, synth_labels)):
        if x.ndim != 2 or len(x) == 0:
            raise FsynthError(f"the {name} embeddings must be a non-empty [N, D] array, got shape {x.shape}")
        if y.shape != (len(x),):
            raise FsynthError(f"{len(x)} {name} embeddings but labels of shape {y.shape}; pass one label per row")
        if y.min() < 0 or y.max() >= num_classes:
            raise FsynthError(f"{name} labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
        if not np.isfinite(x).all():
            raise FsynthError(f"the {name} embeddings hold NaN or infinite values; check the encoder")
    if real.shape[1] != synth.shape[1]:
        raise FsynthError(f"real embeddings have dim {real.shape[1]}, synthetic {synth.shape[1]}; embed both "
                          "with the same encoder")


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows of x [N, D] scaled to unit L2 norm, float64 (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def class_means(x: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(means [C, D], counts [C]) of the rows of x [N, D] per label; the mean of an absent class is zero."""
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=num_classes)
    return sums / np.maximum(counts, 1)[:, None], counts


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine [K] of a [K, D] and b [K, D]."""
    return (_normalise(a) * _normalise(b)).sum(axis=1)


def _covariance_factor(x: np.ndarray) -> np.ndarray:
    """F [k, D] with F^T F = the unbiased covariance of x [N, D] (k = min(N, D); empty for N < 2).

    N <= D: the centred data itself, scaled by 1/sqrt(N - 1) (exact, no eigen-decomposition). N > D: sqrt(w) V^T
    from eigh of the covariance, negative rounding eigenvalues clipped to 0.
    """
    n, d = x.shape
    if n < 2:
        return np.zeros((0, d))
    centred = (x - x.mean(axis=0)) / np.sqrt(n - 1)
    if n <= d:
        return centred
    w, v = np.linalg.eigh(centred.T @ centred)
    return np.sqrt(np.clip(w, 0.0, None))[:, None] * v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to a [N, D] and b [M, D] (means, unbiased covariances).

    ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a^1/2 S_b S_a^1/2)^1/2). With S_a = F_a^T F_a and
    S_b = F_b^T F_b, the last trace is the sum of the singular values of F_b F_a^T: exact and real for
    rank-deficient covariances (fewer samples than dimensions), unlike sqrtm of S_a S_b, and no square root of
    near-zero eigenvalues amplifies rounding. A set of one sample has zero covariance.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    fa, fb = _covariance_factor(a), _covariance_factor(b)
    cross = np.linalg.svd(fb @ fa.T, compute_uv=False).sum() if len(fa) and len(fb) else 0.0
    mean_term = float(((a.mean(axis=0) - b.mean(axis=0)) ** 2).sum())
    return max(0.0, mean_term + float((fa**2).sum() + (fb**2).sum() - 2.0 * cross))


def _nearest_centroid_hits(synth: np.ndarray, synth_labels: np.ndarray, centroids: np.ndarray,
                           classes: np.ndarray) -> int:
    """How many rows of synth [M, D] have their own label as the nearest (cosine) of centroids [K, D] of classes [K]."""
    unit = _normalise(centroids)
    hits = 0
    for start in range(0, len(synth), _CHUNK):  # chunks, not samples: [chunk, K] similarities at a time
        sims = synth[start:start + _CHUNK] @ unit.T
        hits += int((classes[sims.argmax(axis=1)] == synth_labels[start:start + _CHUNK]).sum())
    return hits


def _nearest_real_distance_sum(real: np.ndarray, real_labels: np.ndarray, synth: np.ndarray,
                               synth_labels: np.ndarray, classes: np.ndarray) -> float:
    """Sum over synthetic rows of `classes` of 1 - max cosine to a real row of the same class (unit rows [., D])."""
    total = 0.0
    for c in classes:  # one [m_c, n_c] similarity block per class
        sims = synth[synth_labels == c] @ real[real_labels == c].T
        total += float((1.0 - sims.max(axis=1)).sum())
    return total


def embedding_gap(real: np.ndarray, real_labels: np.ndarray, synth: np.ndarray, synth_labels: np.ndarray,
                  num_classes: int) -> dict[str, float]:
    """Gap between real embeddings [N, D] (labels [N]) and synthetic ones [M, D] (labels [M]), rows L2-normalised.

    - centroid_distance: mean over the classes with both real and synthetic images of 1 - cos(real class mean,
      synthetic class mean);
    - frechet: Fréchet distance between Gaussians fitted to all real and all synthetic embeddings. With few real
      shots (N ~ D or less) it is biased upwards and noisy: compare it only between synthetic sets measured
      against the same real shots with the same encoder;
    - synthetic_accuracy: share of synthetic images whose nearest real class mean (cosine) is their own class;
    - nearest_real_distance: mean over synthetic images of 1 - cosine to the nearest real image of their class;
    - real_images, synthetic_images, classes (classes with both, over which the last two are also taken).
    Raises a one-line FsynthError on empty sets, mismatched shapes, out-of-range labels or no shared class.
    """
    real_labels = np.asarray(real_labels).astype(np.int64).reshape(-1)
    synth_labels = np.asarray(synth_labels).astype(np.int64).reshape(-1)
    real, synth = np.asarray(real), np.asarray(synth)
    _check(real, real_labels, synth, synth_labels, num_classes)
    real, synth = _normalise(real), _normalise(synth)
    real_means, real_counts = class_means(real, real_labels, num_classes)
    synth_means, synth_counts = class_means(synth, synth_labels, num_classes)
    shared = np.flatnonzero((real_counts > 0) & (synth_counts > 0))
    if len(shared) == 0:
        raise FsynthError("no class has both real and synthetic images; check the labels of the two sets")
    present = np.flatnonzero(real_counts > 0)
    judged = np.isin(synth_labels, shared)
    n_judged = int(judged.sum())
    return {
        "centroid_distance": max(0.0, float((1.0 - _cosine_rows(real_means[shared], synth_means[shared])).mean())),
        "frechet": frechet_distance(real, synth),
        "synthetic_accuracy": _nearest_centroid_hits(synth[judged], synth_labels[judged], real_means[present],
                                                     present) / n_judged,
        "nearest_real_distance": max(0.0, _nearest_real_distance_sum(real, real_labels, synth, synth_labels,
                                                                     shared) / n_judged),
        "real_images": len(real),
        "synthetic_images": len(synth),
        "classes": len(shared),
    }


# ------------------------------------------------------------------------------------------------ the encoder


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run `model` as its frozen pretrained backbone: every peft adapter layer off, restored on exit.

    peft's toggle also flips requires_grad of the adapter tensors; every parameter's flag is put back as it was.
    """
    layers = [m for m in model.modules() if hasattr(m, "enable_adapters") and hasattr(m, "disable_adapters")]
    was_disabled = [bool(m.disable_adapters) for m in layers]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, disabled in zip(layers, was_disabled, strict=True):
            layer.enable_adapters(not disabled)
        for p, flag in grads:
            p.requires_grad_(flag)


def encoder_name(cfg: ExperimentConfig) -> str:
    """'<arch>/<pretrained>' of cfg.model ('<arch>' alone for random weights)."""
    return f"{cfg.model.arch}/{cfg.model.pretrained}" if cfg.model.pretrained else cfg.model.arch


def head_accuracy(embeddings: np.ndarray, labels: np.ndarray, class_weights: np.ndarray) -> float:
    """Share of rows of embeddings [M, D] whose highest-scoring class under class_weights [C, D] (cosine up to the
    logit scale, which cannot change the argmax) is their label [M]."""
    hits = 0
    for start in range(0, len(embeddings), _CHUNK):
        scores = np.asarray(embeddings[start:start + _CHUNK], dtype=np.float64) @ class_weights.T
        hits += int((scores.argmax(axis=1) == labels[start:start + _CHUNK]).sum())
    return hits / max(1, len(embeddings))


def _starting_head(model: torch.nn.Module) -> np.ndarray:
    """The starting model's class weights [C, D], float64, read inside `adapters_disabled`.

    A zero-shot head with text adapters caches its weights in eval mode: the cache, which may hold the adapted
    weights, is cleared first (Classifier.train drops it; the mode is kept). The caller clears it again once the
    adapters are back on.
    """
    model.train(model.training)
    with torch.no_grad():
        return model.class_weights().detach().to("cpu", torch.float64).numpy()


def measure_synthetic_quality(cfg: ExperimentConfig, data: TrainData, model: torch.nn.Module | None = None,
                              device: torch.device | None = None, batch_size: int = 64) -> dict:
    """`embedding_gap` of data.synthetic against data.real in the frozen encoder of cfg.model, plus
    `starting_model_accuracy` (the share of synthetic images the starting classifier, its head on the frozen
    encoder, labels as their own class), `head`, `encoder` (arch/pretrained) and `image_size`.

    `model`: a Classifier of cfg.model (built with fsynth.stages.build_model on `device` when None); it is used
    with its LoRA adapters disabled, so a trained model measures the same gap as a fresh one. Images go through
    the eval transform (resize, centre-crop, normalise), `batch_size` at a time.
    """
    for name, samples in (("real shots", data.real), ("synthetic images", data.synthetic)):
        if not samples:
            raise FsynthError(f"the training data has no {name}; load a few-shot directory with a synthetic manifest")
    if model is None:
        model = build_model(cfg, data, device)
    transform = build_eval_transform(model.image_size, model.mean, model.std)
    with adapters_disabled(model):
        real, synth = (embedding_features(model.encode, LazyImages(s), transform, batch_size)
                       for s in (data.real, data.synthetic))
        head = _starting_head(model)
    model.train(model.training)  # and not after: the cache would keep the frozen head for the adapted model
    labels = [np.array([s.label for s in samples], dtype=np.int64) for samples in (data.real, data.synthetic)]
    gap = embedding_gap(real, labels[0], synth, labels[1], data.num_classes)
    return {**gap, "starting_model_accuracy": head_accuracy(synth, labels[1], head), "head": cfg.model.head,
            "encoder": encoder_name(cfg), "image_size": int(model.image_size)}


# ------------------------------------------------------------------------------------------------------ files


def write_quality(out_dir: str | Path, metrics: dict) -> Path:
    """Write metrics to out_dir/quality.json atomically (a temporary sibling, then os.replace); return the path."""
    return atomic_write_bytes(Path(out_dir).resolve() / QUALITY_NAME,
                              (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())


def load_quality(path: str | Path) -> dict:
    """Read a quality.json (or the quality.json inside a directory) that `write_quality` wrote."""
    path = Path(path)
    path = path / QUALITY_NAME if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FsynthError(f"cannot read synthetic-set quality {path} ({reason}); run the quality measurement "
                          "again") from None
