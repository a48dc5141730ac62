"""Classic porting bugs, planted on purpose, to show that ``diff`` finds where a fault enters.

File faults rewrite tensor bytes in a copy of a GGUF so that a *correct* reader computes what a buggy
port would compute from the original file:

- ``q6k-sequential``: Q6_K values taken in sequential order instead of ggml's interleaved one
  (dequantize_row_q6_K writes outputs l, l+32, l+64, l+96 from one ql/qh byte group);
- ``transpose``: a square weight read as [in, out] instead of [out, in] (a non-square one would fail
  loudly; square Q/O matrices hide the bug);
- ``unpermute-qk``: attn_q/attn_k rows put back in Hugging Face order, which is what a port sees
  when it pairs RoPE dimensions as halves (NEOX) on a llama-arch GGUF whose converter permuted them.

Runtime faults switch a bug on in the forward (``Transformer.faults``): ``position-offset`` (RoPE
positions start at 1), ``no-causal-mask``, ``rms-eps`` (a wrong epsilon).
"""
from __future__ import annotations

import numpy as np

from ..errors import GGTorchError
from ..gguf.reader import GGUFFile
from ..gguf.writer import GGUFWriter
from ..quant.dequant import dequantize

FILE_FAULTS = ("q6k-sequential", "transpose", "unpermute-qk")
RUNTIME_FAULTS = {"position-offset": ("position_offset", int, 1), "no-causal-mask": ("no_causal_mask", bool, True),
                  "rms-eps": ("rms_eps", float, 1.0)}


class FaultError(GGTorchError):
    """A fault that cannot be planted as asked."""


def parse_runtime(spec: str) -> dict:
    """``position-offset``, ``position-offset=2``, ``rms-eps=0.5``, ``no-causal-mask`` -> faults dict."""
    name, _, value = spec.partition("=")
    if name not in RUNTIME_FAULTS:
        raise FaultError(f"unknown runtime fault {name!r}; expected one of {', '.join(RUNTIME_FAULTS)}")
    key, typ, default = RUNTIME_FAULTS[name]
    try:
        v = default if not value else (value.lower() in ("1", "true", "yes") if typ is bool else typ(value))
    except ValueError:
        raise FaultError(f"fault {name}: expected a {typ.__name__} value, found {value!r}") from None
    return {key: v}


def entry_point(tensor: str) -> str:
    """The first traced tensor a broken weight touches (what ``diff`` should name)."""
    if tensor.startswith("token_embd"):
        return "inp_embd"
    if tensor.startswith("output."):
        return "result_output"
    il, kind = tensor.split(".")[1], tensor.split(".")[2]
    return {"attn_q": "Qcur", "attn_k": "Kcur", "attn_v": "Vcur", "attn_output": "attn_out",
            "ffn_gate": "ffn_out", "ffn_up": "ffn_out", "ffn_down": "ffn_out"}[kind] + f"-{il}"


# ---- Q6_K in sequential order -----------------------------------------------------------------------
def _q6k_interleaved_slots():
    """For output position i of a Q6_K block: (ql byte, ql shift, qh byte, qh shift), ggml's layout."""
    i = np.arange(256)
    n, k, l = i // 128, (i % 128) // 32, i % 32
    return n * 64 + l + 32 * (k % 2), 4 * (k // 2), n * 32 + l, 2 * k


def _q6k_sequential_slots():
    """The naive reading: value i from nibble i%2 of ql[i//2] and bit pair i%4 of qh[i//4]."""
    i = np.arange(256)
    return i // 2, 4 * (i % 2), i // 4, 2 * (i % 4)


def q6k_sequential(raw: np.ndarray) -> np.ndarray:
    """Q6_K blocks re-encoded so that a correct decoder yields what a sequential-order decoder reads."""
    b = raw.reshape(-1, 210).copy()
    ql, qh = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32)
    qi, si, hi, sh = _q6k_sequential_slots()
    codes = ((ql[:, qi] >> si) & 15) | (((qh[:, hi] >> sh) & 3) << 4)  # [nb, 256] as the buggy port sees
    qi, si, hi, sh = _q6k_interleaved_slots()
    new_ql, new_qh = np.zeros_like(ql), np.zeros_like(qh)
    for pos in range(256):
        new_ql[:, qi[pos]] |= (codes[:, pos] & 15) << si[pos]
        new_qh[:, hi[pos]] |= (codes[:, pos] >> 4) << sh[pos]
    b[:, :128], b[:, 128:192] = new_ql.astype(np.uint8), new_qh.astype(np.uint8)
    return b.reshape(raw.shape)


