"""Calibration windows the dense model writes itself: sampling, determinism, the disk cache, the
prune stage's batch, and the layer-wise path that cannot write them."""

from __future__ import annotations

import pytest
import torch

from gqaprune_core import self_text
from gqaprune_core.config import PruneConfig
from gqaprune_core.data import calibration_batch
from gqaprune_core.pipeline import prune_calibration
from gqaprune_core.self_text import (DOCUMENT_BREAK, _sample, cache_path,
                                     prompts_for, self_written, write_windows, written_count)

EOS = 1  # the tiny model's end-of-text id


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def prompts():
    return torch.randint(2, 97, (3, 4), generator=torch.Generator().manual_seed(5))


def test_windows_continue_their_prompts_and_are_seeded(make_tiny, prompts):
    model = make_tiny().train()
    ids = write_windows(model, prompts, count=5, seq_len=12, seed=7)
    assert model.training  # put back as it was
    assert ids.shape == (5, 12) and ids.dtype == torch.long
    # rows cycle through the prompts, each starting with its prompt
    cycled = prompts[[0, 1, 2, 0, 1]]
    assert torch.equal(ids[:, :4], cycled)
    assert not (ids[:, 4:] == EOS).any()  # end-of-text never sampled
    assert torch.equal(ids, write_windows(model, prompts, count=5, seq_len=12, seed=7))
    assert not torch.equal(ids, write_windows(model, prompts, count=5, seq_len=12, seed=8))


def test_a_nucleus_of_one_token_writes_what_the_whole_prefix_predicts(make_tiny, prompts,
                                                                     monkeypatch):
    """The KV-cached loop against a full forward pass over each prefix: with only the top token
    in the nucleus, every written token is the argmax (end-of-text excluded) of the model's
    logits over everything before it, so cache positions and the sampling agree."""
    model = make_tiny()
    monkeypatch.setattr(self_text, "BATCH_ROWS", 2)  # two row blocks
    ids = write_windows(model, prompts, count=3, seq_len=14, seed=0, top_p=1e-9)
    with torch.no_grad():
        logits = model(ids).logits[:, 3:-1].clone()
    logits[..., EOS] = float("-inf")
    assert torch.equal(ids[:, 4:], logits.argmax(-1))


def test_the_nucleus_is_read_when_the_windows_are_written(make_tiny, prompts, monkeypatch):
    """``TOP_P`` set after import (a benchmark variant does) reaches the sampler and the cache
    key alike, so a cached file never holds windows of another nucleus."""
    model = make_tiny()
    greedy = write_windows(model, prompts, count=3, seq_len=14, seed=0, top_p=1e-9)
    key = cache_path(model, prompts, 3, 14, 0)
    monkeypatch.setattr(self_text, "TOP_P", 1e-9)
    assert torch.equal(write_windows(model, prompts, count=3, seq_len=14, seed=0), greedy)
    assert torch.equal(self_written(model, prompts, 3, 14, seed=0), greedy)
    assert cache_path(model, prompts, 3, 14, 0) != key


def test_the_temperature_flattens_the_sampling_and_is_read_at_the_call(make_tiny, prompts,
                                                                      monkeypatch):
    """Logits divided by the temperature before the nucleus: at 2 the probabilities go as their
    square root; ``TEMPERATURE`` set after import reaches the sampler and the cache key, and set
    back to 1 gives the default's key again."""
    logits = torch.log(torch.tensor([[0.64, 0.36]])).repeat(2000, 1)
    picks = _sample(logits, 1.0, torch.Generator().manual_seed(0), temperature=2.0)
    share = (picks == 0).float().mean().item()
    assert 0.54 < share < 0.61  # 0.8 / (0.8 + 0.6) = 0.571, against 0.64 at temperature 1
    model = make_tiny()
    key = cache_path(model, prompts, 3, 14, 0)
    hot = write_windows(model, prompts, count=3, seq_len=14, seed=0, temperature=5.0)
    assert not torch.equal(hot, write_windows(model, prompts, count=3, seq_len=14, seed=0))
    monkeypatch.setattr(self_text, "TEMPERATURE", 5.0)
    assert torch.equal(write_windows(model, prompts, count=3, seq_len=14, seed=0), hot)
    assert cache_path(model, prompts, 3, 14, 0) != key
    monkeypatch.setattr(self_text, "TEMPERATURE", 1.0)
    assert cache_path(model, prompts, 3, 14, 0) == key
    with pytest.raises(ValueError, match="temperature must be above 0; got 0"):
        write_windows(model, prompts, count=3, seq_len=14, temperature=0.0)


