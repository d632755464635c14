"""Apply a pruning plan to a model in place, keeping every shape and head count in sync."""

from __future__ import annotations

import torch
from torch import nn

from gqaprune_core.geometry import group_indices, head_rows
from gqaprune_core.models import decoder_layers, layout
from gqaprune_core.plan import LayerPlan, PruningPlan


class SurgeryError(RuntimeError):
    """The pruned model failed validation."""


def check_plan_matches(model: nn.Module, plan: PruningPlan) -> None:
    """Raise ``ValueError`` naming the layer and values if ``plan`` was not made for ``model``."""
    shapes = layout(model)
    if len(shapes) != len(plan.layers):
        raise ValueError(f"plan has {len(plan.layers)} layers, model has {len(shapes)}")
    for s, p in zip(shapes, plan.layers):
        have = (s.q_heads, s.kv_heads, s.head_dim, s.mlp_width)
        want = (p.q_heads_before, p.kv_heads_before, p.head_dim, p.mlp_before)
        if p.layer != s.layer or have != want:
            raise ValueError(f"layer {s.layer}: model has (H, G, D, I) = {have}, plan expects {want}")


def _cut_linear_(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along ``dim`` (0: output rows, 1: input columns) of weight and bias."""
    index = index.to(linear.weight.device)
    weight = linear.weight.data.index_select(dim, index).contiguous()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).contiguous(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = weight.shape[0]
    else:
        linear.in_features = weight.shape[1]


def cut_layer_(layer: nn.Module, plan: LayerPlan) -> None:
    """Cut one decoder layer in place to what ``plan`` keeps (no checks; see apply_plan_)."""
    attn, mlp = layer.self_attn, layer.mlp
    q_rows, kv_rows = group_indices(plan.kept_kv_heads, plan.q_per_kv, plan.head_dim)
    if plan.kept_q_heads is not None:  # naive-heads anti-example: heads chosen apart from groups
        q_rows = head_rows(plan.kept_q_heads, plan.head_dim)
    if plan.kv_heads != plan.kv_heads_before or plan.kept_q_heads is not None:
        _cut_linear_(attn.q_proj, q_rows, 0)
        _cut_linear_(attn.k_proj, kv_rows, 0)
        _cut_linear_(attn.v_proj, kv_rows, 0)
        _cut_linear_(attn.o_proj, q_rows, 1)
        # transformers reshapes with -1 heads; older versions and other engines read these.
        for name, value in (("num_heads", plan.q_heads), ("num_key_value_heads", plan.kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)
        attn.num_key_value_groups = plan.q_per_kv
    if plan.mlp != plan.mlp_before:
        channels = torch.as_tensor(plan.kept_mlp_channels, dtype=torch.long)
        _cut_linear_(mlp.gate_proj, channels, 0)
        _cut_linear_(mlp.up_proj, channels, 0)
        _cut_linear_(mlp.down_proj, channels, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = plan.mlp


def sync_config_(model: nn.Module) -> None:
    """Write uniform per-layer shapes into the config (so save_pretrained describes them)."""
    shapes = layout(model)
    heads = {(s.q_heads, s.kv_heads) for s in shapes}
    widths = {s.mlp_width for s in shapes}
    config = model.config
    config.head_dim = shapes[0].head_dim
    if len(heads) == 1:
        config.num_attention_heads, config.num_key_value_heads = heads.pop()
    if len(widths) == 1:
        config.intermediate_size = widths.pop()


@torch.no_grad()
def validate(model: nn.Module, vocab_size: int | None = None, tokens: int = 8) -> None:
    """Forward with and without KV cache, a short ``generate()``, and no NaN/Inf anywhere.

    Raises:
        SurgeryError: shapes disagree, outputs are not finite, or cached decoding differs.
    """
    shapes = layout(model)  # raises on inconsistent head shapes
    for s, layer in zip(shapes, decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.o_proj.in_features != s.q_heads * s.head_dim or \
                mlp.down_proj.in_features != s.mlp_width or \
                attn.v_proj.out_features != s.kv_heads * s.head_dim:
            raise SurgeryError(f"layer {s.layer}: projection shapes disagree after surgery")
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=generator).to(device)
    full = model(ids, use_cache=False).logits
    if not torch.isfinite(full).all():
        raise SurgeryError("the pruned model produces NaN or Inf logits")
    prefix = model(ids[:, :-1], use_cache=True)
    step = model(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits
    tolerance = 1e-3 if full.dtype == torch.float32 else 5e-2
    scale = full[:, -1].abs().max().clamp_min(1.0)
    if (step[:, -1] - full[:, -1]).abs().max() > tolerance * scale:
        raise SurgeryError("decoding with the KV cache disagrees with a full forward pass")
    out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    if out.shape[1] != tokens + 2:
        raise SurgeryError(f"generate() returned {out.shape[1]} tokens, expected {tokens + 2}")


def apply_plan_(model: nn.Module, plan: PruningPlan, *, check: bool = True) -> nn.Module:
    """Cut q/k/v/o and gate/up/down weights (and biases) in place according to ``plan``.

    The plan is checked against the model first; a plan that does not match leaves the model
    untouched. With ``check=True`` the result is validated (see :func:`validate`).

    Returns:
        ``model``, pruned.
    """
    check_plan_matches(model, plan)
    for layer, layer_plan in zip(decoder_layers(model), plan.layers):
        if not layer_plan.is_identity:
            cut_layer_(layer, layer_plan)
    sync_config_(model)
    if check:
        validate(model)
    return model
