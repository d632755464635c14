"""Model loading, layout read from weights, device/dtype choice and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from gqaprune_core.models import ModelLoadError, count_parameters, layout, load_model, pick_dtype


def test_tiny_source_layout():
    model, tokenizer = load_model("tiny", device="cpu")
    shapes = layout(model)
    assert len(shapes) == 3
    assert {(s.q_heads, s.kv_heads, s.q_per_kv, s.head_dim, s.mlp_width) for s in shapes} == {
        (6, 2, 3, 8, 40)}
    assert tokenizer.decode(tokenizer("Hi there").input_ids) == "Hi there"


@pytest.mark.parametrize("variant,expected", [("mha", (4, 4, 1)), ("q_per_kv4", (8, 2, 4)),
                                              ("qwen2_bias", (6, 2, 3))])
def test_layout_variants(make_tiny, variant, expected):
    s = layout(make_tiny(variant))[0]
    assert (s.q_heads, s.kv_heads, s.q_per_kv) == expected


def test_hf_directory_round_trip(make_tiny, tiny_tokenizer, tmp_path):
    model = make_tiny("qwen2_bias")
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path, device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tokenizer.pad_token is not None


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope", device="cpu")


def test_non_decoder_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="decoder-only"):
        load_model(tmp_path, device="cpu")


def test_heads_not_multiple_of_kv_heads_is_refused(make_tiny):
    model = make_tiny()
    attn = model.model.layers[1].self_attn
    attn.k_proj = torch.nn.Linear(48, 4 * 8, bias=False)  # 6 query heads over 4 KV heads
    with pytest.raises(ModelLoadError, match="layer 1: 6 query heads are not a multiple of 4"):
        layout(model)


def test_gguf_without_tokenizer_is_refused(tmp_path):
    import gguf

    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="no embedded tokenizer"):
        load_model(path, device="cpu")


def test_dtype_defaults():
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        pick_dtype(torch.device("cpu"), "int3")


def test_converted_checkpoint_is_plain_and_tied(make_tiny, tiny_tokenizer, tmp_path):
    """The demo conversion writes weights itself: newer transformers refuse save_pretrained on a
    GGUF-loaded model (it keeps a GGUF quantization_config), which the written config drops."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from gqaprune_core.models import _save_converted

    model = make_tiny(tie_embeddings=True).eval()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    _save_converted(model, tiny_tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == [type(model).__name__]
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert "model.embed_tokens.weight" in weights.keys()
        assert "lm_head.weight" not in weights.keys()  # the tied copy is stored once
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_failed_demo_conversion_leaves_nothing(make_tiny, tiny_tokenizer, tmp_path, monkeypatch):
    from gqaprune_core import models

    def broken(model, tokenizer, directory):
        (directory / "config.json").write_text("{}")
        raise ValueError("not serializable")

    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "demo_gguf_path", lambda: tmp_path / "demo.gguf")
    monkeypatch.setattr(models, "_load_gguf", lambda path, dtype: (make_tiny(), tiny_tokenizer))
    monkeypatch.setattr(models, "_portable_tokenizer", lambda tokenizer, config: tokenizer)
    monkeypatch.setattr(models, "_save_converted", broken)
    with pytest.raises(ValueError, match="not serializable"):
        models.demo_model_dir()
    assert list((tmp_path / "models").iterdir()) == []  # no staging left, no half-written model


@pytest.mark.demo
def test_demo_model_layout_and_generation(demo):
    model, tokenizer = demo
    shapes = layout(model)
    assert len(shapes) == 30
    assert {(s.q_heads, s.kv_heads, s.head_dim, s.mlp_width) for s in shapes} == {(9, 3, 64, 1536)}
    assert count_parameters(model) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
