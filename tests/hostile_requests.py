"""Seeded hostile requests for a model server: what an attacker or a broken client sends."""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass, field

from PIL import Image

from registry.bodies import INPUT_KEYS

LEAK_MARKERS = ("Traceback", "stack_trace", 'File "', "site-packages", "object at 0x")


@dataclass
class HostileRequest:
    method: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def png(rng: random.Random, size: int) -> bytes:
    image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    buffer = io.BytesIO()
    image.save(buffer, format=rng.choice(["PNG", "JPEG", "GIF", "BMP"]))
    return buffer.getvalue()


def image_value(rng: random.Random) -> object:
    """A cell of the image column: sometimes a real image, mostly not."""
    raw = png(rng, rng.choice([1, 8, 32, 40]))
    return rng.choice(
        [
            base64.b64encode(raw).decode(),
            base64.b64encode(raw[: rng.randrange(1, len(raw))]).decode(),
            base64.b64encode(rng.randbytes(rng.randrange(0, 200))).decode(),
            "".join(rng.choice("ab+/=\n @%é\x00") for _ in range(rng.randrange(0, 40))),
            rng.randrange(-(2**70), 2**70),
            rng.random() * 1e308,
            None,
            True,
            [],
            {"image": "x"},
            [base64.b64encode(raw).decode()],
        ]
    )


def random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 4 else 4)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1, 1.5, 1e308, -1e-308, 2**64])
    if kind == 1:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 12)))
    if kind == 2:
        return image_value(rng)
    if kind == 3:
        return rng.randrange(-(10**30), 10**30)
    if kind in (4, 5):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {
        rng.choice(["image", "columns", "data", "index", "", "params", "tta", "\x00"]): random_json(
            rng, depth + 1
        )
        for _ in range(rng.randrange(0, 4))
    }


def payload(rng: random.Random) -> object:
    """A body shaped like MLflow's protocol, with something wrong (or right) somewhere."""
    key = rng.choice([*INPUT_KEYS, "data", "columns"])
    rows = [image_value(rng) for _ in range(rng.choice([0, 1, 2, 3, 5]))]
    value = rng.choice(
        [
            {"columns": ["image"], "data": [[r] for r in rows]},
            {"columns": rng.choice([["image"], ["image", "image"], ["x"], [], "image", 3]),
             "data": rng.choice([[[r] for r in rows], rows, 7, None, [[]]])},
            {"columns": ["image"], "index": [1, 1], "data": [[r] for r in rows]},
            [{"image": r} for r in rows],
            [{rng.choice(["image", "other", ""]): random_json(rng)} for _ in rows],
            {"image": rows},
            rows,
            random_json(rng),
        ]
    )  # fmt: skip
    body: dict[str, object] = {key: value}
    if rng.random() < 0.3:
        body["params"] = rng.choice(
            [{"tta": True}, {"tta": "yes"}, {"tta": [1]}, {"x": 1}, 5, None]
        )
    if rng.random() < 0.1:
        body[rng.choice(INPUT_KEYS)] = random_json(rng)
    return body


def nested(rng: random.Random) -> bytes:
    depth = rng.choice([33, 100, 1000, 5000, 100_000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    inner = rng.choice(['"x"', "1", ""])
    closing = closer * depth if rng.random() < 0.8 else ""
    return f'{{"inputs": {opener * depth}{inner}{closing}}}'.encode()


def body_of(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.55:
        return json.dumps(payload(rng)).encode()
    if roll < 0.65:
        return nested(rng)
    if roll < 0.75:
        text = json.dumps(payload(rng)).encode()
        return text[: rng.randrange(0, max(1, len(text)))]
    if roll < 0.85:
        return rng.randbytes(rng.randrange(0, 300))
    if roll < 0.9:
        return b'{"dataframe_split": {"columns": ["image"], "data": [[NaN], [Infinity]]}}'
    return "\n".join(
        ",".join(rng.choice(["a", "1", '"', "é"]) for _ in range(3)) for _ in range(4)
    ).encode()


def hostile_requests(seed: int, count: int, token: str | None) -> list[HostileRequest]:
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        headers = {
            "Content-Type": rng.choice(
                ["application/json"] * 24
                + ["application/json; charset=utf-8", "application/json; charset=latin-1",
                   "text/csv", "application/vnd.apache.parquet", "text/plain", "", "application/json; x=1"]
            )
        }  # fmt: skip
        if token and rng.random() < 0.95:
            headers["Authorization"] = rng.choice(
                [f"Bearer {token}"] * 18 + ["Bearer nope", "Basic x"]
            )
        method = rng.choice(["POST"] * 30 + ["GET", "PUT", "DELETE"])
        path = rng.choice(
            ["/invocations"] * 30 + ["/ping", "/version", "/metrics", "/../etc/passwd"]
        )
        requests.append(HostileRequest(method, path, body_of(rng), headers))
    return requests
