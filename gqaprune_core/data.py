"""Text corpora split into calibration and evaluation parts that never overlap.

Named sources:

- ``demo``: gensim's ``lee_background.cor`` (300 Australian news articles, one per line), read
  from the installed package; no network.
- ``pydoc``: the standard library's ``pydoc_data.topics`` (Python reference documentation).
- ``wiki``: 96 English Wikipedia articles ("Anarchism" ... "Apollo 11") from the shortened dump
  in gensim's test data, markup stripped (:mod:`gqaprune_core.wiki`); no network.
- ``wikitext2``, ``ptb``, ``c4``: through ``datasets``; they need the network or a local cache.
- any local ``.txt`` file: documents are separated by blank lines.
- ``a+b``: a mixture, e.g. ``demo+pydoc``; each part keeps its own split, and calibration
  windows come from the parts in equal shares.
- ``NAME:fit``: NAME's calibration part split again by document, the first
  ``1 - VALIDATION_FRACTION`` to calibrate and the rest as its evaluation part, a *validation*
  part carved from calibration text (the quality gate measures there; NAME's evaluation part
  is never touched). ``demo:fit+pydoc:fit`` mixes such parts.

The split is by document: the first ``calibration_fraction`` of a source's documents calibrate,
the rest evaluate, so no text is both. For ``datasets`` sources the dataset's own train and
test/validation splits are used.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

BUILTIN_CORPORA = ("demo", "pydoc", "wiki", "wikitext2", "ptb", "c4")
VALIDATION_FRACTION = 0.3  # of a calibration part's documents, for NAME:fit


class CorpusError(ValueError):
    """A corpus that cannot be read (unknown name, missing file, unreachable dataset)."""


@dataclass(frozen=True)
class Corpus:
    """A named source with disjoint calibration and evaluation documents; a mixture also
    keeps its ``parts`` so that calibration windows can be drawn from each in equal shares."""

    name: str
    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]
    parts: tuple[Corpus, ...] = ()

    def text(self, part: str) -> str:
        if part not in ("calibration", "evaluation"):
            raise ValueError(f"part must be 'calibration' or 'evaluation', got {part!r}")
        return "\n\n".join(getattr(self, part))


def _split(name: str, documents: list[str], calibration_fraction: float) -> Corpus:
    # dict.fromkeys: drop repeated documents (pydoc lists some topics under several keys),
    # which would otherwise land in both parts.
    documents = list(dict.fromkeys(d.strip() for d in documents if d.strip()))
    if len(documents) < 2:
        raise CorpusError(f"corpus {name!r} has {len(documents)} documents; need at least 2")
    cut = min(max(1, round(len(documents) * calibration_fraction)), len(documents) - 1)
    return Corpus(name, tuple(documents[:cut]), tuple(documents[cut:]))


def gensim_test_file(name: str, corpus: str) -> Path:
    """The file ``name`` of gensim's test data, which ``corpus`` reads; a :class:`CorpusError`
    saying what to do when gensim or the file is missing."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the {corpus} corpus needs gensim: run `make setup` (pip install gensim)")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / name
    if not path.is_file():
        raise CorpusError(f"the {corpus} corpus reads {path}, which this gensim does not ship")
    return path


def _demo_documents() -> list[str]:
    path = gensim_test_file("lee_background.cor", "demo")
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _wiki_documents() -> list[str]:
    from gqaprune_core.wiki import DUMP, wiki_documents

    return wiki_documents(gensim_test_file(DUMP, "wiki"))


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def hf_corpus(name: str, path: str, config: str | None, text_field: str,
              calibration_split: str, evaluation_split: str,
              data_files: dict[str, str] | None = None) -> Corpus:
    """A corpus from ``datasets.load_dataset``; each split's rows are documents.

    Raises:
        CorpusError: neither the network nor a local cache has the dataset.
    """
    import datasets

    try:
        dataset = datasets.load_dataset(path, config, data_files=data_files)
    except Exception as err:  # datasets raises many types for "not reachable"
        raise CorpusError(
            f"could not load corpus {name!r} ({path}{'/' + config if config else ''}) through "
            f"`datasets`: no network and no local cache has it ({type(err).__name__}: {err}). "
            "Use 'demo', 'pydoc' or a local .txt file instead.") from err
    parts = []
    for split in (calibration_split, evaluation_split):
        if split not in dataset:
            raise CorpusError(f"corpus {name!r} has no split {split!r} (has {list(dataset)})")
        parts.append(tuple(t for t in dataset[split][text_field] if t and t.strip()))
    return Corpus(name, parts[0], parts[1])


_HF_SOURCES: dict[str, Callable[[], Corpus]] = {
    "wikitext2": lambda: hf_corpus("wikitext2", "wikitext", "wikitext-2-raw-v1", "text",
                                   "train", "test"),
    "ptb": lambda: hf_corpus("ptb", "ptb_text_only", "penn_treebank", "sentence",
                             "train", "test"),
    "c4": lambda: hf_corpus(
        "c4", "allenai/c4", None, "text", "train", "validation",
        data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                    "validation": "en/c4-validation.00000-of-00008.json.gz"}),
}


