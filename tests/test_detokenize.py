"""Streamed text from tokens, one token at a time, with a real byte-level BPE tokenizer
(trained here on a few sentences, so characters split across tokens): the pieces never
carry a broken character and always add up to the whole answer."""

from __future__ import annotations

import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from rag.service.detokenize import INCOMPLETE, TextStream

TEXTS = [
    "Hummingbirds hover; so do kestrels.",
    "Café crème, naïve façade, Straße",
    "日本語のテキストと絵文字 🐝🦜 mixed in",
    "  spaces   inside and around  ",
    "emoji at the end 🦩",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(TEXTS[:2] * 3, vocab_size=300, min_frequency=1)
    return PreTrainedTokenizerFast(tokenizer_object=trainer)


def decode_with(tokenizer: PreTrainedTokenizerFast):
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_answer_and_never_split_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    assert any(INCOMPLETE in tokenizer.decode([i]) for i in ids) or text.isascii()
    stream = TextStream(decode_with(tokenizer))
    pieces = [stream.add([token]) for token in ids] + [stream.close()]
    assert "".join(pieces) == text.strip() == stream.text
    assert not any(INCOMPLETE in piece for piece in pieces)
    assert sum(bool(p) for p in pieces) > len(text.split()) // 2  # text leaves as it comes


def test_a_cut_short_answer_ends_with_what_its_tokens_say(tokenizer):
    """Generation stopped inside a character: the last piece is what decoding all the
    tokens gives, so the stream still equals the answer."""
    ids = tokenizer.encode("bee 🐝")[:-1]
    stream = TextStream(decode_with(tokenizer))
    pieces = [stream.add([token]) for token in ids] + [stream.close()]
    assert "".join(pieces) == decode_with(tokenizer)(ids).strip()
