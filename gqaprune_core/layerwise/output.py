"""The layer-wise checkpoint writer: tensors as they come into shards, then config, plan, tokenizer.

The files are those of :func:`gqaprune_core.checkpoint.save_pruned` (so
:func:`gqaprune_core.checkpoint.load_pruned` reads them): weights (``model.safetensors``, or
shards + ``model.safetensors.index.json`` once they exceed ``max_shard_bytes``), config.json
describing the skeleton (:func:`gqaprune_core.checkpoint.skeleton_shapes`), the plan, the
tokenizer and the generation config. Everything is written into a staging directory beside the
target and renamed into place at the end; on failure the target is left as it was.

All of it is one function, :func:`write_checkpoint`, so that it can be pointed at another
checkpoint writer (sharded with a manifest and model card) without touching the pipeline.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from gqaprune_core.checkpoint import (CONFIG_NAME, PLAN_NAME, _new_sibling, _publish,
                                      skeleton_shapes)
from gqaprune_core.export.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from gqaprune_core.plan import PruningPlan


def write_checkpoint(directory: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]],
                     config, finish: Callable[[], PruningPlan], tokenizer=None,
                     generation_config=None, *, architecture: str = "",
                     overwrite: bool = False,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Consume ``tensors`` (name, tensor) into shards, then write the metadata and publish.

    Args:
        tensors: every distinct tensor once (a tied LM head only as the embedding); consumed
            lazily, so a generator may prune layer ``i`` while layer ``i - 1`` is written.
        config: the source's Hugging Face config (copied; its shapes are set from the plan).
        finish: called after the last tensor; returns the plan that was applied.
        architecture: the causal-LM class name for ``config.architectures``.

    Raises:
        ValueError: ``directory`` exists and is a file, or is non-empty without ``overwrite``;
            the plan's layers differ in head_dim or q_per_kv.
    """
    target = Path(directory).expanduser().absolute()
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not overwrite):
        raise ValueError(f"refusing to overwrite {str(target)!r}: it exists and is not an empty "
                         "directory (pass overwrite=True / --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling(target, "saving")
    try:
        dtypes = set()
        with ShardWriter(staging, max_shard_bytes=max_shard_bytes) as writer:
            for name, tensor in tensors:
                if tensor.is_floating_point():
                    dtypes.add(tensor.dtype)
                writer.add(name, tensor)
        plan = finish()
        q_heads, kv_heads, head_dim, mlp_width = skeleton_shapes(plan)
        out_config = copy.deepcopy(config)
        out_config.num_attention_heads, out_config.num_key_value_heads = q_heads, kv_heads
        out_config.head_dim, out_config.intermediate_size = head_dim, mlp_width
        if architecture:
            out_config.architectures = [architecture]
        if dtypes:
            out_config.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        out_config.save_pretrained(staging)
        mode = (staging / CONFIG_NAME).stat().st_mode & 0o777
        for file in writer.files:  # safetensors writes 0600; use the umask's mode instead
            os.chmod(staging / file, mode)
        plan.save(staging / PLAN_NAME)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful publish
    return target
