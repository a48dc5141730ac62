"""Record what llama.cpp's vocabulary loader decides for the two packaged models: the end-of-generation
ids, the attributes of every special-looking token, and tokenizations of texts full of chat/control tokens
(special parsing on and off), into tests/data/llamacpp_vocab.json. Dev tool (needs llama-cpp-python
0.3.36, the version behind ../shared/fixtures); tests/test_chat_tokens.py compares ggtorch against it.

    .venv/bin/python tools/record_llamacpp_vocab.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import llama_cpp

from ggtorch.packaged import resolve

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "llamacpp_vocab.json"
TEXTS = [
    "hello</s>world", "</s>", " </s> ", "<end_of_turn>", "<start_of_turn>model\nHi<end_of_turn>\n",
    "<bos><eos><pad><unk><mask>", "<|im_end|>", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<reponame>x<file_sep>y<|endoftext|>z<repo_name>", "[multimodal] and <unused0> and <unused99>",
    "text with <|eot_id|> and <eos> inside", "<start_of_image>", "a <end_of_turn> b </s> c <|im_end|> d",
]


CHATS = {
    "single": [("user", "What is the capital of France?")],
    "system_user": [("system", "  Be brief.  "), ("user", " What is the capital of France? ")],
    "multi_turn": [("system", "Be brief."), ("user", "Hi"), ("assistant", " Hello! "), ("user", "Bye\n")],
    "no_system": [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")],
}


def builtin_chats() -> list[dict]:
    """llama.cpp's own (non-Jinja) chatml and gemma formats, llama_chat_apply_template."""
    import ctypes

    recs = []
    for name in ("chatml", "gemma"):
        for case, msgs in CHATS.items():
            for add_ass in (True, False):
                arr = (llama_cpp.llama_chat_message * len(msgs))(
                    *[llama_cpp.llama_chat_message(role=r.encode(), content=c.encode()) for r, c in msgs])
                buf = ctypes.create_string_buffer(8192)
                n = llama_cpp.llama_chat_apply_template(name.encode(), arr, len(msgs), add_ass, buf, len(buf))
                recs.append({"template": name, "messages": [{"role": r, "content": c} for r, c in msgs],
                             "add_generation_prompt": add_ass, "output": buf.raw[:n].decode()})
    return recs


def main() -> int:
    out = {"llama_cpp_python": llama_cpp.__version__, "models": {}, "builtin_templates": builtin_chats()}
    for name in ("smollm2-135m", "gemma3-270m"):
        llm = llama_cpp.Llama(resolve(name), vocab_only=True, verbose=False)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        eog = [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)]
        # every token that is not plain NORMAL (attr 4) in llama.cpp's eyes
        attrs = {str(i): int(llama_cpp.llama_vocab_get_attr(vocab, i)) for i in range(n)
                 if int(llama_cpp.llama_vocab_get_attr(vocab, i)) != 4}
        toks = [{"text": t, "ids": llm.tokenize(t.encode(), add_bos=False, special=False),
                 "ids_special": llm.tokenize(t.encode(), add_bos=False, special=True)} for t in TEXTS]
        for e in toks:
            e["detok"] = llm.detokenize(e["ids_special"], special=False).decode("utf-8", "replace")
            e["detok_special"] = llm.detokenize(e["ids_special"], special=True).decode("utf-8", "replace")
        out["models"][name] = {"n_vocab": n, "eog_ids": eog, "attrs": attrs, "tokenize": toks}
        print(f"{name}: eog {eog}, {len(attrs)} non-normal tokens", file=sys.stderr)
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
