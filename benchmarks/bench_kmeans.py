"""K-means at DTD scale: FAISS vs the torch fallback on embedding-like features, then FAISS on pixel features.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_kmeans.py --write

47 classes x 516 points (16 real + 500 synthetic) = 24,252 points, K = 94 (cluster multiple 2), 300 iterations.
Writes the section "## K-means: embeddings vs pixels" of docs/benchmarks.md with --write (other sections stay).
One row re-runs the embedding FAISS case in a child process with the default OpenMP wait policy, because torch
and faiss-cpu each load their own libgomp and their spinning worker threads compete for the cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fsynth.partition as partition  # noqa: E402
from fsynth.partition import kmeans, pixel_features  # noqa: E402

CLASSES, PER_CLASS, DIM, K = 47, 516, 512, 94
HEADING = "## K-means: embeddings vs pixels"
RESULTS = ROOT / "docs" / "benchmarks.md"
_INIT_SECONDS: list[float] = []
_kmeanspp = partition._kmeanspp_indices


def _timed_kmeanspp(*args, **kwargs):
    """kmeans()'s own k-means++ start, timed in place (running it twice would double the pixel cases' cost)."""
    start = time.perf_counter()
    out = _kmeanspp(*args, **kwargs)
    _INIT_SECONDS.append(time.perf_counter() - start)
    return out


partition._kmeanspp_indices = _timed_kmeanspp


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def embedding_like(seed: int = 0) -> np.ndarray:
    """Unit-norm features [CLASSES * PER_CLASS, DIM] float32: two sub-modes per class plus isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(CLASSES, 1, DIM)))
    modes = unit(centres + 0.6 * unit(rng.normal(size=(CLASSES, 2, DIM))))
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    picks = modes[labels, rng.integers(0, 2, len(labels))]
    return unit(picks + rng.normal(scale=0.8 / np.sqrt(DIM), size=picks.shape)).astype(np.float32)


def texture_images(side: int = 96, seed: int = 0) -> list[Image.Image]:
    """CLASSES * PER_CLASS RGB images: a blocky random texture per class, shifted and noised per image."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(CLASSES, 6, 6, 3)).astype(np.int16)
    patterns = blocks.repeat(side // 6, axis=1).repeat(side // 6, axis=2)
    images = []
    for c in range(CLASSES):
        for _ in range(PER_CLASS):
            shifted = np.roll(patterns[c], tuple(rng.integers(0, side, 2)), axis=(0, 1))
            noisy = shifted + rng.integers(-40, 41, size=shifted.shape, dtype=np.int16)
            images.append(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))
    return images


def timed_kmeans(case: str, x: np.ndarray, backend: str, iterations: int) -> dict:
    """Time kmeans() end to end, and its k-means++ start apart so that the per-iteration cost can be separated."""
    start = time.perf_counter()
    result = kmeans(x, K, iterations=iterations, seed=0, backend=backend)
    seconds = time.perf_counter() - start
    init = _INIT_SECONDS.pop()
    row = {
        "case": case,
        "dim": x.shape[1],
        "backend": result.backend,
        "iterations": result.iterations_run,
        "seconds": seconds,
        "init_seconds": init,
        "per_iteration": max(seconds - init, 0.0) / result.iterations_run,
        "inertia": result.inertia,
        "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }
    print(json.dumps(row), flush=True)
    return row


def default_policy_row(iterations: int) -> dict:
    """The embedding FAISS case in a child process whose OpenMP runtimes keep their default (spinning) policy."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    cmd = [sys.executable, __file__, "--child-embedding-faiss", str(iterations)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    mem_kb = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")))
    return f"{os.cpu_count()}-core CPU ({model}), {mem_kb / 2**20:.0f} GiB RAM, {platform.system()}"


def versions() -> str:
    import faiss
    import torch

    return f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, faiss-cpu " \
        f"{faiss.__version__}, torch threads {torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()}"


