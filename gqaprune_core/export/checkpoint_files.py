"""The files of one checkpoint, written into a staging folder: shared by whole-model saves
(:func:`gqaprune_core.checkpoint.save_pruned`) and the layer-wise pipeline, which hands its cut
layers over one at a time and never holds the whole model.

Order matters for the integrity check: weights first (streamed into shards), then config.json
(plain, remote-code or skeleton, see :mod:`gqaprune_core.export.hf_config`), plan, tokenizer,
generation config, model card, and last the SHA-256 manifest over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from gqaprune_core.export.hf_config import CONFIG_NAME, before_skeleton, write_config
from gqaprune_core.export.manifest import write_manifest
from gqaprune_core.export.model_card import CARD_NAME, CardInfo, write_card
from gqaprune_core.export.shards import ShardWriter
from gqaprune_core.plan import PruningPlan

PLAN_NAME = "gqaprune_plan.json"


def write_checkpoint_files(staging: Path, tensors: Iterable[tuple[str, torch.Tensor]], config,
                           plan: PruningPlan | Callable[[], PruningPlan], *, architecture: str,
                           tokenizer=None, generation_config=None,
                           max_shard_bytes: int, card: CardInfo | None = None) -> PruningPlan:
    """Write every checkpoint file into ``staging`` (an empty folder); returns the plan.

    Args:
        tensors: (name, tensor) pairs, every distinct tensor once (a tied LM head only as the
            embedding); consumed lazily, so a generator may cut layer ``i`` while layer
            ``i - 1`` is being written.
        config: the Hugging Face config of the model (not modified; its shapes are restated).
        plan: the applied plan, or a callable that returns it once the last tensor is consumed.
        architecture: the causal-LM class name (``LlamaForCausalLM``) for ``architectures``.
    """
    dtypes: list[torch.dtype] = []
    with ShardWriter(staging, max_shard_bytes=max_shard_bytes) as writer:
        for name, tensor in tensors:
            if tensor.is_floating_point() and tensor.dtype not in dtypes:
                dtypes.append(tensor.dtype)
            writer.add(name, tensor)
    plan = plan() if callable(plan) else plan
    layer_shapes = [(p.q_heads, p.kv_heads, p.head_dim, p.mlp) for p in plan.layers]
    dtype = dtypes[0] if len(dtypes) == 1 else torch.float32
    kind = write_config(config, layer_shapes, before_skeleton(plan), staging, architecture, dtype)
    # safetensors writes 0600; give the weights the umask-derived mode of an ordinary file.
    mode = (staging / CONFIG_NAME).stat().st_mode & 0o777
    for name in writer.files:
        os.chmod(staging / name, mode)
    plan.save(staging / PLAN_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    if generation_config is not None:
        generation_config.save_pretrained(staging)
    write_card(staging / CARD_NAME, config, plan, kind, card or CardInfo())
    write_manifest(staging)
    return plan
