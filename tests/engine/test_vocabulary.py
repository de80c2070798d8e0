"""The result file-name rule: the names the engine gives its images, and recognising exactly those."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import GenerationRequest
from engine.vocabulary import FORMAT_DETAILS, MAX_IMAGES, OUTPUT_FORMATS, is_result_file_name, result_file_name


def test_a_result_file_is_named_by_its_index_and_its_format_extension():
    assert result_file_name(0, "png") == "image_0.png"
    assert result_file_name(3, "jpeg") == "image_3.jpg"
    assert result_file_name(MAX_IMAGES - 1, "webp") == f"image_{MAX_IMAGES - 1}.webp"


def test_every_name_the_rule_makes_is_recognised_and_nothing_more():
    made = {result_file_name(i, fmt) for i in range(MAX_IMAGES) for fmt in OUTPUT_FORMATS}
    assert len(made) == MAX_IMAGES * len(FORMAT_DETAILS)
    assert all(is_result_file_name(name) for name in made)
    near = [f"image_{i}.{ext}" for i in (-1, MAX_IMAGES, 10, 99) for ext in ("png", "jpg", "webp")]
    near += [f"image_{i}.{ext}" for i in range(MAX_IMAGES) for ext in ("jpeg", "PNG", "gif", "")]
    assert not any(is_result_file_name(name) for name in near)


@pytest.mark.parametrize("name", [
    "", "image_", "image_.png", "image_0", "image_00.png", "image_01.png", "IMAGE_0.png", "Image_0.png",
    " image_0.png", "image_0.png ", "image_0.png\n", "image_0.png\x00", "../image_0.png", "a/image_0.png",
    "image_0.png/..", "image_\u0663.png", "image_\uff10.png", "image_0.png.png", "image_0.jpg.webp", "image-0.png",
])
def test_names_the_engine_cannot_make_are_refused(name):
    assert not is_result_file_name(name)


@pytest.mark.parametrize("value", [None, 0, 1.5, b"image_0.png", Path("image_0.png"), ["image_0.png"],
                                   ("image_0.png",), {"image_0.png": 1}])
def test_what_is_not_a_str_is_refused(value):
    assert is_result_file_name(value) is False


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_the_engine_names_its_images_by_the_rule(engine, output_format):
    request = GenerationRequest(prompt="a kite", seed=1, num_images=MAX_IMAGES, num_inference_steps=1,
                                image_size=(256, 256), output_format=output_format)
    names = [image.file_name for image in engine.generate(request).images]
    assert names == [result_file_name(i, output_format) for i in range(MAX_IMAGES)]
    assert all(is_result_file_name(name) for name in names)
