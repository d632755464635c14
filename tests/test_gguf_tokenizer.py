"""Tokenizer conversion: llama.cpp must tokenize exactly as transformers does.

Each tokenizer is written into a GGUF beside a tiny random model and read back by llama.cpp with
``vocab_only``; the ids must be equal for texts with non-ASCII letters, emoji, digits, spacing,
special tokens and a rendered chat template.
"""

from __future__ import annotations

import copy
import json

import pytest

from gqaprune_core.export.gguf import write_gguf
from gqaprune_core.export.gguf_tokenizer import (LLAMA3_REGEX, QWEN2_REGEX,
                                                 TokenizerConversionError, convert_tokenizer)
from gqaprune_core.models import demo_model_dir
from gqaprune_core.tiny import tiny_bpe_tokenizer, tiny_model

TEXTS = [
    "Hello world", " leading space and trailing  ", "Grüße aus Köln — naïve café, 東京 😀",
    "numbers 1234567 and 3.14159", "tabs\tand\nnew lines\n\n   indented", "it's we'll I'M they'RE",
    "x.y_z(a, b) -> {'k': [1, 2]}",
]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Wie geht's? 😀"}]


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir())


def llama_ids(tokenizer, tmp_path, texts: list[str]) -> list[list[int]]:
    pytest.importorskip("llama_cpp")
    from gqaprune_core.export.gguf_check import llama_tokenize, open_llama

    rows = max(tokenizer.backend_tokenizer.get_vocab_size(), 1)
    path = tmp_path / "tok.gguf"
    write_gguf(tiny_model(vocab=rows, layers=1), tokenizer, path, "f16", overwrite=True)
    with open_llama(path, vocab_only=True) as llm:
        return [llama_tokenize(llm, text) for text in texts]


def assert_same_ids(tokenizer, tmp_path, texts: list[str]) -> None:
    expected = [tokenizer(text)["input_ids"] for text in texts]
    for text, want, got in zip(texts, expected, llama_ids(tokenizer, tmp_path, texts)):
        assert got == want, text


def with_pre_tokenizer(tokenizer, pre_tokenizer: dict):
    """A copy of ``tokenizer`` whose tokenizer.json has another pre-tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = pre_tokenizer
    variant = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                      bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                                      unk_token=tokenizer.unk_token)
    variant.chat_template = tokenizer.chat_template
    return variant


def byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": use_regex}


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


@pytest.mark.demo
def test_demo_tokenizer_texts_and_chat_template_tokenize_alike(demo_tokenizer, tmp_path):
    chat = demo_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert_same_ids(demo_tokenizer, tmp_path, TEXTS + ["<|im_start|>user\nhi<|im_end|>", chat])
    vocab = convert_tokenizer(demo_tokenizer, 49152)
    assert (vocab.model, vocab.pre, vocab.add_bos) == ("gpt2", "gpt-2", False)
    assert vocab.chat_template == demo_tokenizer.chat_template
    assert vocab.special_ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert len(vocab.tokens) == 49152  # the 5 added infill tokens past the embedding dropped


@pytest.mark.parametrize("name,pre_tokenizer", [
    ("gpt-2", byte_level(True)),
    ("smollm", {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level(True)]}),
    ("llama-bpe", {"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(False)]}),
    ("qwen2", {"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(False)]}),
])
def test_each_byte_level_pre_tokenizer_maps_to_llama_cpps_name(name, pre_tokenizer, tmp_path):
    tokenizer = with_pre_tokenizer(tiny_bpe_tokenizer(), pre_tokenizer)
    assert convert_tokenizer(tokenizer, 400).pre == name
    assert_same_ids(tokenizer, tmp_path, TEXTS + ["<|im_start|>user\nhi 123<|im_end|>"])


def test_chat_template_is_carried_and_renders_to_the_same_ids(tmp_path):
    tokenizer = tiny_bpe_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                               "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert_same_ids(tokenizer, tmp_path, [chat])
    pytest.importorskip("llama_cpp")
    from gqaprune_core.export.gguf_check import open_llama

    with open_llama(tmp_path / "tok.gguf", vocab_only=True) as llm:
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template


def test_sentencepiece_style_tokenizer_with_byte_fallback_tokenizes_alike(tmp_path):
    tokenizer = tiny_bpe_tokenizer(sentencepiece=True)
    vocab = convert_tokenizer(tokenizer, len(tokenizer))
    assert (vocab.model, vocab.add_bos, vocab.add_space_prefix) == ("llama", True, True)
    assert vocab.token_types[vocab.tokens.index("<0xE6>")] == 6  # BYTE
    assert vocab.token_types[1] == 3  # <s>: CONTROL
    assert_same_ids(tokenizer, tmp_path, TEXTS + ["<s>x</s> and more"])


def test_unconvertible_tokenizers_are_refused_with_the_reason(tiny_tokenizer):
    with pytest.raises(TokenizerConversionError, match="WordLevel"):
        convert_tokenizer(tiny_tokenizer, 97)
    odd = with_pre_tokenizer(tiny_bpe_tokenizer(), {"type": "Whitespace"})
    with pytest.raises(TokenizerConversionError, match="neither byte-level"):
        convert_tokenizer(odd, 400)
    unknown_regex = with_pre_tokenizer(tiny_bpe_tokenizer(), {
        "type": "Sequence", "pretokenizers": [split("\\w+|\\s+"), byte_level(False)]})
    with pytest.raises(TokenizerConversionError, match="no known llama.cpp equivalent"):
        convert_tokenizer(unknown_regex, 400)


def test_short_vocabulary_is_padded_with_unused_tokens():
    tokenizer = copy.deepcopy(tiny_bpe_tokenizer())
    vocab = convert_tokenizer(tokenizer, 403)
    assert vocab.tokens[400:] == ("[PAD400]", "[PAD401]", "[PAD402]")
    assert set(vocab.token_types[400:]) == {5}  # UNUSED
