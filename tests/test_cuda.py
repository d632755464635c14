"""The newer stages on a CUDA device give what they give on CPU (skipped without one; the GPU
script, benchmarks/run_gpu.sh, runs them)."""

from __future__ import annotations

import pytest
import torch

from gqaprune_core.checkpoint import load_pruned
from gqaprune_core.config import PRESETS
from gqaprune_core.layerwise.pipeline import run_layerwise
from gqaprune_core.pipeline import run_pipeline
from gqaprune_core.sensitivity.profile import ProfileSettings, compute_profile
from gqaprune_core.tiny import char_tokenizer
from gqaprune_core.unit_importance import fisher_channel_scores

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = {"importance_samples": 4, "importance_seq_len": 16, "num_examples": 6, "seq_len": 24,
         "eval_seq_len": 32, "max_eval_windows": 2, "channel_multiple": 1, "device": "cuda",
         "pruning_ratio": 0.2, "calibration_dataset": "pydoc", "eval_datasets": ("pydoc",),
         "self_text_share": 0.0}  # layer-wise runs calibrate on real text only


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))


def test_layerwise_on_cuda_equals_in_memory_on_cuda(make_tiny, tmp_path):
    model, tokenizer = make_tiny(), char_tokenizer()
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    config = PRESETS["default"].with_(**SMALL, channel_selection="energy", dtype="float32",
                                      base_model=str(tmp_path / "src"))
    in_memory = run_pipeline(config)
    layerwise = run_layerwise(config, tmp_path / "out", batch_size=4)
    assert layerwise.plan == in_memory.plan
    loaded, _ = load_pruned(tmp_path / "out")
    expected = {k: v.cpu() for k, v in in_memory.model.state_dict().items()}
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-4, rtol=1e-3, msg=name)


def test_fisher_scores_on_cuda_equal_cpu(make_tiny, profile_windows):
    model = make_tiny()
    on_cpu = fisher_channel_scores(model, profile_windows[0], chunk_size=4)
    on_gpu = fisher_channel_scores(model.cuda(), profile_windows[0].cuda(), chunk_size=4)
    for layer, scores in on_cpu.items():
        torch.testing.assert_close(on_gpu[layer].cpu(), scores, rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("mode", ["exact", "anchored"])
def test_profile_on_cuda_equals_cpu(make_tiny, profile_windows, mode):
    model = make_tiny(layers=3)
    fit, ids = profile_windows
    settings = ProfileSettings(mode=mode)
    on_cpu = compute_profile(model, fit, ids, settings)
    on_gpu = compute_profile(model.cuda(), fit, ids, settings, batch_size=32)
    for table in ("mlp_loss", "group_loss", "mlp_error", "group_error"):
        for got, want in zip(getattr(on_gpu, table), getattr(on_cpu, table)):
            assert got == pytest.approx(want, rel=1e-3, abs=1e-5), table
    assert on_gpu.base_loss == pytest.approx(on_cpu.base_loss, rel=1e-5)