def table(rows: list[dict], extraction: dict[int, float]) -> list[str]:
    """The markdown table; ratios are per iteration against the embedding FAISS row with the passive policy."""
    n = CLASSES * PER_CLASS
    base = next(r for r in rows if r["case"] == "embedding" and r["backend"] == "faiss" and r is not rows[2])
    lines = [
        "| features | D | backend | OMP wait | iterations run | total s | k-means++ s | s / iteration | "
        "x embedding FAISS (per iteration) | feature matrix | extraction s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        side = int(round((r["dim"] / 3) ** 0.5)) if r["case"] == "pixels" else 0
        cells = [
            f"pixels {side} px" if side else "embedding",
            f"{r['dim']:,}",
            r["backend"],
            r["wait_policy"].lower(),
            str(r["iterations"]),
            f"{r['seconds']:.1f}",
            f"{r['init_seconds']:.1f}",
            f"{r['per_iteration']:.3f}",
            f"{r['per_iteration'] / base['per_iteration']:.1f}",
            f"{n * r['dim'] * 4 / 2**30:.2f} GiB",
            f"{extraction[side]:.1f}" if side else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def reading(rows: list[dict]) -> str:
    """What the table says, computed from it."""
    faiss_row, torch_row, default_row, px32, px64 = rows
    ratio = torch_row["per_iteration"] / faiss_row["per_iteration"]
    gap = abs(torch_row["inertia"] - faiss_row["inertia"]) / faiss_row["inertia"]
    slow = default_row["per_iteration"] / faiss_row["per_iteration"]
    slow_init = default_row["init_seconds"] / faiss_row["init_seconds"]
    x32, x64 = (r["per_iteration"] / faiss_row["per_iteration"] for r in (px32, px64))
    return (
        f"Reading: on embeddings the torch fallback costs {ratio:.2f}x FAISS per iteration and ends at the same "
        f"inertia (relative gap {gap:.0e}; both start from the same centroids). Per-iteration cost grows about "
        f"linearly with D: 32 px (D x{px32['dim'] // DIM}) costs {x32:.1f}x and 64 px (D x{px64['dim'] // DIM}) "
        f"{x64:.1f}x the "
        f"embedding iteration. Without OMP_WAIT_POLICY=PASSIVE the same FAISS run was {slow:.1f}x slower per "
        f"iteration and {slow_init:.1f}x slower in the k-means++ start: torch and faiss-cpu each load their own "
        "libgomp, whose spinning idle threads fight over the 2 cores (worse the busier the machine)."
    )


def section(rows: list[dict], extraction: dict[int, float], run: dict, args: argparse.Namespace) -> str:
    n = CLASSES * PER_CLASS
    policy = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ else ""
    full = n * 224 * 224 * 3 * 4
    per_iter_224 = next(r for r in rows if r["dim"] == 64 * 64 * 3)["per_iteration"] * (224 / 64) ** 2
    lines = [
        HEADING,
        "",
        f"Date {datetime.date.today().isoformat()}; {machine()}; {versions()}.",
        f"Command: `{policy}.venv/bin/python benchmarks/bench_kmeans.py {' '.join(sys.argv[1:])}`. "
        f"Whole run {run['wall'] / 60:.1f} min; load average (1 min) {run['load'][0]:.1f} at the start, "
        f"{run['load'][1]:.1f} at the end (the machine is shared with other jobs, which slows every row).",
        "",
        f"DTD scale: {CLASSES} classes x {PER_CLASS} points = {n:,} points, K = {K}, seed 0. Both backends start "
        "from the same seeded greedy k-means++ centroids: `total s` includes that start, `k-means++ s` times it "
        "alone, and `s / iteration` = (total - k-means++) / iterations (so it carries the final assignment pass). "
        "Embedding-like features: unit-norm, two sub-modes per class. Pixel features: 96 px synthetic textures "
        "resized by `pixel_features` (extraction time listed apart). The `default` row re-runs the embedding FAISS "
        f"case ({args.default_policy_iterations} iterations) in a child process without OMP_WAIT_POLICY.",
        "",
        *table(rows, extraction),
        "",
        f"The design's 224 px pixels would be D = 150,528: the feature matrix alone is {n:,} x 150,528 x 4 B = "
        f"{full / 1e9:.1f} GB ({full / 2**30:.1f} GiB), before FAISS's working memory; scaling the 64 px "
        f"per-iteration cost by D gives about {per_iter_224:.0f} s per iteration here, "
        f"{per_iter_224 * 300 / 3600:.1f} h for 300 iterations.",
        "",
        reading(rows),
    ]
    if args.pixel64_iterations != args.iterations:
        lines.append(
            f"The 64 px case ran {args.pixel64_iterations} iterations, not {args.iterations}, to bound the run "
            "time; compare it by seconds per iteration (every k-means iteration does the same work)."
        )
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Add or replace this benchmark's section of docs/benchmarks.md, leaving every other section as it is."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = old.find(HEADING + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(HEADING))
        new = old[:start] + text + (old[end:] if end >= 0 else "")
    RESULTS.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--pixel64-iterations", type=int, default=30, help="fewer: 64 px costs ~2-3 s per iteration")
    parser.add_argument("--default-policy-iterations", type=int, default=30)
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    parser.add_argument("--child-embedding-faiss", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_embedding_faiss:
        timed_kmeans("embedding", embedding_like(), "faiss", args.child_embedding_faiss)
        return
    load_start, wall_start = os.getloadavg()[0], time.perf_counter()
    emb = embedding_like()
    rows = [timed_kmeans("embedding", emb, b, args.iterations) for b in ("faiss", "torch")]
    rows.append(default_policy_row(args.default_policy_iterations))
    del emb
    images = texture_images()
    extraction: dict[int, float] = {}
    for side, iterations in ((32, args.iterations), (64, args.pixel64_iterations)):
        start = time.perf_counter()
        feats = pixel_features(images, side)
        extraction[side] = time.perf_counter() - start
        rows.append(timed_kmeans("pixels", feats, "faiss", iterations))
        del feats
    run = {"load": (load_start, os.getloadavg()[0]), "wall": time.perf_counter() - wall_start}
    text = section(rows, extraction, run, args)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
