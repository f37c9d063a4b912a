"""The regularised loss of eq. 7 (cross-entropy + discrepancy + robustness) in its `paper`, `protoaug` and
`protoaug-lightweight` presets (DESIGN.md 1.3; README's loss section)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class _Options:
    """The orthogonal options a preset fixes (DESIGN.md 1.3's table)."""

    probabilities: bool  # outputs p: softmax probabilities (True) or raw logits
    squared: bool  # dist: L2 norm (False) or squared L2 divided by C (True)
    g: str  # "in_t": synthetic samples of the batch in T; "batch": all of the batch's; "dataset": per class x C
    diagonal: bool  # robustness pairs: ordered with the diagonal (True) or unordered u < v (False)


# paper: eq. 7 as written. protoaug: the official full code. protoaug-lightweight: the official lightweight code
# (F.mse_loss on logits; g = len(label_gen), the batch's synthetic count; a double loop over G_k x G_k).
_PRESETS: dict[str, _Options] = {
    "paper": _Options(probabilities=True, squared=False, g="in_t", diagonal=True),
    "protoaug": _Options(probabilities=False, squared=True, g="dataset", diagonal=False),
    "protoaug-lightweight": _Options(probabilities=False, squared=True, g="batch", diagonal=True),
}
PRESETS = tuple(_PRESETS)


@dataclass(frozen=True)
class LossOutput:
    """`total`: scalar, differentiable. `parts`: 'ce_real', 'ce_synth', 'discrepancy', 'robustness' (scalars,
    unweighted, i.e. before the lambdas and the cross-entropy weights)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def regularized_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    is_synthetic: torch.Tensor,
    regions: torch.Tensor,
    *,
    num_classes: int,
    ce_real_weight: float,
    ce_synth_weight: float,
    lambda_discrepancy: float,
    lambda_robustness: float,
    preset: str = "paper",
    synthetic_per_class: int | None = None,
) -> LossOutput:
    """Eq. 7 on one mini-batch (DESIGN.md 1.3).

    logits [B, C]; labels [B] int64 class indices or [B, C] float soft targets (CutMix/MixUp); is_synthetic [B]
    bool; regions [B] int64 region ids (any integer ids, gaps allowed). T is the set of regions with a real
    sample; `synthetic_per_class` is required by `protoaug`, whose g is synthetic_per_class * num_classes (the other
    presets count g in the batch and ignore it).
    """
    _check(logits, labels, is_synthetic, regions, preset, synthetic_per_class)
    with torch.autocast(logits.device.type, enabled=False):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ce_real, ce_synth = _cross_entropies(x, labels, is_synthetic)
        disc, rob = _regularisers(x, is_synthetic, ~is_synthetic, regions, num_classes, preset, synthetic_per_class)
    total = ce_real_weight * ce_real + ce_synth_weight * ce_synth + lambda_discrepancy * disc + lambda_robustness * rob
    return LossOutput(total, {"ce_real": ce_real, "ce_synth": ce_synth, "discrepancy": disc, "robustness": rob})


def synthetic_only_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    regions: torch.Tensor,
    *,
    num_classes: int,
    ce_synth_weight: float,
    lambda_robustness: float,
    preset: str = "paper",
    synthetic_per_class: int | None = None,
) -> LossOutput:
    """The loss for synthetic data only (fsynth's reading of the paper's Appendix F).

    Every sample is synthetic, so there is no real sample: the discrepancy (and ce_real) is 0, and T becomes every
    region that holds a synthetic sample, so g is the batch size (`paper`, `protoaug-lightweight`) or
    synthetic_per_class * num_classes (`protoaug`). total = ce_synth_weight * ce_synth + lambda_robustness *
    robustness; parts has all four keys.
    Shapes as in `regularized_loss`: logits [B, C], labels [B] int64 or [B, C] float, regions [B] int64.
    """
    synthetic = torch.ones(regions.shape, dtype=torch.bool, device=regions.device)
    _check(logits, labels, synthetic, regions, preset, synthetic_per_class)
    with torch.autocast(logits.device.type, enabled=False):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ce_real, ce_synth = _cross_entropies(x, labels, synthetic)
        disc, rob = _regularisers(x, synthetic, synthetic, regions, num_classes, preset, synthetic_per_class)
    total = ce_synth_weight * ce_synth + lambda_robustness * rob
    return LossOutput(total, {"ce_real": ce_real, "ce_synth": ce_synth, "discrepancy": disc, "robustness": rob})


def _check(logits, labels, is_synthetic, regions, preset, synthetic_per_class) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown loss preset {preset!r}; expected one of {PRESETS}")
    if _PRESETS[preset].g == "dataset" and (synthetic_per_class is None or synthetic_per_class <= 0):
        raise ValueError(f"preset 'protoaug' needs synthetic_per_class > 0, got {synthetic_per_class!r}")
    b = logits.shape[0]
    if logits.dim() != 2 or labels.shape not in ((b,), logits.shape) or is_synthetic.shape != (b,):
        raise ValueError(
            f"expected logits [B, C], labels [B] or [B, C], is_synthetic [B]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(is_synthetic.shape)}"
        )
    if regions.shape != (b,) or regions.dtype.is_floating_point or is_synthetic.dtype != torch.bool:
        raise ValueError("expected regions [B] of integer ids and is_synthetic [B] of bool")


def _cross_entropies(x: torch.Tensor, labels: torch.Tensor, synthetic: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mean cross-entropy of the real and of the synthetic samples of x [B, C]; 0 for an absent domain."""
    target = labels.to(x.dtype) if labels.is_floating_point() else labels
    ce = F.cross_entropy(x, target, reduction="none")
    means = []
    for mask in (~synthetic, synthetic):
        m = mask.to(x.dtype)
        # clamp: an absent domain has a zero sum, so its mean comes out 0 rather than 0/0.
        means.append((ce * m).sum() / m.sum().clamp_min(1))
    return means[0], means[1]


def _pairwise_dist(x: torch.Tensor, opts: _Options, num_classes: int) -> torch.Tensor:
    """dist(p_a, p_b) for every pair of rows of x [B, C] -> [B, B]."""
    p = x.softmax(dim=-1) if opts.probabilities else x
    # Exact differences, never the |a|^2 + |b|^2 - 2ab shortcut (cdist's mm path): that one leaves a coincident pair
    # at ~1e-8 instead of 0, with a huge sqrt gradient. In this mode cdist's backward (CPU and CUDA kernels) returns
    # 0, not 0/0, at zero distance, and it never builds the [B, B, C] differences (~5x faster than those on CPU).
    dist = torch.cdist(p, p, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    # Squaring keeps that: d(dist²) = 2·dist·d(dist) is 0 at dist = 0.
    return dist.square() / num_classes if opts.squared else dist


def _regularisers(x, synthetic, anchor, regions, num_classes, preset, synthetic_per_class):
    """Discrepancy D and robustness Rb (scalars) from x [B, C]; synthetic, anchor [B] bool; regions [B] int.

    T is the set of regions with an `anchor` sample (real ones; synthetic ones for `synthetic_only_loss`). Sums
    over regions become sums over same-region pairs weighted per sample, so there is no loop over regions.
    """
    opts = _PRESETS[preset]
    dist = _pairwise_dist(x, opts, num_classes)
    # same = M Mᵀ for the one-hot region mask M [B, K]; compared directly, so K is never needed (no host sync).
    same = (regions[:, None] == regions[None, :]).to(dist.dtype)
    real, synth = (~synthetic).to(dist.dtype), synthetic.to(dist.dtype)
    # Per-sample counts of its region (|R_k|, |G_k|, anchors) stand in for a loop over the regions.
    n_real, n_synth, n_anchor = same @ real, same @ synth, same @ anchor.to(dist.dtype)
    synth_in_t = synth * (n_anchor > 0).to(dist.dtype)
    g = _g(opts, synth, synth_in_t, synthetic_per_class, num_classes)
    # (|G_k|/g) * mean over R_k x G_k = (1/g) * sum over R_k x G_k / |R_k|.
    w_disc = (real / n_real.clamp_min(1))[:, None] * synth[None, :] * same
    w_rob = (synth_in_t / n_synth.clamp_min(1))[:, None] * synth[None, :] * same
    if not opts.diagonal:
        w_rob = w_rob.triu(diagonal=1)
    return (w_disc * dist).sum() / g, (w_rob * dist).sum() / g


def _g(opts: _Options, synth: torch.Tensor, synth_in_t: torch.Tensor, synthetic_per_class, num_classes: int):
    """The normaliser g (scalar tensor) from the synthetic masks synth, synth_in_t [B] (float 0/1)."""
    if opts.g == "dataset":
        return torch.tensor(float(synthetic_per_class * num_classes), dtype=synth.dtype, device=synth.device)
    # The lightweight code's g = len(label_gen) counts synthetic samples outside T as well, which only scales both
    # terms down; g = 0 leaves no pair in either sum, so the clamp makes both terms 0 rather than 0/0.
    return (synth if opts.g == "batch" else synth_in_t).sum().clamp_min(1)
