"""Times fsynth.loss.regularized_loss against a per-region, per-pair Python loop; prints a markdown table.

    python benchmarks/bench_loss.py [--repeats 30] [--device cpu] [--threads N]

Forward + backward at batch 128, half real / half synthetic, K = 2C regions, both presets; the two versions run
alternately in one process so that machine load hits both alike. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fsynth.loss import regularized_loss

PARTS = ("ce_real", "ce_synth", "discrepancy", "robustness")
WEIGHTS = dict(ce_real_weight=4.0, ce_synth_weight=1.0, lambda_discrepancy=2.0, lambda_robustness=20.0)
SYNTHETIC_PER_CLASS = 16
HEADER = (
    "| preset | B | C | K | pairs | vectorised (ms) | loop (ms) | loop / vectorised "
    "| max abs diff, total | max abs diff, parts |"
)


def loop_loss(
    logits,
    labels,
    is_synthetic,
    regions,
    *,
    num_classes,
    ce_real_weight,
    ce_synth_weight,
    lambda_discrepancy,
    lambda_robustness,
    preset="paper",
    synthetic_per_class=None,
):
    """DESIGN.md 1.3 written the obvious way: a Python loop over regions, and within each over sample pairs."""
    p = logits.softmax(-1) if preset == "paper" else logits

    def dist(a, b):
        sq = (a - b).pow(2).sum()
        return sq / num_classes if preset == "protoaug" else sq.sqrt()

    zero = logits.new_zeros(())
    real, synth = ~is_synthetic, is_synthetic
    ce_real = F.cross_entropy(logits[real], labels[real]) if real.any() else zero
    ce_synth = F.cross_entropy(logits[synth], labels[synth]) if synth.any() else zero
    groups = []
    for k in regions.unique().tolist():
        in_k = regions == k
        r_k, g_k = torch.nonzero(in_k & real).flatten().tolist(), torch.nonzero(in_k & synth).flatten().tolist()
        if r_k:
            groups.append((r_k, g_k))
    g = sum(len(g_k) for _, g_k in groups) if preset == "paper" else synthetic_per_class * num_classes
    disc, rob = zero, zero
    for r_k, g_k in groups:
        if not g_k or g == 0:
            continue
        disc = disc + (len(g_k) / g) * sum(dist(p[s], p[u]) for s in r_k for u in g_k) / (len(r_k) * len(g_k))
        # paper: ordered pairs, the (zero) diagonal left out; protoaug: u < v
        pairs = [(u, v) for u in g_k for v in g_k if (u != v if preset == "paper" else u < v)]
        rob = rob + sum((dist(p[u], p[v]) for u, v in pairs), zero) / (g * len(g_k))
    total = ce_real_weight * ce_real + ce_synth_weight * ce_synth + lambda_discrepancy * disc + lambda_robustness * rob
    return total, {"ce_real": ce_real, "ce_synth": ce_synth, "discrepancy": disc, "robustness": rob}


def make_batch(batch: int, num_classes: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, generator=gen) * 3
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    is_synthetic = torch.randperm(batch, generator=gen) < batch // 2
    regions = torch.randint(0, 2 * num_classes, (batch,), generator=gen)
    return [t.to(device) for t in (logits, labels, is_synthetic, regions)]


def pair_count(is_synthetic, regions, preset: str) -> int:
    """Distances the loop evaluates: real x synthetic and synthetic pairs within regions that hold a real sample."""
    count = 0
    for k in regions.unique().tolist():
        n_real = int((~is_synthetic & (regions == k)).sum())
        n_synth = int((is_synthetic & (regions == k)).sum())
        if n_real:
            count += n_real * n_synth + (n_synth * (n_synth - 1) // (2 if preset == "protoaug" else 1))
    return count


def timed(fn, logits, *args, **kwargs) -> float:
    x = logits.clone().requires_grad_(True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(x, *args, **kwargs)
    (out.total if hasattr(out, "total") else out[0]).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_case(preset: str, num_classes: int, batch: int, repeats: int, device: str) -> dict:
    logits, labels, is_synthetic, regions = make_batch(batch, num_classes, device)
    kw = dict(num_classes=num_classes, preset=preset, synthetic_per_class=SYNTHETIC_PER_CLASS, **WEIGHTS)
    vec = regularized_loss(logits, labels, is_synthetic, regions, **kw)
    loop_total, loop_parts = loop_loss(logits, labels, is_synthetic, regions, **kw)
    times = {"vec": [], "loop": []}
    for i in range(repeats + 2):  # the first two are warm-up
        for name, fn in (("vec", regularized_loss), ("loop", loop_loss)):
            elapsed = timed(fn, logits, labels, is_synthetic, regions, **kw)
            if i >= 2:
                times[name].append(elapsed)
    vec_ms, loop_ms = (1e3 * statistics.median(times[n]) for n in ("vec", "loop"))
    return {
        "preset": preset,
        "C": num_classes,
        "K": 2 * num_classes,
        "B": batch,
        "pairs": pair_count(is_synthetic, regions, preset),
        "vec_ms": vec_ms,
        "loop_ms": loop_ms,
        "d_total": float((vec.total - loop_total).abs()),
        "d_parts": max(float((vec.parts[n] - loop_parts[n]).abs()) for n in PARTS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} forward+backward runs, float32\n"
    )
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for preset in ("paper", "protoaug"):
        for num_classes in (47, 100):
            r = bench_case(preset, num_classes, 128, args.repeats, args.device)
            print(
                f"| {r['preset']} | {r['B']} | {r['C']} | {r['K']} | {r['pairs']} | {r['vec_ms']:.2f} | "
                f"{r['loop_ms']:.1f} | {r['loop_ms'] / r['vec_ms']:.1f}× | {r['d_total']:.1e} | {r['d_parts']:.1e} |"
            )


if __name__ == "__main__":
    main()
