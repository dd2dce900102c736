"""Decoding untrusted image bytes: every format and mode accepted, every bad input named."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.model.decoding import MAX_IMAGE_PIXELS, InvalidImageError, decode_image
from pipeline.model.imaging import encode_png


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(size=(32, 32), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def test_png_bytes_round_trip_exactly():
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_png(image)), image)


def test_base64_text_with_line_breaks_is_accepted():
    raw = encode_png(np.zeros((32, 32, 3), np.uint8))
    assert decode_image(base64.encodebytes(raw).decode()).shape == (32, 32, 3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1"])
def test_any_mode_becomes_rgb(mode):
    out = decode_image(encoded(photo(mode=mode)))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert decode_image(encoded(clear)).min() == 255


def test_any_size_is_resized_and_jpeg_works():
    out = decode_image(encoded(photo((640, 480)), "JPEG", quality=90))
    assert out.shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("!!not base64!!", "not valid base64"),
        (base64.b64encode(b"hello, not an image").decode(), "not a recognizable image"),
        (b"", "empty"),
        (12345, "expected PNG/JPEG bytes"),
        (encoded(photo(), "GIF"), "GIF is not supported"),
        (encoded(photo((64, 64)))[:200], "truncated or corrupt"),
    ],
)
def test_bad_inputs_name_the_problem(payload, message):
    with pytest.raises(InvalidImageError, match=message):
        decode_image(payload)


def test_decompression_bomb_is_refused_from_the_header():
    # A 20,000 x 20,000 PNG compresses to about 1 MB; decoding it would need 1.2 GB.
    bomb = encoded(Image.new("L", (20_000, 20_000)), optimize=False)
    assert len(bomb) < 2_000_000
    with pytest.raises(InvalidImageError, match="refused|over the limit"):
        decode_image(bomb)


def test_plain_20_megapixel_photo_is_refused_by_pixel_count():
    big = Image.new("RGB", (5472, 3648), (120, 80, 40))
    assert MAX_IMAGE_PIXELS < 5472 * 3648
    with pytest.raises(InvalidImageError, match="5472x3648 is 19,961,856 pixels"):
        decode_image(encoded(big, "JPEG"))
