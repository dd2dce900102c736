"""Image decoding and validation of the served model, in process (the HTTP side is in test_serve)."""

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from registry.serving_model import (
    MAX_IMAGE_PIXELS,
    InvalidImageError,
    MicroBatcher,
    decode_image,
    encode_png,
)


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


class RecordingForward:
    """A forward pass that takes 20 ms and answers each image with its own value: batch sizes are
    recorded, and every caller can check it got its own rows back."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, images: np.ndarray, tta: bool) -> np.ndarray:
        self.batches.append(len(images))
        self.threads.add(threading.current_thread().name)
        time.sleep(0.02)
        if (images == 255).any():
            raise ValueError("poisoned batch")
        return images.reshape(len(images), -1)[:, :1].astype(np.float64) + (100 if tta else 0)


def ask(batcher: MicroBatcher, value: int, count: int = 1, tta: bool = False) -> np.ndarray:
    with batcher.caller():
        return batcher.predict(np.full((count, 2, 2, 3), value, np.uint8), tta)


def test_waiting_requests_run_as_one_batch_and_each_gets_its_own_rows():
    forward = RecordingForward()
    batcher = MicroBatcher(lambda: None, forward, max_images=64, wait_s=0.005)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda v: ask(batcher, v, count=1 + v % 3), range(16)))
    for value, answer in enumerate(answers):
        assert answer.shape == (1 + value % 3, 1) and (answer == value).all()
    assert max(forward.batches) > 1 and len(forward.batches) < 16
    assert sum(forward.batches) == sum(1 + v % 3 for v in range(16))
    assert forward.threads == {"torch"}


def test_a_lone_request_does_not_wait_and_the_cap_bounds_a_batch():
    forward = RecordingForward()
    batcher = MicroBatcher(lambda: None, forward, max_images=4, wait_s=1.0)
    started = time.perf_counter()
    assert ask(batcher, 7)[0, 0] == 7
    assert time.perf_counter() - started < 0.5  # the 1 s wait is only for callers already decoding
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda v: ask(batcher, v, count=2), range(12)))
    assert max(forward.batches) <= 4


def test_tta_requests_are_batched_apart_and_an_error_reaches_its_caller_only():
    forward = RecordingForward()
    batcher = MicroBatcher(lambda: None, forward, max_images=64, wait_s=0.005)
    with ThreadPoolExecutor(8) as pool:
        plain = pool.submit(ask, batcher, 3)
        mirrored = pool.submit(ask, batcher, 3, 1, True)
        assert plain.result()[0, 0] == 3 and mirrored.result()[0, 0] == 103
    with pytest.raises(ValueError, match="poisoned"):
        ask(batcher, 255)
    assert ask(batcher, 5)[0, 0] == 5
