"""Write a (pruned or dense) Llama-family model as a GGUF file for llama.cpp, ollama, LM Studio.

Notation: L layers, H_l query heads, G_l KV heads and I_l MLP width of layer l, D head_dim,
E hidden size, V vocabulary (embedding rows).

Architecture. llama.cpp's ``llama`` architecture builds every layer from layer 0's shapes, so
only a model whose layers are all equal is written as ``llama``. A model with per-layer shapes is
written as ``deci`` (Nemotron-NAS), whose layers are each built from their own
``attention.head_count[l]``, ``attention.head_count_kv[l]`` and ``feed_forward_length[l]``
(arrays of L Python ints). Both fall back to ``token_embd`` when ``output.weight`` is absent, so
tied embeddings are written once.

Rotary layout. Hugging Face rotates the two halves of each head (``rotate_half``); llama.cpp's
``llama``/``deci`` rotate interleaved pairs. llama.cpp's own converter therefore permutes the
rows of q_proj and k_proj within every head; this module does the same, per layer, with that
layer's own head count (H_l for q, G_l for k), and applies it to q/k biases too.

Out types: ``f32``, ``f16`` and ``bf16`` (2-D weights; norms stay f32, as llama.cpp expects),
``q8_0`` (2-D weights whose rows are a multiple of 32 values, quantized by gguf-py; others f16),
``q4_k_m`` (an f16 file written beside the output, then llama.cpp's own quantizer from
llama-cpp-python: ``llama_model_quantize``).

Qwen2-style q/k/v biases are written as ``attn_q.bias`` etc. (permuted like their weights).
Measured with llama-cpp-python 0.3.36 (tests/test_gguf.py): its ``deci`` builds them per layer,
so Qwen2 with cut query heads loads and matches PyTorch, contrary to what the research note
expected; other llama.cpp builds (ollama's, LM Studio's) were not tried.

Mistral is written as ``llama``; its sliding window is not (llama.cpp's ``llama`` has none), so
the two agree up to the window length.

What is refused (:class:`GgufExportError`): biases other than q/k/v (o_proj, MLP); rope scaling
other than Llama-3 style or linear; a tokenizer :mod:`.gguf_tokenizer` cannot convert. Output
is written beside the target and renamed into place, so an error or interrupt never leaves a
partial file, and an existing file is replaced only with ``overwrite``.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from gqaprune_core.export.gguf_tokenizer import convert_tokenizer, write_vocab
from gqaprune_core.models import LayerLayout, decoder_layers, layout

OutType = Literal["f32", "f16", "bf16", "q8_0", "q4_k_m"]
OUT_TYPES: tuple[str, ...] = get_args(OutType)
# llama.cpp's general.file_type (enum llama_ftype) per out type.
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32, "q4_k_m": 15}
Q8_BLOCK = 32
LAYER_TENSORS = {  # Hugging Face module path in a decoder layer -> GGUF tensor name
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


class GgufExportError(ValueError):
    """A model, out type or target that cannot be exported (the values and the way out named)."""


@dataclass(frozen=True)
class GgufResult:
    """What :func:`write_gguf` wrote."""

    path: Path
    architecture: str  # "llama" or "deci"
    outtype: str
    size_bytes: int
    seconds: float


def check_target(output: str | os.PathLike, outtype: str, overwrite: bool) -> Path:
    """The absolute output path, after checking ``outtype`` and that nothing would be lost.

    Raises:
        GgufExportError: unknown out type, an existing file without ``overwrite``, a directory.
    """
    if outtype not in OUT_TYPES:
        raise GgufExportError(f"unknown out type {outtype!r}; choose one of {', '.join(OUT_TYPES)}")
    target = Path(output).expanduser().absolute()
    if target.is_dir():
        raise GgufExportError(f"{str(target)!r} is a directory; give a file name such as "
                              "model.gguf")
    if target.exists() and not overwrite:
        raise GgufExportError(f"{str(target)!r} exists; pass --overwrite (overwrite=True) to "
                              "replace it")
    return target


def export_gguf(source: str | os.PathLike, output: str | os.PathLike, outtype: str = "f16",
                overwrite: bool = False) -> GgufResult:
    """Load ``source`` (a gqaprune checkpoint, a Hugging Face directory or ``"demo"``) on CPU in
    fp32 and write it with :func:`write_gguf`.

    Raises:
        GgufExportError, ModelLoadError, CheckpointError, TokenizerConversionError (all
        ValueError): see :func:`write_gguf` and :func:`gqaprune_core.checkpoint.load_any`.
    """
    from gqaprune_core.checkpoint import load_any

    check_target(output, outtype, overwrite)  # before the (slow) load
    model, tokenizer = load_any(source, device="cpu", dtype=torch.float32)
    return write_gguf(model, tokenizer, output, outtype, overwrite=overwrite)


def write_gguf(model: nn.Module, tokenizer: Any, output: str | os.PathLike, outtype: str = "f16",
               *, overwrite: bool = False, name: str | None = None) -> GgufResult:
    """Write ``model`` and ``tokenizer`` to ``output`` as GGUF (module docstring for details).

    Raises:
        GgufExportError: see :func:`check_target` and the module docstring.
        TokenizerConversionError: the tokenizer cannot be described for llama.cpp.
    """
    started = time.perf_counter()
    target = check_target(output, outtype, overwrite)
    shapes = layout(model)
    architecture = choose_architecture(model, shapes)
    vocab = convert_tokenizer(tokenizer, model.get_input_embeddings().weight.shape[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "writing")
    source = _sibling(target, "f16") if outtype == "q4_k_m" else staging
    try:
        writer = _new_writer(source, architecture, model, shapes, outtype, name)
        try:
            write_vocab(writer, vocab)
            _add_tensors(writer, model, shapes, "f16" if outtype == "q4_k_m" else outtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        if outtype == "q4_k_m":
            quantize_with_llama_cpp(source, staging, "q4_k_m")
        os.replace(staging, target)
    finally:
        for leftover in {source, staging}:
            leftover.unlink(missing_ok=True)
    return GgufResult(target, architecture, outtype, target.stat().st_size,
                      time.perf_counter() - started)


def _sibling(target: Path, purpose: str) -> Path:
    return target.with_name(f".{target.name}.{purpose}-{secrets.token_hex(4)}")


def choose_architecture(model: nn.Module, shapes: list[LayerLayout]) -> str:
    """``"llama"`` when all layers are equal, else ``"deci"``; refuses what neither can hold."""
    uniform = len({(s.q_heads, s.kv_heads, s.head_dim, s.mlp_width) for s in shapes}) == 1
    layers = decoder_layers(model)
    biases = sorted({path for layer in layers for path, module in layer.named_modules()
                     if isinstance(module, nn.Linear) and module.bias is not None})
    allowed = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    if set(biases) - allowed:
        raise GgufExportError(f"biases on {sorted(set(biases) - allowed)} have no place in a "
                              "llama.cpp llama/deci GGUF")
    return "llama" if uniform else "deci"


def _rope(config: Any) -> tuple[float, dict]:
    """(rope theta, scaling parameters) from a transformers 4.x or 5.x config."""
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict) and not parameters.get("rope_type"):
        parameters |= legacy
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), parameters


def _new_writer(path: Path, architecture: str, model: nn.Module, shapes: list[LayerLayout],
                outtype: str, name: str | None):
    from gguf import GGUFWriter, RopeScalingType

    config = model.config
    writer = GGUFWriter(str(path), architecture)
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    writer.add_file_type(FILE_TYPES[outtype])
    per_layer = architecture == "deci"

    def value(values: list[int]) -> int | list[int]:
        return [int(v) for v in values] if per_layer else int(values[0])

    head_dim = shapes[0].head_dim
    writer.add_block_count(len(shapes))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(value([s.mlp_width for s in shapes]))
    writer.add_head_count(value([s.q_heads for s in shapes]))
    writer.add_head_count_kv(value([s.kv_heads for s in shapes]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(model.get_input_embeddings().weight.shape[0]))
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind not in ("default", "llama3"):
        raise GgufExportError(f"rope scaling {kind!r} is not supported by the GGUF export "
                              "(supported: none, linear, llama3)")
    return writer


def llama3_rope_factors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """Per-frequency divisors (D/2,) of Llama-3 rope scaling, as llama.cpp's ``rope_freqs``."""
    factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor",
                                                       "high_freq_factor"))
    original = float(scaling["original_max_position_embeddings"])
    frequencies = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = []
    for frequency in frequencies:
        wavelength = 2 * math.pi / frequency
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k weight (heads*D, E) or bias (heads*D,) from HF's half-split rotary layout
    to llama.cpp's interleaved one, within each head."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _model_tensors(model: nn.Module, shapes: list[LayerLayout]):
    """(GGUF name, fp32 tensor) pairs in llama.cpp's order; q/k rows permuted per layer."""
    yield "token_embd.weight", model.get_input_embeddings().weight
    for index, (layer, shape) in enumerate(zip(decoder_layers(model), shapes, strict=True)):
        for path, short in LAYER_TENSORS.items():
            module = layer.get_submodule(path)
            heads = {"attn_q": shape.q_heads, "attn_k": shape.kv_heads}.get(short)
            for kind in ("weight", "bias"):
                tensor = getattr(module, kind, None)
                if tensor is None:
                    continue
                yield (f"blk.{index}.{short}.{kind}",
                       permute_rotary(tensor, heads) if heads else tensor)
    yield "output_norm.weight", model.model.norm.weight
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        yield "output.weight", output.weight


