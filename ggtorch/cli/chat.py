"""`ggtorch chat`: talk to a model through its own chat template.

In a terminal it is a conversation (streamed answers, history, /reset, /system TEXT, /exit; Ctrl-C stops
an answer, Ctrl-D leaves). With -p TEXT it answers once; with stdin not a terminal it answers each input
line in turn, as one conversation; both for scripts.
"""
from __future__ import annotations

import json
import sys

from ..errors import GGTorchError
from .common import add_context, add_model, add_sampling, add_structured, load, print_json, sampling_kwargs

HELP = "/reset starts over, /system TEXT sets the system prompt, /exit leaves; Ctrl-C stops an answer, Ctrl-D leaves"


def _speed(t) -> str:
    d = t.as_dict()
    s = f"[prompt {d['prompt_tokens']} tok"
    if d["cached_tokens"]:
        s += f" (+{d['cached_tokens']} cached)"
    s += f" {d['prompt_ms']:.0f} ms | answer {d['gen_tokens']} tok {d['gen_ms']:.0f} ms"
    return s + (f", {d['gen_tok_s']:.1f} tok/s]" if d["gen_tok_s"] else "]")


class Chat:
    def __init__(self, model, a):
        self.m, self.a = model, a
        self.system = a.system
        self.history: list[dict] = []
        self.kw = sampling_kwargs(a)
        self.kw.update(template=a.chat_template, chat_template_kwargs=_kwargs(a.chat_template_kwargs))
        if a.logit_bias:
            self.kw["logit_bias"] = _bias(a.logit_bias)
        model._grammar(dict(self.kw))  # a bad --json-schema/--grammar fails now, not at the first turn

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def answer(self, text: str, out=None) -> dict:
        """One turn: stream the answer to ``out`` (default: the current sys.stdout, looked up at call
        time); Ctrl-C stops it and keeps what was said."""
        out = out or sys.stdout
        self.history.append({"role": "user", "content": text})
        try:
            ids, timings, _, steps = self.m.chat_steps(self.messages(), **self.kw)
        except BaseException:  # the template refused these messages, or Ctrl-C: the turn did not happen
            self.history.pop()
            raise
        pieces, reason, n = [], "length", 0
        try:
            for step in steps:
                n += 1
                reason = step.finish_reason or reason
                if step.piece:
                    pieces.append(step.piece)
                    if not self.a.json:
                        out.write(step.piece)
                        out.flush()
        except KeyboardInterrupt:
            steps.close()
            reason = "interrupted"
            if not self.a.json:
                out.write(" [stopped]")
        reply = "".join(pieces)
        self.history.append({"role": "assistant", "content": reply})
        if self.a.json:
            print_json({"text": reply, "finish_reason": reason, "usage": {
                "prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
                "timings": timings.as_dict()})
        else:
            out.write("\n")
            out.flush()
            print(_speed(timings), file=sys.stderr, flush=True)
        return {"text": reply, "finish_reason": reason}

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave."""
        cmd, _, rest = line.partition(" ")
        if cmd in ("/exit", "/quit", "/bye"):
            return False
        if cmd == "/reset":
            self.history = []
            self.m.reset_chat()
            print("[conversation cleared]", file=sys.stderr)
        elif cmd == "/system":
            self.system = rest.strip() or None
            print(f"[system prompt {'set' if self.system else 'cleared'}; the conversation so far is kept]",
                  file=sys.stderr)
        else:
            print(f"[unknown command {cmd}: {HELP}]", file=sys.stderr)
        return True

    def interactive(self) -> int:
        try:
            import readline  # noqa: F401 - importing it gives input() line editing and history
        except ImportError:
            pass
        while True:
            try:
                line = input("> ")
            except KeyboardInterrupt:  # clears the line, as a shell does
                print(file=sys.stderr)
                continue
            except EOFError:
                print(file=sys.stderr)
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            try:
                self.answer(line)
            except GGTorchError as e:  # e.g. a template that takes no system prompt: say so, keep chatting
                print(f"[error: {e}]", file=sys.stderr)
            except KeyboardInterrupt:
                print(file=sys.stderr)


def _kwargs(s):
    if not s:
        return None
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise GGTorchError(f"--chat-template-kwargs must be a JSON object: {e}") from None
    if not isinstance(v, dict):
        raise GGTorchError("--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    return v


def _bias(items) -> dict[int, float]:
    out = {}
    for it in items:
        tid, _, val = it.partition("=")
        try:
            out[int(tid)] = float(val)
        except ValueError:
            raise GGTorchError(f"--logit-bias expects ID=BIAS, got {it!r}") from None
    return out


def cmd_chat(a) -> int:
    from ..chat import model_template
    from ..gguf.reader import GGUFFile
    from ..packaged import resolve

    with GGUFFile(resolve(a.model)) as f:  # a bad --chat-template fails before the weights load
        _, label = model_template(f.metadata, a.chat_template)
    m = load(a)
    chat = Chat(m, a)
    interactive = a.prompt is None and sys.stdin.isatty()
    if interactive:
        name = m.file.metadata.get("general.name") or a.model
        print(f"ggtorch chat: {name} | template: {label}\n{HELP}", file=sys.stderr)
        return chat.interactive()
    print(f"[template: {label}]", file=sys.stderr)
    if a.prompt is not None:
        chat.answer(a.prompt)
        return 0
    for line in sys.stdin:
        line = line.strip()
        if line:
            chat.answer(line)
    return 0


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat through the model's own chat template (interactive; -p or a pipe for "
                                    "scripts)")
    add_model(p, optional=True)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                   help="a named template of the file (tokenizer.chat_template.NAME), a built-in (chatml, gemma) "
                        "or a .jinja file; default: the file's own, else chatml as llama.cpp")
    p.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help="variables for the template, e.g. '{\"enable_thinking\": false}'")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS to token ID's logit (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per answer (text, finish_reason, usage)")
    add_sampling(p)
    add_structured(p)
    add_context(p)
    p.set_defaults(max_tokens=512)
