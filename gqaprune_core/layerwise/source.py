"""Open a model lazily: config, tokenizer, a meta skeleton, and one decoder layer at a time.

Notation: L layers, H query heads, G KV heads, D head_dim, I MLP width, E hidden size, V vocab.

Sources (:func:`resolve_source`): ``"demo"`` (its converted safetensors copy), a Hugging Face
model directory (``model.safetensors`` or shards with ``model.safetensors.index.json``), or a
gqaprune checkpoint (config.json + ``gqaprune_plan.json``: the skeleton is cut to the plan's
per-layer shapes, as :func:`gqaprune_core.checkpoint.load_pruned` does). GGUF files and the
in-memory ``tiny`` model have no safetensors to stream from and are refused with what to do.

The skeleton is the causal LM built from the config on the meta device (no memory, no random
init) with real rotary buffers; :func:`open_model` then assigns the embedding, final norm and
LM head (tied when the config says so and the weights hold no ``lm_head.weight``).
:func:`load_layer` assigns one decoder layer's tensors (cast to the compute dtype) and
:func:`release_layer` puts it back on the meta device, freeing its memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gqaprune_core.checkpoint import PLAN_NAME, shape_plan
from gqaprune_core.export.hf_config import read_base_config
from gqaprune_core.export.manifest import ManifestError, verify_manifest
from gqaprune_core.export.shards import LazyWeights, ShardError, has_weights
from gqaprune_core.models import ModelLoadError, decoder_layers, layout
from gqaprune_core.plan import PruningPlan

LAYER_PREFIX = "model.layers."


def resolve_source(source: str | os.PathLike) -> Path:
    """The directory holding ``source``'s safetensors weights.

    Raises:
        ModelLoadError: a missing path, a GGUF file, ``tiny``, or a directory without
            config.json or safetensors weights (the message says what to use instead).
    """
    text = str(source)
    if text == "demo":
        from gqaprune_core.models import demo_model_dir

        return demo_model_dir()
    if text == "tiny":
        raise ModelLoadError("the 'tiny' model exists only in memory: layer-wise pruning reads "
                             "weights from disk; use --layerwise off (or save it first)")
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {text!r} does not exist")
    if path.is_file():
        raise ModelLoadError(f"{text!r} is a file; layer-wise pruning reads a model directory with "
                             "safetensors weights (convert a .gguf with load_model + save_pruned, "
                             "or use --layerwise off)")
    if not (path / "config.json").is_file() or not has_weights(path):
        raise ModelLoadError(f"{text!r} needs config.json and model.safetensors (or a "
                             "safetensors index) for layer-wise pruning")
    return path


@dataclass
class ModelSource:
    """A model directory opened lazily (weights stay on disk until asked for)."""

    path: Path
    config: object  # transformers PretrainedConfig
    weights: LazyWeights
    plan: PruningPlan | None  # the stored plan of a gqaprune checkpoint, else None

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def layer_names(self, index: int) -> list[str]:
        prefix = f"{LAYER_PREFIX}{index}."
        return [name for name in self.weights.keys() if name.startswith(prefix)]

    def compute_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of all weights in ``dtype`` (what an in-memory load would take)."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(_numel(shape) for shape in self.weights.shapes().values()) * size

    def close(self) -> None:
        self.weights.close()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def open_source(source: str | os.PathLike) -> ModelSource:
    """Open ``source`` (see :func:`resolve_source`) without reading any weights."""

    path = resolve_source(source)
    try:
        verify_manifest(path)  # a gqaprune checkpoint's SHA-256 digests (GQAPRUNE_NO_VERIFY=1 skips)
    except ManifestError as err:
        raise ModelLoadError(str(err)) from err
    try:
        # A gqaprune checkpoint's config may name remote code (per-layer shapes): read its base
        # config instead, which never runs that code.
        config = read_base_config(path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{path / 'config.json'}: unreadable config: {err}") from err
    plan = PruningPlan.load(path / PLAN_NAME) if (path / PLAN_NAME).is_file() else None
    return ModelSource(path, config, LazyWeights(path), plan)


def load_tokenizer(source: ModelSource):
    """The tokenizer saved beside the weights (pad token set to EOS when missing)."""
    from gqaprune_core.checkpoint import read_tokenizer

    tokenizer = read_tokenizer(source.path, source.config)
    if tokenizer is None:
        raise ModelLoadError(f"{source.path} holds no tokenizer files")
    return tokenizer


def meta_skeleton(source: ModelSource) -> nn.Module:
    """The causal LM of ``source``'s config with every parameter on the meta device (no
    memory), cut to the stored plan's shapes for a gqaprune checkpoint: enough for shapes,
    parameter counts and the rate schedule."""
    return _meta_model(source.config, source.plan)


def _empty_model(config) -> nn.Module:
    """``from_config`` with meta parameters and real buffers (rotary ``inv_freq``)."""
    from transformers import AutoModelForCausalLM

    try:
        from accelerate import init_empty_weights
    except ImportError:  # torch alone: everything on meta, then a real rotary embedding
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        rotary = model.model.rotary_emb
        with torch.device("cpu"):
            model.model.rotary_emb = type(rotary)(config=config)
        return model
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # accelerate's patch breaks ties made inside the context; redo them
    return model


def _meta_model(config, plan: PruningPlan | None) -> nn.Module:
    from gqaprune_core.surgery import apply_plan_

    model = _empty_model(config)
    if plan is not None:
        first = layout(model)[0]  # config.json states the skeleton every layer fits into
        skeleton = (first.q_heads, first.kv_heads, first.head_dim, first.mlp_width)
        apply_plan_(model, shape_plan(skeleton, plan), check=False)
    return model.eval()


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Assign ``tensors`` (names relative to ``module``) to its parameters, checking every
    name and shape."""
    expected = {name: tuple(p.shape) for name, p in module.named_parameters()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ShardError(f"{where}: weights do not match the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise ShardError(f"{where}: tensor {name} has shape {list(tensor.shape)}, the "
                             f"config gives {list(expected[name])}")
    params = {name: nn.Parameter(t, requires_grad=False) for name, t in tensors.items()}
    module.load_state_dict(params, strict=False, assign=True)


def _read(source: ModelSource, name: str, device: torch.device, dtype: torch.dtype
          ) -> torch.Tensor:
    tensor = source.weights.get(name)
    # safetensors maps the files: an open handle keeps every page read so far resident (a
    # decoder layer's through its prune and re-fit; the embedding's while the head is read);
    # closing it after each tensor lets those pages go (tensors that still use them keep them)
    source.weights.close()
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def open_model(source: ModelSource, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The skeleton with embedding, final norm and LM head on ``device`` in ``dtype``; every
    decoder layer stays on the meta device until :func:`load_layer`."""
    model = _meta_model(source.config, source.plan)
    if len(decoder_layers(model)) != source.num_layers:
        raise ModelLoadError(f"{source.path}: the model has {len(decoder_layers(model))} layers, "
                             f"config.json {source.num_layers}")
    inner = model.model
    outer = {name: module for name, module in (("model.embed_tokens.", inner.embed_tokens),
                                               ("model.norm.", inner.norm))}
    for prefix, module in outer.items():
        tensors = {name[len(prefix):]: _read(source, name, device, dtype)
                   for name in source.weights.keys() if name.startswith(prefix)}
        _assign(module, tensors, f"{source.path} ({prefix[:-1]})")
    head = model.get_output_embeddings()
    if "lm_head.weight" in source.weights:
        head.weight = nn.Parameter(_read(source, "lm_head.weight", device, dtype),
                                   requires_grad=False)
    elif getattr(source.config, "tie_word_embeddings", False):
        head.weight = inner.embed_tokens.weight
    else:
        raise ShardError(f"{source.path}: no lm_head.weight and the config does not tie it to "
                         "the embedding")
    inner.rotary_emb.to(device)
    return model


def load_layer(model: nn.Module, source: ModelSource, index: int, device: torch.device,
               dtype: torch.dtype) -> nn.Module:
    """Decoder layer ``index`` of the skeleton with its weights on ``device`` in ``dtype``."""
    layer = decoder_layers(model)[index]
    prefix = f"{LAYER_PREFIX}{index}."
    tensors = {name[len(prefix):]: _read(source, name, device, dtype)
               for name in source.layer_names(index)}
    _assign(layer, tensors, f"{source.path} (layer {index})")
    for buffer_owner in layer.modules():  # a layer's own buffers (none in Llama) follow it
        for name, buffer in list(buffer_owner.named_buffers(recurse=False)):
            setattr(buffer_owner, name, buffer.to(device))
    return layer


def release_layer(layer: nn.Module) -> None:
    """Put a layer's parameters back on the meta device (its memory is freed)."""
    layer.to("meta")


def open_skeleton(source: str | os.PathLike) -> tuple[nn.Module, object]:
    """A meta skeleton (shapes only, no weights) and the tokenizer of ``source`` on disk."""
    opened = open_source(source)
    try:
        return meta_skeleton(opened), load_tokenizer(opened)
    finally:
        opened.close()
