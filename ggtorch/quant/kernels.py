"""Fast kernels for QWeight, chosen per tensor type ("fast" mode; measured in shared/notes/perf-probes.md
and benchmarks/).

- With the JIT kernel (quant/jit.py, csrc/qdot.cpp; built on first use when a C++ compiler exists):
  Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 keep their block scales and multiply int8-quantized
  activations the way llama.cpp does (per group of 32, or 16 for Q6_K). The values keep the file's 4,
  5, 6 or 8 bits; the scales are float16 per group, except K-quants, which keep their int8 sub-block
  scales and mins with d and dmin per 256 (the "K layout": 4.625 bits a weight for Q4_K, 6.56 for
  Q6_K). For one token it takes half the time of PyTorch's int4 kernel at 1.1B shapes, and it drops
  the int8 per-row requantization below. Without the JIT library, PyTorch's kernels:
- Q4_0, Q4_1, Q4_K: repacked once for PyTorch's int4 weight-only matmul (`_weight_int4pack_mm_for_cpu`),
  which computes w = (q - 8) * scale + zero per 32-element group with bf16 activations. The maps are
  exact in real arithmetic: Q4_0 scale d, zero 0; Q4_1 scale d, zero m + 8d; Q4_K scale d*sc,
  zero 8*d*sc - dmin*m. 4.5 bits per weight, the same as the GGUF blocks.
- Every other quantized type (Q8_0, Q5_0, Q6_K, ...): requantized once to int8 with one scale per
  row for `_weight_int8pack_mm` (8 bits per weight, half a bf16 copy, 2.3x faster than bf16 for one
  token). This is the one approximate step: a block whose scale is far below its row's largest gets
  fewer levels (on SmolLM2's Q8_0 output matrix: 0.09 sigma largest logit error, KL 0.001). For
  many rows at once (prefill) the int8 rows are widened to bf16 and multiplied, which is faster there.
- Weights that read the same input (Q/K/V, FFN gate/up) are fused into one matrix when their kernels
  agree, so one call replaces two or three.
The exact path (float32 dequantize-and-multiply) stays the default.
"""
from __future__ import annotations

import torch

from .dequant import _bits, _f16, _k_scale_min, _nibbles, _q5
from .linear import QWeight

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
PLANE_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q5_K")  # two int4 planes per weight (see _plane_parts)
INT8_MAX_ROWS = 16  # above this many activation rows, widen int8 to bf16 and use a GEMM
FORMAT = "9"  # the repacked layout's version: bump when what install() stores changes (keys the repack cache)
QDOT_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


def repack_format() -> str:
    """FORMAT plus whether the JIT kernel is in use (the stored state differs)."""
    from . import jit

    return FORMAT + ("-qdot" if jit.available() else "")


def _int4_parts(w: QWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N, K] int32 in 0..15, scale and zero [N, K/32] float32."""
    return _int4_parts_rows(w, w.raw)


def _nibbles_u8(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] uint8: low nibbles, then high nibbles (ggml's q4 order), no widening."""
    return torch.cat((qs & 15, qs >> 4), dim=1)


