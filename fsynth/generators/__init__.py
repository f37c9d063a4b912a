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

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fsynth.errors import ConfigError, FsynthError

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from fsynth.config import GeneratorConfig

BACKENDS = ("sd", "ddpm")
ROW_COLUMNS = ("label", "class_name", "prompt", "seed")


class ImageGenerator(Protocol):
    """What the generation job needs from a backend (see the module docstring)."""

    fingerprint: str

    def generate(self, rows: pd.DataFrame) -> list[Image.Image]: ...


@dataclass(frozen=True)
class SourceShots:
    """The real shots image-to-image generation starts from: {sample id: PIL image}, the strength in (0, 1], and
    the 16-hex digest of the shot ids (what the backend's fingerprint and the set's address record)."""

    images: Mapping[str, Image.Image]
    strength: float
    digest: str

    def pick(self, source_ids: Sequence[str]) -> list[Image.Image]:
        """The source shot of each row, in row order; a one-line FsynthError for an id that is not a shot."""
        missing = [s for s in source_ids if s not in self.images]
        if missing:
            raise FsynthError(f"source shot '{missing[0]}' is not among the {len(self.images)} real shots; plan the "
                              "prompt table from the same few-shot set the generator was built with")
        return [self.images[s] for s in source_ids]

    def fingerprint(self, base: str) -> str:
        """A backend's fingerprint `base` extended with the image-to-image settings: other shots or strength,
        other images (and other sample ids, which caches downstream key on)."""
        blob = json.dumps([base, "sdedit", float(self.strength), self.digest]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def denoising_steps(steps: int, strength: float) -> int:
    """How many of `steps` DDIM/pipeline steps an image-to-image sample runs: int(steps * strength), as
    diffusers' img2img; a one-line ConfigError when that leaves none."""
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ConfigError(f"generator.strength={strength:g} with generator.steps={steps} leaves no denoising step "
                          f"(int(steps x strength) = 0); raise generator.strength to at least {1 / steps:.3g} or "
                          "generator.steps")
    return kept


def check_source(g: GeneratorConfig) -> None:
    """Refuse, before any data, Ray or training work, a generator model that cannot load on this machine, or an
    image-to-image strength that leaves no denoising step."""
    if g.init_from == "shots":
        denoising_steps(g.steps, g.strength)
    if g.backend == "sd":  # the ddpm backend trains its own model on the shots: nothing to find
        from fsynth.generators.sd import check_model

        check_model(g.model)
