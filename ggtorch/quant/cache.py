"""A disk cache of repacked weights, so a model's second load skips repacking.

Repacking a 1.1B model's blocks for the fast kernels takes 4-20 s on 2 cores; reading the result back
through mmap takes a fraction of a second (llama.cpp maps its file the same way). One cache file per
model file lives in ``$XDG_CACHE_HOME/ggtorch/repack`` (``~/.cache/ggtorch/repack``), or in
``$GGTORCH_REPACK_CACHE`` when set.

- Key: the model file's identity (real path, size, mtime, inode, a hash of its first 1 MiB) and
  everything that shapes the repacked bytes (ggtorch version, kernel format, torch version, the CPU
  kernel ISA, since PyTorch's int4 packing layout depends on it). Any change gives a new key; the old
  entry for the same path is deleted when the new one is written.
- Format: magic, a JSON header (key, tensor table, caller's manifest), then 64-byte-aligned tensor
  bytes. Loaded with one copy-on-write memory map: pages are read on first use, as with the GGUF file.
- Written to a temporary file in the same directory, then renamed: readers never see a partial file.
  A file that fails validation (bad magic/header, wrong size, other key) is ignored and rebuilt.
- Size cap: ``GGTORCH_CACHE_MAX_MB`` (default 20480); least recently used entries are evicted first.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

MAGIC = b"GGTRPK01"
ALIGN = 64
DEFAULT_MAX_MB = 20480
_DTYPES = {str(d): d for d in (torch.uint8, torch.int8, torch.int32, torch.bfloat16, torch.float16, torch.float32)}


def cache_root() -> Path:
    if os.environ.get("GGTORCH_REPACK_CACHE"):  # an explicit directory (the test suite sets one)
        return Path(os.environ["GGTORCH_REPACK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ggtorch" / "repack"


def max_bytes() -> int:
    try:
        return int(float(os.environ.get("GGTORCH_CACHE_MAX_MB", DEFAULT_MAX_MB)) * 2**20)
    except ValueError:
        return DEFAULT_MAX_MB * 2**20


def file_key(path: str, fmt: str) -> dict:
    """What identifies the repacked form of ``path``: the file, and the code and CPU that repack it."""
    from .. import __version__

    real = os.path.realpath(path)
    st = os.stat(real)
    with open(real, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "head_sha256": head,
            "ggtorch": __version__, "format": fmt, "torch": torch.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability()}


def entry_path(key: dict) -> Path:
    """One file per model path; the file name carries a digest of the whole key."""
    where = hashlib.sha256(key["path"].encode()).hexdigest()[:16]
    what = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = os.path.basename(key["path"]).rsplit(".", 1)[0][:48]
    return cache_root() / f"{stem}-{where}-{what}.gtrp"


_writing: dict[str, threading.Thread] = {}  # entry path -> the thread writing it (save_in_background)
_cancel = threading.Event()  # set by cancel_writes(): writers stop at their next chunk
CHUNK = 16 << 20  # bytes written per call, so that a cancelled write stops within one chunk


class _Cancelled(Exception):
    pass


def save_in_background(key: dict, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    """save() on a thread, so the model is ready while its repacked form is written (writing a 1.1B
    model's 0.6-1.2 GB took longer than repacking it). A load of the same entry in this process waits
    for the write; the interpreter waits for it at exit (a non-daemon thread). The file appears
    whole or not at all either way (save() writes a temporary file and renames it)."""
    path = str(entry_path(key))
    t = threading.Thread(target=_save_low_priority, args=(key, tensors, manifest), name="ggtorch-repack-cache")
    _writing[path] = t
    t.start()


def _save_low_priority(key: dict, tensors: dict, manifest: dict) -> None:
    """save() at the lowest CPU priority for this thread (Linux gives each thread its own nice value):
    the first decode steps run beside the write, and with as many compute threads as cores a writer
    at equal priority preempts one of them, stalling the others at every barrier (gpt-oss 4-layer:
    18 tok/s in the first process against 68 warm)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: write at the process's priority
        pass
    save(key, tensors, manifest)


def cancel_writes() -> None:
    """Stop the background writes (Ctrl-C): each removes its temporary file and ends; no entry is
    written. Call flush() after it to wait for them."""
    _cancel.set()
    for path in list(_writing):
        t = _writing.pop(path, None)
        if t is not None:
            t.join()
    _cancel.clear()


def flush() -> None:
    """Wait for every write save_in_background started."""
    for path in list(_writing):
        t = _writing.pop(path, None)
        if t is not None:
            t.join()


def load(key: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, manifest) from a valid entry for ``key``, or None (missing, stale or damaged)."""
    p = entry_path(key)
    pending = _writing.pop(str(p), None)
    if pending is not None:
        pending.join()
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            if f.read(8) != MAGIC:
                return None
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                return None
            hdr = json.loads(f.read(n).decode("utf-8"))
        if hdr.get("key") != key or hdr.get("file_size") != size:
            return None
        buf = torch.from_numpy(np.memmap(p, dtype=np.uint8, mode="c", shape=(size,)))
        out = {}
        for name, (dtype, shape, off, nbytes) in hdr["tensors"].items():
            if off % ALIGN or off + nbytes > size or dtype not in _DTYPES:
                return None
            t = buf[off:off + nbytes].view(_DTYPES[dtype])
            out[name] = t.reshape(shape)
        os.utime(p)  # recently used: evicted last
        return out, hdr["manifest"]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, UnicodeDecodeError, struct.error):
        return None


def save(key: dict, tensors: dict[str, torch.Tensor], manifest: dict) -> Path | None:
    """Write an entry atomically; returns its path, or None when it does not fit or cannot be written."""
    total, table = 0, {}
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        table[name] = [str(t.dtype), list(t.shape), 0, nb]
        total += nb + ALIGN
    cap = max_bytes()
    if total > cap:
        return None
    root = cache_root()
    p = entry_path(key)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        # offsets depend on the header's length, which depends on the offsets: fix the header size first
        def header(start: int) -> bytes:
            off = start
            for name in tensors:
                table[name][2] = off
                off += -(-table[name][3] // ALIGN) * ALIGN
            return json.dumps({"key": key, "file_size": off, "tensors": table, "manifest": manifest}).encode()

        start = ALIGN
        while True:
            h = header(start)
            need = -(-(16 + len(h)) // ALIGN) * ALIGN
            if need <= start:
                break
            start = need
        h = header(start)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gtrp", dir=root)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(h)) + h)
            f.write(b"\0" * (start - 16 - len(h)))
            for name, t in tensors.items():
                data = memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())
                for i in range(0, len(data), CHUNK):
                    if _cancel.is_set():
                        raise _Cancelled
                    f.write(data[i:i + CHUNK])
                f.write(b"\0" * (-len(data) % ALIGN))
        _evict(total, keep_path=key["path"])
        os.replace(tmp, p)
        tmp = None
        return p
    except (OSError, _Cancelled):
        return None
    finally:  # also on KeyboardInterrupt, when save() runs on the main thread: no partial file stays
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _evict(incoming: int, keep_path: str) -> None:
    """Delete entries for the same model path (stale) and, oldest use first, others over the cap."""
    root = cache_root()
    prefix = "-" + hashlib.sha256(keep_path.encode()).hexdigest()[:16] + "-"
    entries = []
    for q in root.glob("*.gtrp"):
        try:
            st = q.stat()
        except OSError:
            continue
        if q.name.startswith(".tmp-"):  # another writer's, or left by a crash: removed once an hour old
            if st.st_mtime < time.time() - 3600:
                q.unlink(missing_ok=True)
            continue
        if prefix in q.name:
            q.unlink(missing_ok=True)
        else:
            entries.append((st.st_mtime, st.st_size, q))
    used = sum(e[1] for e in entries) + incoming
    for _, size, q in sorted(entries):
        if used <= max_bytes():
            break
        q.unlink(missing_ok=True)
        used -= size
