"""End-of-generation ids and token attributes as llama.cpp's vocabulary loader builds them (recorded from
llama.cpp by tools/record_llamacpp_vocab.py), and what they change in tokenization."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import golden
from ggtorch.gguf.reader import GGUFFile
from ggtorch.packaged import resolve
from ggtorch.special_tokens import A_CONTROL, A_NORMAL, A_USER_DEFINED, SpecialTokens
from ggtorch.tokenizer import Tokenizer

REC = json.loads((Path(__file__).parent / "data" / "llamacpp_vocab.json").read_text())
MODELS = {"smollm2-135m": "smollm2-135m-q4_1", "gemma3-270m": "gemma3-270m-q4_k_m"}


@pytest.fixture(scope="module", params=sorted(MODELS))
def tok(request):
    with GGUFFile(resolve(request.param)) as f:
        t = Tokenizer(f.metadata)
    t.name = request.param
    return t


def test_eog_ids_equal_llama_cpp(tok):
    assert sorted(tok.eog_ids) == REC["models"][tok.name]["eog_ids"]


def test_token_attributes_equal_llama_cpp(tok):
    rec = REC["models"][tok.name]
    want = np.full(rec["n_vocab"], A_NORMAL, dtype=np.int32)
    for i, a in rec["attrs"].items():
        want[int(i)] = a
    bad = np.nonzero(tok.attrs != want)[0]
    assert bad.size == 0, [(int(i), tok.tokens[i], int(tok.attrs[i]), int(want[i])) for i in bad[:10]]


def test_control_looking_tokens_tokenize_as_llama_cpp(tok):
    for e in REC["models"][tok.name]["tokenize"]:
        assert tok.tokenize(e["text"]) == e["ids"], e["text"]
        assert tok.tokenize(e["text"], special=True) == e["ids_special"], e["text"]
        assert tok.detokenize(e["ids_special"]) == e["detok"], e["text"]
        assert tok.detokenize(e["ids_special"], special=True) == e["detok_special"], e["text"]


def test_every_golden_text_with_special_parsing_on_and_off(tok):
    for e in golden(MODELS[tok.name])["tokenize"]:
        assert tok.tokenize(e["text"]) == e["ids"], e["text"]
        assert tok.tokenize(e["text"], special=True) == e["ids_special"], e["text"]


def test_gemma_user_defined_eos_text_becomes_control():
    """Gemma 3's '</s>' (212) is USER_DEFINED in the file; llama.cpp makes it CONTROL and end-of-generation,
    so in plain text (special parsing off) it is ordinary text, and it is not printed."""
    with GGUFFile(resolve("gemma3-270m")) as f:
        t = Tokenizer(f.metadata)
    s = t.token_to_id["</s>"]
    assert t.types[s] == 4 and t.attrs[s] & A_CONTROL and s in t.eog_ids
    assert s not in t.tokenize("a</s>b") and s in t.tokenize("a</s>b", special=True)
    assert t.detokenize([s]) == "" and t.detokenize([s], special=True) == "</s>"
    assert t.token_to_id["<end_of_turn>"] == 106 and 106 in t.eog_ids


def test_loader_rules_on_a_synthetic_vocabulary():
    """The model-family corrections: gpt-oss's <|end|> is not an end when <|return|>/<|call|> exist;
    a gemma4-style vocabulary keeps </s> ordinary; FIM tokens found by text end generation."""
    toks = ["<|end|>", "<|return|>", "<|call|>", "<|channel|>", "</s>", "<|tool_response>", "<|fim_pad|>", "x"]
    types = np.array([3, 3, 3, 3, 4, 4, 1, 1], dtype=np.int32)
    st = SpecialTokens(toks, types, {"eos": None})
    assert st.eog_ids == {1, 2, 5, 6}
    assert st.attrs[0] == A_USER_DEFINED and st.attrs[3] == A_USER_DEFINED and st.attrs[4] == A_NORMAL
    assert st.attrs[6] & A_CONTROL and st.ids["fim_pad"] == 6


@pytest.mark.parametrize("i", range(len(REC["builtin_templates"])))
def test_builtin_templates_equal_llama_cpps_formats(i):
    """`--chat-template chatml|gemma` and the no-template fallback render as llama_chat_apply_template."""
    from ggtorch.chat import BUILTIN, apply_template

    r = REC["builtin_templates"][i]
    assert apply_template(BUILTIN[r["template"]], r["messages"],
                          add_generation_prompt=r["add_generation_prompt"]) == r["output"]
