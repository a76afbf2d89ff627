"""The synthetic images: real files, realistic dimensions and weights, seeded."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image, ImageStat

from reference_impl import imagegen

FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG"}


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_a_full_scale_panoramic_has_the_size_of_a_real_one():
    image = imagegen.generate("panoramic", random.Random(1))
    decoded = decode(image.data)
    assert decoded.format == "JPEG"
    assert decoded.mode == "L"
    assert 2500 <= decoded.width <= 3000
    assert decoded.size == (image.width_px, image.height_px)
    assert 1_000_000 <= image.size_bytes <= 3_000_000


@pytest.mark.parametrize("kind", list(imagegen.KINDS))
def test_every_kind_decodes_with_its_dimensions_and_format(kind):
    spec = imagegen.KINDS[kind]
    image = imagegen.generate(kind, random.Random(kind), scale=0.2)
    decoded = decode(image.data)
    assert decoded.size == imagegen.scaled_size(kind, 0.2)
    assert decoded.size == (image.width_px, image.height_px)
    assert decoded.format == FORMATS[image.mime_type] == spec.format
    assert decoded.mode == spec.mode
    assert image.extension == (".png" if spec.format == "PNG" else ".jpg")


@pytest.mark.parametrize("kind", list(imagegen.KINDS))
def test_images_are_textured_not_flat(kind):
    image = imagegen.generate(kind, random.Random(3), scale=0.2)
    decoded = decode(image.data)
    pixels = decoded.width * decoded.height
    # Flat grey encodes to a few hundred bytes; grain keeps a real weight.
    assert image.size_bytes > 0.15 * pixels
    assert min(ImageStat.Stat(decoded).stddev) > 15


def test_the_same_generator_state_gives_the_same_bytes():
    first = imagegen.make_image("bitewing", random.Random(42), scale=0.2)
    again = imagegen.make_image("bitewing", random.Random(42), scale=0.2)
    other = imagegen.make_image("bitewing", random.Random(43), scale=0.2)
    assert first == again
    assert first != other


@pytest.mark.parametrize(
    ("kind", "target_bytes"),
    [
        ("panoramic", 5 * 2**20),
        ("intraoral-photo", 600_000),
        ("periapical", 400_000),
        ("bitewing", 50_000),
    ],
)
def test_an_image_of_a_given_size_lands_within_ten_percent(kind, target_bytes):
    data = imagegen.make_image_of_size(target_bytes, random.Random(5), kind=kind)
    assert abs(len(data) - target_bytes) <= 0.1 * target_bytes
    assert decode(data).format == imagegen.KINDS[kind].format


def test_an_image_of_a_given_size_is_seeded():
    one = imagegen.make_image_of_size(200_000, random.Random(9))
    two = imagegen.make_image_of_size(200_000, random.Random(9))
    assert one == two


def test_unknown_kinds_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown image kind 'xray'"):
        imagegen.make_image("xray", random.Random(1))
    with pytest.raises(ValueError, match="scale=0"):
        imagegen.make_image("panoramic", random.Random(1), scale=0)
    with pytest.raises(ValueError, match="target_bytes=0"):
        imagegen.make_image_of_size(0, random.Random(1))
