"""Read GGUF files: memory-mapped, metadata and tensor index parsed once, tensor data as zero-copy views.

Layout (ggml/docs/gguf.md): magic "GGUF", u32 version, u64 tensor count, u64 kv count, the key/value
pairs, the tensor infos (name, n_dims, ne[0..n_dims), type, offset), padding to `general.alignment`,
then the data section. Every count and length is checked against the bytes that remain before
anything is allocated, so a corrupt header fails at once with a GGUFError.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..errors import GGUFError
from .constants import DEFAULT_ALIGNMENT, GGUF_MAGIC, NUMPY_DTYPES, SUPPORTED_VERSIONS, ValueType
from .types import GGMLType, type_by_id

MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR_FMT = {ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
               ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
               ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d"}
_SPLIT_RE = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor index. ``shape`` is in GGUF order: ``shape[0]`` (ne[0]) moves fastest."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # absolute byte offset in its shard
    shard: int = 0

    @property
    def type(self) -> GGMLType | None:
        return type_by_id(self.type_id)

    @property
    def type_name(self) -> str:
        t = self.type
        return t.name if t else f"unknown({self.type_id})"

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int | None:
        t = self.type
        if t is None:
            return None
        return self.n_elements // t.block_size * t.type_size

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """PyTorch/numpy order (the reverse of GGUF's ne): a weight [in, out] is out rows of in values."""
        return tuple(reversed(self.shape))


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    __slots__ = ("buf", "pos", "end", "path")

    def __init__(self, buf: memoryview, pos: int, path: str):
        self.buf, self.pos, self.end, self.path = buf, pos, len(buf), path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise GGUFError(f"{self.path}: truncated while reading {what}: need {n} bytes at offset {self.pos}, "
                            f"file has {self.end - self.pos} left")

    def scalar(self, vt: ValueType, what: str):
        fmt = _SCALAR_FMT[vt]
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar(ValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(ValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(what + " length")
        self.need(n, f"{what} ({n} bytes)")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "surrogateescape")
        self.pos += n
        return s


def _read_value(cur: _Cursor, vt: int, key: str, depth: int = 0):
    """Returns (value, type_info). type_info is a ValueType, or (ARRAY, inner) for arrays."""
    try:
        vt = ValueType(vt)
    except ValueError:
        raise GGUFError(f"{cur.path}: metadata key {key!r} has unknown value type {vt} (expected 0..12)") from None
    if vt == ValueType.STRING:
        return cur.string(f"value of {key!r}"), vt
    if vt != ValueType.ARRAY:
        v = cur.scalar(vt, f"value of {key!r}")
        return (bool(v) if vt == ValueType.BOOL else v), vt
    if depth > 8:
        raise GGUFError(f"{cur.path}: metadata key {key!r}: arrays nested deeper than 8 levels")
    sub = cur.u32(f"array type of {key!r}")
    n = cur.u64(f"array length of {key!r}")
    try:
        sub = ValueType(sub)
    except ValueError:
        raise GGUFError(f"{cur.path}: metadata key {key!r} is an array of unknown type {sub}") from None
    if sub in NUMPY_DTYPES:
        dt = NUMPY_DTYPES[sub]
        cur.need(n * dt.itemsize, f"array {key!r} of {n} {sub.name}")
        arr = np.frombuffer(cur.buf, dtype=dt, count=n, offset=cur.pos).copy()
        cur.pos += n * dt.itemsize
        return arr, (ValueType.ARRAY, sub)
    # every string or nested array takes at least 8 bytes: reject absurd counts before looping
    cur.need(n * 8, f"array {key!r} of {n} {sub.name}")
    if sub == ValueType.STRING:
        buf, pos, end = cur.buf, cur.pos, cur.end
        out = []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(n):
            if pos + 8 > end:
                cur.pos = pos
                cur.need(8, f"string in array {key!r}")
            (ln,) = unpack(buf, pos)
            pos += 8
            if pos + ln > end:
                cur.pos = pos
                cur.need(ln, f"string in array {key!r}")
            out.append(str(buf[pos:pos + ln], "utf-8", "surrogateescape"))
            pos += ln
        cur.pos = pos
        return out, (ValueType.ARRAY, sub)
    items, infos = [], []
    for _ in range(n):  # each element is itself (subtype u32, count u64, data)
        v, info = _read_value(cur, ValueType.ARRAY, key, depth + 1)
        items.append(v)
        infos.append(info)
    return items, (ValueType.ARRAY, ValueType.ARRAY, tuple(infos))


def _advise(mm: mmap.mmap, start: int, end: int, advice: str) -> None:
    """madvise over the whole pages inside [start, end) of a mapping; advice only, so a platform
    without it (or a refusal) changes nothing."""
    page = mmap.PAGESIZE
    start, end = -(-start // page) * page, end // page * page
    if end > start and hasattr(mm, "madvise") and hasattr(mmap, advice):
        try:
            mm.madvise(getattr(mmap, advice), start, end - start)
        except (OSError, ValueError):
            pass


class GGUFFile:
    """An open GGUF model (one file, or all shards of a gguf-split model opened from the first).

    ``metadata`` maps keys to Python values (numeric arrays as numpy arrays, string arrays as lists);
    ``value_types`` keeps each key's GGUF type so that a writer can reproduce the file exactly.
    ``tensors`` maps names to :class:`TensorInfo` in file order.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._maps: list[mmap.mmap] = []
        self._files = []
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.shards: list[str] = []
        try:
            self._open_all()
        except BaseException:
            self.close()
            raise

    # ---- opening -------------------------------------------------------------------------
    def _open_all(self) -> None:
        first = self._open_one(self.path, 0, primary=True)
        self.shards.append(self.path)
        count = int(self.metadata.get("split.count", 1) or 1)
        if count > 1:
            m = _SPLIT_RE.match(os.path.basename(self.path))
            if not m or int(m.group(2)) != 1:
                raise GGUFError(f"{self.path}: a split model ({count} shards) must be opened from its first shard "
                                f"'<name>-00001-of-{count:05d}.gguf'")
            base = os.path.join(os.path.dirname(self.path), m.group(1))
            for i in range(1, count):
                p = f"{base}-{i + 1:05d}-of-{count:05d}.gguf"
                if not os.path.exists(p):
                    raise GGUFError(f"{self.path}: shard {i + 1} of {count} is missing: expected {p}")
                self._open_one(p, i, primary=False)
                self.shards.append(p)
            want = self.metadata.get("split.tensors.count")
            if want is not None and int(want) != len(self.tensors):
                raise GGUFError(f"{self.path}: split.tensors.count says {want} tensors, the shards hold {len(self.tensors)}")
        del first

    def _open_one(self, path: str, shard: int, primary: bool) -> None:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise GGUFError(f"cannot open {path}: {e.strerror}") from None
        self._files.append(f)
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFError(f"{path}: not a GGUF file: {size} bytes is shorter than a GGUF header (24 bytes)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._maps.append(mm)
        buf = memoryview(mm)
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file: expected magic b'GGUF', found {bytes(buf[:4])!r}")
        cur = _Cursor(buf, 4, path)
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            if swapped in (1, 2, 3):
                raise GGUFError(f"{path}: big-endian GGUF (version {swapped} byte-swapped) is not supported; "
                                f"expected a little-endian file")
            raise GGUFError(f"{path}: unsupported GGUF version {version}; expected one of {SUPPORTED_VERSIONS}")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # each kv takes at least 8+0+4+1 bytes and each tensor info at least 8+4+8+4+8 bytes
        remaining = size - cur.pos
        if n_kv * 13 > remaining:
            raise GGUFError(f"{path}: header claims {n_kv} metadata entries, more than {remaining} bytes can hold")
        if n_tensors * 32 > remaining:
            raise GGUFError(f"{path}: header claims {n_tensors} tensors, more than {remaining} bytes can hold")
        meta: dict[str, Any] = {}
        types: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            if key in meta:
                raise GGUFError(f"{path}: duplicate metadata key {key!r}")
            vt = cur.u32(f"type of {key!r}")
            meta[key], types[key] = _read_value(cur, vt, key)
        if primary:
            self.version = version
            self.metadata, self.value_types = meta, types
        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{path}: general.alignment must be a positive power of two, found {align!r}")
        if primary:
            self.alignment = align
        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.u32(f"dimension count of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions; expected 1..{MAX_DIMS}")
            shape = tuple(cur.u64(f"shape of {name!r}") for _ in range(n_dims))
            n = 1
            for d in shape:
                n *= d
            if n >= 2 ** 62:
                raise GGUFError(f"{path}: tensor {name!r} shape {list(shape)} has an absurd element count")
            type_id = cur.u32(f"type of {name!r}")
            off = cur.u64(f"offset of {name!r}")
            infos.append((name, shape, type_id, off))
        data_start = cur.pos + (-cur.pos) % align
        if data_start > size:
            raise GGUFError(f"{path}: truncated: the data section would start at {data_start}, the file has {size} bytes")
        if primary:
            self.data_offset = data_start
        spans = []
        for name, shape, type_id, off in infos:
            if name in self.tensors:
                raise GGUFError(f"{path}: duplicate tensor name {name!r}")
            if off % align:
                raise GGUFError(f"{path}: tensor {name!r} data offset {off} is not a multiple of the alignment {align}")
            ti = TensorInfo(name, shape, type_id, data_start + off, shard)
            t = ti.type
            if t is not None:
                if shape[0] % t.block_size:
                    raise GGUFError(f"{path}: tensor {name!r} of type {t.name} has rows of {shape[0]} elements, "
                                    f"not a whole number of {t.block_size}-element blocks")
                if ti.offset + ti.nbytes > size:
                    raise GGUFError(f"{path}: tensor {name!r} data [{ti.offset}, {ti.offset + ti.nbytes}) lies outside "
                                    f"the file ({size} bytes): truncated or corrupt")
                spans.append((ti.offset, ti.offset + ti.nbytes, name))
            self.tensors[name] = ti
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise GGUFError(f"{path}: tensor data overlap: {an!r} [{a0}, {a1}) and {bn!r} [{b0}, {b1})")
        del buf, cur
        # The header (a 262k-token vocabulary is ~5 MB) was parsed into Python objects: give its pages
        # back, so that the mapping's resident size is only the tensor bytes that are really read.
        _advise(mm, 0, data_start, "MADV_DONTNEED")

    # ---- access ----------------------------------------------------------------------------
    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def arch_key(self, suffix: str, default=None):
        """``{general.architecture}.{suffix}``, as llama.cpp's LLM_KV does."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a zero-copy uint8 view of the mapped file."""
        from ..errors import QuantError

        ti = self.info(name)
        if ti.type is None:
            raise QuantError(f"tensor {name!r} has ggml type id {ti.type_id}, which this version of ggtorch does not know")
        return np.frombuffer(self._maps[ti.shard], dtype=np.uint8, count=ti.nbytes, offset=ti.offset)

    def copy(self, name: str) -> np.ndarray:
        """The tensor's bytes as a fresh array read with pread, not through the mapping: a norm vector
        read this way does not fault the mapping's read-ahead window (8 MB on this machine's disk)
        into the process's resident set."""
        ti = self.info(name)
        out = np.empty(ti.nbytes, dtype=np.uint8)
        fd, got = self._files[ti.shard].fileno(), 0
        while got < ti.nbytes:
            n = os.preadv(fd, [memoryview(out)[got:]], ti.offset + got)
            if n <= 0:
                raise GGUFError(f"{self.path}: short read of tensor {name!r} at byte {ti.offset + got}")
            got += n
        return out

    def rows(self, name: str, ids: np.ndarray, row_bytes: int) -> np.ndarray:
        """Rows ``ids`` of a matrix tensor ([n, row_bytes] uint8), read with pread: an embedding lookup
        that does not fault the mapping. With large page-cache folios (ext4 since Linux 6.16) one
        faulted row maps its whole folio, so 128 looked-up rows of Gemma 3's 262k-row table made
        90 MB resident; llama.cpp's get_rows reads the mapping, and its tied output then reads the
        whole table anyway, which ours does from the repacked copy."""
        ti = self.info(name)
        out = np.empty((len(ids), row_bytes), dtype=np.uint8)
        fd = self._files[ti.shard].fileno()
        for i, r in enumerate(ids.tolist()):
            if not 0 <= r < ti.nbytes // row_bytes:
                raise IndexError(f"row {r} of {name!r} is out of range")
            if os.preadv(fd, [out[i]], ti.offset + r * row_bytes) != row_bytes:
                raise GGUFError(f"{self.path}: short read of row {r} of tensor {name!r}")
        return out

    def row_source(self, name: str) -> tuple[int, int]:
        """(file descriptor, byte offset) of a tensor's first byte, for a caller that reads its rows with
        pread itself (model/decode.py's one-token step, as :meth:`rows` does); valid while this file is open."""
        ti = self.info(name)
        return self._files[ti.shard].fileno(), ti.offset

    def release(self, name: str, start: int = 0, end: int | None = None) -> None:
        """Let the kernel drop the resident pages of this tensor's bytes [start, end) (a repacked copy
        is used instead). The mapping is private and unmodified, so a later read simply faults the
        bytes in from the file again."""
        ti = self.info(name)
        end = ti.nbytes if end is None else min(end, ti.nbytes)
        _advise(self._maps[ti.shard], ti.offset + start, ti.offset + end, "MADV_DONTNEED")

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def close(self) -> None:
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # views still alive: the map goes when they do
        for f in self._files:
            f.close()
        self._maps, self._files = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
