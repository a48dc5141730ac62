"""One completion request as the engine sees it (one BatchRequest per choice) and as the client sees
it (OpenAI's chat.completion / text_completion objects, whole or as SSE chunks)."""
from __future__ import annotations

import asyncio
import codecs
import json
import time
import uuid
from dataclasses import replace

from ..batch import BatchRequest, Event
from .schema import GenSpec


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class Choice:
    def __init__(self, index: int):
        self.index = index
        self.text: list[str] = []
        self.tokens = []  # TokenInfo of the tokens that are text (not the end-of-generation token)
        self.finish: str | None = None
        self.error: str | None = None
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.parse: ChoiceParse | None = None  # tool calls / reasoning (chat with a ToolPlan)
        self.deltas: list[dict] = []  # parsed deltas not yet streamed

    def finish_reason(self) -> str | None:
        """"tool_calls" when the answer ended on its own with calls in it (as OpenAI and llama.cpp say)."""
        if self.parse is not None and self.finish == "stop" and self.parse.parser.message().tool_calls:
            return "tool_calls"
        return self.finish


class Job:
    def __init__(self, chat: bool, spec: GenSpec, prompts: list[list[int]], model_name: str, fingerprint: str,
                 tokenizer, tools: "ToolPlan | None" = None):
        self.chat, self.spec, self.model_name, self.fingerprint, self.tok = chat, spec, model_name, fingerprint, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reqs: list[BatchRequest] = []
        self.choices: list[Choice] = []
        for pi, ids in enumerate(prompts):
            for j in range(spec.n):
                idx = pi * spec.n + j
                # n choices with one seed: choice i draws with seed + i, so they differ and repeat
                params = spec.params if spec.seed is None else replace(spec.params, seed=(spec.seed + idx) % 2 ** 64)
                # a forced tool call's grammar, or the request's response_format / json_schema / grammar
                grammar = tools.grammar if tools is not None and tools.grammar is not None else spec.constraint
                self.reqs.append(BatchRequest(ids, params, spec.max_tokens, spec.stop, spec.ignore_eos, spec.logprobs,
                                              on_event=lambda ev, idx=idx: self._on_event(idx, ev),
                                              constraint=grammar.new() if grammar is not None else None,
                                              lora=spec.lora))
                c = Choice(idx)
                if tools is not None and chat:
                    c.parse = ChoiceParse(tools, spec.stop, lazy=not spec.stream)
                self.choices.append(c)
        self.n_prompts = len(prompts)
        self.pending: list[list[Event]] = [[] for _ in self.choices]  # engine thread only

    # ---- engine thread -> event loop -------------------------------------------------------------
    def _on_event(self, idx: int, ev: Event) -> None:
        # a whole answer (stream: false) wakes the event loop once, at its end, not once per token:
        # on 2 cores every wake-up takes a core from the model's threads
        if not self.spec.stream and ev.finish_reason is None:
            self.pending[idx].append(ev)
            return
        evs, self.pending[idx] = self.pending[idx] + [ev], []
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (idx, evs))

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancel()

    async def events(self, disconnected: asyncio.Task | None = None):
        """(choice, new text, new tokens, finished?) until every choice has finished."""
        left = len(self.reqs)
        while left:
            if disconnected is not None:
                get = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({get, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    raise ClientGone()
                idx, evs = get.result()
            else:
                idx, evs = await self.queue.get()
            c = self.choices[idx]
            for ev in evs:
                tokens = ev.tokens[:-1] if ev.eog else ev.tokens
                c.text.append(ev.text)
                c.tokens.extend(tokens)
                if c.parse is not None:
                    c.deltas += c.parse.feed([t.id for t in tokens])
                if ev.finish_reason:
                    left -= 1
                    c.finish, c.error = ev.finish_reason, ev.error
                    c.prompt_tokens, c.cached_tokens, c.completion_tokens = \
                        ev.prompt_tokens, ev.cached_tokens, ev.completion_tokens
                    if c.parse is not None:
                        c.deltas += c.parse.finish()
                yield c, ev.text, tokens, ev.finish_reason is not None

    def usage(self) -> dict:
        firsts = self.choices[:: self.spec.n]  # the prompt counts once per prompt, not once per choice
        p = sum(c.prompt_tokens for c in firsts)
        n = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
                "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)}}

    # ---- OpenAI objects ------------------------------------------------------------------------
    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                "system_fingerprint": self.fingerprint}

    def _token(self, tid: int) -> tuple[str, list[int]]:
        b = self.tok.piece(tid, True)
        return b.decode("utf-8", "replace"), list(b)

    def _logprobs(self, tokens, offset: int = 0):
        if self.spec.logprobs is None:
            return None
        if self.chat:
            content = []
            for t in tokens:
                s, b = self._token(t.id)
                tops = []
                for tid, lp in t.top:
                    ts, tb = self._token(tid)
                    tops.append({"token": ts, "logprob": lp, "bytes": tb})
                content.append({"token": s, "logprob": t.logprob, "bytes": b, "top_logprobs": tops})
            return {"content": content}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            s, _ = self._token(t.id)
            out["tokens"].append(s)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append({self._token(tid)[0]: lp for tid, lp in t.top})
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    def response(self) -> dict:
        """The whole answer (stream: false)."""
        choices = []
        for c in self.choices:
            text = "".join(c.text)
            if self.chat:
                msg = c.parse.parser.message().to_openai() if c.parse is not None else \
                    {"role": "assistant", "content": text}
                choices.append({"index": c.index, "message": msg, "logprobs": self._logprobs(c.tokens),
                                "finish_reason": c.finish_reason()})
            else:
                choices.append({"index": c.index, "text": text, "logprobs": self._logprobs(c.tokens),
                                "finish_reason": c.finish})
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": self.usage()}

    async def sse(self):
        """The answer as server-sent events: ``data: {json}\\n\\n`` chunks, then ``data: [DONE]``.
        A client that goes away cancels the generator (Starlette does), which cancels the choices."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        offsets = [0] * len(self.choices)
        try:
            if self.chat:  # the first chunk of each choice carries the role
                for c in self.choices:
                    yield _data({**self._head(obj), "choices": [
                        {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]})
            async for c, text, tokens, done in self.events():
                if c.error:
                    yield _data({"error": {"message": f"generation failed: {c.error}", "type": "server_error",
                                           "param": None, "code": None}})
                    continue
                if c.parse is not None:  # parsed deltas: content, reasoning_content, tool_calls
                    lp = self._logprobs(tokens) if tokens and self.spec.logprobs is not None else None
                    deltas, c.deltas = c.deltas, []
                    for k, d in enumerate(deltas or ([{}] if lp is not None else [])):
                        yield _data({**self._head(obj), "choices": [
                            {"index": c.index, "delta": d, "logprobs": lp if k == 0 else None, "finish_reason": None}]})
                elif text or (tokens and self.spec.logprobs is not None):
                    lp = self._logprobs(tokens, offsets[c.index])
                    offsets[c.index] += len(text)
                    if self.chat:
                        ch = {"index": c.index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}
                    else:
                        ch = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": None}
                    yield _data({**self._head(obj), "choices": [ch]})
                if done:
                    last = ({"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason()} if self.chat
                            else {"index": c.index, "text": "", "logprobs": None, "finish_reason": c.finish})
                    yield _data({**self._head(obj), "choices": [last]})
            if self.spec.include_usage:
                yield _data({**self._head(obj), "choices": [], "usage": self.usage()})
            yield b"data: [DONE]\n\n"
        finally:
            self.cancel()  # no-op when every choice finished; frees the slots when the client left


def _data(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


# ---- tool calls and reasoning (ggtorch.toolcall) ------------------------------------------------------
class ToolPlan:
    """How a chat request's answers are read: the template's tool-call format (its parser, with the
    special tokens it must see), and the compiled grammar of a forced call (or None)."""

    def __init__(self, template: str, prompt: str, parse_calls: bool, tokenizer, grammar=None):
        from ..toolcall import detect_format, make_parser

        self.fmt = detect_format(template)
        self.tok, self.grammar = tokenizer, grammar
        self._new = lambda: make_parser(template, prompt, tools=parse_calls, fmt=self.fmt, tokenizer=tokenizer)
        self.special = set()
        for marker in self._new().preserved:  # llama.cpp renders a format's preserved_tokens as text
            ids = tokenizer.tokenize(marker, special=True)
            if len(ids) == 1:
                self.special.add(ids[0])

    def parser(self):
        return self._new()


class ChoiceParse:
    """One choice's generated tokens -> text with the format's special tokens shown -> parsed deltas.
    Stop strings cut this text as they cut the plain text. ``lazy`` (a whole answer): parse once, at
    the end."""

    def __init__(self, plan: ToolPlan, stop: list[str], lazy: bool):
        self.plan, self.parser, self.stop, self.lazy = plan, plan.parser(), [s for s in stop if s], lazy
        self.dec = codecs.getincrementaldecoder("utf-8")("replace")
        self.held, self.text, self.stopped = "", [], False

    def _push(self, text: str, final: bool) -> list[dict]:
        from ..toolcall.base import held

        if self.stopped:
            return []
        self.held += text
        hit = min((self.held.find(s) for s in self.stop if s in self.held), default=-1)
        if hit >= 0:
            out, self.held, self.stopped = self.held[:hit], "", True
        elif final:
            out, self.held = self.held, ""
        else:
            cut = len(self.held) - held(self.held, self.stop)
            out, self.held = self.held[:cut], self.held[cut:]
        if self.lazy:
            self.text.append(out)
            return []
        return self.parser.feed(out)

    def feed(self, ids: list[int]) -> list[dict]:
        tok, special = self.plan.tok, self.plan.special
        return self._push("".join(self.dec.decode(tok.piece(t, t in special)) for t in ids), False)

    def finish(self) -> list[dict]:
        out = self._push(self.dec.decode(b"", final=True), True)
        if self.lazy:
            out = self.parser.feed("".join(self.text))
        return out + self.parser.finish()
