"""Images per second of the Ray Data generation job against a direct loop over the same generator.

    python benchmarks/bench_generate.py [--backend ddpm|sd] [--sd-size tiny|sd21] [--images 160,320] [--write]

The generator has random weights at a real size (the embedded `ddpm` UNet, 1.1 M parameters, 32 px, 25 DDIM
steps; or Stable Diffusion: `tiny` on a CPU, `sd21` = the SD 2.1-base architecture at 512 px, 50 steps, on a
GPU): sampling costs the same as with trained weights. Three modes run the same groups of the same prompt table
in one process, each into a fresh folder:
  direct   run_groups_direct in this process (torch threads = --cpus-per-actor, as one actor gets),
  ray x1   the Ray Data job, actor pool of 1,
  ray x2   the Ray Data job, actor pool of 2.
Each mode runs at two sizes; the steady rate is (N2 - N1) / (t2 - t1), the fixed cost (Ray start of the actor
pool, model load) is the intercept. Every mode's images are checked to be bit-identical to the direct loop's.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsynth.config import build_config
from fsynth.data.registry import get_spec
from fsynth.generation import build_generator
from fsynth.synthetic import missing_groups, plan_rows, prepare_synthetic_set, run_groups_direct

MODES = ("direct", "ray x1", "ray x2")


def actor_cpus(args) -> list[str]:
    return [f"resources.cpus_per_generator_actor={args.cpus_per_actor}"]


def random_artefact(args, tmp: Path) -> tuple[object, Path | None]:
    """(config, artefact) of a random-weight generator of the chosen backend and size."""
    if args.backend == "ddpm":
        from fsynth.generators.ddpm import SCHEDULE, DDPMGenerator, build_unet, save_generator

        torch.manual_seed(0)
        gen = DDPMGenerator(build_unet(10, 32, 1), dict(SCHEDULE), 32, 1, 10, training={"random": True})
        artefact = save_generator(gen, tmp / "ddpm-random")
        cfg = build_config("embedded", overrides=[f"generator.batch_size={args.group}", *actor_cpus(args)])
        return cfg, artefact
    from fsynth.generators.sd_random import write_random_sd

    model = write_random_sd(tmp / f"sd-{args.sd_size}", args.sd_size)
    cuda = torch.cuda.is_available()
    size = ["generator.resolution=32", "generator.steps=10"] if args.sd_size == "tiny" else [
        "generator.resolution=512", "generator.steps=50"]
    cfg = build_config("lightweight", overrides=[
        "generator.backend=sd", f"generator.model={model}", f"generator.batch_size={args.group}",
        f"generator.dtype={'float16' if cuda else 'float32'}", "generator.finetune.enabled=false", *size,
        f"resources.gpus_per_generator_actor={1 if cuda else 0}", *actor_cpus(args)])
    return cfg, None


def timed_direct(cfg, artefact, table, out: Path, threads: int) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        start = time.perf_counter()
        generator = build_generator(cfg.generator, artefact, device)  # model load counts, as in an actor
        run_groups_direct(generator, table, out, missing_groups(table, out))
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


def timed_ray(cfg, artefact, table, out: Path, actors: int) -> float:
    from fsynth.jobs.generation import run_groups_on_ray

    groups = missing_groups(table, out)
    start = time.perf_counter()
    run_groups_on_ray(cfg, artefact, out, groups, len(table), actors, log=lambda line: None)
    return time.perf_counter() - start


def pixels(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): np.asarray(Image.open(p)).tobytes() for p in sorted(out.rglob("*.png"))}


def run_mode(mode: str, cfg, artefact, table, out: Path, threads: int) -> float:
    if mode == "direct":
        return timed_direct(cfg, artefact, table, out, threads)
    return timed_ray(cfg, artefact, table, out, int(mode[-1]))


def measure(args, cfg, artefact, tmp: Path) -> dict:
    """{(mode, N): seconds}, modes interleaved per size so that machine load hits them alike."""
    names = list(get_spec("fashion-mnist").classnames())
    times, reference = {}, {}
    for n in args.images:
        table = plan_rows("bench", names, "", n // len(names), 0, "bench", args.group)
        for mode in MODES:
            out = prepare_synthetic_set(tmp / f"{mode.replace(' ', '')}-{n}", {"dataset": "bench", "backend": "b"},
                                        table)
            times[mode, n] = run_mode(mode, cfg, artefact, table, out, args.cpus_per_actor)
            got = pixels(out)
            reference.setdefault(n, got)
            assert got == reference[n], f"{mode} made other images than direct at N={n}"
            print(f"{mode:7s} N={n:5d}: {times[mode, n]:7.1f} s", flush=True)
            shutil.rmtree(out)
    return times


def table_lines(args, times: dict) -> list[str]:
    n1, n2 = args.images
    steady = {m: (n2 - n1) / max(1e-9, times[m, n2] - times[m, n1]) for m in MODES}
    lines = ["| mode | " + " | ".join(f"N={n} s" for n in args.images) + " | overall img/s (N=" + str(n2) + ") | "
             "steady img/s | fixed s | steady / direct | steady / ray x1 | images identical to direct |",
             "|---|" + "---:|" * (len(args.images) + 5) + "---|"]
    for m in MODES:
        fixed = times[m, n2] - n2 / steady[m]
        lines.append(f"| {m} | " + " | ".join(f"{times[m, n]:.1f}" for n in args.images) +
                     f" | {n2 / times[m, n2]:.2f} | {steady[m]:.2f} | {fixed:.1f} | "
                     f"{steady[m] / steady['direct']:.2f} | {steady[m] / steady['ray x1']:.2f} | yes |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("ddpm", "sd"), default="ddpm")
    p.add_argument("--sd-size", choices=("tiny", "sd21"), default="tiny")
    p.add_argument("--images", default="160,320", help="two sizes N1,N2 (multiples of 10)")
    p.add_argument("--group", type=int, default=16, help="images per generator call (generator.batch_size)")
    p.add_argument("--cpus-per-actor", type=int, default=1)
    p.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    args = p.parse_args()
    args.images = [int(v) for v in args.images.split(",")]
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        cfg, artefact = random_artefact(args, Path(tmp))
        ray.init(num_cpus=2 * args.cpus_per_actor, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        times = measure(args, cfg, artefact, Path(tmp))
        wall = time.perf_counter() - start
        ray.shutdown()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or 'cpu'}"
    what = "ddpm (embedded UNet, 32 px, 25 DDIM steps)" if args.backend == "ddpm" else f"sd {args.sd_size}"
    head = [f"Date {time.strftime('%Y-%m-%d')}; {device}, {torch.get_num_threads()} torch threads available; "
            f"torch {torch.__version__}; generator {what}, random weights; group {args.group}; "
            f"{args.cpus_per_actor} CPU per actor; whole run {wall / 60:.1f} min.", ""]
    lines = head + table_lines(args, times)
    print("\n".join(lines))
    if args.write:
        with open(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md", "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
