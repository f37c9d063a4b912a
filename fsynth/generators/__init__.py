"""Generator backends behind one interface: rows of the prompt table (label, class, prompt, seed) -> images.

A backend is any object with
- `fingerprint: str` — a hash of everything that determines its images given a row (weights, LoRA, sampler,
  steps, guidance, resolution, dtype, ...): it names the output folder and goes into the manifest;
- `generate(rows) -> list[PIL.Image.Image]` — one RGB image per row of `rows` (a pandas DataFrame with at least
  the columns `label`, `class_name`, `prompt`, `seed`), in row order. The image of a row depends only on that
  row and the backend, never on which other rows share the call: each row's noise comes from its own
  `torch.Generator` seeded with its `seed`.

Image-to-image (SDEdit; generator.init_from=shots): a backend built with `SourceShots` also reads each row's
`source_id` (the real shot it starts from), noises that shot to `strength` of its schedule and denoises it with
the row's class condition. Both backends keep the last int(steps * strength) steps of their step subsequence (what
diffusers' img2img pipelines do), so a step costs the same as in text-to-image and a set's cost is proportional
to its strength; strength 1 is the text-to-image path itself, pixel for pixel.

Backends: `sd` (fsynth.generators.sd, a diffusers Stable Diffusion pipeline, optionally with DataDream LoRA
weights from fsynth.generators.sd_finetune) and `ddpm` (fsynth.generators.ddpm, a small class-conditional model
trained on the real shots). Backend modules import diffusers lazily: it is slow to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsynth.generators.base import ROW_COLUMNS, ImageGenerator, SourceShots, denoising_steps

if TYPE_CHECKING:
    from fsynth.config import GeneratorConfig

__all__ = ["BACKENDS", "ROW_COLUMNS", "ImageGenerator", "SourceShots", "check_source", "denoising_steps"]
BACKENDS = ("sd", "ddpm")


def check_source(g: GeneratorConfig) -> None:
    """Refuse, before any data, Ray or training work, a generator model that cannot load on this machine, or an
    image-to-image strength that leaves no denoising step."""
    if g.init_from == "shots":
        denoising_steps(g.steps, g.strength)
    if g.backend == "sd":  # the ddpm backend trains its own model on the shots: nothing to find
        from fsynth.generators.sd import check_model

        check_model(g.model)