def _int4_parts_rows(w: QWeight, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, K, t = raw.shape[0], w.in_features, w.type.name
    b = raw.reshape(-1, w.type.type_size)
    if t in ("Q4_0", "Q4_1"):
        at = 2 if t == "Q4_0" else 4
        q = _nibbles_u8(b[:, at:at + 16])
        d = _f16(b, 0)
        z = torch.zeros_like(d) if t == "Q4_0" else _f16(b, 2) + 8 * d
        return q.reshape(N, K), d.reshape(N, K // 32), z.reshape(N, K // 32)
    # Q4_K: 8 sub-blocks of 32 per 256-element block
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    s = d * sc.float()
    z = 8 * s - dmin * mn.float()
    q = _nibbles_u8(b[:, 16:144].reshape(n * 4, 32)).reshape(n, 256)
    return q.reshape(N, K), s.reshape(N, K // 32), z.reshape(N, K // 32)


def _affine_parts(w: QWeight, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the types with one scale per 32 values: integers q [n, K] and a, b [n, K/32] float32 with
    value = a * q + b, read from the blocks (ggml's dequantize_row_q8_0 / q5_0 / q5_1 / q5_K)."""
    t, K = w.type.name, w.in_features
    b = raw.reshape(-1, w.type.type_size)
    if t == "Q8_0":
        q, a = b[:, 2:34].contiguous().view(torch.int8).to(torch.int32), _f16(b, 0)
        off = torch.zeros_like(a)
    elif t == "Q5_0":
        q, a = _q5(b, 2, 6), _f16(b, 0)
        off = -16 * a
    elif t == "Q5_1":
        q, a, off = _q5(b, 4, 8), _f16(b, 0), _f16(b, 2)
    else:  # Q5_K: 8 groups of 32 per 256-element block, 6-bit scales and mins
        n = b.shape[0]
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _k_scale_min(b[:, 4:16])
        a, off = d * sc.float(), -dmin * mn.float()
        q = _q5k_values(b)
    rows = raw.shape[0]
    return q.reshape(rows, K), a.reshape(rows, K // 32), off.reshape(rows, K // 32)


def _plane_parts(w: QWeight, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights as two int4 planes side by side, [hi | lo] along K, for the int4 kernel: with
    q = 16 hi + lo (lo in 0..15, hi in -8..7), a*q + b = (hi + 8 - 8) * 16a + ((lo - 8) * a + 8a + b).
    So x @ W.T = [x, x] @ [H, L].T with H's groups scaled 16a (zero 0) and L's scaled a (zero 8a + b):
    the file's block scales are kept, and the product is exact before bf16 rounding (16a and 8a are
    a's bf16 rounding times a power of two)."""
    q, a, b = _affine_parts(w, raw)
    hi, lo = ((q >> 4) + 8).to(torch.uint8), (q & 15).to(torch.uint8)
    return (torch.cat((hi, lo), 1), torch.cat((16 * a, a), 1), torch.cat((torch.zeros_like(a), 8 * a + b), 1))


def _q6k_values(b: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks [n, 210] -> the unsigned 6-bit values [n, 256] uint8 in order (ql low/high nibbles, qh pairs)."""
    from .dequant import _shifts

    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64)
    ql = torch.cat((ql & 0xF, ql >> 4), dim=2).reshape(n, 8, 32)
    qh = b[:, 128:192].to(torch.int32).reshape(n, 2, 1, 32)
    qh = ((qh >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 1, 4, 1)) & 3).to(torch.uint8).reshape(n, 8, 32)
    return (ql | (qh << 4)).reshape(n, 256)


def _q5k_values(b: torch.Tensor) -> torch.Tensor:
    """Q5_K blocks [n, 176] -> the 5-bit values [n, 256] int32 (low nibbles at 48, high bits at 16)."""
    n = b.shape[0]
    ql = _nibbles(b[:, 48:176].reshape(n * 4, 32)).reshape(n, 8, 32)
    return (ql | (_bits(b[:, 16:48], 8).transpose(1, 2) << 4)).reshape(n, 256)


def _q6k_parts(w: QWeight, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q6_K as u [n, K] in 0..63 with a = d*sc per 16 values and b = -32a (ggml's dequantize_row_q6_K)."""
    n = raw.numel() // w.type.type_size
    b = raw.reshape(n, w.type.type_size)
    u = _q6k_values(b)
    a = _f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    rows = raw.shape[0]
    return u.reshape(rows, -1), a.reshape(rows, -1), (-32 * a).reshape(rows, -1)


ZOFF = {"Q4_0": -8.0, "Q5_0": -16.0, "Q6_K": -32.0, "Q8_0": -128.0}  # types whose offset is a multiple of the scale
# how llama.cpp quantizes the activations each weight type multiplies (its type_traits vec_dot_type)
AMODE = {"Q4_0": 0, "Q5_0": 0, "Q8_0": 0, "Q4_1": 1, "Q5_1": 1, "Q4_K": 2, "Q5_K": 2, "Q6_K": 2}


def _qdot_parts(w: QWeight, raw: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """(unsigned values u [n, K] uint8, bits, dw, mw [n, K/G] float32) with value = dw[g] * u + mw[g]."""
    t, K = w.type.name, w.in_features
    if t in INT4_TYPES:  # value = (q - 8) * s + z
        q, s_, z = _int4_parts_rows(w, raw)
        u, dw, mw, bits = q, s_, z - 8 * s_, 4
    elif t == "Q6_K":
        u, dw, mw = _q6k_parts(w, raw)
        bits = 6
    else:
        q, a, b = _affine_parts(w, raw)
        if t == "Q8_0":  # signed: store q + 128
            u, dw, mw, bits = q + 128, a, b - 128 * a, 8
        else:  # Q5_0, Q5_1, Q5_K: 0..31
            u, dw, mw, bits = q, a, b, 5
    return u.to(torch.uint8).reshape(raw.shape[0], K), bits, dw.float(), mw.float()


K_TYPES = ("Q4_K", "Q5_K", "Q6_K")  # kept in their two levels of scales (csrc/qdot.cpp's K layout)


def _qdot_kparts(w: QWeight, raw: torch.Tensor):
    """A K-quant's own two levels: (u [n, K] uint8, bits, sc int8 [n, K/G], mn int8 [n, K/G] or None,
    d float32 [n, K/256], -dmin float32 [n, K/256] or None), value = d * sc * u - dmin * mn (Q4_K, Q5_K:
    ggml's get_scale_min_k4) or d * sc * (u - 32) (Q6_K)."""
    t, K, rows = w.type.name, w.in_features, raw.shape[0]
    b = raw.reshape(-1, w.type.type_size)
    if t == "Q6_K":
        u, bits = _q6k_values(b), 6
        sc, mn = b[:, 192:208].contiguous().view(torch.int8), None
        d, dm = _f16(b, 208), None
    else:
        sc, mn = (v.to(torch.int8) for v in _k_scale_min(b[:, 4:16]))
        d, dm = _f16(b, 0), -_f16(b, 2)
        if t == "Q4_K":
            u, bits = _nibbles_u8(b[:, 16:144].reshape(-1, 32)).reshape(-1, 256), 4
        else:
            u, bits = _q5k_values(b).to(torch.uint8), 5

    def r(v):
        return None if v is None else v.reshape(rows, -1)

    return u.reshape(rows, K), bits, r(sc), r(mn), r(d), r(dm)


def _tile_rows(s: torch.Tensor, t: int, dtype) -> torch.Tensor:
    """Per-row values [t*16, k] -> [tiles, k * 16]: each tile's 16 rows side by side."""
    return s.to(dtype).reshape(t, 16, -1).transpose(1, 2).reshape(t, -1).contiguous()


def _pad_rows(v: torch.Tensor | None, pad: int) -> torch.Tensor | None:
    return v if v is None or not pad else torch.cat((v, v.new_zeros(pad, v.shape[1])))


def _qdot_ktiles(u, bits, sc, mn, d, dm) -> dict:
    """The K layout's tensors (padded rows get zero scales)."""
    pad = -u.shape[0] % 16
    t = (u.shape[0] + pad) // 16
    qw = _qdot_values(_pad_rows(u, pad), bits, u.shape[1] // sc.shape[1])
    st = {"qw": qw, "sc": _tile_rows(_pad_rows(sc, pad), t, torch.int8),
          "dw": _tile_rows(_pad_rows(d, pad), t, torch.float16)}
    if mn is not None:
        st["mn"] = _tile_rows(_pad_rows(mn, pad), t, torch.int8)
        st["mw"] = _tile_rows(_pad_rows(dm, pad), t, torch.float16)
    return st


def _qdot_tiles(u: torch.Tensor, bits: int, dw: torch.Tensor, mw: torch.Tensor | None):
    """csrc/qdot.cpp's layout: rows padded to a multiple of 16 (zero scales), 16 rows side by side group
    by group, 4 values of each row per 64-byte step; scales as float16 [tiles, groups * 16]."""
    n, K = u.shape
    pad = -n % 16
    u, dw, mw = _pad_rows(u, pad), _pad_rows(dw, pad), _pad_rows(mw, pad)
    t = (n + pad) // 16
    q = _qdot_values(u, bits, K // dw.shape[1])
    return q, _tile_rows(dw, t, torch.float16), None if mw is None else _tile_rows(mw, t, torch.float16)


def _qdot_values(u: torch.Tensor, bits: int, G: int) -> torch.Tensor:
    """The values of rows u [t*16, K] (padded) in the tile layout, [tiles, bytes]."""
    n, K = u.shape
    ng, t = K // G, n // 16
    q = u.reshape(t, 16, ng, G // 4, 4).permute(0, 2, 3, 1, 4)  # [tile, group, step, row, 4]
    if bits == 8:
        q = q.reshape(t, -1).contiguous()
    else:  # steps 2p (low nibbles) and 2p + 1 (high nibbles) share 64 bytes
        lo = q & 15
        parts = [(lo[:, :, 0::2] | (lo[:, :, 1::2] << 4)).reshape(t, ng, -1)]
        if bits > 4:  # then one 64-byte block of the high bits: step s at bit (bits - 4) * s of each byte
            hi = (q >> 4).to(torch.int32)
            hb = bits - 4
            packed = sum(hi[:, :, s] << (hb * s) for s in range(G // 4))  # [tile, group, row, 4]
            parts.append(packed.to(torch.uint8).reshape(t, ng, 64))
        q = torch.cat(parts, dim=2).reshape(t, -1).contiguous()
    return q


def _qdot_alloc(t: str, N: int, K: int) -> dict:
    """Uninitialized tensors for N rows of type t in csrc/qdot.cpp's layout (qdot_repack writes every byte)."""
    bits, G = {"Q4": 4, "Q5": 5, "Q6": 6, "Q8": 8}[t[:2]], 16 if t == "Q6_K" else 32
    tiles, ng = (N + 15) // 16, K // G
    gb = 16 * G if bits == 8 else 8 * G if bits == 4 else 8 * G + 64
    kq = t in K_TYPES
    st = {"qw": torch.empty(tiles, ng * gb, dtype=torch.uint8),
          "dw": torch.empty(tiles, (K // 256 if kq else ng) * 16, dtype=torch.float16)}
    if t in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
        st["mw"] = torch.empty_like(st["dw"])
    if kq:
        st["sc"] = torch.empty(tiles, ng * 16, dtype=torch.int8)
        if t != "Q6_K":
            st["mn"] = torch.empty_like(st["sc"])
    st["zoff"] = torch.tensor([-32.0 if t == "Q6_K" else 0.0 if kq else ZOFF.get(t, 0.0)])
    st["amode"] = torch.tensor([AMODE[t]], dtype=torch.int32)
    return st


def _qdot_fill(lib, w: QWeight, st: dict, row0: int = 0) -> bool:
    """Repack w's rows into st from row row0 on (a multiple of 16) with the library's loop."""
    tile0 = row0 // 16

    def p(k):
        return st[k][tile0:].data_ptr() if k in st else None

    return lib.qdot_repack(w.type.id, w.raw.data_ptr(), w.out_features, w.in_features, w.type.type_size, p("qw"),
                           p("dw"), p("mw"), p("sc"), p("mn")) == 0


def _qdot_pack_jit(w: QWeight) -> dict | None:
    """_qdot_pack's result from the JIT library's one-pass loop (csrc/repack.cpp); None without it."""
    from . import jit

    lib = jit.library()
    if lib is None or not w.raw.is_contiguous():
        return None
    st = _qdot_alloc(w.type.name, w.out_features, w.in_features)
    return st if _qdot_fill(lib, w, st) else None


def qdot_fused(ws: list[QWeight | None]):
    """Weights that share an input (Q/K/V, gate/up) repacked straight into one fused matrix, without
    packing each and concatenating (that copy was an eighth of a 1.1B model's load); None when the
    parts cannot share one JIT layout (then install() and fuse() take them one by one)."""
    from . import jit

    lib = jit.library()
    if lib is None or any(w is None or w.type.name not in QDOT_TYPES or w.out_features % 16 or w.dense is not None
                          or w.device.type != "cpu" or w.kernel is not None or not w.raw.is_contiguous() for w in ws):
        return None
    if len({w.type.name for w in ws}) != 1 or len({w.in_features for w in ws}) != 1:
        return None
    st = _qdot_alloc(ws[0].type.name, sum(w.out_features for w in ws), ws[0].in_features)
    row = 0
    for w in ws:
        if not _qdot_fill(lib, w, st, row):
            return None
        row += w.out_features
    for w in ws:
        if w.release is not None:
            w.release()
    return Fused.from_state(qdot_kernel, st, [w.out_features for w in ws], ws[0].in_features)


def _qdot_pack(w: QWeight, chunk: int = 4096, jit: bool = True) -> dict:
    """The weight in csrc/qdot.cpp's layout: by the JIT library's loop when it is there (``jit``),
    else with PyTorch a chunk of rows at a time (the reference the tests hold the loop to)."""
    st = _qdot_pack_jit(w) if jit else None
    if st is not None:
        return st
    parts = []
    kq = w.type.name in K_TYPES
    zoff = -32.0 if w.type.name == "Q6_K" else 0.0 if kq else ZOFF.get(w.type.name)
    for i in range(0, w.out_features, chunk):
        if kq:
            parts.append(_qdot_ktiles(*_qdot_kparts(w, w.raw[i:i + chunk])))
        else:
            u, bits, dw, mw = _qdot_parts(w, w.raw[i:i + chunk])
            q, d, m = _qdot_tiles(u, bits, dw, None if zoff is not None else mw)
            parts.append({"qw": q, "dw": d} if m is None else {"qw": q, "dw": d, "mw": m})
        if w.release is not None:
            w.release(i * w.row_bytes, (i + chunk) * w.row_bytes)
    st = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    st["zoff"] = torch.tensor([zoff or 0.0])
    st["amode"] = torch.tensor([AMODE[w.type.name]], dtype=torch.int32)
    return st


def qdot_unpack(st: dict, K: int) -> torch.Tensor:
    """The float32 weights [N (padded to 16), K] a qdot state stands for (tests, debugging)."""
    from .jit import layout

    qw, dw = st["qw"], st["dw"]
    bits, G = layout(K, qw, dw, st.get("sc"))
    t, ng = qw.shape[0], K // G
    if bits == 8:
        q = qw.view(t, ng, -1, 16, 4)  # [tile, group, step, row, 4]
    else:
        g = qw.view(t, ng, -1)
        lo = g[:, :, :8 * G].reshape(t, ng, -1, 16, 4)  # step pairs
        q = torch.stack((lo & 15, lo >> 4), dim=3).reshape(t, ng, G // 4, 16, 4)
        if bits > 4:
            hb = bits - 4
            h = g[:, :, 8 * G:].reshape(t, ng, 1, 16, 4).to(torch.int32)
            steps = torch.arange(G // 4, dtype=torch.int32).view(1, 1, -1, 1, 1)
            q = q | (((h >> (hb * steps)) & ((1 << hb) - 1)) << 4).to(torch.uint8)
    q = q.permute(0, 3, 1, 2, 4).reshape(t * 16, K).float()

    def rows(s):
        return s.view(t, -1, 16).transpose(1, 2).reshape(t * 16, -1).float()

    if "sc" in st:  # the K layout: d and -dmin per 256 values, sc and mn per group
        ns = 256 // G
        d = rows(dw).repeat_interleave(ns, 1) * rows(st["sc"])
        if "mn" in st:
            m = rows(st["mw"]).repeat_interleave(ns, 1) * rows(st["mn"])
        else:
            m = float(st["zoff"]) * d
    else:
        d = rows(dw)
        m = rows(st["mw"]) if "mw" in st else float(st["zoff"]) * d
    return (q.view(t * 16, ng, G) * d[..., None] + m[..., None]).view(t * 16, K)


def qdot_linear(w):
    """The JIT library's handle on a weight with the qdot kernel (a jit.Linear: its struct and tensors)."""
    st = w.state
    f = getattr(w, "_qdot", None)
    if f is None or f.tensors[0] is not st["qw"]:  # built on first use (and again if the state was replaced)
        from .jit import Linear

        f = w._qdot = Linear(w.in_features, st["qw"], st["dw"], st.get("mw"), float(st["zoff"]), int(st["amode"]),
                             n=w.out_features, sc=st.get("sc"), mn=st.get("mn"))
    return f


def qdot_kernel(x: torch.Tensor, w) -> torch.Tensor:
    y = qdot_linear(w)(x.reshape(-1, w.in_features))
    if not getattr(w, "refine_top", 0):
        return y.view(*x.shape[:-1], w.out_features)
    return _finish(y, x, w)


REFINE_TOP = 16  # output-matrix rows recomputed in float32 per token (see _finish)


def _finish(y: torch.Tensor, x: torch.Tensor, w) -> torch.Tensor:
    """float32 [..., out] from the kernel's bf16 [M, out]. These kernels round their output to bf16
    (8 significant bits: a logit of 16 is known to 0.06). For the output matrix (``w.refine_top``
    set by model.repack) the largest logits of each row are recomputed in float32 from their
    dequantized rows, so the probable tokens get exact logits; the measured KL to llama.cpp on
    SmolLM2 fell from 0.0056 to 0.0047 for ~0.1 ms a token."""
    y = y.float()
    k = getattr(w, "refine_top", 0)
    if k:
        xf = x.reshape(-1, x.shape[-1]).float()
        idx = y.topk(min(k, y.shape[-1]), dim=-1).indices
        rows = w.dequantize(idx.reshape(-1)).view(idx.shape[0], idx.shape[1], -1)
        y.scatter_(1, idx, torch.bmm(rows, xf[:, :, None])[..., 0])
    return y.reshape(*x.shape[:-1], w.out_features)


def int4_kernel(x: torch.Tensor, w) -> torch.Tensor:
    shape = x.shape
    y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), w.state["packed"], 32,
                                          w.state["sz"])
    return _finish(y, x, w)


def planes_kernel(x: torch.Tensor, w) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    y = torch._weight_int4pack_mm_for_cpu(torch.cat((x2, x2), 1), w.state["packed"], 32, w.state["sz"])
    return _finish(y, x, w)


def _pack(parts, w: QWeight, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """int4-pack ``parts(w, raw rows)`` a chunk of rows at a time (the int32 temporaries stay small);
    chunks are multiples of 64 rows, the packed layout's row block, so they concatenate."""
    packed, sz = [], []
    for i in range(0, w.out_features, chunk):
        q, s, z = parts(w, w.raw[i:i + chunk])
        packed.append(_int4pack(q))
        sz.append(torch.stack((s.T.to(torch.bfloat16), z.T.to(torch.bfloat16)), dim=-1))
        if w.release is not None:
            w.release(i * w.row_bytes, (i + chunk) * w.row_bytes)
    return torch.cat(packed), torch.cat(sz, dim=1).contiguous()


def _int4pack_bytes(q: torch.Tensor) -> torch.Tensor:
    """PyTorch's CPU int4 layout with AVX-512 (weight_to_int4pack_kernel), written with byte ops: per
    64-row block and column k, 32 bytes; byte d < 16 holds rows d and d+32, byte 16+d rows 16+d and
    48+d (low nibble first). 10x less memory traffic than the int32 input the converter takes."""
    N, K = q.shape
    u = q.to(torch.uint8).view(N // 64, 4, 16, K)
    b = torch.cat((u[:, 0] | (u[:, 2] << 4), u[:, 1] | (u[:, 3] << 4)), dim=1)  # [N/64, 32, K]
    return b.transpose(1, 2).contiguous().view(N, K // 2)


def _byte_packing_matches() -> bool:
    """Whether _int4pack_bytes reproduces this build's converter (checked once, on a random matrix)."""
    global _BYTES_OK
    if _BYTES_OK is None:
        q = torch.randint(0, 16, (128, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        _BYTES_OK = torch.equal(_int4pack_bytes(q), torch._convert_weight_to_int4pack_for_cpu(q, 1))
    return _BYTES_OK


_BYTES_OK = None


def _int4pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 -> the packed weight for _weight_int4pack_mm_for_cpu."""
    if q.shape[0] % 64 == 0 and _byte_packing_matches():
        return _int4pack_bytes(q)
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def int8_kernel(x: torch.Tensor, w) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    q, s = w.state["q8"], w.state["s8"]
    if x2.shape[0] <= INT8_MAX_ROWS:
        y = torch._weight_int8pack_mm(x2, q, s)
    else:  # y = (x @ q^T) * s, the same product with the int8 rows widened once per call
        y = (x2 @ q.to(torch.bfloat16).T) * s
    return _finish(y, x, w)


def _int8_rows(w: QWeight, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Requantize to int8 [N, K] with one bf16 scale per row (round to nearest, symmetric)."""
    q = torch.empty(w.out_features, w.in_features, dtype=torch.int8)
    s = torch.empty(w.out_features, dtype=torch.bfloat16)
    for i in range(0, w.out_features, chunk):
        rows = w.dequantize(slice(i, i + chunk))
        sc = (rows.abs().amax(1) / 127).to(torch.bfloat16)
        safe = torch.where(sc > 0, sc.float(), torch.ones_like(sc, dtype=torch.float32))
        q[i:i + chunk] = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        s[i:i + chunk] = sc
        if w.release is not None:  # a big matrix's file pages go as its int8 copy grows
            w.release(i * w.row_bytes, (i + chunk) * w.row_bytes)
    return q, s


def install(w: QWeight, planes: bool = True, qdot: bool = True) -> None:
    """Give ``w`` its fast kernel (on CPU), then let the file's pages of the repacked bytes go."""
    if w.dense is not None or w.device.type != "cpu" or w.kernel is not None:
        return
    if qdot and w.type.name in QDOT_TYPES:
        from . import jit

        if jit.available():
            w.state = _qdot_pack(w)
            w.kernel = qdot_kernel
            if w.release is not None:
                w.release()
            return
    # the int4 layout needs whole 32-value groups and rows in multiples of 16 (the converter's rule)
    int4 = w.in_features % 32 == 0 and w.out_features % 16 == 0 and hasattr(torch, "_weight_int4pack_mm_for_cpu")
    if w.type.name in INT4_TYPES and int4:
        w.state["packed"], w.state["sz"] = _pack(_int4_parts_rows, w)
        w.kernel = int4_kernel
    elif w.type.name in PLANE_TYPES and int4 and planes:
        w.state["packed"], w.state["sz"] = _pack(_plane_parts, w)
        w.kernel = planes_kernel
    else:
        w.state["q8"], w.state["s8"] = _int8_rows(w)
        w.kernel = int8_kernel
    if w.release is not None:
        w.release()


def trim_heap() -> None:
    """glibc keeps freed heap memory for reuse; malloc_trim returns whole free pages to the OS."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


class Fused:
    """Several weights with one input, concatenated along the output dimension."""

    def __init__(self, ws: list[QWeight] | None):
        if ws is None:  # filled by from_state
            return
        self.parts = [w.out_features for w in ws]
        self.out_features, self.in_features = sum(self.parts), ws[0].in_features
        self.kernel = ws[0].kernel
        if self.kernel is qdot_kernel:
            self.state = {k: torch.cat([w.state[k] for w in ws]) for k in ws[0].state if k not in ("zoff", "amode")}
            self.state["zoff"], self.state["amode"] = ws[0].state["zoff"], ws[0].state["amode"]
        elif self.kernel in (int4_kernel, planes_kernel):
            self.state = {"packed": torch.cat([w.state["packed"] for w in ws]),
                          "sz": torch.cat([w.state["sz"] for w in ws], dim=1).contiguous()}
        else:
            self.state = {"q8": torch.cat([w.state["q8"] for w in ws]), "s8": torch.cat([w.state["s8"] for w in ws])}

    @classmethod
    def from_state(cls, kernel, state: dict, parts: list[int], in_features: int) -> "Fused":
        """A fused matrix rebuilt from stored state (the repack cache)."""
        f = cls(None)
        f.kernel, f.state, f.parts = kernel, state, [int(p) for p in parts]
        f.out_features, f.in_features = sum(f.parts), int(in_features)
        return f


def fuse(ws: list[QWeight]) -> Fused | None:
    """One matrix for weights that share an input and a kernel; None when they cannot be fused."""
    if any(w is None or w.kernel not in (int4_kernel, planes_kernel, int8_kernel, qdot_kernel) for w in ws):
        return None
    if len({w.kernel for w in ws}) != 1 or len({w.in_features for w in ws}) != 1:
        return None
    if ws[0].kernel is qdot_kernel and (any(w.out_features % 16 for w in ws) or len(
            {(w.state["qw"].shape[1], w.state["dw"].shape[1], "mw" in w.state, "sc" in w.state, "mn" in w.state,
              float(w.state["zoff"]), int(w.state["amode"])) for w in ws}) != 1):
        return None  # one layout (bits, group) per matrix, and parts of whole 16-row tiles
    if ws[0].kernel in (int4_kernel, planes_kernel) and any(w.out_features % 64 for w in ws):
        return None  # the CPU int4 packing interleaves rows in blocks of 64: packed parts only concatenate whole blocks
    f = Fused(ws)
    for w in ws:  # the parts' own copies are no longer needed
        w.state, w.kernel = {}, None
    return f


KERNELS_BY_NAME = {"int4": int4_kernel, "int4x2": planes_kernel, "int8": int8_kernel, "qdot": qdot_kernel}
KERNEL_NAMES = {k: n for n, k in KERNELS_BY_NAME.items()}
