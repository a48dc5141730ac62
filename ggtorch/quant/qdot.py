"""The JIT kernel's side of fast mode: weights in csrc/qdot.cpp's tile layout and the kernel that
multiplies them (see the layout comment in csrc/qdot.cpp).

What each type stores is said once, in quant/types/ (its family's module and the TypeSpec it
registers): the values keep the file's 2, 3, 4, 5, 6 or 8 bits (IQ4's 4-bit indices into their table;
the grid i-quants' entries as 2-, 3- or 4-bit indices of their signed values, types.LUTS), 16 rows
interleaved; the scales are float16 per group (and an offset where it is not a multiple of the scale;
MXFP4 keeps its e8m0 exponent byte, whose range float16 lacks: types/mxfp4.py), except the K layout (K-quants, the 256-value i-quants), which keeps the file's int8 sub-block scales (and
mins) with d (and dmin) per 256 values (4.625 bits a weight for Q4_K, 6.56 for Q6_K, 2.625 for Q2_K).
Activations are quantized as llama.cpp quantizes them for each type (TypeSpec.amode). The repacking is
done by the library's one-pass loop (csrc/repack.cpp) and, as the reference and fallback, by PyTorch
(_qdot_pack with jit=False) from the family's block reader; both give the same bytes.
"""
from __future__ import annotations

import torch

from .fused import Fused, finish
from .types import E8M0, G_IQ1M, G_IQ1S, G_IQ2S, G_IQ2XS, G_IQ3S, G_IQ3XXS, IQ1S, SM4, TYPES, grid_codes, lut, oscale
from .types.mxfp4 import e8m0_byte, e8m0_scale

QDOT_TYPES = tuple(TYPES)
K_TYPES = tuple(n for n, s in TYPES.items() if s.klayout)  # kept in their two levels of scales
AMODE = {n: s.amode for n, s in TYPES.items()}


def _values(flags: int, u: torch.Tensor) -> torch.Tensor:
    """The unsigned values the kernel multiplies: the stored ones, or their table entries (types.LUTS:
    what the kernel's byte shuffle makes of an index)."""
    t = lut(flags)
    return u if t is None else torch.tensor(t, dtype=torch.uint8, device=u.device)[u.long()]


def _k_scales(flags: int, zoff: float, d: torch.Tensor, sc: torch.Tensor, dm, mn) -> tuple[torch.Tensor, torch.Tensor]:
    """The K layout's per-group scale and offset [n, groups] from d (and -dmin) already repeated per
    group and the int8 sc (and mn), as the kernel forms them (ktile): exact in float32."""
    if flags & SM4:  # Q2_K: the file's scale | min << 4
        b = sc.view(torch.uint8).int()
        return d * (b & 15).float(), dm * (b >> 4).float()
    d = d * oscale(flags)
    if flags & IQ1S:  # IQ1_S: ls | delta sign << 3, value = d * (2 ls + 1) * (u - 1 -+ 1/8)
        b = sc.view(torch.uint8).int()
        s = d * (2 * (b & 7) + 1).float()
        return s, s * torch.where((b & 8) != 0, -1.125, -0.875)
    s = d * sc.float()
    return s, dm * mn.float() if mn is not None else zoff * s


