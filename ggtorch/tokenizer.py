"""Tokenizers built from GGUF metadata alone, mirroring llama.cpp's llama-vocab.cpp.

- SentencePiece (`tokenizer.ggml.model = llama`): merges by piece score (llm_tokenizer_spm), byte
  fallback through `<0xXX>` pieces, `add_space_prefix`.
- GPT-2 BPE (`gpt2`): pre-tokenizer regexes chosen by `tokenizer.ggml.pre` (llm_tokenizer_bpe),
  byte-level alphabet, merges by rank.
Special tokens are split out first (tokenizer_st_partition); control tokens only when asked.
"""
from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass

import numpy as np
import regex

from .errors import TokenizerError
from .special_tokens import A_BYTE, A_CONTROL, A_NORMAL, A_UNKNOWN, A_USER_DEFINED, SpecialTokens

# token types (llama_token_type) and what they mean as attributes
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃")

# gpt-4o / tekken: llama-vocab.cpp's forms of the tokenizer.json regexes, where "an upper-case letter" is
# ((?=[\p{L}])([^a-z])) and "a lower-case one" ((?=[\p{L}])([^A-Z])): llama.cpp runs them on text whose
# non-ASCII letters are collapsed into one letter class, so any non-ASCII letter counts as both cases;
# with Python's regex on the real text these two lookahead forms select exactly the same characters.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# regex sets of llm_tokenizer_bpe's constructor, by llama.cpp pre-tokenizer type
_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "starcoder": [r"\p{N}", _GPT2],
    "qwen2": [_QWEN2],
    "deepseek-llm": [r"[\r\n]", r"\s?[" + _DEEPSEEK_LLM_LETTERS + r"]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$",
                     r"[一-龥ࠀ-一가-퟿]+", r"\p{N}+"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "gpt-4o": [_GPT4O],
    "tekken": [_TEKKEN],
}
# tokenizer.ggml.pre -> (regex set, clean_spaces, ignore_merges, add_bos default), as llama_vocab::impl::load
PRE_TOKENIZERS: dict[str, tuple[str, bool, bool, bool]] = {
    "default": ("default", True, False, False),
    "gpt2": ("gpt2", True, False, False), "gpt-2": ("gpt2", True, False, False), "phi-2": ("gpt2", True, False, False),
    "mpt": ("gpt2", True, False, False), "olmo": ("gpt2", True, False, False),
    "llama3": ("llama3", True, True, True), "llama-v3": ("llama3", True, True, True),
    "llama-bpe": ("llama3", True, True, True), "falcon3": ("llama3", True, True, True),
    "dbrx": ("llama3", True, False, False), "smaug-bpe": ("llama3", True, False, False),
    "smollm": ("starcoder", False, False, False), "starcoder": ("starcoder", True, False, False),
    "refact": ("starcoder", True, False, False), "command-r": ("starcoder", False, False, False),
    "codeshell": ("starcoder", True, False, False), "exaone": ("starcoder", True, False, False),
    "minerva-7b": ("starcoder", True, False, False),
    "qwen2": ("qwen2", False, False, False), "deepseek-r1-qwen": ("qwen2", False, False, False),
    "stablelm2": ("qwen2", True, False, False), "megrez": ("qwen2", True, False, False),
    "deepseek-llm": ("deepseek-llm", False, False, False), "deepseek-coder": ("deepseek-coder", False, False, False),
    "falcon": ("falcon", True, False, False),
    "gpt-4o": ("gpt-4o", False, False, False), "llama4": ("gpt-4o", False, False, False),
    "tekken": ("tekken", False, True, True),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character alphabet."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


_B2U = _bytes_to_unicode()
_U2B = {c: b for b, c in _B2U.items()}


@dataclass
class Vocab:
    tokens: list[str]
    types: np.ndarray
    scores: np.ndarray | None


class Tokenizer:
    """`tokenize(text, special, bos)` and `detokenize(ids)` as llama.cpp's llama_tokenize/llama_detokenize."""

    def __init__(self, metadata: dict):
        g = metadata.get
        self.model = g("tokenizer.ggml.model")
        if self.model not in ("llama", "gpt2"):
            raise TokenizerError(f"tokenizer.ggml.model {self.model!r} is not supported; expected 'llama' (SentencePiece) "
                                 f"or 'gpt2' (BPE)")
        self.tokens: list[str] = g("tokenizer.ggml.tokens")
        if not self.tokens:
            raise TokenizerError("the file has no tokenizer.ggml.tokens")
        n = len(self.tokens)
        types = g("tokenizer.ggml.token_type")
        self.types = np.asarray(types, dtype=np.int32) if types is not None else np.full(n, NORMAL, np.int32)
        scores = g("tokenizer.ggml.scores")
        self.scores = np.asarray(scores, dtype=np.float32) if scores is not None else np.zeros(n, np.float32)
        if len(self.types) != n or len(self.scores) != n:
            raise TokenizerError(f"token_type/scores have {len(self.types)}/{len(self.scores)} entries, tokens has {n}")
        # the first id of a duplicated text wins: built from the end, earlier ids overwrite later ones
        self.token_to_id: dict[str, int] = dict(zip(reversed(self.tokens), range(n - 1, -1, -1)))
        spm = self.model == "llama"
        self.pre = g("tokenizer.ggml.pre", "default") if not spm else "default"
        if not spm and self.pre not in PRE_TOKENIZERS:
            warnings.warn(f"unknown tokenizer.ggml.pre {self.pre!r}: using llama.cpp's default pre-tokenizer")
        regex_set, clean, ignore_merges, bos_default = PRE_TOKENIZERS.get(self.pre, PRE_TOKENIZERS["default"])
        self.add_space_prefix = bool(g("tokenizer.ggml.add_space_prefix", spm))
        self.add_bos = bool(g("tokenizer.ggml.add_bos_token", spm or bos_default))
        self.add_eos = bool(g("tokenizer.ggml.add_eos_token", False))
        self.clean_spaces = (not spm) and clean
        self.ignore_merges = (not spm) and ignore_merges

        def _id(key, default=None):
            v = g(f"tokenizer.ggml.{key}", default)
            return int(v) if v is not None and 0 <= int(v) < n else None

        self.bos_id = _id("bos_token_id", 1 if spm else None)
        self.eos_id = _id("eos_token_id", 2 if spm else None)
        self.unk_id = _id("unknown_token_id", 0 if spm else None)
        # attributes and end-of-generation ids as llama_vocab::impl::load corrects them (special_tokens.py)
        st = SpecialTokens(self.tokens, self.types, {
            "bos": self.bos_id, "eos": self.eos_id, "eot": _id("eot_token_id"), "eom": _id("eom_token_id"),
            "fim_pre": _id("fim_pre_token_id"), "fim_suf": _id("fim_suf_token_id"), "fim_mid": _id("fim_mid_token_id"),
            "fim_pad": _id("fim_pad_token_id"), "fim_rep": _id("fim_rep_token_id"), "fim_sep": _id("fim_sep_token_id")})
        self.attrs = st.attrs
        self.eot_id, self.eom_id = st.ids.get("eot"), st.ids.get("eom")
        self.eog_ids = st.eog_ids
        # special tokens that the partition step looks for, longest text first (cache_special_tokens)
        sp = np.nonzero(self.attrs & (A_CONTROL | A_USER_DEFINED | A_UNKNOWN))[0]
        self.special = sorted(((self.tokens[i], int(i)) for i in sp if self.tokens[i]), key=lambda x: -len(x[0]))
        if spm:
            self.byte_ids = [self.token_to_id.get(f"<0x{b:02X}>") for b in range(256)]
        else:
            pairs = [m.partition(" ")[::2] for m in g("tokenizer.ggml.merges") or []]
            # the first rank of a repeated merge wins (as above)
            self.ranks: dict[tuple[str, str], int] = dict(zip(reversed(pairs), range(len(pairs) - 1, -1, -1)))
            self.regexes = [regex.compile(r) for r in _REGEXES[regex_set]]
        self._piece_cache: dict[int, bytes] = {}

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    # ---- encode -------------------------------------------------------------------------------
    def _partition(self, text: str, special: bool) -> list[str | int]:
        """Split out special tokens (tokenizer_st_partition); control/unknown ones only when ``special``."""
        frags: list[str | int] = [text]
        for tok, tid in self.special:
            if not special and self.attrs[tid] & (A_CONTROL | A_UNKNOWN):
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    out.append(f)
                    continue
                parts = f.split(tok)
                for k, p in enumerate(parts):
                    if k:
                        out.append(tid)
                    if p:
                        out.append(p)
            frags = out
        return frags

    def tokenize(self, text: str, special: bool = False, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``. ``bos``/``eos`` add those tokens when the metadata's add_bos/add_eos ask for them."""
        out: list[int] = []
        if bos and self.add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        frags = self._partition(text, special) if text else []
        prev_special = True
        for f in frags:
            if isinstance(f, int):
                out.append(f)
                prev_special = True
                continue
            if self.model == "llama":
                if self.add_space_prefix and prev_special:
                    f = " " + f
                self._spm(f.replace(" ", "\u2581"), out)
            else:
                self._bpe(f, out)
            prev_special = False
        if eos and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _spm(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm_session: merge the best-scoring adjacent pair until none is in the vocabulary."""
        sym = list(text)
        if not sym:
            return
        n = len(sym)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list = []

        def add(a: int, b: int) -> None:
            if a < 0 or b < 0:
                return
            t = sym[a] + sym[b]
            tid = self.token_to_id.get(t)
            if tid is None:
                return
            heapq.heappush(heap, (-float(self.scores[tid]), a, b, len(t)))

        for i in range(1, n):
            add(i - 1, i)
        lens = [len(s) for s in sym]
        while heap:
            _, a, b, size = heapq.heappop(heap)
            if not lens[a] or not lens[b] or lens[a] + lens[b] != size:
                continue
            sym[a] = sym[a] + sym[b]
            lens[a] += lens[b]
            lens[b] = 0
            sym[b] = ""
            nxt[a] = nxt[b]
            if nxt[b] >= 0:
                prev[nxt[b]] = a
            add(prev[a], a)
            add(a, nxt[a])
        i = 0
        while i != -1:
            self._resegment(sym[i], out)
            i = nxt[i]

    def _resegment(self, s: str, out: list[int]) -> None:
        tid = self.token_to_id.get(s)
        if tid is not None:
            out.append(tid)
            return
        for byte in s.encode("utf-8"):
            bid = self.byte_ids[byte]
            if bid is None:
                if self.unk_id is not None:
                    out.append(self.unk_id)
                continue
            out.append(bid)

    def _pretokenize(self, text: str) -> list[str]:
        """unicode_regex_split: each regex splits every piece further; text between matches is kept."""
        pieces = [text]
        for rx in self.regexes:
            nxt = []
            for p in pieces:
                pos = 0
                for m in rx.finditer(p):
                    if m.start() > pos:
                        nxt.append(p[pos:m.start()])
                    if m.end() > m.start():
                        nxt.append(m.group())
                    pos = m.end()
                if pos < len(p):
                    nxt.append(p[pos:])
            pieces = nxt
        return pieces

    def _bpe(self, text: str, out: list[int]) -> None:
        for word in self._pretokenize(text):
            w = "".join(_B2U[b] for b in word.encode("utf-8"))
            if self.ignore_merges and w in self.token_to_id:
                out.append(self.token_to_id[w])
                continue
            parts = list(w)
            while len(parts) > 1:
                best, at = None, -1
                for i in range(len(parts) - 1):
                    r = self.ranks.get((parts[i], parts[i + 1]))
                    if r is not None and (best is None or r < best):
                        best, at = r, i
                if best is None:
                    break
                parts[at:at + 2] = [parts[at] + parts[at + 1]]
            for p in parts:
                tid = self.token_to_id.get(p)
                if tid is not None:
                    out.append(tid)
                else:  # llama.cpp falls back to single-character tokens, dropping what is not there
                    out.extend(self.token_to_id[c] for c in p if c in self.token_to_id)

    # ---- decode -------------------------------------------------------------------------------
    def piece(self, tid: int, special: bool = False) -> bytes:
        """The bytes of one token (llama_token_to_piece)."""
        if not 0 <= tid < len(self.tokens):
            raise TokenizerError(f"token id {tid} is outside the vocabulary (0..{len(self.tokens) - 1})")
        a = int(self.attrs[tid])
        text = self.tokens[tid]
        # llama_vocab::impl::token_to_piece: CONTROL/UNKNOWN only with special; those and USER_DEFINED as text
        if a & (A_CONTROL | A_UNKNOWN):
            return text.encode("utf-8", "surrogateescape") if special else b""
        if a & A_USER_DEFINED:
            return text.encode("utf-8", "surrogateescape")
        if a & A_NORMAL:
            if self.model == "llama":
                return text.replace("\u2581", " ").encode("utf-8", "surrogateescape")
            # llama_decode_text: alphabet characters back to bytes, others as UTF-8
            return b"".join(bytes([_U2B[c]]) if c in _U2B else c.encode("utf-8", "surrogateescape") for c in text)
        if a & A_BYTE:
            if self.model == "llama":
                return bytes([int(text[3:5], 16)])
            b = _U2B.get(text[:1])  # BPE byte tokens are one character of the byte alphabet
            return bytes([b]) if b is not None else text.encode("utf-8", "surrogateescape")
        return b""

    def detokenize_bytes(self, ids, special: bool = False) -> bytes:
        parts = []
        remove_space = self.add_space_prefix
        for tid in ids:
            p = self.piece(int(tid), special)
            if remove_space and p.startswith(b" "):
                p = p[1:]
            remove_space = False
            parts.append(p)
        text = b"".join(parts)
        if self.clean_spaces:
            text = _clean_spaces(text)
        return text

    def detokenize(self, ids, special: bool = False) -> str:
        return self.detokenize_bytes(ids, special).decode("utf-8", "replace")


def _clean_spaces(t: bytes) -> bytes:
    """llama_detokenize's clean_up_tokenization_spaces passes."""
    # " ?", " !", " .", " ," lose the space
    out = bytearray(t[:1])
    for i in range(1, len(t)):
        if t[i - 1] == 0x20 and t[i] in b"?!.,":
            out.pop()
        out.append(t[i])
    # " ' " -> "'"
    t, out, i = bytes(out), bytearray(out[:1]), 1
    while i < len(t):
        x = t[i]
        if x == 0x27 and i + 1 < len(t) and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            out.pop()
            out.append(x)
            i += 2
            continue
        out.append(x)
        i += 1
    # " 's", " 'm", " 're", " 've" lose the space
    t, out = bytes(out), bytearray(out[:1])
    for i in range(1, len(t)):
        if t[i - 1] == 0x20 and t[i] == 0x27 and i + 1 < len(t):
            x1 = t[i + 1]
            x2 = t[i + 2] if i + 2 < len(t) else None
            if x1 in b"sm" or (x2 is not None and (x1, x2) in ((ord("r"), ord("e")), (ord("v"), ord("e")))):
                out.pop()
        out.append(t[i])
    return bytes(out)


class StreamDecoder:
    """Incremental detokenization that never emits a broken UTF-8 sequence."""

    def __init__(self, tok: Tokenizer, special: bool = False, first: bool = True):
        self.tok, self.special, self.pending, self.first = tok, special, b"", first

    def feed(self, tid: int) -> str:
        p = self.tok.piece(tid, self.special)
        if self.first and self.tok.add_space_prefix and p.startswith(b" "):
            p = p[1:]
        self.first = False
        buf = self.pending + p
        # hold back an incomplete multi-byte tail (at most 3 bytes)
        cut = len(buf)
        for k in range(1, min(4, len(buf)) + 1):
            c = buf[-k]
            if c & 0xC0 == 0x80:
                continue
            need = 2 if c & 0xE0 == 0xC0 else 3 if c & 0xF0 == 0xE0 else 4 if c & 0xF8 == 0xF0 else 1
            if need > k:
                cut = len(buf) - k
            break
        self.pending = buf[cut:]
        return buf[:cut].decode("utf-8", "replace")

    def flush(self) -> str:
        s, self.pending = self.pending.decode("utf-8", "replace"), b""
        return s
