"""Save and load pruned models: sharded safetensors + HF config + plan JSON + tokenizer.

Notation: L layers, H query heads, G KV heads (groups), D head_dim, I MLP width.

A checkpoint directory holds::

    model.safetensors       every distinct tensor once (a tied lm_head is stored as the embedding),
      or model-0000N-of-0000M.safetensors + model.safetensors.index.json once the tensors exceed
      one shard (``max_shard_size``, 5 GB by default; :mod:`gqaprune_core.export.shards`)
    config.json             the Hugging Face config (see below)
    configuration_gqaprune.py, modeling_gqaprune.py
                            remote code, only when layers differ (see below)
    gqaprune_plan.json      a PruningPlan: per layer the shapes before and the kept units
    tokenizer files         whatever ``tokenizer.save_pretrained`` writes
    generation_config.json  when the model has one
    README.md               the model card: base model, settings, per-layer counts, perplexities,
                            how to load it (:mod:`gqaprune_core.export.model_card`)
    gqaprune_manifest.json  size and SHA-256 of every other file, checked by :func:`load_pruned`
                            (:mod:`gqaprune_core.export.manifest`)

How config and plan relate (details: :mod:`gqaprune_core.export.hf_config`). A Hugging Face
config has one (H, G, D, I) for all layers, a pruned model may have different shapes per layer:

- all layers equal after pruning: config.json states the pruned shape, so plain
  ``AutoModelForCausalLM.from_pretrained(directory)`` (and vLLM) load the checkpoint as is;
- layers differ (Llama, Mistral, Qwen2): config.json has ``model_type`` ``gqaprune_<base>``, the
  per-layer lists ``layer_num_attention_heads``, ``layer_num_key_value_heads``,
  ``layer_intermediate_size`` and an ``auto_map``, so that
  ``from_pretrained(directory, trust_remote_code=True)`` loads it without gqaprune; its
  top-level H, G, I are the *skeleton*, the per-dimension maximum of the plan's *before* shapes;
- layers differ, other bases: config.json states the skeleton, only :func:`load_pruned` loads it.

Per layer the saved shape is the plan's *after* shape: ``len(kept_kv_heads)`` groups and
``len(kept_mlp_channels)`` channels. :func:`load_pruned` builds the base model of the skeleton
with parameters on the meta device (no memory, no random init), cuts every layer to the first
``k`` groups / channels (the positions do not matter, the weights come next), then assigns the
stored tensors. It never runs the remote code, and nothing is unpickled at any point: weights
travel only through safetensors. Checkpoints of older versions (one ``model.safetensors``, no
manifest, no card) load too.

Writes are atomic (:mod:`gqaprune_core.export.staging`): everything goes into a hidden sibling
folder that is renamed into place; folders left by a killed save are removed by the next save to
the same target.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from gqaprune_core.export.checkpoint_files import PLAN_NAME, write_checkpoint_files
from gqaprune_core.export.hf_config import CONFIG_NAME, Shapes, layer_lists, read_base_config, \
    read_config_dict, skeleton_shapes
from gqaprune_core.export.manifest import ManifestError, verify_manifest
from gqaprune_core.export.model_card import CardInfo
from gqaprune_core.export.shards import INDEX_NAME, SINGLE_NAME, LazyWeights, ShardError, \
    has_weights, parse_size
from gqaprune_core.export.staging import staged
from gqaprune_core.models import layout, pick_device, pick_dtype
from gqaprune_core.plan import LayerPlan, PruningPlan, identity_plan

WEIGHTS_NAME = SINGLE_NAME  # or shards + INDEX_NAME
DEFAULT_MAX_SHARD_SIZE = "5GB"
GENERATION_NAME = "generation_config.json"
GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")

class CheckpointError(ValueError):
    """A directory that is not a readable gqaprune checkpoint (named with the offending values)."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory written by :func:`save_pruned`."""
    return (Path(path) / PLAN_NAME).is_file()


# ---- saving -----------------------------------------------------------------------------------

