"""Untrusted encoded images (request bodies, files to score) -> 32x32 RGB pixels, or one clear error.

The served model, `evaluate` and batch scoring decode through here, so every path refuses the same
inputs with the same words. Imports only numpy and Pillow.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

import numpy as np
import PIL
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.model.imaging import to_rgb_32

MAX_IMAGE_PIXELS = 4096 * 4096
SUPPORTED_FORMATS = ("PNG", "JPEG")


class InvalidImageError(PipelineError, ValueError):
    """An input that is not a usable image; the message names which one and what to send."""


def image_bytes(value: Any, index: int) -> bytes:
    """Raw bytes from what a caller sent: bytes in process, base64 text over REST.

    Line breaks are allowed in the base64 text (the `base64` tool and MLflow wrap at 76 columns);
    any other character outside the alphabet is an error, not silently skipped.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
    elif isinstance(value, str):
        try:
            raw = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImageError(
                f"image {index}: not valid base64. Send each image as the base64 text of its "
                "PNG or JPEG file (e.g. base64.b64encode(open('cat.png','rb').read()).decode())."
            ) from None
    else:
        raise InvalidImageError(
            f"image {index}: expected PNG/JPEG bytes or their base64 text, got {type(value).__name__}."
        )
    if not raw:
        raise InvalidImageError(f"image {index}: empty; send the bytes of a PNG or JPEG file.")
    return raw


def decode_image(value: Any, index: int = 0) -> np.ndarray:
    """One encoded image -> 32x32 RGB uint8, refusing oversized images before decoding pixels."""
    raw = image_bytes(value, index)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImageError(
            f"image {index}: refused, its header declares more than {MAX_IMAGE_PIXELS:,} pixels."
        ) from None
    except (PIL.UnidentifiedImageError, OSError, ValueError):
        raise InvalidImageError(
            f"image {index}: the bytes are not a recognizable image; send a PNG or JPEG file."
        ) from None
    if image.format not in SUPPORTED_FORMATS:
        raise InvalidImageError(
            f"image {index}: {image.format} is not supported; send PNG or JPEG."
        )
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidImageError(
            f"image {index}: {width}x{height} is {width * height:,} pixels, over the limit of "
            f"{MAX_IMAGE_PIXELS:,}; downscale it before sending (the model sees 32x32)."
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError):
        raise InvalidImageError(
            f"image {index}: the {image.format} data is truncated or corrupt."
        ) from None
    return to_rgb_32(image)
