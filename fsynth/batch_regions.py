"""Regions during training: prediction-space and online centroids, per-batch assignment, and the mixing figures.

The paper bounds the partition objective by k-means on the model's outputs h(z) (Appendix A.4, eqs. 43-48) and
assigns every mini-batch's samples to their nearest centroid while training (Algorithm 1, line 7). With
`partition.features: outputs` the centroids are fitted before the first epoch on the starting model's outputs
of real ∪ synthetic (eval mode, no augmentation); each batch is assigned with the outputs of its own training
forward (no extra forward), before the loss. Outputs are the ones the loss compares: probabilities for the
`paper` preset, logits for the `protoaug` presets.

Under DDP rank 0's centroids are broadcast, so every rank assigns with the same centroids and the same rule.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fsynth.config import ExperimentConfig
from fsynth.partition import OnlinePartitioner, kmeans, num_regions


def output_features(cfg: ExperimentConfig, logits: torch.Tensor) -> torch.Tensor:
    """The outputs the loss compares, [B, C] float32 from logits [B, C], detached: softmax for `paper`."""
    x = logits.detach().float()
    return x.softmax(dim=-1) if cfg.loss.preset == "paper" else x


def uses_outputs(cfg: ExperimentConfig) -> bool:
    """Whether the run's regions live in the prediction space (assigned per batch from the training forward)."""
    return cfg.partition.features == "outputs" and cfg.partition.mode in ("static", "online")


def needs_partitioner(cfg: ExperimentConfig) -> bool:
    """Online regions (any features) or static prediction-space regions: centroids held by the loop."""
    return cfg.partition.mode == "online" or uses_outputs(cfg)


@torch.no_grad()
def dataset_features(cfg: ExperimentConfig, model, loader, device: torch.device) -> torch.Tensor:
    """[N, D] features of every sample of `loader` in eval mode: outputs (prediction space) or embeddings."""
    was_training = model.training
    model.eval()
    try:
        if uses_outputs(cfg):
            feats = [output_features(cfg, model(b["image"].to(device))) for b in loader]
        else:
            feats = [model.encode(b["image"].to(device)).float() for b in loader]
    finally:
        model.train(was_training)
    return torch.cat(feats)


def fit_centroids(cfg: ExperimentConfig, features: torch.Tensor, num_classes: int,
                  broadcast: Callable[[torch.Tensor], torch.Tensor]) -> OnlinePartitioner:
    """Centroids [K, D] of features [N, D]: k-means (static) or seeded k-means++ picks (online), rank 0's kept."""
    p = cfg.partition
    k = min(num_regions("static", p.cluster_multiple, num_classes), len(features))
    if p.mode == "online":
        part = OnlinePartitioner.from_features(features, k, p.seed)
    else:
        result = kmeans(features.cpu().numpy(), k, iterations=p.iterations, seed=p.seed)
        part = OnlinePartitioner(torch.from_numpy(result.centroids).to(features.device))
    part.centroids = broadcast(part.centroids.contiguous())
    return part


def refits(cfg: ExperimentConfig) -> bool:
    """Whether the run refits its centroids (static prediction-space regions with partition.refit_every > 0)."""
    return uses_outputs(cfg) and cfg.partition.mode == "static" and cfg.partition.refit_every > 0


def refit_due(cfg: ExperimentConfig, epoch: int) -> bool:
    """Refit after epoch `epoch` (0-based) when partition.refit_every divides epoch + 1."""
    return refits(cfg) and (epoch + 1) % cfg.partition.refit_every == 0


def synthetic_in_t(regions: torch.Tensor, synthetic: torch.Tensor) -> torch.Tensor:
    """[B] bool: synthetic samples whose region holds a real sample (the T of eq. 7), from regions [B], synthetic
    [B] bool."""
    real_regions = regions[~synthetic]
    return synthetic & torch.isin(regions, real_regions)


class MixingCounter:
    """How many synthetic samples the regularisers can act on: per batch (what the loss sees) and over the epoch.

    `add(regions [B], synthetic [B] bool)` once per batch. `metrics()` gives
    - mixing/batch_synthetic_in_t: share of the epoch's synthetic samples that had a real sample of their region in
      their own batch (g / |synthetic| pooled over batches): what the loss actually saw;
    - mixing/synthetic_in_mixed: share of the synthetic samples whose region (over the whole epoch's assignments)
      holds a real sample: what the regularisers can act on;
    - mixing/regions_mixed: regions holding both real and synthetic samples; mixing/regions_used: non-empty ones.
    """

    def __init__(self) -> None:
        self.regions: list[np.ndarray] = []
        self.synthetic: list[np.ndarray] = []
        self.batch_hits = self.batch_synth = 0

    def add(self, regions: torch.Tensor, synthetic: torch.Tensor) -> None:
        self.batch_hits += int(synthetic_in_t(regions, synthetic).sum())
        self.batch_synth += int(synthetic.sum())
        self.regions.append(regions.detach().cpu().numpy().astype(np.int64))
        self.synthetic.append(synthetic.detach().cpu().numpy().astype(bool))

    def metrics(self) -> dict[str, float]:
        if not self.regions or self.batch_synth == 0:
            return {}
        return mixing_figures(np.concatenate(self.regions), np.concatenate(self.synthetic),
                              batch_fraction=self.batch_hits / self.batch_synth)


def mixing_figures(regions: np.ndarray, synthetic: np.ndarray, batch_fraction: float | None = None
                   ) -> dict[str, float]:
    """The dataset-level mixing of regions [N] int and synthetic [N] bool (plus the per-batch share, if given)."""
    real_regions = np.unique(regions[~synthetic])
    synth_regions = np.unique(regions[synthetic])
    out = {"mixing/regions_mixed": float(len(np.intersect1d(real_regions, synth_regions))),
           "mixing/regions_used": float(len(np.unique(regions))),
           "mixing/synthetic_in_mixed": float(np.isin(regions[synthetic], real_regions).mean())
           if synthetic.any() else 0.0}
    if batch_fraction is not None:
        out["mixing/batch_synthetic_in_t"] = float(batch_fraction)
    return out


def no_mixing_warning(cfg: ExperimentConfig, metrics: dict) -> str | None:
    """One warning line when the regularisers saw no synthetic sample in an epoch although a λ is positive."""
    regularised = cfg.loss.lambda_discrepancy > 0 or cfg.loss.lambda_robustness > 0
    if not regularised or metrics.get("mixing/batch_synthetic_in_t", 1.0) > 0:
        return None
    p = cfg.partition
    return (f"warning: epoch {metrics.get('epoch')}: the regularisers saw no synthetic sample (no synthetic image "
            f"shared a region with a real one in its batch; partition {p.mode}/{p.features}, "
            f"K = {p.cluster_multiple:g} x classes): the run is cross-entropy only; set partition.features=outputs "
            "(regions in the prediction space), lower partition.cluster_multiple, or set partition.mode=single")
