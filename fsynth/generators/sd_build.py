"""Building the `sd` backend from a config: the pipeline, its DataDream LoRA, text-to-image or image-to-image."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsynth.generators.sd import SDGenerator, find_lora_files, folder_digest, load_sd_pipeline, model_folder
from fsynth.generators.sd_img2img import SDImg2ImgGenerator

if TYPE_CHECKING:
    import torch

    from fsynth.config import GeneratorConfig
    from fsynth.generators.base import SourceShots


def build_sd_generator(gcfg: GeneratorConfig, device: str | torch.device | None = None,
                       lora_path: str | None = None, sources: SourceShots | None = None) -> SDGenerator:
    """Load gcfg.model and wrap it with gcfg's settings.

    `lora_path` (e.g. a fine-tuned LoRA folder) replaces gcfg.lora_path unless it is None; "" means no LoRA.
    `sources`: the real shots for image-to-image (fsynth.generators.sd_img2img), None for text-to-image.
    """
    path = gcfg.lora_path if lora_path is None else lora_path
    lora_files = find_lora_files(path) if path else {}
    pipe = load_sd_pipeline(gcfg.model, gcfg.dtype, gcfg.scheduler, device)
    settings = dict(guidance_scale=gcfg.guidance_scale, steps=gcfg.steps, resolution=gcfg.resolution,
                    negative_prompt=gcfg.negative_prompt, lora_files=lora_files, lora_scale=gcfg.lora_scale)
    if sources is not None:
        return SDImg2ImgGenerator(pipe, folder_digest(model_folder(gcfg.model)), sources, **settings)
    return SDGenerator(pipe, folder_digest(model_folder(gcfg.model)), **settings)
