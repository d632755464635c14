"""Pruned Llama / Mistral / Qwen2 models whose decoder layers have their own shapes.

Written by gqaprune and copied unchanged into every checkpoint whose layers differ; it needs only
transformers. Each class is its transformers base class (forward, KV cache, generate() and
weight names unchanged) with one difference: decoder layer ``l`` is built from
``config.layer_config(l)`` (see configuration_gqaprune.py), so its projections have that layer's
query heads, KV heads and MLP width. The attention modules then read the shared configuration
again, so that the attention implementation chosen at load time (sdpa, eager, ...) applies to
every layer. The default dynamic KV cache grows per layer, so it takes the per-layer KV heads
as they come; a static cache (one size for all layers) is not supported.
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from .configuration_gqaprune import GQAPruneLlamaConfig, GQAPruneMistralConfig, GQAPruneQwen2Config


def per_layer_decoder(config, layer_class: type[nn.Module]) -> nn.ModuleList:
    """The decoder layers, layer ``l`` built from ``config.layer_config(l)``."""
    layers = []
    for index in range(config.num_hidden_layers):
        layer = layer_class(config.layer_config(index), index)
        layer.self_attn.config = config  # the attention implementation is read at run time
        layers.append(layer)
    return nn.ModuleList(layers)


class GQAPruneLlamaForCausalLM(LlamaForCausalLM):
    config_class = GQAPruneLlamaConfig

    def __init__(self, config: GQAPruneLlamaConfig):
        super().__init__(config)  # on the meta device under from_pretrained: costs nothing
        self.model.layers = per_layer_decoder(config, LlamaDecoderLayer)
        self.post_init()


class GQAPruneMistralForCausalLM(MistralForCausalLM):
    config_class = GQAPruneMistralConfig

    def __init__(self, config: GQAPruneMistralConfig):
        super().__init__(config)
        self.model.layers = per_layer_decoder(config, MistralDecoderLayer)
        self.post_init()


class GQAPruneQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = GQAPruneQwen2Config

    def __init__(self, config: GQAPruneQwen2Config):
        super().__init__(config)
        self.model.layers = per_layer_decoder(config, Qwen2DecoderLayer)
        self.post_init()


__all__ = ["GQAPruneLlamaForCausalLM", "GQAPruneMistralForCausalLM", "GQAPruneQwen2ForCausalLM"]