def test_sampling_stays_inside_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    picks = _sample(logits, 0.8, torch.Generator().manual_seed(0)).flatten()
    assert set(picks.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.8: tokens 2 and 3 never drawn
    share = (picks == 0).float().mean().item()
    assert 0.55 < share < 0.70  # renormalised: 0.5 / 0.8 = 0.625
    certain = torch.log(torch.tensor([[0.97, 0.01, 0.01, 0.01]])).repeat(50, 1)
    assert (_sample(certain, 0.95, torch.Generator().manual_seed(0)) == 0).all()


def test_written_windows_are_cached_and_a_damaged_file_is_written_again(make_tiny, prompts,
                                                                       tmp_path):
    model = make_tiny()
    first = self_written(model, prompts, 4, 10, seed=2, model_id="tiny")
    path = cache_path(model, prompts, 4, 10, 2, "tiny")
    assert path.is_file() and not list(path.parent.glob(".*"))  # no staging file left

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(self_text, "write_windows", refuse)
        assert torch.equal(self_written(model, prompts, 4, 10, seed=2, model_id="tiny"), first)
    assert cache_path(model, prompts, 4, 10, 3, "tiny") != path  # the seed is in the key
    assert path.is_relative_to(tmp_path)  # the test's own cache
    path.write_bytes(b"not safetensors")
    assert torch.equal(self_written(model, prompts, 4, 10, seed=2, model_id="tiny"), first)
    assert self_written(model, prompts, 0, 10).shape == (0, 10)


def test_the_prune_stage_adds_the_share_of_written_windows(make_tiny, tiny_tokenizer):
    model = make_tiny()
    config = PruneConfig(base_model="tiny", calibration_dataset="pydoc", num_examples=6,
                         seq_len=16)
    real = calibration_batch(tiny_tokenizer, "pydoc", 6, 16, 0)
    assert torch.equal(prune_calibration(config, model, tiny_tokenizer), real)
    stages = []
    batch = prune_calibration(config.with_(self_text_share=0.5), model, tiny_tokenizer,
                              lambda stage, done, total: stages.append(stage))
    assert batch.shape == (6 + written_count(0.5, 6), 16) == (9, 16)
    assert torch.equal(batch[:6], real)
    starts = prompts_for(real, tiny_tokenizer)
    assert torch.equal(batch[6:, :starts.shape[1]], starts[:3])
    assert set(stages) == {"self_text"}
    with pytest.raises(ValueError, match="self_text_share=5.0"):
        config.with_(self_text_share=5.0)


def test_too_short_prompts_or_windows_are_refused(make_tiny):
    with pytest.raises(ValueError, match="at least 1 token"):
        write_windows(make_tiny(), torch.zeros(2, 0, dtype=torch.long), 2, 10)
    with pytest.raises(ValueError, match="seq_len 4"):
        write_windows(make_tiny(), torch.zeros(2, 8, dtype=torch.long), 2, 4)


def test_prompts_are_heads_of_real_windows_or_one_document_break(make_tiny, tiny_tokenizer,
                                                               monkeypatch):
    """With PROMPT_TOKENS 0 every window starts where a new document would (the corpora's own
    separator), whatever the real windows hold; the cache tells the two kinds of prompt apart."""
    real = calibration_batch(tiny_tokenizer, "pydoc", 3, 16, 0)
    monkeypatch.setattr(self_text, "PROMPT_TOKENS", 4)
    assert torch.equal(prompts_for(real, tiny_tokenizer), real[:, :4])
    monkeypatch.setattr(self_text, "PROMPT_TOKENS", 1)
    assert torch.equal(prompts_for(real, tiny_tokenizer), real[:, :1])
    monkeypatch.setattr(self_text, "PROMPT_TOKENS", 0)
    document = tiny_tokenizer(DOCUMENT_BREAK, add_special_tokens=False)["input_ids"]
    starts = prompts_for(real, tiny_tokenizer)
    assert starts.tolist() == [document] * 3

    def blank_lines_dropped(text, add_special_tokens=False):
        return {"input_ids": []}

    assert torch.equal(prompts_for(real, blank_lines_dropped), real[:, :1])
    model = make_tiny()
    ids = self_written(model, starts, 4, 16, seed=1, model_id="tiny")
    assert ids[:, :len(document)].tolist() == [document] * 4
    assert len(set(map(tuple, ids.tolist()))) == 4  # one prompt, four different windows
    assert cache_path(model, starts, 4, 16, 1, "tiny") != cache_path(model, real[:, :1], 4, 16,
                                                                      1, "tiny")
