"""Layer importance: removal with prefix reuse equals the naive way, hooks are cleaned up, the
cache hits, misses and invalidates as it should, and the JSON file round-trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import gqaprune_core.layer_importance as importance_module
from gqaprune_core.evaluate import perplexity
from gqaprune_core.layer_calls import record_calls
from gqaprune_core.layer_importance import (
    LayerImportance,
    compute_layer_importance,
    layer_importance,
    load_importance_config,
    save_importance_config,
    weights_fingerprint,
)
from gqaprune_core.models import decoder_layers

ARCHITECTURES = ["llama", "mistral", "qwen2_bias"]
TEXT = ("The quick brown fox jumps over the lazy dog. " * 4 + "\n\n"
        "Pack my box with five dozen liquor jugs! " * 4 + "\n\n"
        "How vexingly quick daft zebras jump; 0123456789. " * 4 + "\n\n"
        "Sphinx of black quartz, judge my vow? " * 4)


class Bypass(nn.Module):
    """A decoder layer that passes its input on unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def naive_removal(model, ids):
    """Perplexity increase with each layer really replaced by :class:`Bypass`."""
    layers = decoder_layers(model)
    base = perplexity(model, ids, batch_size=4).value
    scores = []
    for index in range(len(layers)):
        original = layers[index]
        layers[index] = Bypass()
        try:
            scores.append(perplexity(model, ids, batch_size=4).value - base)
        finally:
            layers[index] = original
    return scores


def calibration(count=4, length=20):
    return torch.randint(0, 97, (count, length), generator=torch.Generator().manual_seed(3))


def assert_no_hooks(model):
    for layer in decoder_layers(model):
        assert not layer._forward_hooks and not layer._forward_pre_hooks


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_manual_layers_reproduce_forward(make_tiny, variant):
    model, ids = make_tiny(variant), calibration()
    with torch.no_grad():
        calls, final = record_calls(model, ids)
        hidden = calls[0].hidden
        for call, layer in zip(calls, decoder_layers(model)):
            hidden = call.run(layer, hidden)
        assert torch.equal(model.model.norm(hidden), final)
        assert torch.equal(model.lm_head(final), model(ids).logits)
    assert_no_hooks(model)


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_removal_equals_naive_bypass(make_tiny, variant):
    model, ids = make_tiny(variant), calibration()
    seen = []
    scores, statistics = compute_layer_importance(model, ids, "removal", batch_size=3,
                                                  progress=lambda d, t: seen.append((d, t)))
    assert scores == pytest.approx(naive_removal(model, ids), rel=1e-4, abs=1e-4)
    assert statistics["base_ppl"] == pytest.approx(perplexity(model, ids).value, rel=1e-5)
    assert [p - statistics["base_ppl"] for p in statistics["layer_ppl"]] == pytest.approx(scores)
    assert seen[-1] == (6, 6)  # 2 batches (3 + 1 windows) x 3 layers
    assert not model.training
    assert_no_hooks(model)


@pytest.mark.parametrize("method", ["activation", "block_influence"])
@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_hook_methods_are_finite_and_clean_up(make_tiny, variant, method):
    model = make_tiny(variant)
    scores, statistics = compute_layer_importance(model, calibration(), method, batch_size=2)
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
    assert statistics["min"] <= statistics["mean"] <= statistics["max"]
    if method == "block_influence":
        assert all(0.0 <= s <= 2.0 for s in scores)
    else:
        assert all(s > 0 for s in scores)
    assert_no_hooks(model)


def test_activation_is_the_mean_output_norm(make_tiny):
    model, ids = make_tiny(), calibration()
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is layer i's output, except the last, which is after the final norm
    expected = [float(h.norm(dim=-1).mean()) for h in hidden[1:-1]]
    scores, _ = compute_layer_importance(model, ids, "activation", batch_size=4)
    assert scores[:-1] == pytest.approx(expected, rel=1e-5)


class Boom(nn.Module):
    def forward(self, hidden):
        raise RuntimeError("boom")


@pytest.mark.parametrize("method", ["removal", "activation", "block_influence"])
def test_hooks_removed_when_forward_fails(make_tiny, method):
    model = make_tiny()
    model.model.norm = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        compute_layer_importance(model, calibration(), method)
    assert_no_hooks(model)


