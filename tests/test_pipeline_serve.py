"""`ggtorch serve --pipeline 2`: two processes on loopback (gloo), started with the environment torchrun
gives its workers (RANK, WORLD_SIZE, MASTER_ADDR/PORT). Stage 0 serves HTTP and samples; its batched
steps go through both stages in micro-batches. The `openai` client gets the single-process server's
greedy text, alone and with 4 requests at once; killing stage 1 mid-answer ends that answer with a
clear error, later requests get a 503 naming the lost stage, and stage 0 still exits cleanly; a stage
that stops answering fails the answer after the pipeline's timeout."""
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import httpx
import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "..", "shared", "fixtures", "tiny", "tiny-llama-Q4_0.gguf")  # 2 layers: one a stage
PROMPTS = ["Hello world", "Once upon a time", "The capital of", "1, 2, 3,"]
N_TOKENS = 24
PARALLEL, CTX = 4, 2048  # 512 tokens a slot


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, procs, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a stage exited ({p.returncode}): {p.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the pipeline server did not come up")


def _launch(timeout_s: float):
    """Stage 0 (HTTP on a free port) and stage 1 of `ggtorch serve --pipeline 2 --micro-batches 2`."""
    http, master = _port(), _port()
    cmd = [sys.executable, "-m", "ggtorch", "serve", MODEL, "--pipeline", "2", "--micro-batches", "2",
           "--pipeline-timeout", str(timeout_s), "--parallel", str(PARALLEL), "--ctx", str(CTX), "--port", str(http),
           "--threads", "1"]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, PYTHONPATH=ROOT, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    return f"http://127.0.0.1:{http}", procs


def _end(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture(scope="module")
def pipe_server():
    url, procs = _launch(10)
    try:
        _wait_up(url, procs)
        yield url, procs
    finally:
        _end(procs)


@pytest.fixture(scope="module")
def single_server():
    """The same model in one process: create_app under uvicorn on a thread of this process."""
    import uvicorn

    import ggtorch
    from ggtorch.server import create_app

    with warnings.catch_warnings():  # CTX is above the tiny model's trained 512 (a longer slot for the kill test)
        warnings.simplefilter("ignore")
        m = ggtorch.load(MODEL, n_ctx=CTX)
    app = create_app(m, parallel=PARALLEL, n_ctx=CTX)
    port = _port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    t0 = time.monotonic()
    while not server.started:
        assert time.monotonic() - t0 < 30 and t.is_alive(), "the single-process server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def _answers(url: str, together: bool) -> list:
    c = _client(url)

    def ask(p):
        r = c.completions.create(model="m", prompt=p, max_tokens=N_TOKENS, temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].text, r.usage.completion_tokens

    if not together:
        return [ask(p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as ex:
        return list(ex.map(ask, PROMPTS))


def test_pipeline_serve_answers_like_one_process(pipe_server, single_server):
    url, _ = pipe_server
    want = _answers(single_server, together=False)
    assert all(n == N_TOKENS for _, n in want)
    assert len({t for t, _ in want}) == len(PROMPTS)  # different prompts, different answers: a real comparison
    assert _answers(url, together=False) == want
    # 4 requests at once: decoded together in batched steps cut into 2 micro-batches across the stages
    assert _answers(url, together=True) == want
    # chat, streamed
    msgs = [{"role": "user", "content": "Name a colour."}]
    got = "".join(ch.choices[0].delta.content or "" for ch in _client(url).chat.completions.create(
        model="m", messages=msgs, max_tokens=N_TOKENS, temperature=0, stream=True) if ch.choices)
    ref = _client(single_server).chat.completions.create(model="m", messages=msgs, max_tokens=N_TOKENS, temperature=0)
    assert got == ref.choices[0].message.content
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok"


def _broken_stream(c, fault) -> str:
    """A long streamed answer, ``fault()`` applied after its first chunk: the error the client got."""
    stream = c.completions.create(model="m", prompt=PROMPTS[0], max_tokens=480, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    pieces = []
    try:
        for ch in stream:
            if not pieces:
                fault()  # mid-answer
            pieces.append(ch)
    except openai.APIError as e:
        return str(e)
    raise AssertionError(f"the answer ended without an error after {len(pieces)} chunks")


def test_killed_stage_gives_clear_errors(pipe_server):
    """Runs last (it kills the module's stage 1)."""
    url, (stage0, stage1) = pipe_server
    c = _client(url)
    t0 = time.monotonic()
    err = _broken_stream(c, stage1.kill)
    assert "lost contact with stage 1: its process ended" in err, err
    assert time.monotonic() - t0 < 30
    stage1.wait(10)
    # a later request: a 503 naming the lost stage, at once; the server stays up and says so on /health
    t1 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="m", prompt="Hi", max_tokens=4)
    assert e.value.status_code == 503 and "lost contact with stage 1" in str(e.value)
    assert time.monotonic() - t1 < 10
    h = httpx.get(url + "/health")
    assert h.status_code == 503 and "lost contact with stage 1" in h.json()["error"]
    # and it still shuts down cleanly
    stage0.send_signal(signal.SIGTERM)
    assert stage0.wait(30) == 0, stage0.stderr.read()[-3000:]


def test_silent_stage_times_out():
    """A stage that stops answering (SIGSTOP) fails the answer in flight after --pipeline-timeout."""
    url, (stage0, stage1) = _launch(2)
    try:
        _wait_up(url, (stage0, stage1))
        t0 = time.monotonic()
        err = _broken_stream(_client(url), lambda: stage1.send_signal(signal.SIGSTOP))
        assert "lost contact with stage 1: no answer within 2 s" in err, err
        assert time.monotonic() - t0 < 20
        assert httpx.get(url + "/health").status_code == 503
        stage0.send_signal(signal.SIGTERM)
        assert stage0.wait(30) == 0, stage0.stderr.read()[-3000:]
    finally:
        stage1.send_signal(signal.SIGCONT)
        _end((stage0, stage1))
