"""Tiny seeded GQA models and a character tokenizer: fast, offline, deterministic.

Sizes are odd and distinct on purpose (E=48, H=6, G=2, I=40, vocab 97) so that a mix-up of
dimensions fails loudly instead of passing by coincidence.
"""

from __future__ import annotations

import json
import string
from typing import Literal

import torch

Architecture = Literal["llama", "mistral", "qwen2"]
CHARACTERS = string.printable[:95]  # digits, letters, punctuation, space; no \t\n\r\x0b\x0c


def char_tokenizer():
    """A 97-token character tokenizer: ``<unk>``, ``<eos>`` and 95 printable characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {ch: i + 2 for i, ch in enumerate(CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")


def tiny_model(q_heads: int = 6, kv_heads: int = 2, hidden: int = 48, head_dim: int = 8,
               mlp_width: int = 40, layers: int = 3, vocab: int = 97, seed: int = 0,
               architecture: Architecture = "llama", tie_embeddings: bool = False,
               init_std: float = 0.08):
    """A random causal LM of the given shape, seeded, in eval mode, fp32, on CPU.

    ``architecture="qwen2"`` gives q/k/v biases (randomised so that tests see them).
    """
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[architecture]
    config = config_class(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp_width,
        num_hidden_layers=layers, num_attention_heads=q_heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=256, tie_word_embeddings=tie_embeddings,
        initializer_range=init_std, bos_token_id=None, eos_token_id=1, pad_token_id=1,
    )
    if architecture == "mistral":
        config.sliding_window = None
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, init_std)
            elif "norm" in name:
                param.uniform_(0.8, 1.2)  # non-trivial norms catch mis-sliced inputs
    model.config._attn_implementation = "sdpa"
    return model.eval()


TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. A pruned model keeps whole groups of heads; "
    "it's smaller, and we'll run it anywhere. Numbers: 12, 345, 6789 and 3.14. "
    "Grüße aus Köln: naïve café, Straße. def main(): return 0\n"
) * 4


def tiny_bpe_tokenizer(vocab_size: int = 400, sentencepiece: bool = False):
    """A small BPE tokenizer trained on a fixed text: deterministic, offline, fast.

    ``sentencepiece=False``: byte-level BPE (GPT-2 style, as SmolLM2 / Llama-3 / Qwen2), with
    ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``; no BOS added, EOS ``<|im_end|>``.
    ``sentencepiece=True``: Llama-2 style (``▁`` for spaces, prepended once, byte fallback with
    ``<0x00>``..``<0xFF>``), ``<unk>``, ``<s>`` (added in front), ``</s>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    if not sentencepiece:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.train_from_iterator([TRAINING_TEXT], BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                       eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                       pad_token="<|im_end|>")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = Tokenizer(models.BPE())
    trainer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
    trainer.train_from_iterator([TRAINING_TEXT], BpeTrainer(
        vocab_size=vocab_size + len(specials), special_tokens=specials, show_progress=False))
    spec = json.loads(trainer.to_str())["model"]
    backend = Tokenizer(models.BPE(spec["vocab"], [tuple(m) for m in spec["merges"]],
                                   unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = trainer.normalizer
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(specials[:3])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")
