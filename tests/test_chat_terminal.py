"""`ggtorch chat` in a real terminal: a pseudo-terminal driven from Python (always), and tmux with
send-keys/capture-pane where tmux is installed. History, the cache across turns, /system, /reset,
Ctrl-C stopping an answer without leaving, /exit."""
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

CMD = [sys.executable, "-m", "ggtorch", "chat", "smollm2-135m", "-n", "400", "--threads", "2"]
STORY = "Write a very long story about a dragon who learns to cook, with many chapters."


@pytest.fixture(autouse=True)
def python_sigint():
    """The in-process tests drive Chat's Ctrl-C handling, which expects Python's own SIGINT handler: a
    suite started with `&` by a non-interactive shell begins with SIGINT ignored, so set it (and put back
    whatever was there)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


class Term:
    """A child process on a pseudo-terminal, read with a deadline."""

    def __init__(self, argv, sigint=signal.SIG_DFL):
        env = dict(os.environ, TERM="dumb", COLUMNS="200")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so ^C is a SIGINT
            # SIGINT's action as given, whatever this process has: a test suite run in a job started with
            # `&` by a non-interactive shell has SIGINT ignored, and a child would inherit that (issue 26)
            signal.signal(signal.SIGINT, sigint)
            os.execvpe(argv[0], argv, env)
        self.buf, self.pos = "", 0
        self.reads: list[tuple[float, int]] = []  # (when, length of buf after it): when output arrived

    def read_until(self, pattern, timeout=180.0) -> re.Match:
        rx, end = re.compile(pattern), time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout} s; screen so far:\n{self.buf[-3000:]}")
            r, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if r:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"terminal closed before {pattern!r}:\n{self.buf[-3000:]}")
                self.buf += data.decode("utf-8", "replace").replace("\r\n", "\n")
                self.reads.append((time.monotonic(), len(self.buf)))

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout=60.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                select.select([self.fd], [], [], 0.2) and os.read(self.fd, 65536)
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("ggtorch chat did not exit")


def test_interactive_chat_in_a_pseudo_terminal():
    # started with SIGINT ignored, as by a shell script's `cmd &`: Ctrl-C must still stop an answer
    t = Term(CMD, sigint=signal.SIG_IGN)
    try:
        t.read_until(r"template: the file's tokenizer\.chat_template")
        t.read_until(r"\n> ")
        t.send("Name the capital city of France.\r")
        t.read_until(r"Paris")
        t.read_until(r"\[prompt 37 tok \d+ ms \| answer \d+ tok")  # the speed line
        t.read_until(r"\n> ")
        t.send("And of Germany?\r")  # history: the model knows what "And" refers to; the prefix is cached
        t.read_until(r"Germany")
        t.read_until(r"\[prompt \d+ tok \(\+\d+ cached\)")
        t.read_until(r"\n> ")
        t.send(STORY + "\r")
        t.read_until(re.escape(STORY[-20:]) + r"\n(?:.|\n){40}")  # the answer is streaming
        t.send("\x03")  # Ctrl-C stops the answer, not the program
        t.read_until(r"\[stopped\]")
        t.read_until(r"\[prompt \d+ tok")
        t.read_until(r"\n> ")
        t.send("/system Answer in one word.\r")
        t.read_until(r"\[system prompt set")
        t.send("/reset\r")
        t.read_until(r"\[conversation cleared\]")
        t.send("/exit\r")
        assert t.wait() == 0
    finally:
        try:
            os.kill(t.pid, signal.SIGKILL)
            os.waitpid(t.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(t.fd)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (the pty test covers the terminal)")
def test_interactive_chat_in_tmux(tmp_path):
    sock, name = f"ggtorch-test-{uuid.uuid4().hex[:8]}", "chat"
    tmux = ["tmux", "-L", sock]

    def screen() -> str:
        return subprocess.run(tmux + ["capture-pane", "-p", "-J", "-S", "-200", "-t", name],
                              capture_output=True, text=True).stdout.rstrip()  # tmux pads with blank lines

    def wait_for(pattern, timeout=180.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = screen()
            if re.search(pattern, s):
                return s
            time.sleep(0.3)
        raise AssertionError(f"no {pattern!r} on the screen:\n{screen()}")

    cmd = " ".join(CMD) + f"; echo EXIT=$? > {tmp_path / 'rc'}; sleep 30"
    subprocess.run(tmux + ["new-session", "-d", "-s", name, "-x", "160", "-y", "50", cmd], check=True)
    try:
        wait_for(r"template: the file's tokenizer\.chat_template(.|\n)*\n>$")
        subprocess.run(tmux + ["send-keys", "-t", name, "Name the capital city of France.", "Enter"], check=True)
        wait_for(r"Paris(.|\n)*\[prompt 37 tok(.|\n)*\n>$")
        subprocess.run(tmux + ["send-keys", "-t", name, STORY, "Enter"], check=True)
        wait_for(re.escape(STORY[-20:]) + r"\n(.|\n){40}")
        subprocess.run(tmux + ["send-keys", "-t", name, "C-c"], check=True)
        wait_for(r"\[stopped\](.|\n)*\[prompt \d+ tok \(\+\d+ cached\)(.|\n)*\n>$")
        subprocess.run(tmux + ["send-keys", "-t", name, "C-d"], check=True)  # Ctrl-D leaves
        end = time.monotonic() + 60
        while not (tmp_path / "rc").exists() and time.monotonic() < end:
            time.sleep(0.3)
        assert (tmp_path / "rc").read_text().strip() == "EXIT=0"
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)


# ---- Ctrl-C during an answer, in-process: where the SIGINT lands must not matter -----------------------
class _Model:
    """chat_steps() as ggtorch.api.Model has it: ``n`` steps, and ``at(i)`` run while step i is computed
    (where a real SIGINT would land)."""

    def __init__(self, n, at):
        self.n, self.at, self.closed = n, at, False

    def _grammar(self, kw):  # Model's check of --json-schema/--grammar (none here)
        return None

    def chat_steps(self, messages, **kw):
        from ggtorch.generate import Step, Timings

        def steps():
            try:
                for i in range(self.n):
                    self.at(i)
                    yield Step(i, f"w{i} ", "length" if i == self.n - 1 else None)
            finally:
                self.closed = True

        return [1, 2, 3], Timings(), "test", steps()


def _answer(n, at):
    import io

    from ggtorch.cli import build_parser
    from ggtorch.cli.chat import Chat

    m = _Model(n, at)
    chat = Chat(m, build_parser().parse_args(["chat"]))
    out = io.StringIO()
    r = chat.answer("hi", out=out)
    assert m.closed  # the session's generator ran its finally
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    fd = signal.set_wakeup_fd(-1)
    assert fd == -1  # so is the wakeup fd
    assert chat.history[-1] == {"role": "assistant", "content": r["text"]}  # what was said is kept
    return r, out.getvalue()


def _ctrl_c_at(k, times=1):
    def at(i):
        if i == k:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
    return at


def test_ctrl_c_stops_after_the_step_in_flight():
    r, out = _answer(50, _ctrl_c_at(7))
    assert r["finish_reason"] == "interrupted" and r["text"] == "".join(f"w{i} " for i in range(8))
    assert out == r["text"] + " [stopped]\n"


def test_ctrl_c_whose_keyboardinterrupt_would_be_swallowed(monkeypatch):
    """The SIGINT's Python handler runs inside a finalizer: a KeyboardInterrupt raised there is printed as
    "Exception ignored in ..." and dropped, and the answer would go on; the flag still stops it."""
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's own, not pytest's
    class Finalized:
        def __del__(self):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])  # delivered here, handled in __del__
            sum(range(10))

    def at(i):
        if i == 5:
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # pending until the finalizer unblocks it
            Finalized()

    r, out = _answer(50, at)
    assert r["finish_reason"] == "interrupted" and r["text"].split() == [f"w{i}" for i in range(6)]


def test_ctrl_c_seen_only_by_the_c_level_handler():
    """The C handler has written the SIGINT to the wakeup fd, the Python handler has not run (yet): the
    loop sees it between steps."""
    def at(i):
        if i == 3:
            fd = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(fd)
            os.write(fd, bytes([signal.SIGINT]))

    r, _ = _answer(50, at)
    assert r["finish_reason"] == "interrupted" and r["text"].split() == ["w0", "w1", "w2", "w3"]


def test_ctrl_c_before_the_first_step_and_during_the_last():
    r, out = _answer(50, _ctrl_c_at(0))  # the prompt's evaluation: it raises there, as before
    assert r["finish_reason"] == "interrupted" and r["text"] == "" and out == " [stopped]\n"
    r, out = _answer(6, _ctrl_c_at(5))  # the answer was complete, but the user asked to stop: say so
    assert r["finish_reason"] == "interrupted" and r["text"].split() == [f"w{i}" for i in range(6)]
    assert out.endswith(" [stopped]\n")
    r, out = _answer(6, lambda i: None)
    assert r["finish_reason"] == "length" and "[stopped]" not in out


def test_second_ctrl_c_interrupts_the_step_in_flight():
    r, out = _answer(50, _ctrl_c_at(4, times=2))
    assert r["finish_reason"] == "interrupted" and r["text"].split() == ["w0", "w1", "w2", "w3"]
    assert out.endswith(" [stopped]\n")
