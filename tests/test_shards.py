"""Sharded safetensors: the writer's shard sizes, names and index; lazy reading of both layouts."""

from __future__ import annotations

import json

import pytest
import torch

from gqaprune_core.export.shards import (INDEX_NAME, SINGLE_NAME, LazyWeights, ShardError,
                                         ShardWriter, shard_name, weight_map)


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"layer.{i}.weight": torch.randn(10, 10, generator=generator) for i in range(5)}


def test_small_model_is_one_file_without_index(tmp_path):
    tensors = _tensors()
    with ShardWriter(tmp_path) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    assert writer.files == [SINGLE_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_NAME]
    with LazyWeights(tmp_path) as weights:
        assert sorted(weights.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(weights.get(name), tensor)


def test_shards_respect_the_size_limit_and_the_index_names_every_tensor(tmp_path):
    tensors = _tensors()  # 400 bytes each
    with ShardWriter(tmp_path, max_shard_bytes=900) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    assert writer.files == [shard_name(i, 3) for i in (1, 2, 3)] + [INDEX_NAME]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 5 * 400
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert [list(index["weight_map"].values()).count(shard_name(i, 3)) for i in (1, 2, 3)] == [2, 2, 1]
    assert not list(tmp_path.glob(".shard-*"))  # provisional names are gone
    with LazyWeights(tmp_path) as weights:
        assert weights.shapes() == {name: (10, 10) for name in tensors}
        assert all(torch.equal(weights.get(n), t) for n, t in tensors.items())


def test_a_tensor_larger_than_a_shard_gets_its_own(tmp_path):
    with ShardWriter(tmp_path, max_shard_bytes=100) as writer:
        writer.add("small", torch.zeros(5))
        writer.add("big", torch.zeros(100))
    assert weight_map(tmp_path) == {"small": shard_name(1, 2), "big": shard_name(2, 2)}


def test_transformers_reads_the_index(tmp_path, make_tiny):
    """A sharded folder written by ShardWriter loads with plain from_pretrained."""
    from transformers import AutoModelForCausalLM

    from gqaprune_core.checkpoint import unique_state_dict

    model = make_tiny()
    model.config.save_pretrained(tmp_path)
    with ShardWriter(tmp_path, max_shard_bytes=20_000) as writer:
        for name, tensor in unique_state_dict(model).items():
            writer.add(name, tensor)
    assert len(writer.files) > 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(12).reshape(1, 12)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(ShardError, match="neither"):
        weight_map(tmp_path)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(ShardError, match="missing"):
        weight_map(tmp_path)
    (tmp_path / INDEX_NAME).write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ShardError, match="unreadable safetensors index"):
        weight_map(tmp_path)


def test_duplicate_names_are_refused(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add("a", torch.zeros(1))
    with pytest.raises(ValueError, match="twice"):
        writer.add("a", torch.zeros(1))
