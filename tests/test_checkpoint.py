"""Checkpoints: bit-exact round trips with per-layer shapes, atomic writes, clear errors."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gqaprune_core.checkpoint import (CONFIG_NAME, PLAN_NAME, WEIGHTS_NAME, CheckpointError,
                                      load_pruned, save_pruned, skeleton_shapes)
from gqaprune_core.models import layout
from gqaprune_core.plan import PruningPlan, identity_plan
from gqaprune_core.surgery import apply_plan_
from gqaprune_core.tiny import char_tokenizer

PACKAGE = Path(__file__).resolve().parents[1] / "gqaprune_core"


pytestmark = pytest.mark.usefixtures("one_thread")


def keep_plan(model, keep: dict[int, tuple[tuple[int, ...] | None, tuple[int, ...] | None]]
              ) -> PruningPlan:
    """Identity plan of ``model`` with ``{layer: (kept groups, kept channels)}`` (None: all)."""
    plan = identity_plan(layout(model), method="hand")
    for index, (groups, channels) in keep.items():
        layer = plan.layers[index]
        plan = plan.with_layer(replace(layer, kept_kv_heads=groups or layer.kept_kv_heads,
                                       kept_mlp_channels=channels or layer.kept_mlp_channels))
    return plan


def mixed_plan(model) -> PruningPlan:
    """Layer 0 keeps group 1 only; layer 1 keeps every group and half the MLP; layer 2 as is."""
    width = layout(model)[1].mlp_width
    return keep_plan(model, {0: ((1,), None), 1: (None, tuple(range(0, width, 2)))})


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@pytest.mark.parametrize("variant, overrides", [
    ("llama", {}), ("qwen2_bias", {}), ("llama", {"tie_embeddings": True}), ("q_per_kv4", {}),
])
def test_round_trip_with_different_layer_shapes_is_bit_exact(
        make_tiny, tiny_tokenizer, tiny_ids, tmp_path, variant, overrides):
    model = make_tiny(variant, **overrides)
    original = layout(model)
    plan = mixed_plan(model)
    apply_plan_(model, plan)
    target = save_pruned(model, tiny_tokenizer, plan, tmp_path / "ckpt")

    loaded, tokenizer = load_pruned(target)

    assert torch.equal(logits(loaded, tiny_ids), logits(model, tiny_ids))
    assert layout(loaded) == layout(model)
    assert PruningPlan.load(target / PLAN_NAME) == plan
    config = json.loads((target / CONFIG_NAME).read_text())
    first = original[0]  # layers differ: config describes the original (skeleton) shapes
    assert (config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"]) == (first.q_heads, first.kv_heads, first.mlp_width)
    assert tokenizer("Hi there!").input_ids == tiny_tokenizer("Hi there!").input_ids
    if overrides.get("tie_embeddings"):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        from safetensors import safe_open

        with safe_open(target / WEIGHTS_NAME, framework="pt") as handle:
            assert "lm_head.weight" not in handle.keys()


def test_uniform_plan_loads_with_plain_transformers(make_tiny, tiny_tokenizer, tiny_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny("qwen2_bias")
    plan = keep_plan(model, {i: ((0,), tuple(range(3, 40, 3))) for i in range(3)})
    apply_plan_(model, plan)
    target = save_pruned(model, tiny_tokenizer, plan, tmp_path / "uniform")

    config = json.loads((target / CONFIG_NAME).read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["intermediate_size"]) == (3, 1, 8, 13)
    plain = AutoModelForCausalLM.from_pretrained(target).eval()
    assert torch.equal(logits(plain, tiny_ids), logits(model, tiny_ids))
    ours, _ = load_pruned(target)
    assert torch.equal(logits(ours, tiny_ids), logits(model, tiny_ids))
    plain_bf16 = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16).eval()
    ours_bf16, _ = load_pruned(target, dtype=torch.bfloat16)
    assert torch.equal(logits(ours_bf16, tiny_ids), logits(plain_bf16, tiny_ids))


def test_without_plan_stores_the_current_layout(make_tiny, tiny_ids, tmp_path):
    model = make_tiny()
    apply_plan_(model, mixed_plan(model))
    target = save_pruned(model, None, None, tmp_path / "noplan")

    stored = PruningPlan.load(target / PLAN_NAME)
    assert all(layer.is_identity for layer in stored.layers)
    assert [(p.q_heads, p.kv_heads, p.mlp) for p in stored.layers] == \
        [(s.q_heads, s.kv_heads, s.mlp_width) for s in layout(model)]
    loaded, tokenizer = load_pruned(target, check=False)
    assert tokenizer is None
    assert torch.equal(logits(loaded, tiny_ids), logits(model, tiny_ids))


def test_load_casts_to_the_requested_dtype(make_tiny, tmp_path):
    model = make_tiny()
    target = save_pruned(model, None, None, tmp_path / "fp32")
    loaded, _ = load_pruned(target, dtype="bf16", check=False)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_on_gpu_is_bit_exact(make_tiny, tiny_ids, tmp_path, dtype):
    model = make_tiny("qwen2_bias", tie_embeddings=True)
    apply_plan_(model, mixed_plan(model))
    # Load (not .to(dtype)) so that the rotary buffer stays fp32 as from_pretrained keeps it.
    first, _ = load_pruned(save_pruned(model, None, None, tmp_path / "cpu"), "cuda", dtype)
    second, _ = load_pruned(save_pruned(first, None, None, tmp_path / "gpu"), "cuda")
    assert next(second.parameters()).is_cuda and next(second.parameters()).dtype == dtype
    assert second.lm_head.weight is second.model.embed_tokens.weight
    assert torch.equal(logits(second, tiny_ids.cuda()), logits(first, tiny_ids.cuda()))


def test_save_refuses_a_plan_that_does_not_describe_the_model(make_tiny, tmp_path):
    model = make_tiny()
    stale = identity_plan(layout(model))
    apply_plan_(model, mixed_plan(model))
    with pytest.raises(ValueError, match=r"layer 0: model has \(H, G, D, I\) = \(3, 1, 8, 40\)"):
        save_pruned(model, None, stale, tmp_path / "stale")
    assert not (tmp_path / "stale").exists()


def test_failure_while_saving_leaves_nothing_behind(make_tiny, tmp_path, monkeypatch):
    tokenizer = char_tokenizer()

    def explode(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(tokenizer, "save_pretrained", explode)
    with pytest.raises(OSError, match="simulated"):
        save_pruned(make_tiny(), tokenizer, None, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_directory_unless_overwrite(make_tiny, tiny_tokenizer, tmp_path,
                                                        monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=re.escape(str(target))):
        save_pruned(make_tiny(), None, None, target)

    failing = char_tokenizer()
    monkeypatch.setattr(failing, "save_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save_pruned(make_tiny(), failing, None, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"  # a failed overwrite changes nothing

    save_pruned(make_tiny(), tiny_tokenizer, None, target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / WEIGHTS_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_an_empty_directory_is_filled(make_tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    target = save_pruned(make_tiny(), None, None, tmp_path / "empty")
    assert (target / WEIGHTS_NAME).is_file()


@pytest.fixture
def saved(make_tiny, tmp_path) -> Path:
    model = make_tiny()
    plan = mixed_plan(model)
    apply_plan_(model, plan)
    return save_pruned(model, None, plan, tmp_path / "ckpt")


@pytest.mark.parametrize("damage", [
    lambda data: b"not a safetensors file at all",
    lambda data: data[: len(data) // 2],  # truncated
])
def test_corrupt_weights_give_a_clear_error(saved, damage):
    weights = saved / WEIGHTS_NAME
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError, match="gqaprune_manifest.json recorded"):
        load_pruned(saved)
    with pytest.raises(CheckpointError, match="safetensors"):  # unchecked: the reader's error
        load_pruned(saved, verify=False)


@pytest.mark.parametrize("name", [PLAN_NAME, WEIGHTS_NAME, CONFIG_NAME])
def test_missing_files_give_a_clear_error(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=f"has no {re.escape(name)}"):
        load_pruned(saved)


def test_missing_directory_gives_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pruned(tmp_path / "nowhere")


def test_unreadable_plan_gives_a_clear_error(saved):
    (saved / PLAN_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable plan"):
        load_pruned(saved, verify=False)


def as_old_skeleton_config(directory: Path) -> None:
    """Rewrite config.json as versions before remote code wrote it (skeleton, no lists)."""
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["model_type"] = config["model_type"].removeprefix("gqaprune_")
    for key in ("auto_map", "layer_num_attention_heads", "layer_num_key_value_heads",
                "layer_intermediate_size"):
        config.pop(key)
    (directory / CONFIG_NAME).write_text(json.dumps(config))


def test_plan_that_disagrees_with_the_weights_names_tensor_and_shapes(saved):
    as_old_skeleton_config(saved)
    plan = PruningPlan.load(saved / PLAN_NAME)
    plan.with_layer(replace(plan.layers[0], kept_kv_heads=(0, 1))).save(saved / PLAN_NAME)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.self_attn\.\w+\.weight "
                                              r"has shape \[\d+, \d+\] but .* give \[\d+, \d+\]"):
        load_pruned(saved, verify=False)


def test_plan_that_disagrees_with_the_per_layer_config_is_refused(saved):
    plan = PruningPlan.load(saved / PLAN_NAME)
    plan.with_layer(replace(plan.layers[0], kept_kv_heads=(0, 1))).save(saved / PLAN_NAME)
    with pytest.raises(CheckpointError, match=r"layer_num_attention_heads \[3, 6, 6\] disagrees "
                                              r"with gqaprune_plan.json \(\[6, 6, 6\]\)"):
        load_pruned(saved, verify=False)


def test_old_checkpoint_without_manifest_card_or_remote_code_loads(saved, tiny_ids):
    reference, _ = load_pruned(saved)
    as_old_skeleton_config(saved)
    for name in ("gqaprune_manifest.json", "README.md", "configuration_gqaprune.py",
                 "modeling_gqaprune.py"):
        (saved / name).unlink()
    old, _ = load_pruned(saved)
    assert torch.equal(logits(old, tiny_ids), logits(reference, tiny_ids))


def test_plan_that_does_not_fit_the_config_is_refused(saved):
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["intermediate_size"] = 10  # narrower than layer 0's 40 channels
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layer 0: plan shape .* does not fit"):
        load_pruned(saved, verify=False)


def test_skeleton_shapes(make_tiny):
    model = make_tiny()
    assert skeleton_shapes(identity_plan(layout(model))) == (6, 2, 8, 40)
    assert skeleton_shapes(mixed_plan(model)) == (6, 2, 8, 40)
    uniform = keep_plan(model, {i: ((1,), tuple(range(7))) for i in range(3)})
    assert skeleton_shapes(uniform) == (3, 1, 8, 7)


def _unsafe_loads(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            found += [n for n in names if n.split(".")[0] in ("pickle", "dill", "joblib")]
            if getattr(node, "module", None) == "torch":
                found += [f"from torch import {n}" for n in names if n == "load"]
        elif isinstance(node, ast.Attribute) and node.attr == "load" \
                and isinstance(node.value, ast.Name) and node.value.id == "torch":
            found.append("torch.load")
    return found


# The one module that may let transformers read pickled weights, and only behind the user's
# explicit allow_pickle (it names torch's weights_only unpickler in its messages).
PICKLE_OPT_IN = "model_files.py"


def test_no_module_unpickles_anything():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found = _unsafe_loads(ast.parse(path.read_text(), filename=str(path)))
        if path.name == PICKLE_OPT_IN:  # imports pickle for its exception type only
            found = [name for name in found if name != "pickle"]
        text = path.read_text()
        mentions = "torch.load(" in text or ("weights_only" in text and path.name != PICKLE_OPT_IN)
        if found or mentions:
            offenders[path.name] = found or ["torch.load( / weights_only in text"]
    assert offenders == {}