def save_pruned(model: nn.Module, tokenizer, plan: PruningPlan | None,
                directory: str | os.PathLike, *, overwrite: bool = False,
                max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                card: CardInfo | None = None) -> Path:
    """Write ``model`` (pruned by ``plan``) as a checkpoint directory, atomically.

    Args:
        plan: the plan that was applied; its *after* shapes must equal the model's layer shapes.
            ``None`` stores an identity plan of the model's current layout.
        tokenizer: saved with ``save_pretrained``; ``None`` writes no tokenizer files.
        overwrite: replace an existing non-empty ``directory`` (old one renamed aside, the new one
            moved in, the old one deleted).
        max_shard_size: the most tensor bytes per weights file (``"5GB"``, ``"200MB"``, or an
            int); more weights than that are written as shards with an index.
        card: what the model card should say beyond the shapes (settings, command, report).

    Everything is written into a temporary sibling directory that is renamed into place at the
    end; on any failure it is removed and ``directory`` is left as it was. Temporary siblings
    of earlier saves to ``directory`` whose process is gone are removed first.

    Raises:
        ValueError: ``directory`` exists and is a file, or is non-empty without ``overwrite``;
            the plan does not describe the model; layers differ in D or q_per_kv; a bad
            ``max_shard_size``.
    """
    target = Path(directory).expanduser().absolute()
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not overwrite):
        raise ValueError(f"refusing to overwrite {str(target)!r}: it exists and is not an empty "
                         "directory (pass overwrite=True to replace it)")
    shard_bytes = parse_size(max_shard_size)
    stored_plan = _checked_plan(model, plan)
    skeleton_shapes(stored_plan)  # fails before anything is written
    with staged(target) as staging:
        _write_files(model, tokenizer, stored_plan, staging, shard_bytes, card or CardInfo())
    return target


def _checked_plan(model: nn.Module, plan: PruningPlan | None) -> PruningPlan:
    shapes = layout(model)
    if plan is None:
        return identity_plan(shapes)
    if len(plan.layers) != len(shapes):
        raise ValueError(f"plan has {len(plan.layers)} layers, model has {len(shapes)}")
    for s, p in zip(shapes, plan.layers, strict=True):
        have = (s.q_heads, s.kv_heads, s.head_dim, s.mlp_width)
        after = (p.q_heads, p.kv_heads, p.head_dim, p.mlp)
        if have != after or p.layer != s.layer:
            raise ValueError(f"layer {s.layer}: model has (H, G, D, I) = {have}, but the plan "
                             f"leaves {after}; pass the plan that was applied to this model")
    return plan


