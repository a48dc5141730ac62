"""The JIT kernel's side of fast mode: weights in csrc/qdot.cpp's tile layout and the kernel that
multiplies them (see the layout comment in csrc/qdot.cpp).

The values keep the file's 4, 5, 6 or 8 bits, 16 rows interleaved; the scales are float16 per group
(and an offset where it is not a multiple of the scale), except K-quants, which keep their int8
sub-block scales and mins with d and dmin per 256 (4.625 bits a weight for Q4_K, 6.56 for Q6_K).
Activations are quantized as llama.cpp quantizes them for each type (AMODE). The repacking is done
by the library's one-pass loop (csrc/repack.cpp) and, as the reference and fallback, by PyTorch
(_qdot_pack with jit=False); both give the same bytes.
"""
from __future__ import annotations

import torch

from .blocks import INT4_TYPES, _affine_parts, _int4_parts_rows, _nibbles_u8, _q5k_values, _q6k_parts, _q6k_values
from .dequant import _f16, _k_scale_min
from .linear import QWeight

QDOT_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
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
    from .kernels import Fused

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
    from .kernels import _finish  # the output matrix's float32 top logits (PyTorch kernels' rounding)

    return _finish(y, x, w)
