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


def _mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype family, odd shapes, a 0-dim, an empty and a non-contiguous tensor."""
    generator = torch.Generator().manual_seed(1)
    return {
        "f32": torch.randn(3, 5, 7, generator=generator),
        "bf16": torch.randn(11, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(2, 3, generator=generator).to(torch.float16),
        "i64": torch.randint(-10**12, 10**12, (4,), generator=generator),
        "flag": torch.rand(3, 3, generator=generator) > 0.5,
        "u8": torch.randint(0, 256, (13,), generator=generator, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(6, 5, generator=generator).t(),
        "f8": torch.randn(9, generator=generator).to(torch.float8_e4m3fn),
    }


def _header(path) -> dict:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert (8 + length) % 8 == 0
    return json.loads(raw[8:8 + length])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (torch.equal has no float8 kernel on CPU)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@pytest.mark.parametrize("max_shard_bytes", [10**9, 64])
def test_shards_load_with_safetensors_for_every_dtype_and_shape(tmp_path, max_shard_bytes):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = _mixed_tensors()
    with ShardWriter(tmp_path, max_shard_bytes, metadata={"source": "test"}) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    weights = [f for f in writer.files if f != INDEX_NAME]
    assert (len(weights) == 1) == (max_shard_bytes == 10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writer.files)
    loaded = {}
    for file in weights:
        with safe_open(str(tmp_path / file), "pt") as handle:
            assert handle.metadata() == {"format": "pt", "source": "test"}
            opened = {name: handle.get_tensor(name) for name in handle.keys()}
        from_file = load_file(tmp_path / file)
        assert opened.keys() == from_file.keys()
        assert all(_same(opened[n], from_file[n]) for n in opened)
        assert all(writer.weight_map[name] == file for name in opened)
        loaded.update(opened)
    assert loaded.keys() == tensors.keys()
    assert all(_same(loaded[name], tensor) for name, tensor in tensors.items())
    assert writer.total_size == sum(t.numel() * t.element_size() for t in tensors.values())


def test_bytes_equal_save_file_when_its_order_is_the_insertion_order(tmp_path):
    """save_file sorts by dtype alignment, then name: one dtype, names added sorted, and one
    metadata key (it writes metadata in hash order) give it our order, so the files match."""
    from safetensors.torch import save_file

    tensors = {name: tensor.to(torch.bfloat16) for name, tensor in sorted(_tensors().items())}
    tensors["layer.9.scalar"] = torch.tensor(1.0, dtype=torch.bfloat16)
    (tmp_path / "ours").mkdir()
    with ShardWriter(tmp_path / "ours") as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours" / SINGLE_NAME).read_bytes() == \
        (tmp_path / "theirs.safetensors").read_bytes()


def test_header_equals_save_file_up_to_order(tmp_path):
    from safetensors.torch import save_file

    tensors = _mixed_tensors()
    (tmp_path / "ours").mkdir()
    with ShardWriter(tmp_path / "ours", metadata={"a": "1", "b": "2"}) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    theirs_path = tmp_path / "theirs.safetensors"
    save_file({n: t.contiguous() for n, t in tensors.items()}, theirs_path,
              metadata={"format": "pt", "a": "1", "b": "2"})
    ours, theirs = _header(tmp_path / "ours" / SINGLE_NAME), _header(theirs_path)
    assert ours.pop("__metadata__") == theirs.pop("__metadata__")
    assert list(ours) == list(tensors)  # the insertion order, laid out contiguously
    ends = [entry["data_offsets"] for entry in ours.values()]
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))

    def without_offsets(header):
        return {name: (e["dtype"], e["shape"], e["data_offsets"][1] - e["data_offsets"][0])
                for name, e in header.items()}

    assert without_offsets(ours) == without_offsets(theirs)

    def data(path, header) -> dict[str, bytes]:
        raw = path.read_bytes()
        start = 8 + int.from_bytes(raw[:8], "little")
        return {name: raw[start + e["data_offsets"][0]:start + e["data_offsets"][1]]
                for name, e in header.items()}

    assert data(tmp_path / "ours" / SINGLE_NAME, ours) == data(theirs_path, theirs)


def test_the_writer_holds_no_tensor_after_add(tmp_path):
    import weakref

    def tensors_in(value) -> int:
        if isinstance(value, torch.Tensor):
            return 1
        if isinstance(value, dict):
            return sum(tensors_in(v) for v in value.values())
        if isinstance(value, list | tuple | set):
            return sum(tensors_in(v) for v in value)
        return 0

    writer = ShardWriter(tmp_path)
    tensor = torch.randn(64, 64)
    storage = weakref.ref(tensor.untyped_storage())
    writer.add("a", tensor)
    del tensor
    assert storage() is None
    assert tensors_in(vars(writer)) == 0
    writer.close()


def test_unstorable_dtypes_and_names_are_refused(tmp_path):
    writer = ShardWriter(tmp_path)
    with pytest.raises(ValueError, match=r"'z'.*complex64"):
        writer.add("z", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="__metadata__"):
        writer.add("__metadata__", torch.zeros(2))
    with pytest.raises(ValueError, match="str to str"):
        ShardWriter(tmp_path, metadata={"n": 1})
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.add("late", torch.zeros(1))


def test_no_tensors_give_an_empty_model_file(tmp_path):
    from safetensors import safe_open

    assert ShardWriter(tmp_path).close() == [SINGLE_NAME]
    with safe_open(str(tmp_path / SINGLE_NAME), "pt") as handle:
        assert list(handle.keys()) == [] and handle.metadata() == {"format": "pt"}


def test_an_error_leaves_only_provisional_files(tmp_path):
    with pytest.raises(KeyError), ShardWriter(tmp_path, max_shard_bytes=500) as writer:
        for name, tensor in _tensors().items():
            writer.add(name, tensor)
        raise KeyError("caller failed")
    assert all(p.name.startswith(".shard-") for p in tmp_path.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        [f".shard-{i:05d}.partial" for i in (1, 2, 3, 4)] + [".shard-00005.data.partial"]


@pytest.mark.parametrize("copy", ["fails_midway", "absent"])
def test_shards_are_whole_when_the_os_cannot_copy_file_to_file(tmp_path, monkeypatch, copy):
    """A file system without copy_file_range, or one that stops midway: the buffered copy
    continues from where the kernel stopped."""
    import os

    from gqaprune_core.export import shards

    if copy == "absent":
        monkeypatch.delattr(shards.os, "copy_file_range", raising=False)
    elif hasattr(os, "copy_file_range"):
        real, calls = os.copy_file_range, []

        def copy_then_fail(src, dst, count, *args):
            calls.append(count)
            if len(calls) > 1:
                raise OSError(95, "Operation not supported")
            return real(src, dst, 7, *args)

        monkeypatch.setattr(shards.os, "copy_file_range", copy_then_fail)
    monkeypatch.setattr(shards, "COPY_CHUNK_BYTES", 33)
    tensors = _mixed_tensors()
    with ShardWriter(tmp_path, max_shard_bytes=300) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    assert len(writer.files) > 2
    with LazyWeights(tmp_path) as weights:
        assert all(_same(weights.get(name), tensor) for name, tensor in tensors.items())
