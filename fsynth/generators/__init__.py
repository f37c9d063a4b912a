"""Generator backends behind one interface: rows of the prompt table (label, class, prompt, seed) -> images.

A backend is any object with
- `fingerprint: str` — a hash of everything that determines its images given a row (weights, LoRA, sampler,
  steps, guidance, resolution, dtype, ...): it names the output folder and goes into the manifest;
- `generate(rows) -> list[PIL.Image.Image]` — one RGB image per row of `rows` (a pandas DataFrame with at least
  the columns `label`, `class_name`, `prompt`, `seed`), in row order. The image of a row depends only on that
  row and the backend, never on which other rows share the call: each row's noise comes from its own
  `torch.Generator` seeded with its `seed`.

Backends: `sd` (fsynth.generators.sd, a diffusers Stable Diffusion pipeline, optionally with DataDream LoRA
weights from fsynth.generators.sd_finetune) and `ddpm` (fsynth.generators.ddpm, a small class-conditional model
trained on the real shots). Backend modules import diffusers lazily: it is slow to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

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


def check_source(g: GeneratorConfig) -> None:
    """Refuse, before any data, Ray or training work, a generator model that cannot load on this machine."""
    if g.backend == "sd":  # the ddpm backend trains its own model on the shots: nothing to find
        from fsynth.generators.sd import check_model

        check_model(g.model)
