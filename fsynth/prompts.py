"""Prompts: the zero-shot head's class prompts and the generator's "a {domain }photo of a {class}"."""

from __future__ import annotations

NEGATIVE_PROMPT = "distorted, unrealistic, blurry, out of frame"


def readable(classname: str) -> str:
    """A class name as written in a prompt: CoOp keeps '_' in its names and replaces it only here."""
    return classname.replace("_", " ")


def class_prompts(classnames: tuple[str, ...] | list[str], templates: tuple[str, ...]) -> list[list[str]]:
    """For each class, its prompts (one per template), e.g. [['banded texture.'], ...] -> shape [C][T]."""
    return [[t.format(readable(c)) for t in templates] for c in classnames]


def generation_prompt(classname: str, domain: str = "") -> str:
    """DataDream's generation prompt: 'a texture photo of a banded', 'a photo of a accordion'."""
    prefix = f"{domain} " if domain else ""
    return f"a {prefix}photo of a {readable(classname)}"