@lru_cache(maxsize=16)
def load_corpus(name: str, calibration_fraction: float = 0.5) -> Corpus:
    """Load a named corpus, a ``.txt`` path, or a ``+``-joined mixture of them."""
    if "+" in name:
        return mixture([load_corpus(part, calibration_fraction) for part in name.split("+")])
    if name.endswith(":fit"):
        documents = load_corpus(name[:-len(":fit")], calibration_fraction).calibration
        if len(documents) < 2:
            raise CorpusError(f"corpus {name!r}: the calibration part has {len(documents)} "
                              "document(s), too few to carve a validation part from")
        cut = min(max(1, round(len(documents) * (1 - VALIDATION_FRACTION))), len(documents) - 1)
        return Corpus(name, documents[:cut], documents[cut:])
    if name == "demo":
        return _split(name, _demo_documents(), calibration_fraction)
    if name == "pydoc":
        return _split(name, _pydoc_documents(), calibration_fraction)
    if name == "wiki":
        return _split(name, _wiki_documents(), calibration_fraction)
    if name in _HF_SOURCES:
        return _HF_SOURCES[name]()
    path = Path(name).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise CorpusError(f"text file {str(path)!r} does not exist")
        documents = path.read_text(encoding="utf-8", errors="replace").split("\n\n")
        return _split(path.stem, documents, calibration_fraction)
    raise CorpusError(f"unknown corpus {name!r}: use one of {', '.join(BUILTIN_CORPORA)}, "
                      "a path to a .txt file, or a mixture like 'demo+pydoc'")


def mixture(parts: list[Corpus]) -> Corpus:
    """Sources joined: evaluation texts concatenated, calibration windows drawn from each part
    in equal shares (see :func:`calibration_batch`)."""
    return Corpus("+".join(p.name for p in parts), tuple(d for p in parts for d in p.calibration),
                  tuple(d for p in parts for d in p.evaluation), tuple(parts))


def fit_and_validation(name: str) -> tuple[Corpus, Corpus]:
    """The fit share of every source of ``name`` (``NAME:fit``; a source already named so
    stays) and, as a corpus whose *calibration* part they are, its validation documents: two
    corpora to draw calibration windows from, disjoint by document (mixtures keep their
    parts). Raises :class:`CorpusError` when a source has too few documents to split."""
    parts = [part if part.endswith(":fit") else f"{part}:fit" for part in name.split("+")]
    fits = [load_corpus(part) for part in parts]
    held = [Corpus(f"{fit.name}:validation", fit.evaluation, ()) for fit in fits]
    if len(fits) == 1:
        return fits[0], held[0]
    return mixture(fits), mixture(held)


def tokenize_documents(tokenizer, documents: tuple[str, ...]) -> torch.Tensor:
    """One 1-D LongTensor: the documents joined by blank lines, without special tokens.

    Plain text separators keep the numbers comparable across tokenizers (no model-specific EOS).
    """
    ids = tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


def _part_tokens(tokenizer, corpus: Corpus, part: str) -> torch.Tensor:
    """Tokens of one part, memoised: evaluation before and after pruning reuses them."""
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), len(tokenizer), corpus, part)
    if key not in _TOKEN_CACHE:
        if len(_TOKEN_CACHE) >= 16:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = tokenize_documents(tokenizer, getattr(corpus, part))
    return _TOKEN_CACHE[key]


def calibration_batch(tokenizer, corpus: str | Corpus, num_samples: int = 10, seq_len: int = 64,
                      seed: int = 0) -> torch.Tensor:
    """``(num_samples, seq_len)`` token ids drawn at seeded random offsets of the calibration part.

    Like the original ``get_examples``: random windows of the calibration text. A mixture gives
    each of its sources an equal share of the windows (the first sources one more when
    ``num_samples`` does not divide), whatever their sizes, in a seeded random row order.
    """
    corpus = load_corpus(corpus) if isinstance(corpus, str) else corpus
    if corpus.parts:
        count = len(corpus.parts)
        shares = [num_samples // count + (i < num_samples % count) for i in range(count)]
        rows = torch.cat([calibration_batch(tokenizer, part, share, seq_len, seed + i)
                          for i, (part, share) in enumerate(zip(corpus.parts, shares)) if share])
        order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
        return rows[order]
    tokens = _part_tokens(tokenizer, corpus, "calibration")
    if tokens.numel() <= seq_len:
        raise CorpusError(f"corpus {corpus.name!r} calibration part has {tokens.numel()} tokens, "
                          f"fewer than seq_len {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (num_samples,), generator=generator)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def evaluation_windows(tokenizer, corpus: str | Corpus, seq_len: int = 512,
                       max_windows: int | None = None) -> torch.Tensor:
    """``(N, seq_len)`` non-overlapping windows of the evaluation part (the tail is dropped)."""
    corpus = load_corpus(corpus) if isinstance(corpus, str) else corpus
    tokens = _part_tokens(tokenizer, corpus, "evaluation")
    count = tokens.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise CorpusError(f"corpus {corpus.name!r} evaluation part has {tokens.numel()} tokens, "
                          f"fewer than one window of {seq_len}")
    return tokens[:count * seq_len].reshape(count, seq_len)
