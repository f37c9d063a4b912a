"""The vectorised loss against a naive loop reference written from DESIGN.md 1.3, on many random batches."""

import pytest
import torch
import torch.nn.functional as F

from fsynth.loss import regularized_loss, synthetic_only_loss

PRESETS = ("paper", "protoaug", "protoaug-lightweight")
PARTS = ("ce_real", "ce_synth", "discrepancy", "robustness")
WEIGHTS = dict(ce_real_weight=4.0, ce_synth_weight=0.7, lambda_discrepancy=2.0, lambda_robustness=20.0)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# Naive reference: Python loops over regions and pairs, straight from the formulas.


def naive_dist(a, b, preset, num_classes):
    sq = ((a - b) ** 2).sum()
    if preset != "paper":
        return sq / num_classes
    # A coincident pair is 0 by definition; skipping the sqrt keeps the reference's own gradient defined.
    return torch.sqrt(sq) if sq > 0 else sq * 0


def naive_ce(logits, labels, idx):
    if not idx:
        return logits.new_zeros(())
    terms = []
    for i in idx:
        logp = torch.log_softmax(logits[i], dim=-1)
        terms.append(-(labels[i] * logp).sum() if labels.dim() == 2 else -logp[labels[i]])
    return sum(terms) / len(idx)


def naive_terms(logits, is_synthetic, regions, num_classes, preset, synthetic_per_class, anchor_synthetic=False):
    """D and Rb; T = regions with a real sample (or, for the synthetic-only loss, with a synthetic one)."""
    p = torch.softmax(logits, dim=-1) if preset == "paper" else logits
    regs = regions.tolist()
    syn = is_synthetic.tolist()
    R, G = {}, {}
    for i, (k, s) in enumerate(zip(regs, syn, strict=True)):
        (G if s else R).setdefault(k, []).append(i)
    anchors = G if anchor_synthetic else R
    T = [k for k in sorted(set(regs)) if len(anchors.get(k, [])) >= 1]
    if preset == "paper":
        g = sum(len(G.get(k, [])) for k in T)
    elif preset == "protoaug-lightweight":
        g = sum(syn)  # every synthetic sample of the batch, in T or not
    else:
        g = synthetic_per_class * num_classes
    zero = logits.new_zeros(())
    if g == 0:
        return zero, zero
    D, Rb = zero, zero
    for k in T:
        Rk, Gk = R.get(k, []), G.get(k, [])
        if not Gk:
            continue
        if Rk:
            pair_sum = sum(naive_dist(p[s], p[u], preset, num_classes) for s in Rk for u in Gk)
            D = D + (len(Gk) / g) * pair_sum / (len(Rk) * len(Gk))
        if preset != "protoaug":
            pairs = [(u, v) for u in Gk for v in Gk]
        else:
            pairs = [(u, v) for u in Gk for v in Gk if u < v]
        Rb = Rb + (1 / g) * (1 / len(Gk)) * sum((naive_dist(p[u], p[v], preset, num_classes) for u, v in pairs), zero)
    return D, Rb


