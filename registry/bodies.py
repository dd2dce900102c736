"""What a request body may be before the model sees it: JSON no deeper than a limit (MLflow's own
parser overflows on deep nesting), one of MLflow's input keys, at most the images a call takes."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from pipeline.model.classifier import check_image_count
from pipeline.model.decoding import InvalidImageError
from registry.refusals import Rejected

INPUT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
STRING_LITERAL = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays/objects, counted without recursion (strings removed first)."""
    structure = np.frombuffer(STRING_LITERAL.sub(b'""', body), dtype=np.uint8)
    steps = np.zeros(len(structure), dtype=np.int32)
    steps[(structure == ord("[")) | (structure == ord("{"))] = 1
    steps[(structure == ord("]")) | (structure == ord("}"))] = -1
    return int(np.cumsum(steps).max(initial=0))


def images_in(payload: dict[str, Any]) -> int:
    """How many rows a request carries, whichever of MLflow's input keys it uses."""
    data = payload[next(key for key in INPUT_KEYS if key in payload)]
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if isinstance(data, dict):
        return max((len(v) for v in data.values() if isinstance(v, list)), default=1)
    return len(data) if isinstance(data, list) else 1


def check_depth(body: bytes, max_depth: int) -> None:
    """Refuse JSON nested deeper than the limit; a body with fewer brackets than that (any body
    of base64 images) cannot be, and is not scanned."""
    brackets = body.count(b"[") + body.count(b"{")
    if brackets > max_depth and json_depth(body) > max_depth:
        raise Rejected(
            400,
            "json_too_deep",
            f"the JSON is nested deeper than {max_depth} levels; "
            'send {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}.',
        )


def parse_invocation(body: bytes, max_depth: int) -> tuple[int, dict[str, Any]]:
    """Check an /invocations body the way MLflow will read it; its number of images and the
    parsed JSON."""
    check_depth(body, max_depth)
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise Rejected(400, "malformed_json", "the body is not UTF-8 text.") from None
    except json.JSONDecodeError as error:
        raise Rejected(400, "malformed_json", f"the body is not valid JSON: {error}.") from None
    keys = [key for key in INPUT_KEYS if isinstance(payload, dict) and key in payload]
    if len(keys) != 1:
        raise Rejected(
            400,
            "bad_input_format",
            f"the JSON must be an object with exactly one of {', '.join(INPUT_KEYS)}; "
            'e.g. {"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}.',
        )
    count = images_in(payload)
    try:
        check_image_count(count)
    except InvalidImageError as error:
        raise Rejected(400, "too_many_images", str(error)) from None
    return count, payload


def too_large(size: int, limit: int) -> str:
    return (
        f"the body is {size:,} bytes or more, over this server's limit of {limit:,}; "
        "send fewer images per request."
    )
