"""The rate preview of the Rate tuning page: what a set of settings would cut, without cutting.

Per-layer rates, the whole units (GQA groups, MLP channels) they keep, and where the removed
parameters come from (:class:`BudgetSplit`: attention versus MLP, per layer), all computed from
the model's layout and unit costs; the weights are never touched. Nothing here imports streamlit.
Notation: L layers, G KV heads (groups), I MLP width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
from torch import nn

from gqaprune_core.config import STRATEGIES, PruneConfig
from gqaprune_core.layer_importance import LayerImportance
from gqaprune_core.models import LayerLayout, count_parameters, layout
from gqaprune_core.schedule import UnitAllocation, UnitCost, unit_costs

if TYPE_CHECKING:  # annotations only: neither is needed to import this module
    from gqaprune_core.plan import PruningPlan
    from gqaprune_core.sensitivity.profile import SensitivityProfile


@dataclass(frozen=True)
class BudgetSplit:
    """Where the removed parameters come from, per layer (L entries each): attention, as whole
    GQA groups, and the MLP, as channels. Parameters counted with :func:`unit_costs`."""

    groups_removed: tuple[int, ...]
    channels_removed: tuple[int, ...]
    attention: tuple[int, ...]  # parameters removed with the groups
    mlp: tuple[int, ...]  # parameters removed with the channels

    @property
    def attention_total(self) -> int:
        return sum(self.attention)

    @property
    def mlp_total(self) -> int:
        return sum(self.mlp)

    @property
    def total(self) -> int:
        return self.attention_total + self.mlp_total

    @property
    def attention_share(self) -> float:
        """Attention's fraction of the removed parameters (0.0 when nothing is removed)."""
        return self.attention_total / self.total if self.total else 0.0

    @property
    def mlp_share(self) -> float:
        return self.mlp_total / self.total if self.total else 0.0

    def summary(self) -> str:
        """One line: count and share of the removed parameters from each part."""
        if not self.total:
            return "Nothing removed."
        groups, channels = sum(self.groups_removed), sum(self.channels_removed)
        return (f"Of the {self.total:,} parameters removed, attention gives "
                f"{self.attention_total:,} ({self.attention_share:.1%}: {groups} GQA "
                f"group{'s' * (groups != 1)}) and the MLP {self.mlp_total:,} "
                f"({self.mlp_share:.1%}: {channels:,} channel{'s' * (channels != 1)}).")

    def table(self) -> pd.DataFrame:
        rows = [{"layer": layer, "GQA groups removed": g, "attention params removed": a,
                 "MLP channels removed": m, "MLP params removed": p}
                for layer, (g, m, a, p) in enumerate(zip(self.groups_removed,
                                                         self.channels_removed, self.attention,
                                                         self.mlp))]
        return pd.DataFrame(rows)


def budget_split(costs: Sequence[UnitCost], groups_removed: Sequence[int],
                 channels_removed: Sequence[int]) -> BudgetSplit:
    """The split of removed parameters for per-layer counts of removed groups and channels.

    Raises:
        ValueError: the three sequences differ in length or a count is negative.
    """
    if not len(costs) == len(groups_removed) == len(channels_removed):
        raise ValueError(f"need one cost and two counts per layer: {len(costs)} costs, "
                         f"{len(groups_removed)} group counts, {len(channels_removed)} channel "
                         "counts")
    if min([*groups_removed, *channels_removed], default=0) < 0:
        raise ValueError(f"removed counts must be >= 0: groups {list(groups_removed)}, "
                         f"channels {list(channels_removed)}")
    return BudgetSplit(tuple(int(g) for g in groups_removed),
                       tuple(int(m) for m in channels_removed),
                       tuple(int(g) * c.group for g, c in zip(groups_removed, costs)),
                       tuple(int(m) * c.channel for m, c in zip(channels_removed, costs)))


def allocation_split(shapes: Sequence[LayerLayout], costs: Sequence[UnitCost],
                     allocation: UnitAllocation) -> BudgetSplit:
    """The split of a planned :class:`UnitAllocation`; its total is ``params_removed``."""
    return budget_split(costs, [s.kv_heads - g for s, g in zip(shapes, allocation.groups_to_keep)],
                        [s.mlp_width - m for s, m in zip(shapes, allocation.channels_to_keep)])


def plan_split(plan: PruningPlan, costs: Sequence[UnitCost]) -> BudgetSplit:
    """The split of a :class:`~gqaprune_core.plan.PruningPlan`, with ``costs`` the unit costs
    of the model it cuts (a unit's cost does not change by pruning, so the pruned model's serve
    as long as every layer keeps a group and a channel)."""
    return budget_split(costs, [lp.kv_heads_before - lp.kv_heads for lp in plan.layers],
                        [lp.mlp_before - lp.mlp for lp in plan.layers])


@dataclass(frozen=True)
class RatePreview:
    """What a set of tuning settings would do, computed without touching the weights."""

    rates: list[float]
    allocation: UnitAllocation
    achieved: list[float]  # per layer: removed / parameters of the pruned parts
    table: pd.DataFrame
    params_total: int
    split: BudgetSplit | None = None  # the removed parameters by part, per layer

    @property
    def params_after(self) -> int:
        return self.params_total - self.allocation.params_removed


def achieved_rates(shapes: Sequence[LayerLayout], costs: Sequence[UnitCost],
                   allocation: UnitAllocation, prune_attention: bool, prune_mlp: bool
                   ) -> list[float]:
    """Per layer: parameters the whole units remove / parameters of the pruned parts."""
    from gqaprune_core.sensitivity.optimize import allocation_rates

    return allocation_rates(allocation, shapes, costs, prune_attention, prune_mlp)


def rate_preview(config: PruneConfig, model: nn.Module, importance: LayerImportance,
                 profile: SensitivityProfile | None = None) -> RatePreview:
    """Per-layer rates and whole units kept for ``config`` (raises the library's ValueError;
    the ``optimized`` strategy needs the sensitivity ``profile``)."""
    from gqaprune_core.pipeline import plan_units

    rates, allocation = plan_units(config, model, importance, profile)
    shapes, costs = layout(model), unit_costs(model)
    achieved = achieved_rates(shapes, costs, allocation, config.prune_attention, config.prune_mlp)
    rows = [{"layer": s.layer, "score": importance.scores[s.layer], "rate %": 100 * rate,
             "achieved %": 100 * done, "KV groups kept": f"{g} / {s.kv_heads}",
             "query heads kept": f"{g * s.q_per_kv} / {s.q_heads}",
             "MLP channels kept": f"{m} / {s.mlp_width}"}
            for s, rate, done, g, m in zip(shapes, rates, achieved, allocation.groups_to_keep,
                                           allocation.channels_to_keep)]
    return RatePreview(rates, allocation, achieved, pd.DataFrame(rows), count_parameters(model),
                       allocation_split(shapes, costs, allocation))


def strategy_rates(config: PruneConfig, model: nn.Module, importance: LayerImportance,
                   profile: SensitivityProfile | None = None) -> dict[str, list[float]]:
    """The per-layer rates every strategy would give with the other settings unchanged
    (``optimized`` only with a sensitivity ``profile``)."""
    from gqaprune_core.pipeline import plan_units

    result: dict[str, list[float]] = {}
    for strategy in STRATEGIES:
        if strategy == "optimized" and profile is None:
            continue
        try:
            result[strategy] = plan_units(config.with_(pruning_strategy=strategy), model,
                                          importance, profile)[0]
        except ValueError:
            continue  # the chosen strategy's own error is shown; skip the overlay
    return result