def naive_loss(
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
    syn = is_synthetic.tolist()
    ce_real = naive_ce(logits, labels, [i for i, s in enumerate(syn) if not s])
    ce_synth = naive_ce(logits, labels, [i for i, s in enumerate(syn) if s])
    D, Rb = naive_terms(logits, is_synthetic, regions, num_classes, preset, synthetic_per_class)
    total = ce_real_weight * ce_real + ce_synth_weight * ce_synth + lambda_discrepancy * D + lambda_robustness * Rb
    return total, {"ce_real": ce_real, "ce_synth": ce_synth, "discrepancy": D, "robustness": Rb}


def naive_synthetic_only(
    logits,
    labels,
    regions,
    *,
    num_classes,
    ce_synth_weight,
    lambda_robustness,
    preset="paper",
    synthetic_per_class=None,
):
    syn = torch.ones(len(regions), dtype=torch.bool)
    ce_synth = naive_ce(logits, labels, list(range(len(regions))))
    _, Rb = naive_terms(logits, syn, regions, num_classes, preset, synthetic_per_class, anchor_synthetic=True)
    zero = logits.new_zeros(())
    total = ce_synth_weight * ce_synth + lambda_robustness * Rb
    return total, {"ce_real": zero, "ce_synth": ce_synth, "discrepancy": zero, "robustness": Rb}


# ---------------------------------------------------------------------------------------------------------------
# Random batches, edge cases included.


def random_batch(seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def randint(lo, hi, size=()):
        return torch.randint(lo, hi + 1, size, generator=gen)

    B, C = int(randint(1, 40)), int(randint(2, 12))
    K = int(randint(1, max(1, B // 2)))
    regions = randint(0, K - 1, (B,))
    domain = seed % 6  # every sixth batch has no real sample, and every sixth has no synthetic one
    p_synth = {0: 1.0, 1: 0.0}.get(domain, float(torch.rand((), generator=gen)))
    is_synthetic = torch.rand(B, generator=gen) < p_synth
    if seed % 4 == 0:
        regions = regions * 3 + 5  # region ids with gaps: empty regions
    if seed % 10 == 7:
        regions = torch.zeros_like(regions)  # all samples in one region
    logits = (torch.randn(B, C, generator=gen) * float(randint(1, 4))).to(dtype)
    if seed % 2:
        labels = randint(0, C - 1, (B,))
    else:  # a CutMix/MixUp target: a mix of two one-hots
        lam = torch.rand(B, 1, generator=gen)
        a, b = F.one_hot(randint(0, C - 1, (B,)), C), F.one_hot(randint(0, C - 1, (B,)), C)
        labels = (lam * a + (1 - lam) * b).to(dtype)
    return logits, labels, is_synthetic, regions, C


def kwargs(preset, C, **extra):
    spc = 3 if preset == "protoaug" else None
    return dict(num_classes=C, preset=preset, synthetic_per_class=spc, **WEIGHTS, **extra)


def assert_same(out, ref_total, ref_parts, tol=1e-6, msg=""):
    assert set(out.parts) == set(PARTS), msg
    assert torch.allclose(out.total, ref_total, rtol=tol, atol=tol), (msg, out.total, ref_total)
    for name in PARTS:
        assert torch.allclose(out.parts[name], ref_parts[name], rtol=tol, atol=tol), (msg, name)


@pytest.mark.parametrize("seed", range(200))
def test_matches_naive_reference(seed):
    logits, labels, is_synthetic, regions, C = random_batch(seed)
    for preset in PRESETS:
        out = regularized_loss(logits, labels, is_synthetic, regions, **kwargs(preset, C))
        ref_total, ref_parts = naive_loss(logits, labels, is_synthetic, regions, **kwargs(preset, C))
        assert_same(out, ref_total, ref_parts, msg=(seed, preset))


def edge_batches():
    gen = torch.Generator().manual_seed(0)
    B, C = 9, 5
    logits = torch.randn(B, C, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, C, (B,), generator=gen)
    half = torch.arange(B) % 2 == 1
    spread = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    return {
        "no_real": (logits, labels, torch.ones(B, dtype=torch.bool), spread),
        "no_synthetic": (logits, labels, torch.zeros(B, dtype=torch.bool), spread),
        "single_sample_region": (logits, labels, half, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4])),
        "region_id_gaps": (logits, labels, half, spread * 7 + 3),
        "one_region": (logits, labels, half, torch.zeros(B, dtype=torch.long)),
        "synthetic_outside_t": (logits, labels, half, torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0])),
        "batch_of_one": (logits[:1], labels[:1], half[1:2], spread[:1]),
    }


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("case", sorted(edge_batches()))
def test_edge_cases_match_naive_reference(case, preset):
    logits, labels, is_synthetic, regions = edge_batches()[case]
    out = regularized_loss(logits, labels, is_synthetic, regions, **kwargs(preset, logits.shape[1]))
    ref_total, ref_parts = naive_loss(logits, labels, is_synthetic, regions, **kwargs(preset, logits.shape[1]))
    assert_same(out, ref_total, ref_parts, msg=case)
    assert torch.isfinite(out.total)
    if case in ("no_real", "no_synthetic", "synthetic_outside_t"):
        assert out.parts["discrepancy"] == 0 and out.parts["robustness"] == 0
    if case == "no_real":
        assert out.parts["ce_real"] == 0
    if case == "no_synthetic":
        assert out.parts["ce_synth"] == 0


@pytest.mark.parametrize("seed", range(20))
def test_gradient_matches_naive_reference(seed):
    logits, labels, is_synthetic, regions, C = random_batch(1000 + seed)
    for preset in PRESETS:
        x = logits.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(regularized_loss(x, labels, is_synthetic, regions, **kwargs(preset, C)).total, x)
        (ref,) = torch.autograd.grad(naive_loss(x, labels, is_synthetic, regions, **kwargs(preset, C))[0], x)
        assert torch.allclose(grad, ref, rtol=1e-6, atol=1e-8), (seed, preset)


@pytest.mark.parametrize("seed", range(30))
def test_reduces_to_weighted_cross_entropy(seed):
    logits, labels, is_synthetic, regions, C = random_batch(seed)
    w = dict(ce_real_weight=3.0, ce_synth_weight=0.5, lambda_discrepancy=0.0, lambda_robustness=0.0)
    expected = logits.new_zeros(())
    for weight, mask in ((3.0, ~is_synthetic), (0.5, is_synthetic)):
        if mask.any():
            expected = expected + weight * F.cross_entropy(logits[mask], labels[mask])
    for preset in PRESETS:
        out = regularized_loss(
            logits, labels, is_synthetic, regions, num_classes=C, preset=preset, synthetic_per_class=2, **w
        )
        assert torch.allclose(out.total, expected, rtol=1e-9, atol=1e-12), (seed, preset)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_gradients_finite_when_outputs_coincide(preset, dtype):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 6, generator=gen, dtype=dtype)
    logits[1] = logits[0]  # a duplicate real/synthetic pair in region 0
    logits[3] = logits[2]  # a duplicate synthetic/synthetic pair in region 1
    labels = torch.randint(0, 6, (8,), generator=gen)
    is_synthetic = torch.tensor([0, 1, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    regions = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    for x in (logits, torch.full_like(logits, 0.3)):
        x = x.clone().requires_grad_(True)
        out = regularized_loss(x, labels, is_synthetic, regions, **kwargs(preset, 6))
        (grad,) = torch.autograd.grad(out.total, x)
        assert torch.isfinite(out.total) and torch.isfinite(grad).all()
        only = synthetic_only_loss(
            x,
            labels,
            regions,
            num_classes=6,
            ce_synth_weight=1.0,
            lambda_robustness=5.0,
            preset=preset,
            synthetic_per_class=2,
        )
        (grad,) = torch.autograd.grad(only.total, x)
        assert torch.isfinite(only.total) and torch.isfinite(grad).all()
    equal = torch.full_like(logits, 0.3)
    out = regularized_loss(equal, labels, is_synthetic, regions, **kwargs(preset, 6))
    assert out.parts["discrepancy"] == 0 and out.parts["robustness"] == 0


@pytest.mark.parametrize("bad", (None, 0, -1))
def test_protoaug_needs_synthetic_per_class(bad):
    logits, labels, is_synthetic, regions, C = random_batch(5)
    with pytest.raises(ValueError, match="synthetic_per_class"):
        regularized_loss(
            logits, labels, is_synthetic, regions, num_classes=C, preset="protoaug", synthetic_per_class=bad, **WEIGHTS
        )
    with pytest.raises(ValueError, match="synthetic_per_class"):
        synthetic_only_loss(
            logits,
            labels,
            regions,
            num_classes=C,
            ce_synth_weight=1.0,
            lambda_robustness=1.0,
            preset="protoaug",
            synthetic_per_class=bad,
        )


def test_lightweight_needs_no_synthetic_per_class():
    logits, labels, is_synthetic, regions, C = random_batch(5)
    out = regularized_loss(logits, labels, is_synthetic, regions, num_classes=C, preset="protoaug-lightweight",
                           **WEIGHTS)
    assert torch.isfinite(out.total)


def test_unknown_preset_raises():
    logits, labels, is_synthetic, regions, C = random_batch(5)
    with pytest.raises(ValueError, match="preset"):
        regularized_loss(logits, labels, is_synthetic, regions, num_classes=C, preset="Paper", **WEIGHTS)


@pytest.mark.parametrize("seed", range(40))
def test_synthetic_only_matches_naive_reference(seed):
    logits, labels, _, regions, C = random_batch(seed)
    for preset in PRESETS:
        kw = dict(
            num_classes=C,
            ce_synth_weight=0.7,
            lambda_robustness=20.0,
            preset=preset,
            synthetic_per_class=3 if preset == "protoaug" else None,
        )
        x = logits.clone().requires_grad_(seed < 10)  # the naive reference's autograd graph is slow to build
        out = synthetic_only_loss(x, labels, regions, **kw)
        ref_total, ref_parts = naive_synthetic_only(x, labels, regions, **kw)
        assert_same(out, ref_total, ref_parts, msg=(seed, preset))
        assert out.parts["ce_real"] == 0 and out.parts["discrepancy"] == 0
        if seed >= 10:
            continue
        (grad,) = torch.autograd.grad(out.total, x)
        (ref,) = torch.autograd.grad(ref_total, x)
        assert torch.allclose(grad, ref, rtol=1e-6, atol=1e-8), (seed, preset)


def test_autocast_computes_in_float32():
    logits, labels, is_synthetic, regions, C = random_batch(8, dtype=torch.float32)
    ref = regularized_loss(logits, labels, is_synthetic, regions, **kwargs("paper", C))
    w = torch.eye(C, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = logits @ w  # bfloat16 under autocast, as a model's head would give
        assert x.dtype == torch.bfloat16
        out = regularized_loss(x, labels, is_synthetic, regions, **kwargs("paper", C))
    assert out.total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in out.parts.values())
    (grad,) = torch.autograd.grad(out.total, w)
    assert torch.isfinite(grad).all()
    assert torch.allclose(out.total, ref.total, rtol=2e-2)



# ---------------------------------------------------------------------------------------------------------------
# protoaug-lightweight: the official lightweight code's reductions.

LIGHT = dict(num_classes=2, preset="protoaug-lightweight", **WEIGHTS)


def protoaug_kwargs(C, synthetic_per_class):
    return {**kwargs("protoaug", C), "synthetic_per_class": synthetic_per_class}


def hand_batch():
    """2 classes; regions 0 and 1 hold a real sample (T = {0, 1}), region 2 only a synthetic one."""
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 3.0], [5.0, 5.0]], dtype=torch.float64)
    is_synthetic = torch.tensor([0, 1, 1, 0, 1, 1], dtype=torch.bool)
    regions = torch.tensor([0, 0, 0, 1, 1, 2])
    return logits, torch.tensor([0, 0, 1, 1, 0, 1]), is_synthetic, regions


