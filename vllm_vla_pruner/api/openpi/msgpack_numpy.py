"""msgpack with numpy arrays, byte-compatible with ``openpi_client.msgpack_numpy``.

An array travels as the map ``{b"__ndarray__": True, b"data": raw bytes, b"dtype":
dtype.str, b"shape": [...]}``, a numpy scalar as ``{b"__npgeneric__": True, b"data": item,
b"dtype": dtype.str}`` (written from the protocol description in
``/work/shared/spec/openpi-protocol.md``). Decoding is strict because the bytes come from the
network: object, void and complex dtypes are refused (as openpi's packer refuses them), the
byte count must match dtype x shape, and a bad array is reported with the key path it sat
under (``observation/image: ...``) instead of an exception from deep inside numpy.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

__all__ = ["FrameError", "packb", "unpackb"]

ND_MARK = b"__ndarray__"
GENERIC_MARK = b"__npgeneric__"
#: Object (pickled Python objects), void (structured/raw) and complex: refused both ways.
REFUSED_KINDS = frozenset("OVc")
MAX_NDIM = 8
MAX_DTYPE_CHARS = 16


class FrameError(ValueError):
    """A frame that is not a valid msgpack-numpy message; the text names where and why."""


class _BadArray:
    """Placeholder left by the object hook; reported with its key path after decoding."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _refuse(dtype: np.dtype) -> str | None:
    if dtype.kind in REFUSED_KINDS or dtype.hasobject:
        return f"dtype {dtype.str!r} is refused (object, void and complex arrays are not accepted)"
    return None


def _encode(obj: Any) -> Any:
    """msgpack ``default``: numpy arrays and scalars as openpi encodes them."""
    if isinstance(obj, (np.ndarray, np.generic)):
        reason = _refuse(obj.dtype)
        if reason is not None:
            raise TypeError(reason)
    if isinstance(obj, np.ndarray):
        return {
            ND_MARK: True,
            b"data": obj.tobytes(),  # C order whatever the array's layout
            b"dtype": obj.dtype.str,
            b"shape": list(obj.shape),
        }
    if isinstance(obj, np.generic):
        return {GENERIC_MARK: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """Pack a dict of plain values and numpy arrays (what the server sends)."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def _dtype(raw: Any) -> np.dtype | str:
    """The dtype a peer named, or the reason it is not acceptable."""
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str) or not 0 < len(raw) <= MAX_DTYPE_CHARS:
        return "dtype must be a short numpy dtype string such as '|u1' or '<f4'"
    try:
        dtype = np.dtype(raw)
    except (TypeError, ValueError, SyntaxError):
        return f"unknown dtype {raw!r}"
    return _refuse(dtype) or dtype


def _array(obj: dict) -> Any:
    dtype = _dtype(obj.get(b"dtype"))
    if isinstance(dtype, str):
        return _BadArray(dtype)
    data, shape = obj.get(b"data"), obj.get(b"shape")
    if not isinstance(data, bytes):
        return _BadArray("ndarray 'data' must be bytes")
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        return _BadArray(f"ndarray 'shape' must be at most {MAX_NDIM} non-negative integers")
    need = math.prod(shape) * dtype.itemsize
    if need != len(data):
        return _BadArray(
            f"ndarray of shape {tuple(shape)} and dtype {dtype.str!r} needs {need} bytes, "
            f"got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _generic(obj: dict) -> Any:
    dtype = _dtype(obj.get(b"dtype"))
    if isinstance(dtype, str):
        return _BadArray(dtype)
    data = obj.get(b"data")
    if not isinstance(data, (bool, int, float, str, bytes)):
        return _BadArray("numpy scalar 'data' must be a plain number, string or bytes")
    try:
        return dtype.type(data)
    except (TypeError, ValueError, OverflowError):
        return _BadArray(f"numpy scalar {data!r} is not a valid {dtype.str!r}")


def _hook(obj: dict) -> Any:
    if obj.get(ND_MARK) is True:
        return _array(obj)
    if obj.get(GENERIC_MARK) is True:
        return _generic(obj)
    return obj


def _first_bad(value: Any, path: str) -> tuple[str, str] | None:
    if isinstance(value, _BadArray):
        return path or "(top level)", value.reason
    if isinstance(value, dict):
        for k, v in value.items():
            name = k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
            found = _first_bad(v, f"{path}.{name}" if path else name)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _first_bad(v, f"{path}[{i}]")
            if found:
                return found
    return None


def unpackb(data: bytes) -> Any:
    """Decode one frame; :class:`FrameError` naming the key path of the first bad part."""
    try:
        value = msgpack.unpackb(data, object_hook=_hook, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise FrameError(f"not a msgpack frame ({type(exc).__name__}: {exc})") from None
    bad = _first_bad(value, "")
    if bad is not None:
        raise FrameError(f"{bad[0]}: {bad[1]}")
    return value