# ---- Q/K rows in Hugging Face order -----------------------------------------------------------------
def unpermute_rows(raw: np.ndarray, n_rows: int, n_head: int) -> np.ndarray:
    """Undo the converter's per-head permutation (row h*hd + 2j + s <- h*hd + s*hd/2 + j)."""
    rows = raw.reshape(n_rows, -1)
    hd = n_rows // n_head
    j, s = np.meshgrid(np.arange(hd // 2), np.arange(2), indexing="ij")  # gguf row 2j+s
    hf_of_gguf = np.empty(hd, dtype=np.int64)
    hf_of_gguf[(2 * j + s).reshape(-1)] = (s * (hd // 2) + j).reshape(-1)
    order = np.empty(hd, dtype=np.int64)  # HF row r comes from GGUF row order[r]
    order[hf_of_gguf] = np.arange(hd)
    idx = (np.arange(n_head)[:, None] * hd + order[None, :]).reshape(-1)
    return rows[idx].reshape(raw.shape)


# ---- planting ---------------------------------------------------------------------------------------
def default_tensor(f: GGUFFile, fault: str) -> str:
    names = list(f.tensors)
    if fault == "q6k-sequential":
        cands = [n for n in names if f.tensors[n].type and f.tensors[n].type.name == "Q6_K"]
        if not cands:
            raise FaultError(f"{f.path}: no Q6_K tensor to plant q6k-sequential in")
        blk = [n for n in cands if n.startswith("blk.")]
        return (blk or cands)[0]
    if fault == "transpose":
        for n in names:
            ti = f.tensors[n]
            if n.startswith("blk.") and len(ti.shape) == 2 and ti.shape[0] == ti.shape[1]:
                return n
        raise FaultError(f"{f.path}: no square weight to transpose")
    return ""


def plant(src: str, dst: str, fault: str, tensor: str | None = None) -> list[str]:
    """Write a copy of ``src`` carrying ``fault``; returns the names of the tensors changed."""
    if fault not in FILE_FAULTS:
        raise FaultError(f"unknown file fault {fault!r}; expected one of {', '.join(FILE_FAULTS)}")
    with GGUFFile(src) as f:
        arch = f.metadata.get("general.architecture")
        if fault == "unpermute-qk":
            n_head = int(f.metadata[f"{arch}.attention.head_count"])
            n_kv = int(f.metadata.get(f"{arch}.attention.head_count_kv", n_head))
            targets = {n: (n_head if ".attn_q." in n else n_kv) for n in f.tensors
                       if n.endswith((".attn_q.weight", ".attn_k.weight"))}
        else:
            t = tensor or default_tensor(f, fault)
            f.info(t)
            targets = {t: None}
        w = GGUFWriter(alignment=f.alignment)
        for k, v in f.metadata.items():
            if not k.startswith("split."):
                w.add(k, v, f.value_types[k])
        for ti in f:
            raw = np.array(f.raw(ti.name))
            if ti.name in targets:
                raw, typ = _rewrite(fault, ti, raw, targets[ti.name]), ti.type
                if fault == "transpose":
                    w.add_tensor(ti.name, raw, ti.type.name)
                    continue
            w.add_tensor(ti.name, raw, ti.type, ti.shape)
        w.write(dst)
    return list(targets)


def _rewrite(fault, ti, raw, n_head):
    if fault == "q6k-sequential":
        if ti.type.name != "Q6_K":
            raise FaultError(f"tensor {ti.name!r} is {ti.type.name}; q6k-sequential needs a Q6_K tensor")
        return q6k_sequential(raw)
    if fault == "unpermute-qk":
        return unpermute_rows(raw, ti.shape[1], n_head)
    # transpose
    if len(ti.shape) != 2 or ti.shape[0] != ti.shape[1]:
        raise FaultError(f"tensor {ti.name!r} has shape {list(ti.shape)}; transpose needs a square matrix")
    if ti.type.name not in ("F32", "F16"):
        raise FaultError(f"tensor {ti.name!r} is {ti.type.name}; transpose is planted in F32/F16 tensors only")
    dense = dequantize(raw, ti.type, ti.shape).numpy()
    return np.ascontiguousarray(dense.T).astype(np.float32 if ti.type.name == "F32" else np.float16)
