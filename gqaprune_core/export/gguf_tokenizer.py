"""Convert a Hugging Face fast tokenizer into GGUF ``tokenizer.ggml.*`` metadata.

llama.cpp re-implements tokenization from the metadata alone, so the conversion must describe
exactly what transformers does; anything this module cannot describe is refused with
:class:`TokenizerConversionError` instead of writing a GGUF that tokenizes differently.

Two families are understood, both read from the tokenizer's ``tokenizer.json``:

- **byte-level BPE** (GPT-2 style: SmolLM2, Llama-3, Qwen2): ``tokenizer.ggml.model = "gpt2"``,
  the tokens in id order, their types, the merges, and ``pre``, the name llama.cpp uses to pick
  its pre-tokenizer regex. ``pre`` is chosen from the HF pre-tokenizer's structure and regex:

  ======================================================  ============
  HF pre-tokenizer                                          ``pre``
  ======================================================  ============
  ByteLevel(use_regex=True)                                 gpt-2
  Digits(individual) + ByteLevel(use_regex=True)            smollm
  Split(Llama-3 regex) + ByteLevel(use_regex=False)         llama-bpe
  Split(Qwen2 regex) + ByteLevel(use_regex=False)           qwen2
  ======================================================  ============

- **SentencePiece-style BPE** (Llama-2, Mistral: ``byte_fallback`` and ``▁`` for spaces):
  ``tokenizer.ggml.model = "llama"``, tokens, scores and types. llama.cpp merges the adjacent
  pair whose *merged token* scores highest; HF merges the pair of lowest merge rank. A merged
  token therefore scores minus the rank of the first merge that produces it.

Special token ids (bos/eos/unk/pad), whether BOS/EOS are added (measured by encoding a probe
text, not read from flags), and the chat template are written too. Tokens whose ids are past
the model's embedding rows (added tokens a model cannot emit) are dropped; a vocabulary shorter
than the embedding is padded with unused ``[PAD<id>]`` tokens, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# llama.cpp's token types (gguf.TokenType values).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|"
                " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"
               " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
SPLIT_REGEX_NAMES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
PROBE_TEXT = "Hello world"


class TokenizerConversionError(ValueError):
    """A tokenizer whose behaviour GGUF metadata cannot reproduce (the reason is named)."""


@dataclass(frozen=True)
class GgufVocab:
    """Everything written under ``tokenizer.ggml.*`` (lists in token-id order, length V)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None  # llama.cpp pre-tokenizer name (gpt2 model only)
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...] | None  # llama model only
    merges: tuple[str, ...]  # gpt2 model only: "left right"
    special_ids: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None


def convert_tokenizer(tokenizer: Any, vocab_rows: int) -> GgufVocab:
    """Describe ``tokenizer`` (a transformers fast tokenizer) for a model with ``vocab_rows``
    embedding rows.

    Raises:
        TokenizerConversionError: no tokenizer, a slow (Python) tokenizer, a model type other
            than BPE, a pre-tokenizer or normalizer llama.cpp has no equivalent for.
    """
    if tokenizer is None:
        raise TokenizerConversionError(
            "the model has no tokenizer; a GGUF needs one (save the checkpoint with its tokenizer)")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerConversionError(
            f"{type(tokenizer).__name__} is a slow tokenizer without tokenizer.json; "
            "load the fast tokenizer (tokenizer.json) to export a GGUF")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerConversionError(
            f"tokenizer model type {model.get('type')!r} cannot be converted: GGUF export "
            "supports byte-level BPE and SentencePiece-style BPE tokenizers")
    vocab = _id_to_token(spec, vocab_rows)
    added = {t["id"]: t for t in spec.get("added_tokens", []) if t["id"] < vocab_rows}
    add_bos, add_eos = _added_specials(tokenizer)
    common = dict(special_ids=_special_ids(tokenizer, vocab_rows), add_bos=add_bos,
                  add_eos=add_eos, chat_template=_chat_template(tokenizer))
    if _is_byte_level(spec):
        _require_plain_normalizer(spec.get("normalizer"), allowed={"NFC"})
        return GgufVocab(model="gpt2", pre=_pre_name(spec.get("pre_tokenizer")),
                         tokens=tuple(vocab), token_types=_types(vocab, added, byte_level=True),
                         scores=None, merges=tuple(_merge_strings(model)),
                         add_space_prefix=False, **common)
    if model.get("byte_fallback"):
        return GgufVocab(model="llama", pre=None, tokens=tuple(vocab),
                         token_types=_types(vocab, added, byte_level=False),
                         scores=_merge_scores(vocab, model), merges=(),
                         add_space_prefix=_sentencepiece_prefix(spec), **common)
    raise TokenizerConversionError(
        "BPE tokenizer is neither byte-level (ByteLevel pre-tokenizer) nor SentencePiece-style "
        "(byte_fallback); llama.cpp has no equivalent")


