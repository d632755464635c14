"""Configuration of a pruned Llama / Mistral / Qwen2 checkpoint whose layers have their own shapes.

Written by gqaprune (structured pruning by whole GQA groups) and copied unchanged into every
checkpoint whose decoder layers differ; it needs only transformers, not gqaprune. Each class is
its base configuration plus three lists with one entry per decoder layer::

    layer_num_attention_heads   query heads H_l
    layer_num_key_value_heads   KV heads G_l (H_l / G_l is the same in every layer)
    layer_intermediate_size     MLP width I_l

The top-level ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` are
those of the unpruned model (they pass the base class's checks); ``layer_config(l)`` gives the
configuration that layer ``l`` is built from. Load with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig, Qwen2Config

# per-layer list -> the attribute of the base configuration it replaces in layer_config(l)
LAYER_FIELDS = {"layer_num_attention_heads": "num_attention_heads",
                "layer_num_key_value_heads": "num_key_value_heads",
                "layer_intermediate_size": "intermediate_size"}


class PerLayerShapes:
    """Mixin: the per-layer lists, their validation and the per-layer configurations."""

    def layer_config(self, index: int):
        """A shallow copy of this configuration with layer ``index``'s H, G and I."""
        config = copy.copy(self)
        for lists, name in LAYER_FIELDS.items():
            values = getattr(self, lists, None)
            if values is not None:
                setattr(config, name, int(values[index]))
        return config

    def validate_architecture(self) -> None:
        """Each list has one positive entry per layer and H_l is a multiple of G_l.

        Replaces the base check ``hidden_size % num_attention_heads == 0``, which a pruned
        layer need not meet (head_dim is set explicitly).
        """
        layers = self.num_hidden_layers
        for lists in LAYER_FIELDS:
            values = getattr(self, lists, None)
            if values is None:
                continue
            if len(values) != layers or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{lists} must hold {layers} positive integers, got {values}")
        heads = getattr(self, "layer_num_attention_heads", None)
        groups = getattr(self, "layer_num_key_value_heads", None)
        if heads is not None and groups is not None:
            bad = [i for i, (h, g) in enumerate(zip(heads, groups)) if h % g]
            if bad:
                raise ValueError(f"layers {bad}: query heads are not a multiple of KV heads")


@strict
class GQAPruneLlamaConfig(PerLayerShapes, LlamaConfig):
    model_type = "gqaprune_llama"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None


@strict
class GQAPruneMistralConfig(PerLayerShapes, MistralConfig):
    model_type = "gqaprune_mistral"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None


@strict
class GQAPruneQwen2Config(PerLayerShapes, Qwen2Config):
    model_type = "gqaprune_qwen2"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None


__all__ = ["GQAPruneLlamaConfig", "GQAPruneMistralConfig", "GQAPruneQwen2Config"]
