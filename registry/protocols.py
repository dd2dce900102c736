"""The inference protocols clients already speak, translated to and from the one pyfunc.

Open Inference Protocol v2 over HTTP (KServe, Triton, Seldon; `tritonclient.http` works against it,
its binary tensor extension included) and KServe's v1 `:predict` / `:explain`. Pure functions:
bytes and headers in, a DataFrame and params for `model.predict` out, and back; the gateway's
`ModelRoutes` serves them. A problem with a request raises `ProtocolError` with the one line the
client gets as `{"error": ...}`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.model.classifier import check_image_count
from pipeline.model.decoding import InvalidImageError
from pipeline.model.imaging import IMAGE_SHAPE, encode_png

BINARY_HEADER = "inference-header-content-length"
# What a request may pass to the pyfunc, and the type each must have.
MODEL_PARAMS = {"tta": bool, "explain": bool, "target": (str, int)}
V2_OUTPUTS = ("label", "class_name", "probabilities", "heatmap")
V1_INSTANCE_HELP = (
    'send {"instances": ["<base64 PNG/JPEG>", ...]} (or {"b64": ...} per instance) and, to '
    'explain another class than the predicted one, "parameters": {"target": "<class>"}.'
)
V2_INPUT_HELP = (
    'send {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [N], "data": '
    '["<base64 PNG/JPEG>", ...]}]}, or a UINT8 tensor of shape [N, 32, 32, 3].'
)


class ProtocolError(Exception):
    """A request that does not follow the protocol: the status and the message the client gets."""

    def __init__(self, message: str, status: int = 400, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


# The pyfunc's answer as one dict per image (label, class_name, probabilities, and with explain
# the explanation's columns): what MLflow's /invocations answers, and what each protocol is made of.
Records = list[dict[str, Any]]


@dataclass
class V2Request:
    images: list[Any]
    params: dict[str, Any]
    request_id: str | None
    outputs: list[str]
    binary: set[str]


def model_params(given: Any) -> dict[str, Any]:
    """The pyfunc params a request's `parameters` carry; anything else there is ignored, as the
    protocol allows, but a known one of the wrong type is refused."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ProtocolError('"parameters" must be an object, e.g. {"explain": true}.')
    params = {}
    for name, kind in MODEL_PARAMS.items():
        if name in given:
            value = given[name]
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ProtocolError(f'parameter "{name}" has the wrong type ({value!r:.40}).')
            params[name] = str(value) if name == "target" else value
    return params


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header of a v2 request and the binary tensor data after it (if any)."""
    size = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > size:
            raise ProtocolError(
                f"Inference-Header-Content-Length {header_length[:20]!r} is not a length within "
                f"the body's {size} bytes."
            )
        size = int(header_length)
    try:
        payload = json.loads(body[:size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"the request is not valid JSON ({error}).") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"the request must be a JSON object; {V2_INPUT_HELP}")
    return payload, body[size:]


def binary_bytes_elements(raw: bytes) -> list[bytes]:
    """A BYTES tensor in the binary extension: each element is a 4-byte little-endian length and
    then that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError("a BYTES tensor's binary data ends inside an element's length.")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError("a BYTES tensor's binary data is shorter than its elements say.")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def flat(data: Any) -> list[Any]:
    """Tensor data as one row-major list (the protocol allows nested or flat JSON arrays)."""
    if not isinstance(data, list):
        return [data]
    items: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            items.append(item)
        else:
            stack.pop()
    return items


def shape_of(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f'input "{tensor.get("name")}" needs a "shape" of non-negative ints.')
    return shape


def images_of(tensor: dict[str, Any], binary: bytes) -> list[Any]:
    """The encoded images of one v2 input tensor (BYTES) or PNGs made from its pixels (UINT8)."""
    datatype, shape = tensor.get("datatype"), shape_of(tensor)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or size < 0 or size > len(binary)):
        raise ProtocolError(f"binary_data_size {size!r} does not fit the binary data sent.")
    count = int(np.prod(shape[:1])) if shape else 1
    check_count(count)
    if datatype == "BYTES":
        values = binary_bytes_elements(binary[:size]) if size is not None else flat(tensor["data"])
        if len(values) != int(np.prod(shape)):
            raise ProtocolError(
                f"shape {shape} says {int(np.prod(shape))} images, got {len(values)}."
            )
        return values
    if datatype == "UINT8":
        if list(shape[1:]) != list(IMAGE_SHAPE):
            raise ProtocolError(f"a UINT8 input must have shape [N, 32, 32, 3], got {shape}.")
        if size is not None:
            pixels = np.frombuffer(binary[:size], dtype=np.uint8)
        else:
            values = flat(tensor["data"])
            if not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
                raise ProtocolError("a UINT8 input's data must be integers from 0 to 255.")
            pixels = np.array(values, dtype=np.uint8)
        if pixels.size != int(np.prod(shape)):
            raise ProtocolError(
                f"shape {shape} needs {int(np.prod(shape))} values, got {pixels.size}."
            )
        return [encode_png(image) for image in pixels.reshape(shape)]
    raise ProtocolError(f"datatype {str(datatype)[:20]!r} is not taken; {V2_INPUT_HELP}")


