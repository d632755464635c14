"""One layer's grid of cuts for the sensitivity profile, and each cut's local output change.

Notation: G KV groups, D head_dim, I MLP width, E hidden size, R MLP grid rates.

For layer l the grid is every MLP rate of :data:`MLP_RATES` but 0 (channels chosen and
compensated as the pipeline does: output energy and the ridge re-fit of ``down_proj`` on the
fit windows' Gram matrix; otherwise the unit-importance channel scores, no re-fit) and every
whole number of GQA groups removed but 0 and G (the lowest-scoring groups). Each
:class:`LayerCut` carries its plan, its re-fit ``down_proj`` if any, and ``error = mean_t
||Δy_t||²``, the change of the layer's output on the profile windows in closed form from
their Grams (:mod:`gqaprune_core.sensitivity.grams`), with no forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from gqaprune_core.compensate import channel_energy, refit_down
from gqaprune_core.geometry import group_indices
from gqaprune_core.models import LayerLayout
from gqaprune_core.plan import LayerPlan, top_k
from gqaprune_core.sensitivity.grams import held_grams
from gqaprune_core.unit_importance import LayerSaliency, channel_scores, group_scores

if TYPE_CHECKING:
    from gqaprune_core.sensitivity.profile import HeldOut, ProfileSettings

MLP_RATES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))  # 0 .. 0.9


@dataclass(frozen=True, eq=False)
class LayerCut:
    """One grid point of one layer: what it keeps, a re-fit down_proj (E, K) if any, and the
    local output change on the profile windows."""

    part: str  # "mlp" or "group"
    step: int  # grid index r, or groups removed k
    plan: LayerPlan
    down: torch.Tensor | None
    error: float


def _mlp_cut(shape: LayerLayout, layer: nn.Module, step: int, keep: int, fit_gram: torch.Tensor,
             held_gram: torch.Tensor, positions: int, settings: ProfileSettings,
             saliency: LayerSaliency | None) -> LayerCut:
    weight = layer.mlp.down_proj.weight.detach()
    if settings.compensate:
        kept = top_k(channel_energy(fit_gram, weight), keep)
        down = refit_down(fit_gram, weight, kept, settings.refit_ridge)
    else:
        kept, down = top_k(channel_scores(saliency), keep), None
    new = torch.zeros_like(weight, dtype=torch.float32)
    index = torch.as_tensor(kept, dtype=torch.long)
    new[:, index] = (weight[:, index] if down is None else down).float()
    delta = weight.float() - new  # (E, I): the output change is h @ deltaᵀ
    error = float(((delta @ held_gram) * delta).sum()) / positions
    plan = LayerPlan(shape.layer, shape.q_heads, shape.kv_heads, shape.head_dim,
                     shape.mlp_width, tuple(range(shape.kv_heads)), kept)
    return LayerCut("mlp", step, plan, down, error)


def _group_cut(shape: LayerLayout, layer: nn.Module, removed: int, held_gram: torch.Tensor,
               positions: int, scores: torch.Tensor) -> LayerCut:
    kept = top_k(scores, shape.kv_heads - removed)
    gone = [g for g in range(shape.kv_heads) if g not in kept]
    columns = group_indices(gone, shape.q_per_kv, shape.head_dim)[0]
    out = layer.self_attn.o_proj.weight.detach().float()[:, columns]  # (E, removed*q_per_kv*D)
    error = float(((out @ held_gram[columns][:, columns]) * out).sum()) / positions
    plan = LayerPlan(shape.layer, shape.q_heads, shape.kv_heads, shape.head_dim,
                     shape.mlp_width, kept, tuple(range(shape.mlp_width)))
    return LayerCut("group", removed, plan, None, error)


def mlp_steps(shape: LayerLayout) -> list[tuple[int, int]]:
    """(grid index, channels kept) of the layer's MLP cuts: every rate but 0 that keeps one."""
    keeps = [(step, shape.mlp_width - round(rate * shape.mlp_width))
             for step, rate in enumerate(MLP_RATES)]
    return [(step, keep) for step, keep in keeps if step and keep >= 1]


def layer_cuts(shape: LayerLayout, layer: nn.Module, fit_gram: torch.Tensor | None,
               held: HeldOut, settings: ProfileSettings, saliency: LayerSaliency | None
               ) -> list[LayerCut]:
    """Every grid point of one layer except the uncut ones: R-1 MLP cuts, G-1 group cuts.
    ``fit_gram``: the layer's float64 MLP Gram on the fit windows (with compensation)."""
    mlp_gram, attn_gram = held_grams(layer, held.calls[shape.layer])
    cuts = [_mlp_cut(shape, layer, step, keep, fit_gram, mlp_gram, held.positions, settings,
                     saliency) for step, keep in mlp_steps(shape)]
    if shape.kv_heads > 1:
        scores = group_scores(saliency, shape.q_per_kv, shape.head_dim)
        for removed in range(1, shape.kv_heads):
            cuts.append(_group_cut(shape, layer, removed, attn_gram, held.positions, scores))
    return cuts
