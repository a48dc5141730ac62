"""Chat and the context window (issue 15): a history that outgrows n_ctx is refused, unless context
shift is on, in which case the oldest turns are dropped and the latest question is kept."""
import pytest

import ggtorch
from conftest import TINY
from ggtorch.errors import ContextError


def history(n_turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "sys"}]
    for i in range(n_turns):
        msgs += [{"role": "user", "content": f"question {i} " + "word " * 8},
                 {"role": "assistant", "content": f"answer {i} " + "word " * 8}]
    return msgs + [{"role": "user", "content": "last question"}]


@pytest.fixture(scope="module")
def tiny():
    return ggtorch.load(str(TINY / "tiny-llama-F32.gguf"), fast=False, n_ctx=256)


def test_long_history_is_refused_without_context_shift(tiny):
    assert len(tiny.apply_chat_template(history(12), tokenize=True)) > 256  # the case is real
    with pytest.raises(ContextError):
        tiny.chat(history(12), max_tokens=4, context_shift=False)


def test_context_shift_drops_the_oldest_turns(tiny):
    msgs = history(12)
    ids, _, _, steps = tiny.chat_steps(msgs, max_tokens=4, context_shift=True)
    out = list(steps)
    assert len(ids) + 4 <= 256 and len(out) >= 1
    text = tiny.detokenize(ids, special=True)
    assert "last question" in text and "sys" in text
    assert "question 0 " not in text  # the oldest turn went first
    assert "question 11 " in text  # the newest earlier turn stayed
