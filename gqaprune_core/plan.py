"""A pruning plan: plain data saying which KV groups and MLP channels each layer keeps.

Plans are made by pure functions from scores and per-layer unit counts, can be shown, diffed,
written as JSON and applied later by :func:`gqaprune_core.surgery.apply_plan_`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from gqaprune_core.geometry import check_groups
from gqaprune_core.models import LayerLayout

PLAN_VERSION = 1


@dataclass(frozen=True)
class LayerPlan:
    """What one layer keeps. Indices refer to the layer *before* pruning."""

    layer: int
    q_heads_before: int
    kv_heads_before: int
    head_dim: int
    mlp_before: int
    kept_kv_heads: tuple[int, ...]
    kept_mlp_channels: tuple[int, ...]
    # Only for the naive-heads anti-example: query heads kept independently of their groups.
    kept_q_heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        where = f"layer {self.layer}"
        if self.q_heads_before % self.kv_heads_before:
            raise ValueError(f"{where}: {self.q_heads_before} query heads are not a multiple of "
                             f"{self.kv_heads_before} KV heads")
        check_groups(self.kept_kv_heads, self.kv_heads_before, where=where)
        channels = list(self.kept_mlp_channels)
        if not channels or channels != sorted(set(channels)) or channels[0] < 0 \
                or channels[-1] >= self.mlp_before:
            raise ValueError(f"{where}: kept MLP channels must be sorted, unique, non-empty and "
                             f"within [0, {self.mlp_before}); got {len(channels)} channels")
        if self.kept_q_heads is not None:
            heads = list(self.kept_q_heads)
            if heads != sorted(set(heads)) or not heads or heads[-1] >= self.q_heads_before \
                    or len(heads) != len(self.kept_kv_heads) * self.q_per_kv:
                raise ValueError(f"{where}: kept query heads {heads} must be sorted, unique, in "
                                 f"range and number {len(self.kept_kv_heads)} x {self.q_per_kv}")

    @property
    def q_per_kv(self) -> int:
        return self.q_heads_before // self.kv_heads_before

    @property
    def kv_heads(self) -> int:
        return len(self.kept_kv_heads)

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.q_per_kv

    @property
    def mlp(self) -> int:
        return len(self.kept_mlp_channels)

    @property
    def is_identity(self) -> bool:
        return (self.kv_heads == self.kv_heads_before and self.mlp == self.mlp_before
                and self.kept_q_heads is None)


@dataclass(frozen=True)
class PruningPlan:
    """Per-layer kept units for a whole model, plus how they were chosen."""

    layers: tuple[LayerPlan, ...]
    method: str = "taylor"
    notes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "method": self.method, "notes": self.notes,
                "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"unsupported plan version {data.get('version')!r}; "
                             f"expected {PLAN_VERSION}")
        layers = []
        for entry in data["layers"]:
            entry = dict(entry)
            for key in ("kept_kv_heads", "kept_mlp_channels", "kept_q_heads"):
                if entry.get(key) is not None:
                    entry[key] = tuple(int(i) for i in entry[key])
            layers.append(LayerPlan(**entry))
        return cls(tuple(layers), data.get("method", ""), data.get("notes", {}))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        return cls.from_json(Path(path).read_text())

    def with_layer(self, layer_plan: LayerPlan) -> PruningPlan:
        layers = list(self.layers)
        layers[layer_plan.layer] = layer_plan
        return replace(self, layers=tuple(layers))


def identity_plan(model_layout: Sequence[LayerLayout], method: str = "none") -> PruningPlan:
    """A plan that keeps everything."""
    return PruningPlan(tuple(
        LayerPlan(s.layer, s.q_heads, s.kv_heads, s.head_dim, s.mlp_width,
                  tuple(range(s.kv_heads)), tuple(range(s.mlp_width)))
        for s in model_layout), method)


def top_k(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    """Indices of the ``k`` highest scores, sorted ascending; ties go to the lower index."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} units")
    order = torch.sort(scores.detach().float().cpu().reshape(-1), descending=True, stable=True).indices
    return tuple(sorted(order[:k].tolist()))


def build_plan(model_layout: Sequence[LayerLayout], group_scores: Sequence[torch.Tensor],
               channel_scores: Sequence[torch.Tensor], groups_to_keep: Sequence[int],
               channels_to_keep: Sequence[int], method: str = "taylor") -> PruningPlan:
    """Keep, per layer, the best-scoring ``groups_to_keep[l]`` groups and channels. Pure."""
    count = len(model_layout)
    if not (len(group_scores) == len(channel_scores) == len(groups_to_keep)
            == len(channels_to_keep) == count):
        raise ValueError(f"need one score vector and unit count per layer ({count} layers)")
    layers = []
    for s, g_scores, c_scores, g_keep, c_keep in zip(model_layout, group_scores, channel_scores,
                                                     groups_to_keep, channels_to_keep):
        if g_scores.numel() != s.kv_heads or c_scores.numel() != s.mlp_width:
            raise ValueError(f"layer {s.layer}: scores for {g_scores.numel()} groups / "
                             f"{c_scores.numel()} channels, model has {s.kv_heads} / {s.mlp_width}")
        layers.append(LayerPlan(s.layer, s.q_heads, s.kv_heads, s.head_dim, s.mlp_width,
                                top_k(g_scores, g_keep), top_k(c_scores, c_keep)))
    return PruningPlan(tuple(layers), method)