def official_lightweight_loops(logits, is_synthetic, regions):
    """The official lightweight code's double loops: g = len(label_gen), F.mse_loss on logits, every (u, v)."""
    real = [i for i in range(len(regions)) if not is_synthetic[i]]
    gen = [i for i in range(len(regions)) if is_synthetic[i]]
    g = len(gen)
    disc, rob = 0.0, 0.0
    for k in sorted(set(regions[real].tolist())):
        rk = [i for i in real if regions[i] == k]
        gk = [j for j in gen if regions[j] == k]
        for i in rk:
            for j in gk:
                disc += float(F.mse_loss(logits[i], logits[j])) / (g * len(rk))
        for i in gk:
            for j in gk:
                rob += float(F.mse_loss(logits[i], logits[j])) / (g * len(gk))
    return disc, rob


def test_lightweight_hand_computed_example():
    logits, labels, is_synthetic, regions = hand_batch()
    out = regularized_loss(logits, labels, is_synthetic, regions, **LIGHT)
    # g = 4 synthetic rows (region 2's included). dist = |a - b|^2 / 2: region 0 has d(real, s) = 2 for both of its
    # synthetic rows and d(s1, s2) = 4; region 1 has d(real, s) = 2 and one synthetic row.
    # D = (2 + 2) / (4 * 1) + 2 / (4 * 1) = 1.5; Rb = (4 + 4) / (4 * 2) + 0 / (4 * 1) = 1.0 (diagonal terms are 0).
    assert out.parts["discrepancy"].item() == pytest.approx(1.5, abs=1e-12)
    assert out.parts["robustness"].item() == pytest.approx(1.0, abs=1e-12)
    disc, rob = official_lightweight_loops(logits, is_synthetic, regions)
    assert (disc, rob) == (pytest.approx(1.5, abs=1e-12), pytest.approx(1.0, abs=1e-12))


