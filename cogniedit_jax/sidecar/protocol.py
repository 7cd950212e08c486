"""The sidecar's wire format, shared by server and client (numpy + Pillow only; no pickle).

Every request and response is one JSON object. Arrays travel as `{"dtype", "shape", "data"}` with `data`
the base64 of the C-order bytes (dtype names as numpy spells them, plus "bfloat16" via ml_dtypes). Images are
either such an array (uint8, [H, W, 3]) or `{"png": base64}`.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

PROTOCOL_VERSION = 1
TOKEN_HEADER = "Authorization"  # "Bearer <token>"
ENDPOINTS = ("health", "judge", "decompose", "encode", "chat")


class ProtocolError(ValueError):
    """A request the server refuses; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name)
    except TypeError as e:
        raise ProtocolError(f"unknown array dtype {name!r}") from e


def encode_array(array) -> dict:
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.name, "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_array(obj, where: str = "array") -> np.ndarray:
    if not isinstance(obj, dict) or not {"dtype", "shape", "data"} <= obj.keys():
        raise ProtocolError(f"{where}: expected an object with dtype, shape and data")
    dtype, shape = _dtype(obj["dtype"]), obj["shape"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ProtocolError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    try:
        data = base64.b64decode(obj["data"], validate=True)
    except (binascii.Error, TypeError) as e:
        raise ProtocolError(f"{where}: data is not valid base64") from e
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ProtocolError(f"{where}: {len(data)} bytes of data, shape {shape} {dtype.name} needs {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _check_pixels(height: int, width: int, max_pixels: int, where: str):
    if height * width > max_pixels:
        raise ProtocolError(f"{where}: image {width}x{height} = {height * width} pixels is over the limit of "
                            f"{max_pixels} (server option --max-image-pixels)", status=413)


def encode_image(image, fmt: str = "raw") -> dict:
    """A uint8 [H, W, 3] array (or a PIL image) as a wire image: raw bytes, or PNG (smaller, slower)."""
    array = as_rgb_uint8(image)
    if fmt == "raw":
        return encode_array(array)
    if fmt == "png":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return {"png": base64.b64encode(buf.getvalue()).decode("ascii")}
    raise ValueError(f"image format {fmt!r} is not 'raw' or 'png'")


def as_rgb_uint8(image) -> np.ndarray:
    if hasattr(image, "convert"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image as uint8 [H, W, 3], found {array.dtype} {list(array.shape)}")
    return array


def decode_image(obj, max_pixels: int, where: str = "image") -> np.ndarray:
    """A wire image as uint8 [H, W, 3]; the pixel limit is checked before any pixel data is decoded."""
    if isinstance(obj, dict) and "png" in obj:
        from PIL import Image, UnidentifiedImageError

        try:
            data = base64.b64decode(obj["png"], validate=True)
            image = Image.open(io.BytesIO(data))  # reads the header only
            _check_pixels(image.height, image.width, max_pixels, where)
            return np.asarray(image.convert("RGB"))
        except Image.DecompressionBombError as e:
            raise ProtocolError(f"{where}: {e}", status=413) from e
        except (binascii.Error, TypeError, UnidentifiedImageError, OSError) as e:
            raise ProtocolError(f"{where}: not a readable base64 PNG ({e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("shape"), list) and len(obj["shape"]) == 3:
        height, width = obj["shape"][:2]
        if isinstance(height, int) and isinstance(width, int):
            _check_pixels(height, width, max_pixels, where)
    array = decode_array(obj, where)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ProtocolError(f"{where}: expected uint8 [H, W, 3], found {array.dtype} {list(array.shape)}")
    return array