def test_bad_arguments(make_tiny):
    model = make_tiny()
    with pytest.raises(ValueError, match="unknown layer importance method 'taylor'"):
        compute_layer_importance(model, calibration(), "taylor")
    with pytest.raises(ValueError, match=r"got \(5,\)"):
        compute_layer_importance(model, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        compute_layer_importance(model, calibration(), batch_size=0)


# ---------------------------------------------------------------------------------------------
# fingerprint and cache


def test_fingerprint_sees_pruning_and_edits(make_tiny):
    model = make_tiny()
    first = weights_fingerprint(model)
    assert weights_fingerprint(make_tiny()) == first
    assert weights_fingerprint(make_tiny(seed=1)) != first
    with torch.no_grad():
        decoder_layers(model)[1].mlp.down_proj.weight[5, 7] += 0.05
    assert weights_fingerprint(model) != first
    shorter = make_tiny()
    mlp = decoder_layers(shorter)[2].mlp
    mlp.up_proj.weight = nn.Parameter(mlp.up_proj.weight[:-1].clone())
    assert weights_fingerprint(shorter) != first


@pytest.fixture
def corpus_files(tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(TEXT)
    second.write_text(TEXT.upper())
    return str(first), str(second)


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of compute_layer_importance (still computing)."""
    calls = []
    real = importance_module.compute_layer_importance

    def wrapper(*args, **kwargs):
        calls.append(kwargs.get("method", args[2] if len(args) > 2 else "removal"))
        return real(*args, **kwargs)

    monkeypatch.setattr(importance_module, "compute_layer_importance", wrapper)
    return calls


def run(model, tokenizer, text_file, tmp_path, **overrides):
    arguments = {"method": "activation", "corpus": text_file, "samples": 4, "seq_len": 16,
                 "seed": 0, "model_id": "tiny", "cache_root": tmp_path} | overrides
    return layer_importance(model, tokenizer, **arguments)


def test_cache_hit_skips_compute(make_tiny, tiny_tokenizer, corpus_files, tmp_path, monkeypatch):
    model = make_tiny()
    first = run(model, tiny_tokenizer, corpus_files[0], tmp_path, method="removal")
    assert len(first.scores) == 3 and first.method == "removal"
    files = list((tmp_path / "importance").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("tiny-removal-")

    def fail(*args, **kwargs):
        raise AssertionError("a cache hit must not compute")

    monkeypatch.setattr(importance_module, "compute_layer_importance", fail)
    second = run(model, tiny_tokenizer, corpus_files[0], tmp_path, method="removal")
    assert second == first


def test_cache_misses_on_changed_inputs(make_tiny, tiny_tokenizer, corpus_files, tmp_path,
                                        counted):
    model = make_tiny()
    base = run(model, tiny_tokenizer, corpus_files[0], tmp_path)
    run(model, tiny_tokenizer, corpus_files[0], tmp_path)
    assert len(counted) == 1
    variants = [{"corpus": corpus_files[1]}, {"samples": 3}, {"seq_len": 12}, {"seed": 1},
                {"method": "block_influence"}, {"model_id": "other"}]
    for change in variants:
        result = run(model, tiny_tokenizer, corpus_files[0], tmp_path, **change)
        assert result.inputs != base.inputs
    assert len(counted) == 1 + len(variants)
    assert len(list((tmp_path / "importance").glob("*.json"))) == 1 + len(variants)


def test_cache_invalidated_by_weight_change(make_tiny, tiny_tokenizer, corpus_files, tmp_path,
                                            counted):
    model = make_tiny()
    before = run(model, tiny_tokenizer, corpus_files[0], tmp_path)
    with torch.no_grad():
        decoder_layers(model)[0].self_attn.o_proj.weight.mul_(3.0)
    after = run(model, tiny_tokenizer, corpus_files[0], tmp_path)
    assert len(counted) == 2
    assert after.inputs["weights"] != before.inputs["weights"]
    assert after.scores[0] != pytest.approx(before.scores[0])


def test_no_cache_neither_reads_nor_writes(make_tiny, tiny_tokenizer, corpus_files, tmp_path,
                                           counted):
    model = make_tiny()
    run(model, tiny_tokenizer, corpus_files[0], tmp_path, use_cache=False)
    run(model, tiny_tokenizer, corpus_files[0], tmp_path, use_cache=False)
    assert len(counted) == 2
    assert not (tmp_path / "importance").exists()


def test_damaged_cache_entry_is_recomputed(make_tiny, tiny_tokenizer, corpus_files, tmp_path,
                                           counted):
    model = make_tiny()
    first = run(model, tiny_tokenizer, corpus_files[0], tmp_path)
    (entry,) = (tmp_path / "importance").glob("*.json")
    entry.write_text("{ not json")
    again = run(model, tiny_tokenizer, corpus_files[0], tmp_path)
    assert len(counted) == 2 and again.scores == pytest.approx(first.scores)
    assert load_importance_config(entry).inputs == first.inputs


# ---------------------------------------------------------------------------------------------
# file format


def sample_importance():
    return LayerImportance("removal", (3.5, 0.25, 1.0), {"model_id": "tiny", "samples": 4},
                           {"base_ppl": 10.0, "layer_ppl": [13.5, 10.25, 11.0]}, 1.5)


def test_config_round_trip(tmp_path):
    path = save_importance_config(tmp_path / "out" / "layer_importance_config.json",
                                  sample_importance(), rates=[0.1, 0.4, 0.25])
    content = json.loads(path.read_text())
    assert content["layer_importance"] == {"0": 3.5, "1": 0.25, "2": 1.0}
    assert content["layer_pruning_rates"] == {"0": 0.1, "1": 0.4, "2": 0.25}
    assert content["method"] == "removal" and content["format_version"] == 1
    assert load_importance_config(path, expected_layers=3) == sample_importance()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    unrated = save_importance_config(tmp_path / "unrated.json", sample_importance())
    assert json.loads(unrated.read_text())["layer_pruning_rates"] == {}


def test_reads_original_files(tmp_path):
    path = tmp_path / "layer_importance_config.json"
    path.write_text(json.dumps({"layer_pruning_rates": {"0": 0.2, "1": 0.3},
                                "layer_importance": {"1": 0.5, "0": 2.0},
                                "statistics": {"average_pruning_rate": 0.25}}))
    loaded = load_importance_config(path)
    assert loaded.scores == (2.0, 0.5) and loaded.method == "unknown"


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read layer importance file"),
    ("{ broken", "is not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"statistics": {}}', "'layer_importance' is missing"),
    ('{"layer_importance": {"0": 1.0, "2": 2.0}}', "are not 0..1"),
    ('{"layer_importance": {"0": "high"}}', "non-numeric"),
    ('{"layer_importance": {"0": NaN}}', "must be finite"),
    ('{"layer_importance": {"0": 1.0}, "format_version": 7}', "format_version 7"),
    ('{"layer_importance": {"0": 1.0, "1": 2.0}}', "scores 2 layers, the model has 3"),
])
def test_load_errors_are_clear(tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_importance_config(path, expected_layers=3)
