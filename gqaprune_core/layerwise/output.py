"""The layer-wise checkpoint writer: tensors as they come into shards, then config, plan, tokenizer.

The files are those of :func:`gqaprune_core.checkpoint.save_pruned`, written by the same
function (:func:`gqaprune_core.export.checkpoint_files.write_checkpoint_files`): shards + index,
config.json (plain, or per-layer lists with remote code), plan, tokenizer, generation config,
model card and SHA-256 manifest. Everything goes into a staging folder beside the target that is
renamed into place at the end (:mod:`gqaprune_core.export.staging`); on failure the target is
left as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from gqaprune_core.export.checkpoint_files import write_checkpoint_files
from gqaprune_core.export.model_card import CardInfo
from gqaprune_core.export.shards import DEFAULT_MAX_SHARD_BYTES
from gqaprune_core.export.staging import staged
from gqaprune_core.plan import PruningPlan


def write_checkpoint(directory: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]],
                     config, finish: Callable[[], PruningPlan], tokenizer=None,
                     generation_config=None, *, architecture: str = "",
                     overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     card: CardInfo | None = None) -> Path:
    """Consume ``tensors`` (name, tensor) into shards, then write the metadata and publish.

    Args:
        tensors: every distinct tensor once (a tied LM head only as the embedding); consumed
            lazily, so a generator may prune layer ``i`` while layer ``i - 1`` is written.
        config: the source's Hugging Face config (not modified; its shapes are restated).
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
    with staged(target) as staging:
        write_checkpoint_files(staging, tensors, config, finish,
                               architecture=architecture or config.architectures[0],
                               tokenizer=tokenizer, generation_config=generation_config,
                               max_shard_bytes=max_shard_bytes, card=card)
    return target
