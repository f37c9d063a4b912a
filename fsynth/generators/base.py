"""The backend interface every generator implements: the prompt table's row columns, the `ImageGenerator` protocol,
the real shots image-to-image starts from, and how many denoising steps a strength keeps (see fsynth.generators)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fsynth.cache import content_key
from fsynth.errors import ConfigError, FsynthError

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

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
        # A list of scalars: json.dumps gives the same text with or without sort_keys, so the value is unchanged.
        return content_key([base, "sdedit", float(self.strength), self.digest])


def denoising_steps(steps: int, strength: float) -> int:
    """How many of `steps` DDIM/pipeline steps an image-to-image sample runs: int(steps * strength), as
    diffusers' img2img; a one-line ConfigError when that leaves none."""
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ConfigError(f"generator.strength={strength:g} with generator.steps={steps} leaves no denoising step "
                          f"(int(steps x strength) = 0); raise generator.strength to at least {1 / steps:.3g} or "
                          "generator.steps")
    return kept