def _add_tensors(writer: Any, model: nn.Module, shapes: list[LayerLayout], outtype: str) -> None:
    theta, scaling = _rope(model.config)
    if (scaling.get("rope_type") or scaling.get("type")) == "llama3":
        writer.add_tensor("rope_freqs.weight",
                          llama3_rope_factors(theta, shapes[0].head_dim, scaling))
    for name, tensor in _model_tensors(model, shapes):
        data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        encoded, raw_dtype = encode_tensor(data, outtype)
        writer.add_tensor(name, encoded, raw_dtype=raw_dtype)


def encode_tensor(data: np.ndarray, outtype: str):
    """(array, raw GGML type or None) for one fp32 tensor; 1-D tensors stay f32."""
    from gguf import GGMLQuantizationType, quants

    if data.ndim < 2 or outtype == "f32":
        return data, None
    if outtype == "bf16":
        return quants.quantize(data, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    if outtype == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def quantize_with_llama_cpp(source: Path, target: Path, outtype: str, threads: int = 0) -> None:
    """Quantize the GGUF ``source`` into ``target`` with llama.cpp's own quantizer.

    Raises:
        GgufExportError: llama-cpp-python is not installed, or the quantizer failed.
    """
    import ctypes

    try:
        import llama_cpp
    except ImportError as err:
        raise GgufExportError(
            f"out type {outtype} needs llama.cpp's quantizer from llama-cpp-python, which is not "
            "installed: run `make setup` (or CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install "
            "llama-cpp-python==0.3.36), or export q8_0/f16 instead") from err
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                            ctypes.byref(params))
    if status != 0 or not target.is_file():
        raise GgufExportError(f"llama.cpp's quantizer failed on {source} (status {status})")
