"""Write GGUF v3 files: metadata of every value type, tensors of every ggml type as raw blocks.

Tensor data are laid out in the order tensors were added, each at the next multiple of the
alignment, which is what llama.cpp's gguf writer does; so reading a file and writing it back gives
the same bytes.
"""
from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from ..errors import GGUFError
from .constants import DEFAULT_ALIGNMENT, DTYPE_TO_VALUETYPE, GGUF_MAGIC, NUMPY_DTYPES, ValueType
from .reader import _SCALAR_FMT, GGUFFile
from .types import GGMLType, ggml_type

_NUMPY_TO_GGML = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
                  np.dtype("int8"): "I8", np.dtype("int16"): "I16", np.dtype("int32"): "I32", np.dtype("int64"): "I64"}


def guess_type(value: Any):
    """The GGUF type info for a Python/numpy value (see GGUFFile.value_types for the format)."""
    if isinstance(value, (bool, np.bool_)):
        return ValueType.BOOL
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 2 ** 32:
            return ValueType.UINT32
        if -(2 ** 31) <= v < 0:
            return ValueType.INT32
        return ValueType.INT64 if v < 0 else ValueType.UINT64
    if isinstance(value, (float, np.floating)):
        return ValueType.FLOAT32
    if isinstance(value, str):
        return ValueType.STRING
    if isinstance(value, np.ndarray):
        dt = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        for vt, ndt in NUMPY_DTYPES.items():
            if ndt == dt:
                return (ValueType.ARRAY, vt)
        raise GGUFError(f"cannot store a numpy array of dtype {value.dtype} in GGUF metadata")
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return (ValueType.ARRAY, ValueType.STRING)
        if all(isinstance(v, (list, tuple, np.ndarray)) for v in value) and value:
            return (ValueType.ARRAY, ValueType.ARRAY, tuple(guess_type(v) for v in value))
        if all(isinstance(v, (bool, np.bool_)) for v in value):
            return (ValueType.ARRAY, ValueType.BOOL)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            return (ValueType.ARRAY, ValueType.INT32)
        if all(isinstance(v, (int, float, np.number)) for v in value):
            return (ValueType.ARRAY, ValueType.FLOAT32)
    raise GGUFError(f"cannot store a value of type {type(value).__name__} in GGUF metadata")


def _encode_string(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _encode_value(value: Any, info) -> bytes:
    """Bytes of a value without its leading type tag (the caller writes that)."""
    if isinstance(info, tuple):
        sub = info[1]
        parts = [struct.pack("<IQ", int(sub), len(value))]
        if sub == ValueType.STRING:
            parts += [_encode_string(s) for s in value]
        elif sub == ValueType.ARRAY:
            inner = info[2]
            parts += [_encode_value(v, i) for v, i in zip(value, inner)]
        else:
            parts.append(np.asarray(value, dtype=NUMPY_DTYPES[sub]).tobytes())
        return b"".join(parts)
    vt = ValueType(info)
    if vt == ValueType.STRING:
        return _encode_string(value)
    return struct.pack(_SCALAR_FMT[vt], value)


class GGUFWriter:
    """Collects metadata and tensors, then writes one GGUF v3 file with :meth:`write`."""

    def __init__(self, alignment: int | None = None):
        self.metadata: dict[str, tuple[Any, Any]] = {}
        self.tensors: list[tuple[str, tuple[int, ...], GGMLType, bytes | np.ndarray]] = []
        self._alignment = alignment

    @property
    def alignment(self) -> int:
        if self._alignment:
            return self._alignment
        a = self.metadata.get("general.alignment")
        return int(a[0]) if a else DEFAULT_ALIGNMENT

    def add(self, key: str, value: Any, vtype=None) -> None:
        """Add a metadata key. ``vtype`` is a ValueType or an (ARRAY, subtype[, inner]) tuple; guessed if None."""
        self.metadata[key] = (value, guess_type(value) if vtype is None else vtype)

    def add_tensor(self, name: str, data, type: "str | int | GGMLType | None" = None, shape=None) -> None:
        """Add a tensor. ``data`` is raw blocks (uint8) when ``type`` is a quantized type, or a float/int array.

        ``shape`` is in GGUF order (ne[0] first); by default the reverse of ``data.shape``.
        """
        if any(n == name for n, *_ in self.tensors):
            raise GGUFError(f"duplicate tensor name {name!r}")
        data = np.ascontiguousarray(data.numpy() if hasattr(data, "numpy") else data)
        if type is None:
            if data.dtype not in _NUMPY_TO_GGML:
                raise GGUFError(f"tensor {name!r}: give a ggml type for data of dtype {data.dtype}")
            type = _NUMPY_TO_GGML[data.dtype]
        t = ggml_type(type)
        if shape is None:
            if data.dtype == np.uint8 and t.name not in ("I8",):
                raise GGUFError(f"tensor {name!r}: raw {t.name} blocks need an explicit GGUF shape")
            shape = tuple(reversed(data.shape))
        shape = tuple(int(d) for d in shape)
        n = int(np.prod(shape))
        if shape[0] % t.block_size:
            raise GGUFError(f"tensor {name!r}: rows of {shape[0]} are not whole {t.name} blocks of {t.block_size}")
        want = n // t.block_size * t.type_size
        if data.nbytes != want:
            raise GGUFError(f"tensor {name!r}: {t.name} {list(shape)} needs {want} bytes, got {data.nbytes}")
        self.tensors.append((name, shape, t, data))

    def to_bytes_header(self) -> tuple[bytes, list[int]]:
        align = self.alignment
        out = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(self.tensors), len(self.metadata))]
        for key, (value, info) in self.metadata.items():
            vt = info[0] if isinstance(info, tuple) else info
            out.append(_encode_string(key) + struct.pack("<I", int(vt)) + _encode_value(value, info))
        offsets, off = [], 0
        for name, shape, t, data in self.tensors:
            offsets.append(off)
            out.append(_encode_string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
                       + struct.pack("<IQ", t.id, off))
            off += data.nbytes
            off += (-off) % align
        header = b"".join(out)
        header += b"\0" * ((-len(header)) % align)
        return header, offsets

    def write(self, path: str | os.PathLike) -> None:
        header, offsets = self.to_bytes_header()
        align = self.alignment
        tmp = os.fspath(path) + ".tmp"
        with open(tmp, "wb") as f:  # write aside, then rename: a failed write never clobbers a good file
            f.write(header)
            for (name, shape, t, data), off in zip(self.tensors, offsets):
                f.write(memoryview(data).cast("B"))
                f.write(b"\0" * ((-data.nbytes) % align))
        os.replace(tmp, path)


def copy_gguf(src: GGUFFile, path: str | os.PathLike) -> None:
    """Write ``src`` back out (metadata with its types, tensors as raw blocks)."""
    w = GGUFWriter()
    for k, v in src.metadata.items():
        if k.startswith("split."):
            continue
        w.add(k, v, src.value_types[k])
    for ti in src:
        w.add_tensor(ti.name, src.raw(ti.name), ti.type, ti.shape)
    w.write(path)