def _write_files(model: nn.Module, tokenizer, plan: PruningPlan, staging: Path,
                 shard_bytes: int, card: CardInfo) -> None:
    tensors = unique_state_dict(model)
    write_checkpoint_files(staging, tensors.items(), model.config, plan,
                           architecture=type(model).__name__, tokenizer=tokenizer,
                           generation_config=getattr(model, "generation_config", None),
                           max_shard_bytes=shard_bytes, card=card)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every shared tensor once (first name wins), on CPU and contiguous.

    Tied embeddings appear as ``model.embed_tokens.weight`` only, as Hugging Face stores them.
    """
    seen: set[tuple] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


# ---- loading ----------------------------------------------------------------------------------

def load_pruned(directory: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None, *, check: bool = True,
                verify: bool = True):
    """Load ``(model, tokenizer)`` from a directory written by :func:`save_pruned`, in eval mode.

    Args:
        device: where the weights go (``"auto"``: the GPU with most free memory, else CPU).
        dtype: cast floating weights to this dtype; ``None`` keeps the stored dtype, so the
            logits equal bit for bit those of the model that was saved (same device and kernels).
        check: finish with :func:`gqaprune_core.surgery.validate` (forward, KV cache, generate).
        verify: check every file against ``gqaprune_manifest.json`` (SHA-256) first; False, or
            the environment variable ``GQAPRUNE_NO_VERIFY=1``, skips it (for very large models).

    Returns:
        the model, and the tokenizer (``None`` if the checkpoint has no tokenizer files).

    Raises:
        CheckpointError: missing directory or files, a file that differs from the manifest, a
            corrupt or unreadable file, a plan that does not fit the config, or weights whose
            names or shapes disagree with the plan (the tensor and both shapes are named).
    """
    from gqaprune_core.surgery import SurgeryError, validate

    path = Path(directory).expanduser()
    _require_files(path)
    try:
        verify_manifest(path, verify)
    except ManifestError as err:
        raise CheckpointError(str(err)) from err
    plan = _read_plan(path)
    config = _read_config(path, plan)
    model = _skeleton(config, plan, path)
    target = pick_device(str(device)) if isinstance(device, str) else device
    cast = pick_dtype(target, dtype) if dtype is not None else None
    _load_weights_(model, path, target, cast)
    model.to(target).eval()  # moves the non-persistent buffers (rotary inv_freq)
    if (path / GENERATION_NAME).is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    if check:
        try:
            validate(model)
        except SurgeryError as err:
            raise CheckpointError(f"{path}: the loaded model fails validation: {err}") from err
    return model, read_tokenizer(path, config)


def _require_files(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME, PLAN_NAME):
        present = has_weights(path) if name == WEIGHTS_NAME else (path / name).is_file()
        if not present:
            shown = f"{WEIGHTS_NAME} (nor {INDEX_NAME})" if name == WEIGHTS_NAME else name
            raise CheckpointError(f"{str(path)!r} has no {shown}: not a gqaprune checkpoint"
                                  + (" (a plain model directory? use load_model)"
                                     if name == PLAN_NAME else ""))


def _read_plan(path: Path) -> PruningPlan:
    try:
        return PruningPlan.load(path / PLAN_NAME)
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path / PLAN_NAME}: unreadable plan: {err}") from err


def _read_config(path: Path, plan: PruningPlan):
    """The base config; a remote config's per-layer lists must agree with the plan."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        lists = layer_lists(read_config_dict(path))
        config = read_base_config(path)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: unreadable config: "
                              f"{' '.join(str(err).split())}") from err
    if lists is not None:
        from gqaprune_core.export.hf_config import LAYER_LISTS

        for key, position in LAYER_LISTS.items():
            from_plan = [(p.q_heads, p.kv_heads, p.head_dim, p.mlp)[position] for p in plan.layers]
            if lists[key] != from_plan:
                raise CheckpointError(f"{path / CONFIG_NAME}: {key} {lists[key]} disagrees with "
                                      f"{PLAN_NAME} ({from_plan}); re-save the model")
    return config


def read_tokenizer(path: Path, config):
    """The saved tokenizer, or ``None``; a generic one is loaded from tokenizer.json as is.

    AutoTokenizer may pick a class from config.json's model_type instead of the saved
    ``tokenizer_class`` (transformers 5.17 turns a generic tokenizer beside a qwen2 config into
    Qwen2Tokenizer, replacing its pre-tokenizer), so generic tokenizers bypass it. The others get
    the base ``config``: left alone, AutoTokenizer would read config.json, find the remote code
    of a ``gqaprune_<base>`` config and ask on the terminal whether to run it.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    settings_file, backend_file = path / "tokenizer_config.json", path / "tokenizer.json"
    if not settings_file.is_file() and not backend_file.is_file():
        return None
    try:
        declared = json.loads(settings_file.read_text()).get("tokenizer_class") \
            if settings_file.is_file() else None
        if declared in GENERIC_TOKENIZERS and backend_file.is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, config=config)
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: unreadable tokenizer: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def shape_plan(skeleton: Shapes, plan: PruningPlan, where: str = "") -> PruningPlan:
    """A plan that cuts skeleton layers to ``plan``'s after shapes, keeping the first units."""
    q_heads, kv_heads, head_dim, mlp_width = skeleton
    layers = []
    for p in plan.layers:
        if p.head_dim != head_dim or p.q_per_kv != q_heads // kv_heads \
                or p.kv_heads > kv_heads or p.mlp > mlp_width:
            raise CheckpointError(
                f"{where}layer {p.layer}: plan shape (H, G, D, I) = "
                f"{(p.q_heads, p.kv_heads, p.head_dim, p.mlp)} does not fit the config's "
                f"{skeleton}")
        layers.append(LayerPlan(p.layer, q_heads, kv_heads, head_dim, mlp_width,
                                tuple(range(p.kv_heads)), tuple(range(p.mlp))))
    return PruningPlan(tuple(layers), "shape")


