"""Run an exported GGUF in llama.cpp (through llama-cpp-python) to check it: logits, greedy
tokens, perplexity, tokenization. Used by the tests and ``benchmarks/gguf_bench.py``.

Notation: T tokens, V vocabulary.

The KV cache is kept in f32 (``type_k = type_v = GGML_TYPE_F32``): llama.cpp's default f16 cache
rounds keys and values to 11 bits, which alone moves the logits of an f32 export by ~1e-3; with
an f32 cache the remaining difference to PyTorch is summation order (~1e-6 on tiny models).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

GGML_TYPE_F32 = 0


@contextlib.contextmanager
def open_llama(path: str | os.PathLike, n_ctx: int = 256, threads: int = 1,
               vocab_only: bool = False, f32_cache: bool = True) -> Iterator[Any]:
    """A ``llama_cpp.Llama`` on ``path`` with every position's logits kept; closed afterwards.

    Raises:
        ImportError: llama-cpp-python is not installed.
        ValueError: llama.cpp cannot load the file (its log says why; pass verbose to see it).
    """
    from llama_cpp import Llama

    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                n_threads_batch=threads, logits_all=not vocab_only, vocab_only=vocab_only,
                verbose=False, **cache)
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """Logits (T, V) of ``ids`` from a fresh context (fp32).

    Raises:
        ValueError: more tokens than the context opened by :func:`open_llama` holds.
    """
    if len(ids) > llm.scores.shape[0]:
        raise ValueError(f"{len(ids)} tokens do not fit the context of {llm.scores.shape[0]}; "
                         "open it with a larger n_ctx")
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm: Any, ids: Sequence[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy continuations of ``ids``, decoded one at a time with the KV cache."""
    llm.reset()
    llm.eval(list(ids))
    produced: list[int] = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        produced.append(token)
        llm.eval([token])
    return produced


def nll_sum(logits: np.ndarray, ids: Sequence[int]) -> tuple[float, int]:
    """(summed next-token negative log-likelihood, number of predicted tokens) of one window."""
    logits = logits.astype(np.float64)
    shifted = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    targets = np.asarray(ids[1:])
    return float(-log_probs[np.arange(len(targets)), targets].sum()), len(targets)


def llama_perplexity(path: str | os.PathLike, windows: Sequence[Sequence[int]],
                     threads: int = 1) -> float:
    """Token-weighted perplexity of ``windows`` (each scored from a fresh context)."""
    total, count = 0.0, 0
    with open_llama(path, n_ctx=max(len(w) for w in windows), threads=threads) as llm:
        for window in windows:
            nll, tokens = nll_sum(llama_logits(llm, window), window)
            total, count = total + nll, count + tokens
    return float(np.exp(total / count))


def llama_tokenize(llm: Any, text: str) -> list[int]:
    """Token ids as llama.cpp makes them: BOS/EOS as the GGUF says, special tokens parsed."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