def _id_to_token(spec: dict, vocab_rows: int) -> list[str]:
    tokens: list[str | None] = [None] * vocab_rows
    for text, index in spec["model"]["vocab"].items():
        if index < vocab_rows:
            tokens[index] = text
    for entry in spec.get("added_tokens", []):
        if entry["id"] < vocab_rows:
            tokens[entry["id"]] = entry["content"]
    return [text if text is not None else f"[PAD{i}]" for i, text in enumerate(tokens)]


def _types(tokens: list[str], added: dict[int, dict], byte_level: bool) -> tuple[int, ...]:
    types = []
    for index, text in enumerate(tokens):
        if index in added:
            types.append(CONTROL if added[index].get("special") else USER_DEFINED)
        elif text.startswith("[PAD") and text == f"[PAD{index}]":
            types.append(UNUSED)
        elif not byte_level and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return tuple(types)


def _merge_strings(model: dict) -> list[str]:
    """Merges as llama.cpp wants them: ``"left right"`` (tokenizer.json has pairs or strings)."""
    merges = []
    for merge in model.get("merges", []):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if " " in left or " " in right:
            raise TokenizerConversionError(
                f"merge {merge!r} contains a space, which GGUF's 'left right' merges cannot hold")
        merges.append(f"{left} {right}")
    return merges


def _merge_scores(tokens: list[str], model: dict) -> tuple[float, ...]:
    """Score per token: minus the rank of the first merge producing it (0 for base pieces)."""
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(_merge_strings(model)):
        left, right = merge.split(" ", 1)
        rank_of.setdefault(left + right, rank)
    return tuple(-float(rank_of[text]) if text in rank_of else 0.0 for text in tokens)


def _is_byte_level(spec: dict) -> bool:
    return any(step.get("type") == "ByteLevel" for step in _steps(spec.get("pre_tokenizer")))


def _steps(component: dict | None, key: str = "pretokenizers") -> list[dict]:
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return list(component.get(key, []))
    return [component]


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE pre-tokenizer (table above)."""
    steps = _steps(pre)
    kinds = [step.get("type") for step in steps]
    if len(steps) == 1 and kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEX_NAMES and steps[0].get("behavior") == "Isolated":
            return SPLIT_REGEX_NAMES[regex]
    if any(step.get("add_prefix_space") for step in steps if step.get("type") == "ByteLevel"):
        raise TokenizerConversionError("ByteLevel(add_prefix_space=True) has no llama.cpp "
                                       "equivalent")
    raise TokenizerConversionError(
        f"pre-tokenizer {kinds} has no known llama.cpp equivalent (known: ByteLevel; Digits + "
        "ByteLevel; Split with the Llama-3 or Qwen2 regex + ByteLevel)")


def _require_plain_normalizer(normalizer: dict | None, allowed: set[str]) -> None:
    kinds = {step.get("type") for step in _steps(normalizer, key="normalizers")}
    if kinds - allowed:
        raise TokenizerConversionError(
            f"normalizer {sorted(kinds)} has no llama.cpp equivalent for a byte-level tokenizer")


def _sentencepiece_prefix(spec: dict) -> bool:
    """Whether a ``▁`` is prepended (llama.cpp's add_space_prefix); other rules are refused."""
    prefix = False
    for step in _steps(spec.get("normalizer"), key="normalizers"):
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == "\u2581":
            prefix = True
        elif kind == "Replace" and step.get("content") == "\u2581" \
                and (step.get("pattern") or {}).get("String") == " ":
            continue
        else:
            raise TokenizerConversionError(f"SentencePiece normalizer step {kind!r} has no "
                                           "llama.cpp equivalent")
    for step in _steps(spec.get("pre_tokenizer")):
        if step.get("type") != "Metaspace" or step.get("split", False):
            raise TokenizerConversionError(
                f"SentencePiece pre-tokenizer {step.get('type')!r} (split="
                f"{step.get('split')}) has no llama.cpp equivalent")
        prefix = prefix or step.get("prepend_scheme", "always") in ("always", "first")
    return prefix


def _special_ids(tokenizer: Any, vocab_rows: int) -> dict[str, int]:
    ids = {}
    for name in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if value is not None and 0 <= int(value) < vocab_rows:
            ids[name] = int(value)
    return ids


def _added_specials(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS), measured on a probe text."""
    plain = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    full = tokenizer(PROBE_TEXT)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    if len(full) - len(plain) != int(add_bos) + int(add_eos):
        raise TokenizerConversionError(
            f"the tokenizer adds tokens other than BOS/EOS ({full} vs {plain} for "
            f"{PROBE_TEXT!r}); llama.cpp cannot reproduce that")
    return add_bos, add_eos


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def write_vocab(writer: Any, vocab: GgufVocab) -> None:
    """Add ``vocab`` to a ``gguf.GGUFWriter`` (before its header is written)."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    if vocab.scores is not None:
        writer.add_token_scores(list(vocab.scores))
    if vocab.merges:
        writer.add_token_merges(list(vocab.merges))
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for name, token_id in vocab.special_ids.items():
        setters[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
