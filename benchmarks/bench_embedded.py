"""The embedded default's two cost knobs, each measured side by side in one process on the CPU.

1. The DDPM UNet's widths: one training step (batch 64, 32 px, 1 channel) and one sampling forward pass, for
   the widths of step 3, (32, 64, 64), and of step 5, (16, 32, 32).
2. The encoder's input size: one LoRA training step (batch 64) and one forward pass of the embedded classifier
   (EfficientNet-Lite0, ImageNet weights, prototype head) at 96 px (step 4) and 64 px (step 5).

Variants alternate within each repeat, so a busy machine slows both alike; read the ratios.

    python benchmarks/bench_embedded.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fsynth.config import build_config, with_values
from fsynth.generators.ddpm import build_unet
from fsynth.models import build_classifier


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ddpm_steps(widths: tuple[int, ...]) -> tuple[Callable, Callable]:
    """(one training step, one forward pass) of a fresh UNet with `widths`, batch 64 at 32 px."""
    unet = build_unet(10, 32, 1, widths)
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    x, t, y = torch.randn(64, 1, 32, 32), torch.randint(0, 1000, (64,)), torch.randint(0, 10, (64,))

    def train() -> None:
        loss = unet(x, t, class_labels=y).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            unet(x, t, class_labels=y)

    return train, forward


def encoder_steps(size: int) -> tuple[Callable, Callable]:
    """(one LoRA training step, one forward pass) of the embedded classifier at `size` px, batch 64."""
    cfg = with_values(build_config("embedded"), {"model.image_size": size})
    protos = [(torch.randn(20, 3, size, size), torch.arange(20) % 10)]
    model = build_classifier(cfg.model, [str(i) for i in range(10)], ["{}"], prototype_batches=protos)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    x, y = torch.randn(64, 3, size, size), torch.randint(0, 10, (64,))

    def train() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    return train, forward


def compare(title: str, variants: dict[str, tuple[Callable, Callable]], repeats: int) -> list[str]:
    """Median seconds per call of each variant's (train, forward), alternating variants; markdown rows."""
    times = {name: ([], []) for name in variants}
    for train, forward in variants.values():  # warm-up: first calls allocate
        train(), forward()
    for _ in range(repeats):
        for name, (train, forward) in variants.items():
            times[name][0].append(_seconds(train))
            times[name][1].append(_seconds(forward))
    first = next(iter(variants))
    base = [statistics.median(v) for v in times[first]]
    rows = [f"| {title} | {name} | {statistics.median(tr):.3f} | {statistics.median(fw):.3f} | "
            f"{base[0] / statistics.median(tr):.2f}x | {base[1] / statistics.median(fw):.2f}x |"
            for name, (tr, fw) in times.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    print("| knob | variant | train step s | forward s | train speed-up | forward speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for row in compare("DDPM widths", {"(32, 64, 64)": ddpm_steps((32, 64, 64)),
                                       "(16, 32, 32)": ddpm_steps((16, 32, 32))}, args.repeats):
        print(row, flush=True)
    for row in compare("encoder input", {"96 px": encoder_steps(96), "64 px": encoder_steps(64)}, args.repeats):
        print(row, flush=True)


if __name__ == "__main__":
    main()
