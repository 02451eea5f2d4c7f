"""TF Serving's REST API for a LiteRT export: what a request may hold, what the answer is.

A client written for TF Serving and our SavedModel (``saved_model``: ``serving_default``
takes ``images`` float32 [N, H, W, 3], raw pixels in 0..255, and returns ``classes`` int32
[N], ``exits`` int32 [N], ``probabilities`` float32 [N, C]) works unchanged:

* rows: ``{"instances": [image, ...]}`` or ``[{"images": image}, ...]`` ->
  ``{"predictions": [{"classes": c, "exits": e, "probabilities": [...]}, ...]}`` (one object
  per image, as TF Serving answers a signature with several outputs);
* columnar: ``{"inputs": images}`` or ``{"inputs": {"images": images}}`` ->
  ``{"outputs": {"classes": [...], "exits": [...], "probabilities": [[...], ...]}}``.

An image is a nested list [H][W][3] of numbers, or ``{"b64": "..."}``: base64 of its H*W*3
raw uint8 bytes (row-major, RGB), 4-5x smaller and 12-15x cheaper to take in than numbers
(docs/serving.md has the figures). TF Serving would refuse b64 for a float input; it is this
server's addition, and a client that never sends it never sees it.

Every refusal is a ``RestError`` whose status TF Serving would give (INVALID_ARGUMENT 400,
NOT_FOUND 404), answered as ``{"error": "..."}``.
"""

import base64
import binascii
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import orjson

SIGNATURE = "serving_default"
INPUT = "images"
# The signature's outputs in the order TF Serving prints a signature's map: by name.
OUTPUTS = ("classes", "exits", "probabilities")
B64 = "b64"
MAX_PIXEL = 255.0
# The SavedModel's tensor names, as TF Serving's metadata shows them (TF names a traced
# signature's input after the signature and its outputs after the one call that makes them).
_INPUT_TENSOR = f"{SIGNATURE}_{INPUT}:0"
_OUTPUT_DTYPES = {"classes": "DT_INT32", "exits": "DT_INT32", "probabilities": "DT_FLOAT"}

BAD_REQUEST, NOT_FOUND, TOO_LARGE, UNAVAILABLE, TIMEOUT, INTERNAL = 400, 404, 413, 503, 504, 500


