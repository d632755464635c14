"""config.json of a checkpoint: plain Hugging Face when it can be, remote code when it must.

Notation: L layers, H query heads, G KV heads (groups), D head_dim, I MLP width.

Three cases, decided by :func:`config_kind`:

- ``"plain"``: every layer has the same (H, G, D, I) and the base config class accepts it. The
  config states the pruned shape; ``AutoModelForCausalLM.from_pretrained(dir)`` (and vLLM, and
  any Hugging Face tool) loads the folder as the base architecture, with no remote code.
- ``"remote"``: layers differ (or the base class refuses the shape, e.g. LlamaConfig requires
  hidden % H == 0, which a uniform cut from 32 to 28 heads breaks) and the base is one of
  :data:`REMOTE_BASES`. The config gets ``model_type`` ``gqaprune_<base>``, the per-layer lists
  ``layer_num_attention_heads``, ``layer_num_key_value_heads``, ``layer_intermediate_size`` and an
  ``auto_map`` naming the two files of ``hf_code/`` (copied beside it), so that
  ``from_pretrained(dir, trust_remote_code=True)`` loads it without gqaprune. The top-level H, G,
  I are the skeleton (per-dimension maximum of the original shapes), which the base validates.
- ``"skeleton"``: layers differ (or the base refuses) and the base has no remote code here: the
  config states the skeleton only, and only :func:`gqaprune_core.checkpoint.load_pruned` can
  load the folder.

:func:`read_base_config` reads any of the three back as the *base* config (no remote code is
ever executed by gqaprune): the per-layer shapes come from the plan.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Literal

from gqaprune_core.plan import PruningPlan

CONFIG_NAME = "config.json"
REMOTE_PREFIX = "gqaprune_"
REMOTE_BASES = ("llama", "mistral", "qwen2")
CODE_DIR = Path(__file__).with_name("hf_code")
CODE_FILES = ("configuration_gqaprune.py", "modeling_gqaprune.py")
# per-layer list in config.json -> position in (H, G, D, I)
LAYER_LISTS = {"layer_num_attention_heads": 0, "layer_num_key_value_heads": 1,
               "layer_intermediate_size": 3}
_CLASS_STEMS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}

Kind = Literal["plain", "remote", "skeleton"]
Shapes = tuple[int, int, int, int]  # (H, G, D, I)


def skeleton_shapes(plan: PruningPlan) -> Shapes:
    """The pruned (H, G, D, I) when every layer of ``plan`` is equal, else
    :func:`before_skeleton`.

    Raises:
        ValueError: layers differ in D or q_per_kv, which no config (nor this code) describes.
    """
    after = {(p.q_heads, p.kv_heads, p.head_dim, p.mlp) for p in plan.layers}
    if len(after) == 1:
        return after.pop()
    head_dims = {p.head_dim for p in plan.layers}
    ratios = {p.q_per_kv for p in plan.layers}
    if len(head_dims) != 1 or len(ratios) != 1:
        raise ValueError(f"layers differ in head_dim {sorted(head_dims)} or q_per_kv "
                         f"{sorted(ratios)}; a Hugging Face config cannot describe that")
    return before_skeleton(plan)


def before_skeleton(plan: PruningPlan) -> Shapes:
    """Per-dimension maximum of the plan's *before* shapes (uniform D and q_per_kv assumed)."""
    groups = max(p.kv_heads_before for p in plan.layers)
    first = plan.layers[0]
    return (groups * first.q_per_kv, groups, first.head_dim,
            max(p.mlp_before for p in plan.layers))


def remote_class_names(base: str) -> tuple[str, str]:
    """(config class, model class) in ``hf_code/`` for ``base``."""
    stem = _CLASS_STEMS[base]
    return f"GQAPrune{stem}Config", f"GQAPrune{stem}ForCausalLM"


def _with_shapes(config, shapes: Shapes):
    """A deep copy of ``config`` stating ``shapes`` (no validation: strict configs validate
    in ``__init__`` only)."""
    config = copy.deepcopy(config)
    q_heads, kv_heads, head_dim, mlp_width = shapes
    config.num_attention_heads, config.num_key_value_heads = q_heads, kv_heads
    config.head_dim, config.intermediate_size = head_dim, mlp_width
    return config


def base_accepts(config) -> bool:
    """Whether the config's own class validates it (transformers 5 ``@strict`` configs)."""
    from huggingface_hub.errors import StrictDataclassError

    validate = getattr(config, "validate", None)
    if validate is None:
        return True
    try:
        validate()
    except (StrictDataclassError, ValueError, TypeError):  # StrictDataclassError: no ValueError
        return False
    return True


def config_kind(config, layer_shapes: list[Shapes]) -> Kind:
    """Which config.json the checkpoint gets (see the module docstring)."""
    if len(set(layer_shapes)) == 1 and base_accepts(_with_shapes(config, layer_shapes[0])):
        return "plain"
    return "remote" if config.model_type in REMOTE_BASES else "skeleton"


def write_config(config, layer_shapes: list[Shapes], skeleton: Shapes, directory: Path,
                 architecture: str, dtype) -> Kind:
    """Write config.json (and, for ``"remote"``, the two code files) into ``directory``.

    Args:
        config: the pruned model's config (not modified).
        layer_shapes: per layer the saved (H, G, D, I).
        skeleton: the shapes the config states when the layers differ.
        architecture: the model class name, for ``architectures`` of a plain config.
    """
    kind = config_kind(config, layer_shapes)
    stated = layer_shapes[0] if kind == "plain" else skeleton
    out = _with_shapes(config, stated)
    out.architectures = [architecture]
    out.dtype = dtype
    if kind != "remote":
        out.save_pretrained(directory)
        return kind
    base = config.model_type
    config_class, model_class = remote_class_names(base)
    data = json.loads(out.to_json_string(use_diff=False))
    data.update({
        "model_type": REMOTE_PREFIX + base,
        "architectures": [model_class],
        "auto_map": {"AutoConfig": f"configuration_gqaprune.{config_class}",
                     "AutoModelForCausalLM": f"modeling_gqaprune.{model_class}"},
        **{key: [shape[i] for shape in layer_shapes] for key, i in LAYER_LISTS.items()},
    })
    (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for name in CODE_FILES:
        shutil.copyfile(CODE_DIR / name, directory / name)
    return kind


def read_config_dict(directory: Path) -> dict:
    """config.json as a dict. Raises ValueError (or OSError) when it is not a JSON object."""
    data = json.loads((directory / CONFIG_NAME).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def layer_lists(data: dict) -> dict[str, list[int]] | None:
    """The per-layer lists of a remote config (None for a plain or skeleton one)."""
    if not str(data.get("model_type", "")).startswith(REMOTE_PREFIX):
        return None
    return {key: data.get(key) for key in LAYER_LISTS}


def read_base_config(directory: Path):
    """The base Hugging Face config of a checkpoint, whatever its kind.

    Raises:
        ValueError / OSError / KeyError: unreadable, or a ``gqaprune_`` base that is unknown.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = read_config_dict(directory)
    model_type = str(data.get("model_type", ""))
    if not model_type.startswith(REMOTE_PREFIX):
        return AutoConfig.from_pretrained(directory)
    base = model_type[len(REMOTE_PREFIX):]
    if base not in REMOTE_BASES:
        raise ValueError(f"model_type {model_type!r}: unknown base {base!r} (known: "
                         f"{', '.join(REMOTE_PREFIX + b for b in REMOTE_BASES)})")
    for key in (*LAYER_LISTS, "auto_map", "model_type", "architectures"):
        data.pop(key, None)
    return CONFIG_MAPPING[base].from_dict(data)