def _qdot_parts(w, raw: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Any JIT type in one flat form: (unsigned values u [n, K] uint8, bits, dw, mw [n, K/G] float32) with
    value = dw[g] * u + mw[g] (K layouts' two levels multiplied out; table types' values looked up, 8 bits)."""
    spec = TYPES[w.type.name]
    p = spec.read(w, raw)
    u, bits = _values(spec.flags, p["u"]), 8 if lut(spec.flags) else spec.bits
    if not spec.klayout:
        mw = p["mw"] if spec.mins else spec.zoff * p["dw"]
        return u, bits, p["dw"].float(), mw.float()
    ns = 256 // spec.G
    dm = None if p["dm"] is None else p["dm"].repeat_interleave(ns, 1)
    dw, mw = _k_scales(spec.flags, spec.zoff, p["d"].repeat_interleave(ns, 1), p["sc"], dm, p["mn"])
    return u, bits, dw, mw


def _tile_rows(s: torch.Tensor, t: int, dtype) -> torch.Tensor:
    """Per-row values [t*16, k] -> [tiles, k * 16]: each tile's 16 rows side by side."""
    return s.to(dtype).reshape(t, 16, -1).transpose(1, 2).reshape(t, -1).contiguous()


def _pad_rows(v: torch.Tensor | None, pad: int) -> torch.Tensor | None:
    return v if v is None or not pad else torch.cat((v, v.new_zeros(pad, v.shape[1])))


def _qdot_ktiles(u, bits, sc, mn, d, dm, grid: dict | None = None) -> dict:
    """The K layout's tensors (padded rows get zero scales); dm (-dmin per 256) with or without mn (SM4
    keeps the mins in sc's high nibble). grid: a grid layout's code and the reader's gi/neg (then the
    values are stored as those indices)."""
    pad = -u.shape[0] % 16
    t = (u.shape[0] + pad) // 16
    G = u.shape[1] // sc.shape[1]
    if grid is not None:
        qw = _grid_values(grid["code"], GRID_UNIT, _pad_rows(grid["gi"], pad), _pad_rows(grid.get("neg"), pad),
                          _pad_rows(grid.get("dl"), pad))
    else:
        qw = _qdot_values(_pad_rows(u, pad), bits, G)
    st = {"qw": qw, "sc": _tile_rows(_pad_rows(sc, pad), t, torch.int8),
          "dw": _tile_rows(_pad_rows(d, pad), t, torch.float16)}
    if mn is not None:
        st["mn"] = _tile_rows(_pad_rows(mn, pad), t, torch.int8)
    if dm is not None:
        st["mw"] = _tile_rows(_pad_rows(dm, pad), t, torch.float16)
    return st


def _qdot_tiles(u: torch.Tensor, bits: int, dw: torch.Tensor, mw: torch.Tensor | None, flags: int = 0):
    """csrc/qdot.cpp's layout: rows padded to a multiple of 16 (zero scales), 16 rows side by side group
    by group, 4 values of each row per 64-byte step; scales as float16 [tiles, groups * 16] (E8M0: the
    scales' exponent bytes, uint8, padding rows 0)."""
    n, K = u.shape
    pad = -n % 16
    if flags & E8M0:
        dw = e8m0_byte(dw)
    u, dw, mw = _pad_rows(u, pad), _pad_rows(dw, pad), _pad_rows(mw, pad)
    t = (n + pad) // 16
    q = _qdot_values(u, bits, K // dw.shape[1])
    d = _tile_rows(dw, t, torch.uint8 if flags & E8M0 else torch.float16)
    return q, d, None if mw is None else _tile_rows(mw, t, torch.float16)


def _qdot_values(u: torch.Tensor, bits: int, G: int) -> torch.Tensor:
    """The values of rows u [t*16, K] (padded) in the tile layout, [tiles, bytes]."""
    n, K = u.shape
    ng, t = K // G, n // 16
    q = u.reshape(t, 16, ng, G // 4, 4).permute(0, 2, 3, 1, 4)  # [tile, group, step, row, 4]
    if bits == 8:
        return q.reshape(t, -1).contiguous()
    if bits <= 3:  # steps 4p..4p+3 at bits 0, 2, 4, 6 of one 64-byte block
        lo = (q & 3).reshape(t, ng, G // 16, 4, 16, 4)
        parts = [(lo[:, :, :, 0] | (lo[:, :, :, 1] << 2) | (lo[:, :, :, 2] << 4) | (lo[:, :, :, 3] << 6)).reshape(t, ng, -1)]
        if bits == 3:  # per 4-step block, bit s = step s's high bit; positions 4r + j < 32 in low nibbles, the rest in high
            hb = ((q >> 2) & 1).reshape(t, ng, G // 16, 4, 16, 4)
            nib = (hb[:, :, :, 0] | (hb[:, :, :, 1] << 1) | (hb[:, :, :, 2] << 2) | (hb[:, :, :, 3] << 3)).reshape(t, ng, -1, 64)
            parts.append((nib[..., :32] | (nib[..., 32:] << 4)).reshape(t, ng, -1))
        return torch.cat(parts, dim=2).reshape(t, -1).contiguous()
    # steps 2p (low nibbles) and 2p + 1 (high nibbles) share 64 bytes
    lo = q & 15
    parts = [(lo[:, :, 0::2] | (lo[:, :, 1::2] << 4)).reshape(t, ng, -1)]
    if bits > 4:  # then one 64-byte block of the high bits: step s at bit (bits - 4) * s of each byte
        hi = (q >> 4).to(torch.int32)
        hb = bits - 4
        packed = sum(hi[:, :, s] << (hb * s) for s in range(G // 4))  # [tile, group, row, 4]
        parts.append(packed.to(torch.uint8).reshape(t, ng, 64))
    return torch.cat(parts, dim=2).reshape(t, -1).contiguous()


GRID_UNIT = 32  # the grid layout's storage unit (csrc/tiles.h): one scale group, or two of 16 values


def _grid_values(code: int, G: int, gi: torch.Tensor, neg: torch.Tensor | None, dl: torch.Tensor | None = None) -> torch.Tensor:
    """csrc/tiles.h's grid layout of rows (padded) with entry indices gi [n, entries] and sign bits neg
    [n, K] (none for IQ1_S, IQ1_M; IQ1_M's delta signs dl [n, entries]), [tiles, bytes]: per unit the index
    bytes (entry, row), the high-bit plane (IQ2_XS, IQ3_S: a u16 of 9th bits per entry; IQ2_S: a u32 of 2-bit
    fields; IQ1_S, IQ1_M: a nibble per row), the sign masks per step."""
    n, K = gi.shape[0], gi.shape[1] * (4 if code in (G_IQ3XXS, G_IQ3S) else 8)
    t, ng = n // 16, K // G
    e = gi.reshape(t, 16, ng, -1).permute(0, 2, 3, 1)  # [tile, group, entry, row]
    parts = [(e & 255).to(torch.uint8).reshape(t, ng, -1)]
    if code in (G_IQ2XS, G_IQ3S):
        h = (((e >> 8) & 1) << torch.arange(16)).sum(-1)  # [tile, group, entry]: bit r for row r
        parts.append(torch.stack((h & 255, h >> 8), -1).to(torch.uint8).reshape(t, ng, -1))
    if code == G_IQ2S:  # a u32 per entry: row r's 2 high bits at bits 2r, 2r + 1
        h = (((e >> 8) & 3) << (2 * torch.arange(16))).sum(-1)
        parts.append(torch.stack([(h >> (8 * i)) & 255 for i in range(4)], -1).to(torch.uint8).reshape(t, ng, -1))
    if code in (G_IQ1S, G_IQ1M):  # a nibble per row: 3 high bits (IQ1_M: | the entry's delta sign << 3)
        h = (e >> 8) & 7
        if dl is not None:
            h = h | (dl.reshape(t, 16, ng, -1).permute(0, 2, 3, 1) << 3)
        parts.append((h[..., 0::2] | (h[..., 1::2] << 4)).to(torch.uint8).reshape(t, ng, -1))
    if neg is not None:  # per step, bit 4r + j: row r's value 4s + j
        b = neg.reshape(t, 16, ng, G // 4, 4).permute(0, 2, 3, 1, 4).reshape(t, ng, G // 4, 8, 8).to(torch.int32)
        parts.append((b << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8).reshape(t, ng, -1))
    return torch.cat(parts, dim=2).reshape(t, -1).contiguous()


def _grid_unpack(code: int, G: int, K: int, qw: torch.Tensor) -> torch.Tensor:
    """The stored values (before the table) [tiles * 16, K] of a grid layout, as the kernel unpacks them."""
    name = {G_IQ3XXS: "IQ3_XXS", G_IQ3S: "IQ3_S", G_IQ1S: "IQ1_S", G_IQ1M: "IQ1_S", G_IQ2XS: "IQ2_XS",
            G_IQ2S: "IQ2_S"}.get(code, "IQ2_XXS")
    per = 4 if code in (G_IQ3XXS, G_IQ3S) else 8
    t, ng, ne = qw.shape[0], K // G, G // per
    g = qw.view(t, ng, -1)
    idx, at = g[:, :, :16 * ne].reshape(t, ng, ne, 16).long(), 16 * ne
    if code in (G_IQ2XS, G_IQ3S):
        h = g[:, :, at:at + 2 * ne].reshape(t, ng, ne, 2).long()
        idx = idx | ((((h[..., 0] | (h[..., 1] << 8)).unsqueeze(-1) >> torch.arange(16)) & 1) << 8)
        at += 2 * ne
    if code == G_IQ2S:
        h = g[:, :, at:at + 4 * ne].reshape(t, ng, ne, 4).long()
        hw = h[..., 0] | (h[..., 1] << 8) | (h[..., 2] << 16) | (h[..., 3] << 24)
        idx = idx | (((hw.unsqueeze(-1) >> (2 * torch.arange(16))) & 3) << 8)
        at += 4 * ne
    if code in (G_IQ1S, G_IQ1M):
        h = g[:, :, at:at + 8 * ne].reshape(t, ng, ne, 8).long()
        nib = torch.stack((h & 15, h >> 4), -1).reshape(t, ng, ne, 16)
        idx = idx | ((nib & 7) << 8)
    u = grid_codes(name)[idx]  # [tile, group, entry, row, per]
    if code == G_IQ1M:  # the delta sign, bit 3 of the nibble, on all 8 values as bit 2
        u = u | (((nib >> 3) & 1) << 2).to(torch.uint8).unsqueeze(-1)
    u = u.permute(0, 3, 1, 2, 4).reshape(t * 16, K)
    if code not in (G_IQ1S, G_IQ1M):
        sg = g[:, :, at:at + 2 * G].reshape(t, ng, G // 4, 8, 1)
        bits = ((sg >> torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 1, 8)) & 1).reshape(t, ng, G // 4, 16, 4)
        bits = bits.permute(0, 3, 1, 2, 4).reshape(t * 16, K)
        if code == G_IQ3S:  # (g + 15) / 2 -> (15 - g) / 2 = 15 - (g + 15) / 2
            return torch.where(bits == 1, 15 - u, u)
        u = u | (bits << (3 if code == G_IQ3XXS else 2))
    return u


def group_bytes(bits: int, G: int) -> int:
    """Bytes of one tile's group (16 rows x G values), as csrc/tiles.h's group_bytes (grid codes 9..12)."""
    return {8: 16 * G, 4: 8 * G, 2: 4 * G, 3: 6 * G, G_IQ1S: 3 * G, 10: 4 * G, G_IQ2XS: 4 * G + G // 4,
            G_IQ3XXS: 6 * G, G_IQ2S: 4 * G + G // 2, G_IQ1M: 3 * G, G_IQ3S: 6 * G + G // 2}.get(bits, 8 * G + 64)


def _scalars(spec) -> dict:
    return {"zoff": torch.tensor([spec.zoff]), "amode": torch.tensor([spec.amode], dtype=torch.int32),
            "flags": torch.tensor([spec.flags], dtype=torch.int32)}


def _qdot_alloc(t: str, N: int, K: int) -> dict:
    """Uninitialized tensors for N rows of type t in csrc/qdot.cpp's layout (qdot_repack writes every byte)."""
    spec = TYPES[t]
    tiles, ng = (N + 15) // 16, K // spec.G
    st = {"qw": torch.empty(tiles, ng * group_bytes(spec.lbits, spec.G), dtype=torch.uint8),
          "dw": torch.empty(tiles, (K // 256 if spec.klayout else ng) * 16,
                            dtype=torch.uint8 if spec.flags & E8M0 else torch.float16)}
    if spec.mins:
        st["mw"] = torch.empty_like(st["dw"])
    if spec.klayout:
        st["sc"] = torch.empty(tiles, ng * 16, dtype=torch.int8)
        if spec.mins and not spec.flags & SM4:
            st["mn"] = torch.empty_like(st["sc"])
    st.update(_scalars(spec))
    return st


def _qdot_fill(lib, w, st: dict, row0: int = 0, chunk_bytes: int = 8 << 20) -> bool:
    """Repack w's rows into st from row row0 on (a multiple of 16) with the library's loop, ~8 MB of
    the file at a time, each slice's file pages released as soon as it is repacked (w.release): a
    large matrix (Gemma 3's 178 MB tied table) is then never resident twice, file and copy."""
    step = max(16, chunk_bytes // w.row_bytes // 16 * 16)
    for r in range(0, w.out_features, step):
        n, tile0 = min(step, w.out_features - r), (row0 + r) // 16

        def p(k):
            return st[k][tile0:].data_ptr() if k in st else None

        if lib.qdot_repack(w.type.id, w.raw.data_ptr() + r * w.row_bytes, n, w.in_features, w.type.type_size,
                           p("qw"), p("dw"), p("mw"), p("sc"), p("mn")) != 0:
            return False
        if w.release is not None:
            w.release(r * w.row_bytes, (r + n) * w.row_bytes)
    return True


def _qdot_pack_jit(w) -> dict | None:
    """_qdot_pack's result from the JIT library's one-pass loop (csrc/repack.cpp); None without it."""
    from . import jit

    lib = jit.library()
    if lib is None or not w.raw.is_contiguous():
        return None
    st = _qdot_alloc(w.type.name, w.out_features, w.in_features)
    return st if _qdot_fill(lib, w, st) else None


def qdot_fused(ws: list):
    """Weights that share an input (Q/K/V, gate/up) repacked straight into one fused matrix, without
    packing each and concatenating (that copy was an eighth of a 1.1B model's load); None when the
    parts cannot share one JIT layout (then install() and fuse() take them one by one)."""
    from . import jit

    lib = jit.library()
    if lib is None or any(w is None or w.type.name not in TYPES or w.out_features % 16 or w.dense is not None
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


def _qdot_pack(w, chunk: int = 4096, jit: bool = True) -> dict:
    """The weight in csrc/qdot.cpp's layout: by the JIT library's loop when it is there (``jit``),
    else with PyTorch from the family's block reader, a chunk of rows at a time (the reference the
    tests hold the loop to)."""
    st = _qdot_pack_jit(w) if jit else None
    if st is not None:
        return st
    spec = TYPES[w.type.name]
    parts = []
    for i in range(0, w.out_features, chunk):
        p = spec.read(w, w.raw[i:i + chunk])
        if spec.klayout:
            grid = {"code": spec.glayout, "gi": p["gi"], "neg": p.get("neg"), "dl": p.get("dl")} if spec.glayout else None
            parts.append(_qdot_ktiles(p["u"], spec.bits, p["sc"], p["mn"], p["d"], p["dm"], grid))
        else:
            q, d, m = _qdot_tiles(p["u"], spec.bits, p["dw"].float(), p["mw"].float() if spec.mins else None,
                                  spec.flags)
            parts.append({"qw": q, "dw": d} if m is None else {"qw": q, "dw": d, "mw": m})
        if w.release is not None:
            w.release(i * w.row_bytes, (i + chunk) * w.row_bytes)
    st = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    st.update(_scalars(spec))
    return st


def _flags(st: dict) -> int:
    return int(st["flags"]) if "flags" in st else 0


def qdot_unpack(st: dict, K: int) -> torch.Tensor:
    """The float32 weights [N (padded to 16), K] a qdot state stands for (tests, debugging)."""
    from .jit import layout

    qw, dw = st["qw"], st["dw"]
    flags = _flags(st)
    bits, G = layout(K, qw, dw, st.get("sc"), flags)
    t, ng = qw.shape[0], K // G
    g = qw.view(t, ng, -1)
    if bits > 8:
        q = None
    elif bits == 8:
        q = qw.view(t, ng, -1, 16, 4)  # [tile, group, step, row, 4]
    elif bits <= 3:
        lo = g[:, :, :4 * G].reshape(t, ng, -1, 1, 16, 4)  # blocks of 4 steps
        q = ((lo >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1, 1)) & 3).reshape(t, ng, G // 4, 16, 4)
        if bits == 3:  # 32 bytes of nibbles per 4-step block
            h = g[:, :, 4 * G:].reshape(t, ng, G // 16, 32)
            nib = torch.cat((h & 15, h >> 4), dim=3).reshape(t, ng, G // 16, 1, 16, 4)
            steps = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4, 1, 1)
            q = q | (((nib >> steps) & 1) << 2).reshape(t, ng, G // 4, 16, 4)
    else:
        lo = g[:, :, :8 * G].reshape(t, ng, -1, 16, 4)  # step pairs
        q = torch.stack((lo & 15, lo >> 4), dim=3).reshape(t, ng, G // 4, 16, 4)
        if bits > 4:
            hb = bits - 4
            h = g[:, :, 8 * G:].reshape(t, ng, 1, 16, 4).to(torch.int32)
            steps = torch.arange(G // 4, dtype=torch.int32).view(1, 1, -1, 1, 1)
            q = q | (((h >> (hb * steps)) & ((1 << hb) - 1)) << 4).to(torch.uint8)
    q = _grid_unpack(bits, GRID_UNIT, K, qw) if q is None else q.permute(0, 3, 1, 2, 4).reshape(t * 16, K)
    q = _values(flags, q).float()

    def rows(s):
        return s.view(t, -1, 16).transpose(1, 2).reshape(t * 16, -1).float()

    if "sc" in st:  # the K layout: d and -dmin per 256 values, sc and mn per group
        ns = 256 // G
        dm = rows(st["mw"]).repeat_interleave(ns, 1) if "mw" in st else None
        sc = st["sc"].view(t, -1, 16).transpose(1, 2).reshape(t * 16, -1)
        mn = rows(st["mn"]) if "mn" in st else None
        d, m = _k_scales(flags, float(st["zoff"]), rows(dw).repeat_interleave(ns, 1), sc, dm, mn)
    else:
        d = e8m0_scale(dw.view(t, -1, 16).transpose(1, 2).reshape(t * 16, -1)) if flags & E8M0 else rows(dw)
        m = rows(st["mw"]) if "mw" in st else float(st["zoff"]) * d
    return (q.view(t * 16, ng, G) * d[..., None] + m[..., None]).view(t * 16, K)


def qdot_linear(w):
    """The JIT library's handle on a weight with the qdot kernel (a jit.Linear: its struct and tensors)."""
    st = w.state
    f = getattr(w, "_qdot", None)
    if f is None or f.tensors[0] is not st["qw"]:  # built on first use (and again if the state was replaced)
        from .jit import Linear

        f = w._qdot = Linear(w.in_features, st["qw"], st["dw"], st.get("mw"), float(st["zoff"]), int(st["amode"]),
                             n=w.out_features, sc=st.get("sc"), mn=st.get("mn"), flags=_flags(st))
    return f


def qdot_kernel(x: torch.Tensor, w) -> torch.Tensor:
    y = qdot_linear(w)(x.reshape(-1, w.in_features))
    if not getattr(w, "refine_top", 0):
        return y.view(*x.shape[:-1], w.out_features)
    return finish(y, x, w)  # the output matrix's float32 top logits (PyTorch kernels' rounding)