def check_count(count: int) -> None:
    try:
        check_image_count(count)
    except InvalidImageError as error:
        raise ProtocolError(str(error), reason="too_many_images") from None


def parse_v2_infer(body: bytes, header_length: str | None) -> V2Request:
    """A v2 inference request -> the pyfunc's input, params and what to answer."""
    payload, binary = split_body(body, header_length)
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f'"inputs" must hold exactly one tensor; {V2_INPUT_HELP}')
    if "data" not in inputs[0] and "binary_data_size" not in (inputs[0].get("parameters") or {}):
        raise ProtocolError(f'input "{inputs[0].get("name")}" has no "data"; {V2_INPUT_HELP}')
    params = model_params(payload.get("parameters"))
    available = [name for name in V2_OUTPUTS if name != "heatmap" or params.get("explain")]
    all_binary = bool((payload.get("parameters") or {}).get("binary_data_output", False))
    requested = payload.get("outputs") or [{"name": name} for name in available]
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise ProtocolError('"outputs" must be a list of {"name": ...} objects.')
    names = [o.get("name") for o in requested]
    if unknown := [n for n in names if n not in available]:
        raise ProtocolError(
            f"no output named {unknown[0]!r:.40}; this model answers {', '.join(available)}"
            f"{'' if params.get('explain') else ' (heatmap with parameters.explain=true)'}."
        )
    binary_outputs = {
        o["name"] for o in requested if (o.get("parameters") or {}).get("binary_data", all_binary)
    }
    request_id = payload.get("id")
    images = images_of(inputs[0], binary)
    return V2Request(images, params, str(request_id) if request_id else None, names, binary_outputs)


def v2_tensors(result: Records) -> dict[str, tuple[str, np.ndarray]]:
    """The pyfunc's answer as v2 output tensors: name -> (datatype, array)."""
    count = len(result)
    tensors = {
        "label": ("INT64", np.array([row["label"] for row in result], dtype=np.int64)),
        "class_name": ("BYTES", np.array([row["class_name"] for row in result], dtype=object)),
        "probabilities": (
            "FP32",
            np.array([row["probabilities"] for row in result], dtype=np.float32).reshape(count, -1),
        ),
    }
    if result and "heatmap" in result[0]:
        maps = np.array([row["heatmap"] for row in result], dtype=np.float32)
        tensors["heatmap"] = ("FP32", maps.reshape(count, 32, 32))
    return tensors


def serialized(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return b"".join(
            struct.pack("<I", len(e := str(item).encode())) + e for item in array.ravel()
        )
    return np.ascontiguousarray(array).tobytes()


def v2_infer_response(
    request: V2Request, result: Records, model_name: str, model_version: str
) -> tuple[bytes, dict[str, str]]:
    """The v2 answer's body and headers: JSON, or JSON then binary tensors when asked."""
    tensors = v2_tensors(result)
    outputs, blobs = [], []
    for name in request.outputs:
        datatype, array = tensors[name]
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in request.binary:
            blobs.append(serialized(datatype, array))
            output["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            output["data"] = (
                [str(v) for v in array.ravel()] if datatype == "BYTES" else (array.ravel().tolist())
            )
        outputs.append(output)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.request_id:
        answer["id"] = request.request_id
    answer["outputs"] = outputs
    header = json.dumps(answer).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        BINARY_HEADER: str(len(header)),
    }


def v2_model_metadata(model_name: str, model_version: str, class_names: list[str]) -> dict:
    """GET /v2/models/{name}: what the model takes and answers, in the protocol's terms."""
    return {
        "name": model_name,
        "versions": [model_version],
        "platform": "mlflow_pyfunc_pytorch",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "class_name", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(class_names)]},
        ],
        "parameters": {"class_names": class_names, "explain": "parameters.explain=true adds a "
                       "heatmap FP32 [-1, 32, 32] output (Grad-CAM)"},
    }  # fmt: skip


def parse_v1(body: bytes) -> tuple[list[Any], dict[str, Any]]:
    """KServe v1 `{"instances": [...]}` (base64 strings, or {"b64": ...} / {"image_bytes": {"b64":
    ...}} each) -> the pyfunc's input and params."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(
            f"the request is not valid JSON ({error}); {V1_INSTANCE_HELP}"
        ) from None
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not instances:
        raise ProtocolError(f'the request needs a non-empty "instances" list; {V1_INSTANCE_HELP}')
    check_count(len(instances))
    images = []
    for index, instance in enumerate(instances):
        if isinstance(instance, dict):
            instance = instance.get("image_bytes", instance)
            instance = instance.get("b64") if isinstance(instance, dict) else instance
        if not isinstance(instance, str):
            raise ProtocolError(f"instance {index} is not a base64 image; {V1_INSTANCE_HELP}")
        images.append(instance)
    return images, model_params(payload.get("parameters"))


def v1_predictions(result: Records) -> list[dict[str, Any]]:
    return [
        {"label": int(row["label"]), "class_name": row["class_name"],
         "probabilities": row["probabilities"]}
        for row in result
    ]  # fmt: skip


def v1_explanations(result: Records) -> list[dict[str, Any]]:
    return [
        {
            "target_label": int(row["explained_label"]),
            "target_class": row["explained_class"],
            "heatmap": row["heatmap"],
            "heatmap_png": row["heatmap_png"],
        }
        for row in result
    ]