class RestError(Exception):
    """A request refused: its HTTP status and the message sent as ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> RestError:
    return RestError(BAD_REQUEST, message)


def _received(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise _bad(f"the body is not valid JSON ({error}). Send a JSON object with "
                   "\"instances\" or \"inputs\" (pixels are finite numbers in 0..255: NaN "
                   "and Infinity are not JSON).") from None


def _has_bool(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_bool(v) for v in value)
    return isinstance(value, bool)


def _decode_b64(value: Any, image_shape: Tuple[int, ...]) -> np.ndarray:
    text = value.get(B64)
    if len(value) != 1 or not isinstance(text, str):
        raise _bad(f"a binary image is {{\"b64\": \"<base64 of {int(np.prod(image_shape))} "
                   f"uint8 bytes>\"}} and nothing else. Received: {_received(value)}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"\"b64\" holds invalid base64. Received: {_received(text)}") from None
    if len(raw) != int(np.prod(image_shape)):
        raise _bad(f"a b64 image holds H*W*3 = {int(np.prod(image_shape))} uint8 bytes "
                   f"(shape {list(image_shape)}, row-major RGB). Received: {len(raw)} bytes")
    return np.frombuffer(raw, np.uint8).reshape(image_shape)


def _numbers(value: Any, shape: Sequence[Any], what: str, body: bytes) -> np.ndarray:
    """``value`` as float32 of ``shape`` (None: any size), every number finite in 0..255."""
    try:
        array = np.array(value)
    except (ValueError, TypeError, OverflowError):
        # Ragged nesting: numpy cannot make one array of it.
        raise _bad(f"{what} must be a nested list of numbers of shape {_shape(shape)}; "
                   f"its lists have unequal lengths. Received: {_received(value)}") from None
    # JSON's true and false would pass as 1 and 0 beside numbers; they are rare in a body
    # that is all numbers, so the exact (slow) search runs only where the text holds one.
    if array.dtype.kind not in "iuf" or ((b"true" in body or b"false" in body)
                                         and _has_bool(value)):
        raise _bad(f"{what} must hold numbers only (DT_FLOAT pixels, 0..255). "
                   f"Received: {_received(value)}")
    if array.ndim != len(shape) or any(size is not None and size != got
                                       for size, got in zip(shape, array.shape)):
        raise _bad(f"{what} must have shape {_shape(shape)}. Received: shape "
                   f"{list(array.shape)}")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise _bad(f"{what} must be finite pixel values in 0..{MAX_PIXEL:g}. Received: a "
                   "NaN or infinite value")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > MAX_PIXEL:
        raise _bad(f"{what} must be raw pixel values in 0..{MAX_PIXEL:g} (not normalised). "
                   f"Received: values in {low:g}..{high:g}")
    return array


def _shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("N" if size is None else str(size) for size in shape) + "]"


def _one_image(value: Any, image_shape: Tuple[int, ...], what: str,
               body: bytes) -> np.ndarray:
    if isinstance(value, dict):
        return _decode_b64(value, image_shape).astype(np.float32)
    return _numbers(value, image_shape, what, body)


def _named_input(value: dict, what: str) -> Any:
    unknown = sorted(set(value) - {INPUT})
    if unknown or INPUT not in value:
        raise _bad(f"{what} names the signature's one input, \"{INPUT}\". Received keys: "
                   f"{sorted(value)}")
    return value[INPUT]


def _instances(instances: Any, image_shape: Tuple[int, ...], body: bytes) -> np.ndarray:
    if not isinstance(instances, list) or not instances:
        raise _bad("\"instances\" must be a non-empty list of images. Received: "
                   f"{_received(instances)}")
    if not any(isinstance(instance, dict) for instance in instances):
        return _numbers(instances, (None, *image_shape), "\"instances\"", body)
    images = []
    for i, instance in enumerate(instances):
        what = f"instance {i}"
        if isinstance(instance, dict) and B64 not in instance:
            instance = _named_input(instance, what)
        images.append(_one_image(instance, image_shape, what, body))
    return np.stack(images)


def _inputs(inputs: Any, image_shape: Tuple[int, ...], body: bytes) -> np.ndarray:
    if isinstance(inputs, dict):
        inputs = _named_input(inputs, "\"inputs\"")
    if isinstance(inputs, list) and inputs and all(isinstance(v, dict) for v in inputs):
        return np.stack([_one_image(v, image_shape, f"input {i}", body)
                         for i, v in enumerate(inputs)])
    if not isinstance(inputs, list) or not inputs:
        raise _bad(f"\"inputs\" must be a non-empty batch of images {_shape((None, *image_shape))}."
                   f" Received: {_received(inputs)}")
    return _numbers(inputs, (None, *image_shape), "\"inputs\"", body)


def parse_predict(body: bytes, image_shape: Sequence[int]) -> Tuple[np.ndarray, bool]:
    """(images float32 [N, H, W, 3] in 0..255, whether the request was columnar) from a
    ``:predict`` body; raises ``RestError`` (400, or 404 for another signature)."""
    image_shape = tuple(image_shape)
    request = parse_json(body)
    if not isinstance(request, dict):
        raise _bad("the body must be a JSON object with \"instances\" or \"inputs\". Received: "
                   f"{_received(request)}")
    signature = request.get("signature_name", SIGNATURE)
    if signature != SIGNATURE:
        raise RestError(NOT_FOUND, f"Serving signature name: {_received(signature)} not found "
                                   f"in signature def; this model serves \"{SIGNATURE}\".")
    unknown = sorted(set(request) - {"signature_name", "instances", "inputs"})
    if unknown:
        raise _bad(f"unknown keys {unknown}: a request holds \"signature_name\" (optional) and "
                   "one of \"instances\" or \"inputs\".")
    if ("instances" in request) == ("inputs" in request):
        raise _bad("a request holds exactly one of \"instances\" (row format) or \"inputs\" "
                   f"(columnar format). Received keys: {sorted(request)}")
    if "instances" in request:
        return _instances(request["instances"], image_shape, body), False
    return _inputs(request["inputs"], image_shape, body), True


def predict_body(answers: Dict[str, np.ndarray], columnar: bool) -> bytes:
    """The JSON TF Serving returns for ``serving_default``'s outputs (float32 printed at its
    own shortest precision)."""
    classes, exits = answers["classes"].tolist(), answers["exits"].tolist()
    probabilities = np.asarray(answers["probabilities"], np.float32)
    if columnar:
        body = {"outputs": {"classes": classes, "exits": exits,
                            "probabilities": probabilities}}
    else:
        body = {"predictions": [{"classes": c, "exits": e, "probabilities": p}
                                for c, e, p in zip(classes, exits, probabilities)]}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def status_body(version: int, loaded: bool) -> bytes:
    """``GET /v1/models/NAME``: the one version's state."""
    state = {"version": str(version), "state": "AVAILABLE" if loaded else "LOADING",
             "status": {"error_code": "OK", "error_message": ""}}
    return orjson.dumps({"model_version_status": [state]})


def _tensor_info(dtype: str, shape: Sequence[int], name: str) -> dict:
    return {"dtype": dtype, "name": name, "tensor_shape": {
        "dim": [{"size": str(size), "name": ""} for size in shape], "unknown_rank": False}}


def metadata_body(name: str, version: int, image_shape: Sequence[int],
                  num_classes: int) -> bytes:
    """``GET /v1/models/NAME/metadata``: ``serving_default``'s signature as TF Serving prints
    the SavedModel's (the batch dimension -1)."""
    shapes = {"classes": [-1], "exits": [-1], "probabilities": [-1, num_classes]}
    outputs = {output: _tensor_info(_OUTPUT_DTYPES[output], shapes[output],
                                    f"StatefulPartitionedCall:{i}")
               for i, output in enumerate(OUTPUTS)}
    signature = {"inputs": {INPUT: _tensor_info("DT_FLOAT", [-1, *image_shape], _INPUT_TENSOR)},
                 "outputs": outputs, "method_name": "tensorflow/serving/predict",
                 "defaults": {}}
    return orjson.dumps({
        "model_spec": {"name": name, "signature_name": "", "version": str(version)},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}}})