def test_lightweight_g_is_the_batch_synthetic_count():
    logits, labels, is_synthetic, regions = hand_batch()
    out = regularized_loss(logits, labels, is_synthetic, regions, **LIGHT)
    # synthetic_per_class is not used: any value (or none) gives the same loss.
    again = regularized_loss(logits, labels, is_synthetic, regions, **LIGHT, synthetic_per_class=500)
    assert torch.equal(out.total, again.total)
    # Three more synthetic rows in a region without a real sample add no pair, only raise g from 4 to 7.
    more = (torch.cat([logits, torch.randn(3, 2, dtype=logits.dtype)]), torch.cat([labels, torch.tensor([0, 1, 0])]),
            torch.cat([is_synthetic, torch.ones(3, dtype=torch.bool)]), torch.cat([regions, torch.tensor([2, 5, 5])]))
    bigger = regularized_loss(*more, **LIGHT)
    for name in ("discrepancy", "robustness"):
        assert torch.allclose(bigger.parts[name] * 7, out.parts[name] * 4, rtol=1e-12), name


@pytest.mark.parametrize("seed", range(30))
def test_lightweight_against_protoaug_on_the_same_batch(seed):
    """With g_p = synthetic_per_class * C and g_b the batch's synthetic count: D_light = D_proto * g_p / g_b and,
    the diagonal being 0 and dist symmetric, Rb_light = (1/g_b) sum_k sum_{u, v} / |G_k| = 2 Rb_proto * g_p / g_b."""
    logits, labels, is_synthetic, regions, C = random_batch(seed)
    light = regularized_loss(logits, labels, is_synthetic, regions, **kwargs("protoaug-lightweight", C))
    proto = regularized_loss(logits, labels, is_synthetic, regions, **protoaug_kwargs(C, 5))
    g_p, g_b = 5 * C, max(1, int(is_synthetic.sum()))
    assert torch.allclose(light.parts["discrepancy"], proto.parts["discrepancy"] * g_p / g_b, rtol=1e-10, atol=1e-12)
    assert torch.allclose(light.parts["robustness"], 2 * proto.parts["robustness"] * g_p / g_b, rtol=1e-10, atol=1e-12)
    for name in ("ce_real", "ce_synth"):
        assert torch.equal(light.parts[name], proto.parts[name])


