"""Class prompts for the zero-shot head and the generation prompt."""

from fsynth.data.registry import get_spec
from fsynth.prompts import class_prompts, generation_prompt, readable


def test_generation_prompt_with_and_without_domain():
    assert generation_prompt("banded", "texture") == "a texture photo of a banded"
    assert generation_prompt("accordion") == "a photo of a accordion"
    assert generation_prompt("apple_pie", "food") == "a food photo of a apple pie"


def test_class_prompts_use_the_coop_templates():
    dtd = get_spec("dtd")
    prompts = class_prompts(dtd.classnames(), dtd.templates)
    assert len(prompts) == 47 and prompts[0] == ["banded texture."]
    food = get_spec("food101")
    assert class_prompts(("apple_pie",), food.templates) == [["a photo of apple pie, a type of food."]]
    assert readable("outdoor apartment_building") == "outdoor apartment building"
