"""Corpora: disjoint calibration/evaluation parts, batches, windows, datasets loading."""

from __future__ import annotations

import json

import pytest
import torch

from gqaprune_core import data
from gqaprune_core.data import (CorpusError, calibration_batch, evaluation_windows, hf_corpus,
                                load_corpus)


@pytest.mark.parametrize("name", ["demo", "pydoc"])
def test_builtin_corpora_split_by_document_without_overlap(name):
    corpus = load_corpus(name)
    assert len(corpus.calibration) > 10 and len(corpus.evaluation) > 10
    assert not set(corpus.calibration) & set(corpus.evaluation)


def test_mixture_keeps_each_split(tmp_path):
    mix = load_corpus("demo+pydoc")
    assert set(load_corpus("demo").evaluation) <= set(mix.evaluation)
    assert not set(mix.calibration) & set(mix.evaluation)


def test_mixture_draws_calibration_windows_from_each_source_equally(tmp_path, tiny_tokenizer):
    """A small source next to a large one still gets half the windows."""
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text("\n\n".join("aaaa " * (4 + i) for i in range(4)))  # distinct documents
    large.write_text("\n\n".join("zzzz " * (100 + i) for i in range(40)))
    batch = calibration_batch(tiny_tokenizer, f"{small}+{large}", num_samples=9, seq_len=8, seed=0)
    texts = [tiny_tokenizer.decode(row) for row in batch]
    from_small = sum("a" in t for t in texts)
    assert from_small == 5 and sum("z" in t for t in texts) == 4  # 9 = 5 + 4, first source first
    assert [("a" in t) for t in texts] != [True] * 5 + [False] * 4  # rows are shuffled
    again = calibration_batch(tiny_tokenizer, f"{small}+{large}", num_samples=9, seq_len=8, seed=0)
    assert torch.equal(batch, again)


def test_fit_and_validation_split_the_calibration_documents(tmp_path):
    fit, held = data.fit_and_validation("demo+pydoc")
    for part_fit, part_held, name in zip(fit.parts, held.parts, ("demo", "pydoc")):
        calibration = load_corpus(name).calibration
        assert part_fit.calibration + part_held.calibration == calibration  # 70 % + 30 %
        assert len(part_held.calibration) == round(0.3 * len(calibration))
        assert not part_held.evaluation  # windows are drawn from the validation documents
    assert data.fit_and_validation("demo:fit")[0] == load_corpus("demo:fit")  # already a share
    single = tmp_path / "two.txt"  # one calibration document, one evaluation document
    single.write_text("one document only " * 50 + "\n\n" + "the other one " * 50)
    with pytest.raises(CorpusError, match="too few"):
        data.fit_and_validation(str(single))


def test_text_file_corpus(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"Document number {i} says hello." for i in range(10)))
    corpus = load_corpus(str(path))
    assert corpus.name == "notes" and len(corpus.calibration) == 5
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_unknown_corpus_is_named():
    with pytest.raises(CorpusError, match="unknown corpus 'nonsense'"):
        load_corpus("nonsense")


def test_calibration_batch_and_windows(tiny_tokenizer):
    batch = calibration_batch(tiny_tokenizer, "demo", num_samples=5, seq_len=32, seed=1)
    assert batch.shape == (5, 32) and batch.dtype == torch.long
    assert torch.equal(batch, calibration_batch(tiny_tokenizer, "demo", 5, 32, seed=1))
    assert not torch.equal(batch, calibration_batch(tiny_tokenizer, "demo", 5, 32, seed=2))
    windows = evaluation_windows(tiny_tokenizer, "demo", seq_len=64, max_windows=7)
    assert windows.shape == (7, 64)
    calibration_text = load_corpus("demo").text("calibration")
    first = tiny_tokenizer.decode(windows[0])
    assert first not in calibration_text  # evaluation windows come from the other half


def test_datasets_loading_on_a_local_dataset(tmp_path):
    """The `datasets` path used for wikitext2/ptb/c4, on a small dataset built here."""
    for split, count in (("train", 6), ("test", 4)):
        rows = [{"text": f"{split} line {i}"} for i in range(count)] + [{"text": ""}]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    files = {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "test")}
    corpus = hf_corpus("local", "json", None, "text", "train", "test", data_files=files)
    assert corpus.calibration == tuple(f"train line {i}" for i in range(6))
    assert corpus.evaluation == tuple(f"test line {i}" for i in range(4))


def test_unreachable_dataset_gives_clear_error(tmp_path):
    missing = {"train": str(tmp_path / "absent.jsonl")}
    with pytest.raises(CorpusError, match="could not load corpus 'wikitext2'.*no local cache"):
        hf_corpus("wikitext2", "json", None, "text", "train", "test", data_files=missing)
    assert "wikitext2" in data.BUILTIN_CORPORA