def test_lightweight_at_batch_128_is_about_640_over_synthetic_count_times_protoaug():
    """64 images/class x 10 classes (g_p = 640) at batch 128, half synthetic (about one real per synthetic image)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(128, 10, generator=gen, dtype=torch.float64) * 3
    is_synthetic = torch.arange(128) % 2 == 1
    regions = torch.randint(0, 20, (128,), generator=gen)
    labels = torch.randint(0, 10, (128,), generator=gen)
    light = regularized_loss(logits, labels, is_synthetic, regions, **kwargs("protoaug-lightweight", 10))
    proto = regularized_loss(logits, labels, is_synthetic, regions, **protoaug_kwargs(10, 64))
    n_synth = int(is_synthetic.sum())
    disc_ratio = float(light.parts["discrepancy"] / proto.parts["discrepancy"])
    rob_ratio = float(light.parts["robustness"] / proto.parts["robustness"])
    print(f"n_synth {n_synth}: discrepancy x{disc_ratio:.4f}, robustness x{rob_ratio:.4f} (640 / n_synth "
          f"= {640 / n_synth})")
    assert disc_ratio == pytest.approx(640 / n_synth, rel=1e-10)  # 10: lambda (0.1, 1) is 10x stronger than protoaug's
    assert rob_ratio == pytest.approx(2 * 640 / n_synth, rel=1e-10)  # and 2x more for the ordered pairs


@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_matches_cpu(preset):
    logits, labels, is_synthetic, regions, C = random_batch(11, dtype=torch.float32)
    cpu = regularized_loss(logits, labels, is_synthetic, regions, **kwargs(preset, C))
    dev = [t.cuda() for t in (logits, labels, is_synthetic, regions)]
    x = dev[0].clone().requires_grad_(True)
    out = regularized_loss(x, *dev[1:], **kwargs(preset, C))
    assert torch.allclose(out.total.cpu(), cpu.total, rtol=1e-5, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.float16):
        half = regularized_loss(x.half(), *dev[1:], **kwargs(preset, C))
    assert half.total.dtype == torch.float32
    (grad,) = torch.autograd.grad(out.total + half.total, x)
    assert torch.isfinite(grad).all()