def _skeleton(config, plan: PruningPlan, path: Path) -> nn.Module:
    """The config's model with parameters on the meta device, cut to the plan's shapes."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from gqaprune_core.surgery import apply_plan_

    if len(plan.layers) != config.num_hidden_layers:
        raise CheckpointError(f"{path}: plan has {len(plan.layers)} layers, config.json has "
                              f"{config.num_hidden_layers}")
    try:
        # Buffers stay real: rotary inv_freq is computed here, it is not in the weights file.
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        skeleton = layout(model)[0]  # ModelLoadError for a model that is not GQA-prunable
    except ValueError as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: cannot build the model: {err}") from err
    model.tie_weights()  # accelerate's patch breaks ties made inside the context; redo them
    shapes = (skeleton.q_heads, skeleton.kv_heads, skeleton.head_dim, skeleton.mlp_width)
    apply_plan_(model, shape_plan(shapes, plan, where=f"{path}: "), check=False)
    return model


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (tied embeddings), in registration order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _load_weights_(model: nn.Module, path: Path, device: torch.device,
                   dtype: torch.dtype | None) -> None:
    """Assign the tensors stored in ``path`` (one file or shards) to ``model``, after checking
    every name and shape; tensors are read (and cast) one at a time."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    aliases = {name: group for group in _alias_groups(model) for name in group}
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    label = path / (INDEX_NAME if (path / INDEX_NAME).is_file() else WEIGHTS_NAME)
    state = {}
    try:
        with LazyWeights(path, device=device) as weights:
            _check_names_and_shapes(weights.shapes(), expected, aliases, label)
            for name in weights.keys():
                tensor = weights.get(name)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                # One Parameter object for all tied names, so assign=True keeps the tie.
                param = nn.Parameter(tensor, requires_grad=False)
                for alias in aliases.get(name, [name]):
                    state[alias] = param
    except ShardError as err:  # names the file already
        raise CheckpointError(str(err)) from err
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"{label}: unreadable safetensors weights: {err}") from err
    model.load_state_dict(state, strict=True, assign=True)


def _check_names_and_shapes(stored: dict[str, tuple[int, ...]],
                            expected: dict[str, tuple[int, ...]],
                            aliases: dict[str, list[str]], file: Path) -> None:
    unexpected = sorted(set(stored) - set(expected))
    covered = {alias for name in stored for alias in aliases.get(name, [name])}
    missing = sorted(set(expected) - covered)
    if unexpected or missing:
        raise CheckpointError(f"{file}: tensors do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, shape in stored.items():
        if shape != expected[name]:
            raise CheckpointError(
                f"{file}: tensor {name} has shape {list(shape)} but config.json and "
                f"{PLAN_NAME} give {list(expected[name])}")
    tied = [[name for name in group if name in stored] for group in aliases.values()]
    if any(len(names) > 1 for names in tied):
        raise CheckpointError(f"{file}: tied tensors stored more than once: {tied}")


def load_any(source: str | os.PathLike, device: str = "auto",
             dtype: str | torch.dtype | None = None, *, verify: bool = True):
    """``(model, tokenizer)`` from a checkpoint directory or any source of ``load_model``;
    ``verify``: see :func:`load_pruned`."""
    from gqaprune_core.models import load_model

    if is_checkpoint(source):
        return load_pruned(source, device=device, dtype=dtype, verify=verify)
    return load_model(source, device=device, dtype=dtype)
