"""A minimal reader/writer of the safetensors container, so a trace opens in any framework.

Layout (the published safetensors format): an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` padded with
spaces, then the raw little-endian tensor bytes (offsets are relative to the end of the header).
Written by hand to keep the package free of a dependency for ~60 lines.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from ..errors import GGTorchError

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I32": np.int32, "I64": np.int64,
           "BF16": np.uint16}
_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
          np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}


class TraceFileError(GGTorchError):
    """A trace file that is not a readable safetensors file."""


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            arr = arr.astype(np.float32)
        b = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hj = json.dumps(header).encode()
    hj += b" " * (-len(hj) % 8)
    tmp = path + ".part"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(hj)))
        fh.write(hj)
        for b in blobs:
            fh.write(b)
    os.replace(tmp, path)


def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (float arrays; BF16 widened to float32) and the string metadata."""
    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 8:
        raise TraceFileError(f"{path}: expected a safetensors file, found {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise TraceFileError(f"{path}: header length {n} exceeds the file size {len(data)}")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceFileError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise TraceFileError(f"{path}: header must be a JSON object")
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    out = {}
    for name, h in header.items():
        try:
            dt, shape, (b, e) = h["dtype"], [int(s) for s in h["shape"]], h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise TraceFileError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dt not in _DTYPES:
            raise TraceFileError(f"{path}: tensor {name!r} has dtype {dt}; expected one of {sorted(_DTYPES)}")
        np_dt = np.dtype(_DTYPES[dt]).newbyteorder("<")
        if not (0 <= b <= e <= len(body)) or (e - b) != int(np.prod(shape)) * np_dt.itemsize:
            raise TraceFileError(f"{path}: tensor {name!r}: offsets {b}..{e} do not fit shape {shape} {dt}")
        arr = np.frombuffer(body[b:e], dtype=np_dt).reshape(shape)
        if dt == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.astype(np.float32 if dt != "F64" else np.float64)
    return out, {str(k): str(v) for k, v in meta.items()}
