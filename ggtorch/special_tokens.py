"""Token attributes and the end-of-generation set, built as llama.cpp's ``llama_vocab::impl::load`` does.

GGUF stores one token *type* per token; llama.cpp turns it into an attribute bit set and then corrects
it from the token texts, because converters often get the types of chat tokens wrong:

- tokens whose text looks like an end of turn (``<|im_end|>``, ``<end_of_turn>``, ``</s>`` ...) or a
  fill-in-the-middle marker become EOT/EOM/FIM ids when the metadata names none, and whatever their
  type, they get the CONTROL attribute ("control-looking token ... its type will be overridden").
  CONTROL decides both that a token is dropped when detokenizing without ``special`` and that it is
  *not* split out of plain text when tokenizing without special parsing; so on Gemma 3, whose ``</s>``
  is USER_DEFINED in the file, a literal "</s>" in a user's text stays text, as in llama.cpp;
- the end-of-generation set is every token with such a text, the FIM pad/repo/separator tokens, and the
  eos/eot/eom ids; two model-family corrections drop ``<|end|>`` (gpt-oss, solar-open) and ``</s>``
  (gemma4, plamo) again.

llama.cpp walks an unordered map for the "first match" of EOT/EOM/FIM texts; we walk ids in order
(only a vocabulary with two candidate texts for the same role could tell the difference).
"""
from __future__ import annotations

import numpy as np

# llama_token_attr bits
A_UNDEFINED, A_UNKNOWN, A_UNUSED, A_NORMAL, A_CONTROL, A_USER_DEFINED, A_BYTE = 0, 1, 2, 4, 8, 16, 32

# llama_token_type -> llama_token_attr
_TYPE_TO_ATTR = {1: A_NORMAL, 2: A_UNKNOWN, 3: A_CONTROL, 4: A_USER_DEFINED, 5: A_UNUSED, 6: A_BYTE}

# texts that llama.cpp's loader recognizes, by the role it gives them when the metadata names no id
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# every text that ends generation (the loader's second pass)
EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
))
# gpt-oss: always rendered, so plain USER_DEFINED
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


class SpecialTokens:
    """``attrs`` (int32 bit set per token), ``eog_ids`` and the special ids llama.cpp resolves."""

    def __init__(self, tokens: list[str], types: np.ndarray, ids: dict[str, int | None]):
        n = len(tokens)
        self.attrs = np.array([_TYPE_TO_ATTR.get(int(t), A_UNDEFINED) for t in types], dtype=np.int32)
        self.ids = dict(ids)  # bos, eos, eot, eom, fim_pre ... as given by the metadata (None = absent)
        at = self.attrs
        by_text: dict[str, int] = {}
        for i, t in enumerate(tokens):
            by_text.setdefault(t, i)

        def control(i: int) -> None:
            at[i] |= A_CONTROL

        # EOT / EOM / FIM ids detected by text where the metadata gave none (first pass of the loader)
        for role, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), *_FIM_TEXTS.items()):
            if self.ids.get(role) is not None:
                continue
            hits = sorted(by_text[t] for t in texts if t in by_text)
            if hits:
                self.ids[role] = hits[0]
                control(hits[0])

        # CONTROL tokens with "unused" in their text are marked UNUSED (no other effect here)
        for i in np.nonzero(at & A_CONTROL)[0]:
            if "unused" in tokens[i]:
                at[i] |= A_UNUSED

        eog: set[int] = {self.ids[r] for r in ("fim_pad", "fim_rep", "fim_sep") if self.ids.get(r) is not None}
        for t, i in by_text.items():
            if t in EOG_TEXTS:
                eog.add(i)
                control(i)
        for t in _ALWAYS_RENDERED:
            if t in by_text:
                at[by_text[t]] = A_USER_DEFINED
        for r in ("eos", "eot", "eom"):
            if self.ids.get(r) is not None:
                eog.add(self.ids[r])

        texts = {tokens[i]: i for i in eog if 0 <= i < n}
        has_call = "<|call|>" in texts or "<|calls|>" in texts
        if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
            eog.discard(texts["<|end|>"])  # harmony / solar-open: <|end|> closes a message, not the answer
            at[texts["<|end|>"]] = A_USER_DEFINED
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])  # gemma4 / plamo: </s> is an ordinary token
            at[texts["</s>"]] = A_NORMAL
        self.eog_ids = eog
