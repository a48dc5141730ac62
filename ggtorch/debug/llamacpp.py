"""The llama.cpp side of a diff: run the same tokens through llama-cpp-python (optional extra
``ggtorch[llama-cpp]``) and capture its named graph tensors with the scheduler's eval callback
(llama_context_params.cb_eval), the mechanism llama.cpp's own ``llama-eval-callback`` tool uses.

Tokens are given as ids, so both sides see exactly the same input; every position is marked as an
output so the last layer keeps all rows (llama.cpp otherwise drops to the output rows there).
"""
from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import GGTorchError
from .trace import Trace, tensor_stats

_GGML_F32, _GGML_F16 = 0, 1


class LlamaCppError(GGTorchError):
    """llama-cpp-python missing or failing."""


def _lib():
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppError("llama-cpp-python is not installed; install the optional extra: "
                            "pip install 'ggtorch[llama-cpp]' (builds llama.cpp, ~10 min on 2 cores)") from None
    base = Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(base.glob("libggml-base.*")) or sorted(base.glob("libggml.*"))
    if not cands:
        raise LlamaCppError(f"llama-cpp-python found, but not its ggml library under {base}")
    g = ctypes.CDLL(str(cands[0]))
    g.ggml_get_name.restype, g.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    g.ggml_nbytes.restype, g.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    g.ggml_nelements.restype, g.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    g.ggml_is_contiguous.restype, g.ggml_is_contiguous.argtypes = ctypes.c_bool, [ctypes.c_void_p]
    g.ggml_backend_tensor_get.restype = None
    g.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return llama_cpp, g


class _TensorHead(ctypes.Structure):
    # struct ggml_tensor begins with: enum ggml_type type; ggml_backend_buffer * buffer; int64_t ne[4]
    _fields_ = [("type", ctypes.c_int32), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]


def capture(path: str, ids: list[int], wanted: set[str] | None = None, threads: int | None = None,
            source: str = "llama.cpp") -> Trace:
    """Evaluate ``ids`` (positions 0..) with llama.cpp and return its trace of ``wanted`` tensor names
    (all F32/F16 named tensors when None). A name that occurs several times keeps its last value."""
    llama_cpp, g = _lib()
    llama_cpp.llama_backend_init()
    quiet = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    mp = llama_cpp.llama_model_default_params()
    mp.use_mmap = True
    model = llama_cpp.llama_model_load_from_file(os.fsencode(path), mp)
    if not model:
        raise LlamaCppError(f"llama.cpp could not load {path}")
    found: dict[str, torch.Tensor] = {}

    def want(name: str) -> bool:
        return bool(name) and (wanted is None or name in wanted)

    def cb(t, ask, user):
        head = _TensorHead.from_address(t)
        name = (g.ggml_get_name(t) or b"").decode(errors="replace")
        if ask:
            return want(name) and head.type in (_GGML_F32, _GGML_F16) and bool(g.ggml_is_contiguous(t))
        if not want(name):
            return True
        n = int(g.ggml_nelements(t))
        dt = np.float32 if head.type == _GGML_F32 else np.float16
        buf = np.empty(n, dtype=dt)
        g.ggml_backend_tensor_get(t, buf.ctypes.data, 0, buf.nbytes)
        shape = [int(d) for d in head.ne]
        while len(shape) > 1 and shape[-1] == 1:
            shape.pop()
        found[name] = torch.from_numpy(buf.astype(np.float32).reshape(shape[::-1]))
        return True

    cb_c = llama_cpp.ggml_backend_sched_eval_callback(cb)
    cp = llama_cpp.llama_context_default_params()
    T = len(ids)
    cp.n_ctx = max(64, 1 << math.ceil(math.log2(T)))
    cp.n_batch = cp.n_ubatch = max(T, 1)
    if threads:
        cp.n_threads = cp.n_threads_batch = int(threads)
    cp.cb_eval, cp.cb_eval_user_data = cb_c, None
    # llama-cpp-python's default (and the fixtures'): no flash attention
    cp.flash_attn_type = getattr(llama_cpp, "LLAMA_FLASH_ATTN_TYPE_DISABLED", 0)
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise LlamaCppError("llama.cpp could not create a context")
    batch = llama_cpp.llama_batch_init(T, 0, 1)
    try:
        for i, tok in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(tok), i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = T
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise LlamaCppError(f"llama_decode returned {rc}")
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    del cb_c, quiet
    return Trace(list(ids), {n: tensor_stats(t) for n, t in found.items()}, found, source)
