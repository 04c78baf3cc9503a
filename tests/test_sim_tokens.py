"""Generated words: one token each, and concatenations keep one token per word."""

import random

import pytest

from runner.errors import DataError
from runner.sim.tokens import DEFAULT_TOKENIZER, resolve_tokenizer, token_text


@pytest.fixture(scope="module")
def text():
    return token_text(str(DEFAULT_TOKENIZER))


def test_words_are_single_tokens(text):
    assert len(text.words) > 1000
    encoded = text.tokenizer(text.words, add_special_tokens=False)["input_ids"]
    assert all(len(ids) == 1 for ids in encoded)
    assert all(word.startswith(" ") and word[1:].isalpha() for word in text.words)


@pytest.mark.parametrize("count", [1, 2, 7, 128, 1024, 4096])
def test_concatenation_keeps_count(text, count):
    rng = random.Random(count)
    for _ in range(5):
        generated = text.text(text.draw(rng, count))
        assert len(text.tokenizer.encode(generated, add_special_tokens=False)) == count


def test_chat_count_includes_template(text):
    messages = [{"role": "user", "content": "hello"}]
    assert text.count_chat(messages) > text.count_text("hello") + 5


def test_resolve_tokenizer_names_bad_path(tmp_path):
    assert resolve_tokenizer(None) == DEFAULT_TOKENIZER
    assert resolve_tokenizer("qwen2.5") == DEFAULT_TOKENIZER
    with pytest.raises(DataError, match="missing-dir"):
        resolve_tokenizer(str(tmp_path / "missing-dir"))
