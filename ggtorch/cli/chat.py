"""`ggtorch chat`: talk to a model through its own chat template.

In a terminal it is a conversation (streamed answers, history, /reset, /system TEXT, /exit; Ctrl-C stops
an answer, Ctrl-D leaves). With -p TEXT it answers once; with stdin not a terminal it answers each input
line in turn, as one conversation; both for scripts.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

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
        with StopOnInterrupt() as stop:
            try:
                for step in steps:
                    stop.streaming = True  # from the first step on, Ctrl-C asks; before it, it raises
                    n += 1
                    reason = step.finish_reason or reason
                    if step.piece:
                        pieces.append(step.piece)
                        if not self.a.json:
                            out.write(step.piece)
                            out.flush()
                    if stop.requested():
                        break
            except KeyboardInterrupt:  # during the prompt's evaluation, or a second Ctrl-C
                stop.raised = True
            finally:
                stop.closing = True
                steps.close()  # the session's cache keeps what was said, also on a second Ctrl-C
        if stop.requested():  # also a Ctrl-C during the last step: the user asked to stop, say so
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
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            # Inherited: a program started with `&` by a non-interactive shell (a script, a CI job, a test
            # suite run in the background, and whatever it spawns on a terminal) starts with SIGINT
            # ignored, and Python then leaves it so; the terminal still echoes ^C. A conversation on a
            # terminal is driven by the person at it: their Ctrl-C must stop an answer.
            signal.signal(signal.SIGINT, signal.default_int_handler)
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


class StopOnInterrupt:
    """Ctrl-C while an answer streams, on the main thread: the first SIGINT asks the token loop to stop,
    which it checks after every step (:meth:`requested`). Until the first step has come (the prompt's
    evaluation, which can be long) and for a second SIGINT while the step in flight finishes, the handler
    raises KeyboardInterrupt at once, as Python's default one does; once the loop has stopped, a late
    SIGINT is only counted.

    Why a flag rather than the KeyboardInterrupt alone: an exception raised by a signal handler lands
    wherever the main thread happens to be, and some places drop it (a finalizer, a weakref or ctypes
    callback, a generator closed by the garbage collector: "Exception ignored in ..."); a flag cannot be
    dropped. Why the wakeup pipe as well: CPython's C-level handler writes the signal's number to it
    the moment the signal arrives, so the loop sees the Ctrl-C even where the Python-level handler has
    not run (it runs only when the main thread's eval loop notices the signal). Off the main thread
    (signal handlers cannot be set there), or with SIGINT ignored, it does nothing."""

    def __init__(self):
        self.calls = 0  # times the Python handler ran
        self.piped = 0  # SIGINTs the C handler wrote to the wakeup pipe
        self.raised = False  # a KeyboardInterrupt reached the token loop
        self.streaming = False  # a step has come: the first SIGINT asks instead of raising
        self.closing = False  # the loop has stopped: SIGINT is only counted
        self._old = self._fds = None
        self._old_fd = -1

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is not threading.main_thread():
            return self
        if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):  # ignored on purpose (interactive() undoes
            return self  # an inherited SIG_IGN): keep it so
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)  # set_wakeup_fd wants it: the C handler must never block
        try:
            self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            os.close(r)
            os.close(w)
        else:
            self._fds = (r, w)
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.calls += 1
        if not self.closing and (max(self.calls, self.piped) > 1 or not self.streaming):
            raise KeyboardInterrupt

    def _drain(self) -> None:
        if self._fds is None:
            return
        try:
            data = os.read(self._fds[0], 4096)
        except (BlockingIOError, InterruptedError):
            return
        self.piped += data.count(signal.SIGINT)

    def requested(self) -> bool:
        """Whether a Ctrl-C came during this answer (checked between steps, and once more at the end)."""
        self._drain()
        return bool(self.calls or self.piped or self.raised)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        if self._fds is not None:
            self._drain()  # a SIGINT between the last check and the line above
            signal.set_wakeup_fd(self._old_fd)
            os.close(self._fds[0])
            os.close(self._fds[1])
            self._fds = None


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
