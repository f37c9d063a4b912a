"""Image-to-image (SDEdit) for the `sd` backend: diffusers' `StableDiffusionImg2ImgPipeline` over the components of
the loaded text-to-image pipeline.

Shapes: each row's source shot is centre-cropped and resized to R x R RGB, encoded by the VAE to latents
[1, 4, R/8, R/8] (sampled from the VAE posterior with the row's own CPU generator), noised with that generator
to the first of the last int(steps x strength) scheduler timesteps, and denoised over those steps with the row's
prompt [77, D] (classifier-free guidance with the negative prompt); N rows -> N RGB PIL images R x R.

The two pipelines share every module (UNet, text encoder with the DataDream LoRA adapters, VAE, scheduler), so
the adapters, the scheduler choice, guidance and negative prompt are those of text-to-image. Strength 1 is
the text-to-image call itself (diffusers' img2img at strength 1 would still start from the shot's latent scaled
by sqrt(alpha_bar) of its first timestep, ~0.07 for SD's schedule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

from fsynth.generators.base import SourceShots, denoising_steps
from fsynth.generators.sd import SDGenerator

if TYPE_CHECKING:
    import pandas as pd
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline


def img2img_pipeline(pipe: StableDiffusionPipeline) -> StableDiffusionImg2ImgPipeline:
    """An img2img pipeline holding `pipe`'s own modules (no copy, no dtype or device change).

    Built from `pipe.components` rather than `from_pipe`: diffusers 0.42's `from_pipe` ends with
    `.to(dtype=float32)` unless told the dtype, which would cast a half-precision pipeline's shared modules.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    components = {**pipe.components, "requires_safety_checker": False}
    out = StableDiffusionImg2ImgPipeline(**components)
    out.set_progress_bar_config(disable=True)
    return out


def source_images(shots: list[Image.Image], resolution: int) -> list[Image.Image]:
    """The shots as R x R RGB, centre-cropped to a square first (as DataDream's fine-tuning sees them)."""
    size = (resolution, resolution)
    return [ImageOps.fit(img.convert("RGB"), size, Image.Resampling.BICUBIC) for img in shots]


class SDImg2ImgGenerator(SDGenerator):
    """SDGenerator whose rows start from their `source_id` shot (see the module docstring).

    The fingerprint is the text-to-image one extended with the strength and the shots' digest.
    """

    def __init__(self, pipe: StableDiffusionPipeline, model_digest: str, sources: SourceShots,
                 **settings: Any) -> None:
        self.sources = sources
        super().__init__(pipe, model_digest, **settings)
        denoising_steps(self.steps, sources.strength)  # a strength that leaves no step fails before any image
        self.img2img = img2img_pipeline(pipe)

    def _fingerprint(self) -> str:
        return self.sources.fingerprint(super()._fingerprint())

    def _call(self, adapter: str | None, rows: pd.DataFrame) -> list[Image.Image]:
        """One img2img call for N rows: N source shots -> N RGB images R x R."""
        if self.sources.strength >= 1.0:
            return super()._call(adapter, rows)
        self._use_adapter(adapter)
        shots = source_images(self.sources.pick([str(s) for s in rows["source_id"]]), self.resolution)
        out = self.img2img(image=shots, strength=self.sources.strength, **self._common(rows))
        return self._rgb(out.images)

