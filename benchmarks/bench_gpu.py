"""GPU throughput of the full variant at real size, random weights: CLIP LoRA training steps and SD generation.

    python benchmarks/bench_gpu.py [--tiny] [--budget 240] [--out DIR]     (see benchmarks/run_gpu.sh)

1. CLIP ViT-B/16 (`ViT-B-16-quickgelu`, built by fsynth.models.build_classifier from the full preset's model
   config with model.pretrained='' = random weights, zero-shot head, DTD's 47 classes and template) LoRA training
   steps through fsynth.loop's own epoch function (`_train_epoch`: mixing, bf16 autocast, fsynth.loop.compute_loss,
   AdamW, cosine schedule, the per-step metric reads) at batch 128 = 64 real + 64 synthetic, 224 px, K = 2C = 94
   random regions. Loss variants, timed alternately in one process on the same model: plain cross-entropy (no
   regulariser code), the `real-synthetic-ce` baseline (fsynth.loss with lambda1 = lambda2 = 0), and the
   regularised loss (lambda1 0.1, lambda2 1.0) in the `protoaug` and `paper` presets. Two LoRA setups: the full
   preset's (towers vision + text: the text tower recomputes the 47 class weights on every step) and vision only.
   The batch sits on the GPU already (data loading is not timed), except in the one row marked "batch on CPU".
2. Stable Diffusion 2.1-base architecture with random weights (fsynth.generators.sd_random.build_random_sd, DDIM),
   fp16, wrapped in fsynth's SDGenerator (the `sd` backend's generate path): batch 8, guidance 2.0, 512 px. Calls at
   a few step counts give the per-step time and the fixed cost per call (text encoder, VAE decode, PIL); 50-step
   calls are timed directly as well.

Timing: CUDA-synchronised, warm-up excluded, medians over windows. Everything measured is written as it comes
(`$OUT/bench_gpu.md` and `.json`, or --out), so a failure or timeout in one part keeps the others.
--tiny: tiny-clip (32 px) and the tiny SD (32 px), 1-2 steps per window: the same code path, for a CPU check.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BATCH = 128
DATASET = "dtd"
LOSS_VARIANTS = [  # (key, label, config overrides, plain CE patch)
    ("ce_plain", "plain CE (no regulariser code)",
     ["loss.lambda_discrepancy=0", "loss.lambda_robustness=0"], True),
    ("ce_lambda0", "CE only: fsynth.loss, λ1 = λ2 = 0 (protoaug)",
     ["loss.preset=protoaug", "loss.lambda_discrepancy=0", "loss.lambda_robustness=0"], False),
    ("reg_protoaug", "regularised, protoaug, λ1 0.1 λ2 1.0",
     ["loss.preset=protoaug", "loss.lambda_discrepancy=0.1", "loss.lambda_robustness=1.0"], False),
    ("reg_paper", "regularised, paper, λ1 0.1 λ2 1.0",
     ["loss.preset=paper", "loss.lambda_discrepancy=0.1", "loss.lambda_robustness=1.0"], False),
]
SETUPS = [  # (key, label, config overrides)
    ("vision_text", "vision + text (full preset)", []),
    ("vision", "vision only", ["model.lora.towers=[vision]"]),
]
SD_BATCH = 8
SD_GUIDANCE = 2.0


class Interrupted(BaseException):
    """SIGTERM (e.g. `timeout`): stop measuring, write what there is."""


def _on_term(signum, frame):
    raise Interrupted(f"signal {signum}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs):
    return statistics.median(xs) if xs else None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except Exception:  # noqa: BLE001
        return None


def _module_file(name: str) -> str | None:
    mod = sys.modules.get(name)
    return getattr(mod, "__file__", None) if mod else None


def environment(args) -> dict:
    cuda = torch.cuda.is_available()
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "cpu_threads": torch.get_num_threads(), "tiny": args.tiny, "budget_s": args.budget,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"),
        "versions": {d: _version(d) for d in ("transformers", "diffusers", "open_clip_torch", "peft", "timm",
                                               "torchvision", "huggingface_hub", "safetensors", "numpy",
                                               "accelerate", "ftfy", "requests")},
        "git": _git(),
    }
    return env


def _git() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return head.stdout.strip() + (" (uncommitted changes)" if dirty else "")
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------------------- CLIP


def plain_ce_loss(cfg, data, logits, targets, synthetic, regions, lambdas=None):
    """fsynth.loop.compute_loss's signature, cross-entropy only: ce_real_weight * CE(real) + ce_synth_weight *
    CE(synthetic), with no regulariser computed at all (the floor the regularised loss is compared against)."""
    from fsynth.loss import LossOutput

    ce = F.cross_entropy(logits, targets, reduction="none")
    s = synthetic.to(ce.dtype)
    ce_real = (ce * (1 - s)).sum() / (1 - s).sum().clamp_min(1)
    ce_synth = (ce * s).sum() / s.sum().clamp_min(1)
    total = cfg.loss.ce_real_weight * ce_real + cfg.loss.ce_synth_weight * ce_synth
    zero = total.new_zeros(())
    return LossOutput(total, {"ce_real": ce_real, "ce_synth": ce_synth, "discrepancy": zero, "robustness": zero})


@contextmanager
def patched_loss(plain: bool):
    import fsynth.loop as loop

    original = loop.compute_loss
    if plain:
        loop.compute_loss = plain_ce_loss
    try:
        yield
    finally:
        loop.compute_loss = original


def clip_section(args, res: dict, device: torch.device, deadline: float, save) -> None:
    from fsynth.config import build_config
    from fsynth.data.registry import get_spec
    from fsynth.loop import LoopHooks, _train_epoch, amp_dtype
    from fsynth.models import build_classifier
    from fsynth.partition import num_regions

    sec = res["clip"]
    spec = get_spec(DATASET)
    classnames, templates = tuple(spec.classnames()), tuple(spec.templates)
    base = ["model.pretrained="] + (["model.arch=tiny-clip"] if args.tiny else [])
    cfg0 = build_config("full", overrides=base)
    num_classes = len(classnames)
    k = num_regions("static", cfg0.partition.cluster_multiple, num_classes)
    # compute_loss reads num_classes and synthetic_per_class (protoaug's g = 500 x 47 in the full preset).
    data = SimpleNamespace(num_classes=num_classes, synthetic_per_class=cfg0.generator.images_per_class)
    warm_steps, windows, steps = (1, 2, 2) if args.tiny else (args.warmup_steps, args.windows, args.window_steps)
    sec.update(arch=cfg0.model.arch, pretrained="random (model.pretrained='')", head=cfg0.model.head,
               lora=dict(rank=cfg0.model.lora.rank, alpha=cfg0.model.lora.alpha, dropout=cfg0.model.lora.dropout,
                         targets=list(cfg0.model.lora.targets)),
               batch=BATCH, real=BATCH // 2, synthetic=BATCH - BATCH // 2, classes=num_classes, regions=k,
               mix_prob=cfg0.training.mix_prob, ce_real_weight=cfg0.loss.ce_real_weight,
               synthetic_per_class=data.synthetic_per_class, warmup_steps=warm_steps, window_steps=steps,
               windows_planned=windows, setups=[])
    hooks = LoopHooks()
    for s_i, (skey, slabel, soverrides) in enumerate(SETUPS):
        if time.monotonic() > deadline:
            sec.setdefault("skipped", []).append(f"{skey}: no time left")
            continue
        setup = {"key": skey, "label": slabel, "variants": {}}
        sec["setups"].append(setup)
        t0 = time.perf_counter()
        cfg_s = build_config("full", overrides=base + soverrides)
        model = build_classifier(cfg_s.model, classnames, templates).to(device)
        sync(device)
        setup.update(build_s=round(time.perf_counter() - t0, 2), towers=list(cfg_s.model.lora.towers),
                     image_size=model.image_size,
                     trainable_params=sum(p.numel() for p in model.trainable_parameters()),
                     total_params=sum(p.numel() for p in model.parameters()))
        dtype = amp_dtype(cfg_s, device)
        setup["autocast"] = str(dtype) if dtype else "none (CPU: fsynth.loop uses full precision)"
        log(f"clip {skey}: built {cfg_s.model.arch} in {setup['build_s']} s, {setup['trainable_params']:,} LoRA "
            f"parameters of {setup['total_params']:,}, image {model.image_size} px, autocast {dtype}")
        gen = torch.Generator().manual_seed(0)
        size = model.image_size
        cpu_batch = {
            "image": torch.randn(BATCH, 3, size, size, generator=gen),
            "label": torch.randint(0, num_classes, (BATCH,), generator=gen),
            "synthetic": torch.arange(BATCH) >= BATCH // 2,
            "region": torch.randint(0, k, (BATCH,), generator=gen),
            "position": torch.arange(BATCH),
        }
        gpu_batch = {key: v.to(device) for key, v in cpu_batch.items()}
        variants = []
        extra = [("reg_protoaug_cpu_batch", "regularised, protoaug, batch on CPU (+ host-to-device copy)",
                  LOSS_VARIANTS[2][2], False)] if s_i == 0 and not args.tiny else []
        for vkey, vlabel, voverrides, plain in LOSS_VARIANTS + extra:
            cfg_v = build_config("full", overrides=base + soverrides + voverrides)
            t = cfg_v.training
            opt = torch.optim.AdamW(model.trainable_parameters(), lr=t.lr, weight_decay=t.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100_000, eta_min=t.min_lr)
            scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
            v = SimpleNamespace(key=vkey, label=vlabel, cfg=cfg_v, opt=opt, sched=sched, scaler=scaler, plain=plain,
                                batch=cpu_batch if vkey.endswith("cpu_batch") else gpu_batch)
            variants.append(v)
            setup["variants"][vkey] = {"label": vlabel, "preset": cfg_v.loss.preset,
                                       "lambda_discrepancy": cfg_v.loss.lambda_discrepancy,
                                       "lambda_robustness": cfg_v.loss.lambda_robustness, "window_s": [],
                                       "steps_per_window": steps}

        def run_window(v, n: int, seed: int, model=model, dtype=dtype) -> tuple[float, dict]:
            g = torch.Generator().manual_seed(seed)  # same mixing draws for every variant in a round
            sync(device)
            start = time.perf_counter()
            with patched_loss(v.plain):
                metrics = _train_epoch(v.cfg, data, model, [v.batch] * n, v.opt, v.sched, v.scaler, dtype, None,
                                       device, g, hooks)
            sync(device)
            return time.perf_counter() - start, metrics

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for v in variants:  # warm-up (cuBLAS/cuDNN handles, AdamW state, allocator), not timed
            wt, metrics = run_window(v, warm_steps, 0)
            setup["variants"][v.key]["warmup_s"] = round(wt, 3)
            setup["variants"][v.key]["last_metrics"] = {k2: round(float(x), 5) for k2, x in metrics.items()}
        save()
        round_s = None
        for w in range(windows):
            if w >= 2 and round_s is not None and time.monotonic() + round_s > deadline:
                setup["stopped_early"] = f"after {w} windows (time budget)"
                break
            r0 = time.perf_counter()
            order = variants[w % len(variants):] + variants[:w % len(variants)]  # rotate: no fixed position
            for v in order:
                wt, metrics = run_window(v, steps, 1000 + w)
                rec = setup["variants"][v.key]
                rec["window_s"].append(round(wt, 5))
                rec["last_metrics"] = {k2: round(float(x), 5) for k2, x in metrics.items()}
            round_s = time.perf_counter() - r0
            line = ", ".join(f"{v.key} {BATCH * steps / setup['variants'][v.key]['window_s'][-1]:.1f}"
                             for v in variants)
            log(f"clip {skey} window {w + 1}/{windows} ({round_s:.1f} s): images/s {line}")
            save()
        if device.type == "cuda":
            setup["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        del model, variants, gpu_batch, run_window
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()


def clip_summary(sec: dict) -> list[dict]:
    """Rows: per setup and variant, median step time, images/s, and paired ratios against the CE variants."""
    rows = []
    for setup in sec.get("setups", []):
        vs = setup["variants"]
        for key, rec in vs.items():
            ts = rec["window_s"]
            if not ts:
                continue
            n = rec["steps_per_window"]
            step = median(ts) / n
            row = {"setup": setup["label"], "towers": "+".join(setup.get("towers", [])), "variant": key,
                   "label": rec["label"], "windows": len(ts), "steps": n, "step_ms": step * 1000,
                   "images_per_s": sec["batch"] / step, "min_images_per_s": sec["batch"] * n / max(ts),
                   "max_images_per_s": sec["batch"] * n / min(ts)}
            for ref in ("ce_lambda0", "ce_plain"):
                rt = vs.get(ref, {}).get("window_s", [])
                m = min(len(rt), len(ts))
                # paired by window (same round): throughput(variant) / throughput(ref) = t_ref / t_variant
                row[f"vs_{ref}"] = median([rt[i] / ts[i] for i in range(m)]) if m else None
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------- SD


def import_diffusers(shims: list[str]):
    """Import the diffusers parts fsynth's sd backend uses. A name that diffusers imports from an older
    huggingface_hub which lacks it (this run never touches the hub: offline, random weights in memory) gets a
    stand-in, recorded in `shims`; anything else is raised."""
    import importlib

    for _ in range(30):
        try:
            diffusers = importlib.import_module("diffusers")
            for name in ("AutoencoderKL", "DDIMScheduler", "PNDMScheduler", "StableDiffusionPipeline",
                         "UNet2DConditionModel"):
                getattr(diffusers, name)  # diffusers' lazy module imports each on first access
            importlib.import_module("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
            return diffusers
        except Exception as exc:  # noqa: BLE001
            text, cur, depth = "", exc, 0
            while cur is not None and depth < 10:
                text, cur, depth = text + f" {cur}", cur.__cause__ or cur.__context__, depth + 1
            m = re.search(r"cannot import name '(\w+)' from '(huggingface_hub[\w.]*)'", text)
            if not m:
                raise
            name, modname = m.groups()
            mod = importlib.import_module(modname)
            if name[:1].isupper():
                stand_in = type(name, (Exception,), {"__doc__": "bench_gpu.py stand-in (older huggingface_hub)"})
            else:
                def stand_in(*a, _name=name, **k):
                    if len(a) == 1 and callable(a[0]) and not k:
                        return a[0]  # used as a decorator: leave the function as it is
                    raise RuntimeError(f"{_name} is a bench_gpu.py stand-in (older huggingface_hub)")
            setattr(mod, name, stand_in)
            shims.append(f"{modname}.{name}")
            for key in [k for k in sys.modules if k == "diffusers" or k.startswith("diffusers.")]:
                del sys.modules[key]
    raise RuntimeError("too many missing huggingface_hub names for diffusers")


def sd_section(args, res: dict, device: torch.device, deadline: float, save) -> None:
    import pandas as pd

    sec = res["sd"]
    shims: list[str] = []
    sec["hub_shims"] = shims
    diffusers = import_diffusers(shims)
    sec["diffusers_file"] = diffusers.__file__
    from fsynth.data.registry import get_spec
    from fsynth.generators.sd import SDGenerator, resolve_dtype
    from fsynth.generators.sd_random import build_random_sd
    from fsynth.prompts import generation_prompt

    size = "tiny" if args.tiny else "sd21"
    resolution = 32 if args.tiny else 512
    full_steps = 2 if args.tiny else 50
    fit_steps = (1, 2) if args.tiny else (5, 10)
    repeats = 1 if args.tiny else args.sd_repeats
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = build_random_sd(size, seed=0)  # fp32 on CPU, DDIM
        dtype = resolve_dtype("float16", device)  # float32 on CPU, as the sd backend does
    build_s = time.perf_counter() - t0
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    sync(device)
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "vae", "text_encoder")}
    sec.update(size=size, resolution=resolution, batch=SD_BATCH, guidance_scale=SD_GUIDANCE, dtype=str(dtype),
               scheduler=type(pipe.scheduler).__name__, build_cpu_s=round(build_s, 1),
               to_device_s=round(time.perf_counter() - t0 - build_s, 1), params=params, calls=[])
    log(f"sd {size}: built in {build_s:.1f} s (CPU, fp32), moved to {device} as {dtype}; params {params}")
    classnames = get_spec(DATASET).classnames()
    rows = pd.DataFrame({"label": [i % len(classnames) for i in range(SD_BATCH)],
                         "class_name": [classnames[i % len(classnames)] for i in range(SD_BATCH)],
                         "prompt": [generation_prompt(classnames[i % len(classnames)], "texture")
                                    for i in range(SD_BATCH)],
                         "seed": list(range(SD_BATCH))})
    gens = {}

    def call(steps: int, tag: str) -> float:
        if steps not in gens:
            gens[steps] = SDGenerator(pipe, f"random-{size}", guidance_scale=SD_GUIDANCE, steps=steps,
                                      resolution=resolution)
        sync(device)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: NaN pixels in the PIL conversion
            images = gens[steps].generate(rows)
        sync(device)
        dt = time.perf_counter() - start
        assert len(images) == SD_BATCH and images[0].size == (resolution, resolution)
        sec["calls"].append({"steps": steps, "s": round(dt, 4), "tag": tag})
        log(f"sd {tag}: {steps} steps, batch {SD_BATCH}: {dt:.2f} s")
        save()
        return dt

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    call(2, "warm-up")
    for _ in range(repeats):
        for s in fit_steps:
            call(s, "fit")
    fit = sd_fit(sec)
    for _ in range(repeats):
        est = fit["fixed_s"] + full_steps * fit["per_step_s"] if fit else 0.0
        if time.monotonic() + est * 1.2 > deadline:
            sec["stopped_early"] = "50-step calls cut by the time budget"
            break
        call(full_steps, "full")
    if device.type == "cuda":
        sec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    sec["full_steps"] = full_steps
    save()


def sd_fit(sec: dict) -> dict | None:
    """Least squares t = fixed + steps * per_step over the medians per step count (warm-up excluded)."""
    by: dict[int, list[float]] = {}
    for c in sec.get("calls", []):
        if c["tag"] != "warm-up":
            by.setdefault(c["steps"], []).append(c["s"])
    pts = [(s, median(ts)) for s, ts in sorted(by.items())]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return {"per_step_s": slope, "fixed_s": my - slope * mx, "points": pts}


# ------------------------------------------------------------------------------------------------------ output


def fmt(x, spec=".1f", none="–"):
    return none if x is None else format(x, spec)


def markdown(res: dict) -> str:
    env = res["env"]
    v = env.get("versions", {})
    lines = ["# fsynth GPU benchmark: real-size architectures, random weights" + (" (--tiny)" if env["tiny"] else ""),
             "",
             f"Date {env['date_utc']}; GPU {env['gpu'] or 'none (CPU)'}"
             + (f" ({env['gpu_memory_gib']} GiB)" if env.get("gpu_memory_gib") else "")
             + f"; torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}); Python {env['python']}; "
             f"transformers {v.get('transformers')}, diffusers {v.get('diffusers')}, open_clip "
             f"{v.get('open_clip_torch')}, peft {v.get('peft')}, timm {v.get('timm')}, torchvision "
             f"{v.get('torchvision')}, huggingface_hub {v.get('huggingface_hub')}; repo {env.get('git') or '?'}; "
             f"command `{res['command']}`; wall {fmt(res.get('wall_s'), '.0f')} s.", ""]
    clip = res.get("clip", {})
    lines += ["## CLIP LoRA training step", ""]
    if clip.get("batch"):
        lines += [f"{clip['arch']}, {clip['pretrained']}, {clip['head']} head over {clip['classes']} classes "
                  f"(DTD), LoRA rank {clip['lora']['rank']} on {'+'.join(clip['lora']['targets'])}; batch "
                  f"{clip['batch']} = {clip['real']} real + {clip['synthetic']} synthetic, K = {clip['regions']} "
                  f"random regions, ce_real_weight {clip['ce_real_weight']}, mix_prob {clip['mix_prob']}, "
                  f"protoaug g = {clip['synthetic_per_class']} x {clip['classes']}. Each window = "
                  f"{clip['window_steps']} steps of fsynth.loop._train_epoch (a warm-up window of "
                  f"{clip['warmup_steps']} step(s) per variant excluded); median over windows; variants interleaved "
                  "in rotating order on one model. "
                  "Ratios: throughput of the row / throughput of the reference, paired by window (< 1 = slower).",
                  ""]
        for s in clip.get("setups", []):
            lines.append(f"- LoRA {s['label']}: {s.get('trainable_params', 0):,} trainable of "
                         f"{s.get('total_params', 0):,} parameters, {s.get('image_size')} px, autocast "
                         f"{s.get('autocast')}, built in {s.get('build_s')} s, peak GPU memory "
                         f"{s.get('peak_memory_gib', '–')} GiB" + (f"; {s['stopped_early']}" if s.get("stopped_early")
                                                                   else ""))
        lines += ["", "| LoRA towers | loss | ms / step | images/s | images/s min–max | windows × steps "
                  "| vs CE λ=0 | vs plain CE |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        rows = clip_summary(clip)
        for r in rows:
            lines.append(f"| {r['towers']} | {r['label']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
                         f"{r['min_images_per_s']:.1f}–{r['max_images_per_s']:.1f} | {r['windows']} × {r['steps']} | "
                         f"{fmt(r['vs_ce_lambda0'], '.3f')} | {fmt(r['vs_ce_plain'], '.3f')} |")
        summary = [f"- LoRA {r['towers']}, {r['variant'].removeprefix('reg_')}: regularised / CE-only (λ = 0) "
                   f"throughput {r['vs_ce_lambda0']:.3f} (step time {100 * (1 / r['vs_ce_lambda0'] - 1):+.1f} %); "
                   f"/ plain CE {fmt(r['vs_ce_plain'], '.3f')}"
                   for r in rows if r["variant"] in ("reg_protoaug", "reg_paper") and r["vs_ce_lambda0"]]
        lines += ["", *summary] if summary else []
    if clip.get("error"):
        lines += ["", f"**CLIP part failed:** `{clip['error']}`"]
    sd = res.get("sd", {})
    lines += ["", "## Stable Diffusion generation", ""]
    if sd.get("calls"):
        fit = sd_fit(sd)
        full = [c["s"] for c in sd["calls"] if c["tag"] == "full"]
        fs = sd.get("full_steps", 50)
        lines += [f"{sd['size']} architecture (UNet {sd['params']['unet']:,}, VAE {sd['params']['vae']:,}, text "
                  f"encoder {sd['params']['text_encoder']:,} parameters), random weights, built in memory by "
                  f"fsynth.generators.sd_random ({sd['build_cpu_s']} s on CPU, {sd['to_device_s']} s to the GPU), "
                  f"{sd['dtype']}, {sd['scheduler']}, through fsynth's SDGenerator.generate: batch {sd['batch']}, "
                  f"guidance {sd['guidance_scale']} (UNet batch {2 * sd['batch']}), {sd['resolution']} px. Peak GPU "
                  f"memory {sd.get('peak_memory_gib', '–')} GiB."
                  + (f" huggingface_hub stand-ins: {', '.join(sd['hub_shims'])}." if sd.get("hub_shims") else ""),
                  "", "| quantity | value |", "|---|---:|"]
        if fit:
            pts = ", ".join(f"{s}: {t:.3f} s" for s, t in fit["points"])
            lines += [f"| per denoising step, batch {sd['batch']} (fit over step counts {pts}) | "
                      f"{fit['per_step_s'] * 1000:.1f} ms |",
                      f"| fixed cost per call (text encoder, latents, VAE decode, PIL) | {fit['fixed_s']:.3f} s |",
                      f"| extrapolated {fs}-step call | {fit['fixed_s'] + fs * fit['per_step_s']:.2f} s |",
                      f"| **extrapolated {fs}-step images/s** | "
                      f"**{sd['batch'] / (fit['fixed_s'] + fs * fit['per_step_s']):.3f}** |"]
        if full:
            lines += [f"| measured {fs}-step call (median of {len(full)}: {', '.join(f'{t:.2f}' for t in full)} s) | "
                      f"{median(full):.2f} s |",
                      f"| **measured {fs}-step images/s** | **{sd['batch'] / median(full):.3f}** |"]
        if sd.get("stopped_early"):
            lines.append(f"| note | {sd['stopped_early']} |")
    if sd.get("error"):
        lines += ["", f"**SD part failed:** `{sd['error']}`"]
    if res.get("interrupted"):
        lines += ["", f"**Interrupted:** {res['interrupted']} (the numbers above are what was measured before)"]
    lines += ["", f"Modules loaded from: {json.dumps(res.get('module_files', {}))}; imported at the end: "
              f"{', '.join(res.get('heavy_imported', [])) or 'none'} of ray, mlflow, faiss."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny architectures, 1-2 steps: a CPU check of the code path")
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run (parts adapt to it)")
    p.add_argument("--clip-share", type=float, default=0.5, help="share of the budget the CLIP part may use")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--window-steps", type=int, default=10)
    p.add_argument("--sd-repeats", type=int, default=3)
    p.add_argument("--skip", choices=("clip", "sd"), action="append", default=[])
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for bench_gpu.md/.json (default $OUT)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _on_term)
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "env": environment(args),
           "clip": {}, "sd": {}}
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        res["wall_s"] = round(time.monotonic() - start, 1)
        res["module_files"] = {m: _module_file(m) for m in ("fsynth", "open_clip", "diffusers", "ftfy", "torchvision",
                                                            "requests")}
        res["heavy_imported"] = [m for m in ("ray", "mlflow", "faiss") if m in sys.modules]
        if out:
            (out / "bench_gpu.json").write_text(json.dumps(res, indent=1, default=str))
            (out / "bench_gpu.md").write_text(markdown(res))

    log(f"device {res['env']['gpu'] or 'cpu'}, torch {torch.__version__}, budget {args.budget:.0f} s, out {out}")
    try:
        for name, fn, until in (("clip", clip_section, start + args.budget * args.clip_share),
                                ("sd", sd_section, start + args.budget)):
            if name in args.skip:
                res[name]["error"] = "skipped (--skip)"
                continue
            try:
                fn(args, res, device, until, save)
            except Exception as exc:  # noqa: BLE001 - one part failing must not lose the other
                first = (str(exc).strip().splitlines() or [""])[0]
                res[name]["error"] = f"{type(exc).__name__}: {first}"
                res[name]["traceback"] = traceback.format_exc()
                log(f"{name} part failed:\n{res[name]['traceback']}")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                save()
    except Interrupted as exc:
        res["interrupted"] = str(exc)
        log(f"interrupted ({exc}); writing what was measured")
    finally:
        save()
        print("\n" + markdown(res), flush=True)
    return 0 if not (res["clip"].get("error") or res["sd"].get("error") or res.get("interrupted")) else 1


if __name__ == "__main__":
    sys.exit(main())
