"""Rate schedules and unit allocation: invariants, the demo model's coarse groups, unit costs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gqaprune_core.models import LayerLayout, count_parameters, decoder_layers, layout
from gqaprune_core.plan import LayerPlan, identity_plan
from gqaprune_core.rates import layer_rates
from gqaprune_core.schedule import UnitCost, allocate_units, channel_block, unit_costs
from gqaprune_core.surgery import apply_plan_
from gqaprune_core.tiny import tiny_model

FAST = settings(max_examples=60, deadline=None)

scores_st = st.lists(st.floats(-1e3, 1e4, allow_nan=False, allow_infinity=False),
                     min_size=1, max_size=40)


@st.composite
def settings_st(draw):
    """(scores, target, min_rate, max_rate, weights, layer_start, layer_end), all feasible."""
    scores = draw(scores_st)
    target = draw(st.floats(0.01, 0.9))
    min_rate = target * draw(st.floats(0.0, 1.0))
    max_rate = target + (0.99 - target) * draw(st.floats(0.0, 1.0))
    weights = draw(st.none() | st.lists(st.floats(1.0, 1e7), min_size=len(scores),
                                        max_size=len(scores)))
    start = draw(st.integers(0, len(scores) - 1))
    end = draw(st.none() | st.integers(start + 1, len(scores)))
    return scores, target, min_rate, max_rate, weights, start, end


def weighted_mean(rates, weights, span):
    weights = [1.0] * len(rates) if weights is None else weights
    return sum(rates[i] * weights[i] for i in span) / sum(weights[i] for i in span)


@FAST
@given(settings_st(), st.sampled_from(["inverse", "proportional", "uniform"]),
       st.floats(0.0, 4.0))
def test_rates_meet_target_within_bounds(setup, strategy, alpha):
    scores, target, low, high, weights, start, end = setup
    rates = layer_rates(scores, target, strategy, alpha, low, high, start, end, weights)
    span = range(start, len(scores) if end is None else end)
    assert len(rates) == len(scores)
    assert weighted_mean(rates, weights, span) == pytest.approx(target, abs=1e-6)
    assert all(low - 1e-12 <= rates[i] <= high + 1e-12 for i in span)
    assert all(rates[i] == 0.0 for i in range(len(scores)) if i not in span)


@FAST
@given(scores_st, st.floats(0.2, 0.4), st.floats(0.1, 4.0))
def test_inverse_prunes_important_layers_least(scores, target, alpha):
    inverse = layer_rates(scores, target, "inverse", alpha, 0.0, 0.9)
    proportional = layer_rates(scores, target, "proportional", alpha, 0.0, 0.9)
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] > scores[j]:
                assert inverse[i] <= inverse[j] + 1e-12
                assert proportional[i] >= proportional[j] - 1e-12
    top = max(range(len(scores)), key=scores.__getitem__)
    assert inverse[top] == pytest.approx(min(inverse))
    assert proportional[top] == pytest.approx(max(proportional))


@FAST
@given(scores_st, st.floats(0.15, 0.5))
def test_uniform_and_alpha_zero_give_equal_rates(scores, target):
    for rates in (layer_rates(scores, target, "uniform"),
                  layer_rates(scores, target, "inverse", alpha=0.0),
                  layer_rates(scores, target, "proportional", alpha=0.0)):
        assert rates == pytest.approx([target] * len(scores), abs=1e-12)


@FAST
@given(scores_st, st.sampled_from(["inverse", "proportional", "uniform"]))
def test_zero_target_prunes_nothing(scores, strategy):
    assert layer_rates(scores, 0.0, strategy) == [0.0] * len(scores)


def test_constant_scores_are_uniform():
    assert layer_rates([3.0] * 5, 0.3) == pytest.approx([0.3] * 5)


def test_clipping_is_redistributed():
    """An outlier layer clipped at min_rate must not pull the mean below the target."""
    scores = [1000.0] + [1.0 + 0.1 * i for i in range(9)]
    rates = layer_rates(scores, 0.3, alpha=3.0, min_rate=0.15, max_rate=0.5)
    assert rates[0] == pytest.approx(0.15)
    assert sum(rates) / len(rates) == pytest.approx(0.3, abs=1e-9)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_rate": 0.4, "max_rate": 0.3}, "min_rate 0.4 is greater than max_rate 0.3"),
    ({"target": 0.6}, "target 0.6 cannot be reached"),
    ({"target": 0.1}, "target 0.1 cannot be reached"),
    ({"target": 1.0}, "target must lie in [0, 1), got 1.0"),
    ({"max_rate": 1.0}, "max_rate must lie in [0, 1), got 1.0"),
    ({"min_rate": -0.1}, "min_rate must lie in [0, 1), got -0.1"),
    ({"alpha": -1.0}, "alpha must be a finite number >= 0, got -1.0"),
    ({"strategy": "random"}, "unknown strategy 'random'"),
    ({"layer_start": 3, "layer_end": 3}, "layer range [3, 3)"),
    ({"layer_end": 9}, "layer range [0, 9) is empty or outside the model's 4 layers"),
    ({"weights": [1.0, 2.0]}, "got 2 weights for 4 layer scores"),
    ({"weights": [1.0, 0.0, 1.0, 1.0]}, "weights of layers [1]"),
    ({"scores": [1.0, math.nan, 0.0, 2.0]}, "layer scores must be finite"),
    ({"scores": []}, "scores is empty"),
])
def test_impossible_settings_raise_naming_values(kwargs, message):
    arguments = {"scores": [1.0, 2.0, 3.0, 4.0], "target": 0.25} | kwargs
    with pytest.raises(ValueError) as err:
        layer_rates(**arguments)
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------------
# allocation on the demo model's layout: 30 layers, H9/G3/D64/I1536/E576

DEMO_LAYOUT = [LayerLayout(i, 9, 3, 64, 1536) for i in range(30)]
DEMO_COST = UnitCost(group=294_912, channel=1_728, attention=884_736, mlp=2_654_208)
DEMO_COSTS = [DEMO_COST] * 30
DEMO_SCORES = [50.0 / (1 + i) + 0.3 * i + (7.0 if i == 0 else 0.0) for i in range(30)]


def demo_rates(target, strategy="inverse", **kwargs):
    bounds = {"min_rate": min(0.15, target), "max_rate": max(0.5, target)} | kwargs
    return layer_rates(DEMO_SCORES, target, strategy, weights=[c.attention + c.mlp
                                                               for c in DEMO_COSTS], **bounds)


@pytest.mark.parametrize("target", [0.1, 0.2, 0.25, 0.3, 0.4, 0.5])
def test_demo_budget_met(target):
    rates = demo_rates(target)
    allocation = allocate_units(DEMO_LAYOUT, DEMO_COSTS, rates, DEMO_SCORES)
    prunable = 30 * (DEMO_COST.attention + DEMO_COST.mlp)
    assert allocation.params_prunable == prunable
    assert abs(allocation.params_removed - target * prunable) <= 0.005 * prunable
    assert allocation.budget_met
    assert allocation.ratio_requested == pytest.approx(target)
    assert allocation.ratio_achieved == pytest.approx(target, abs=0.005)
    assert all(1 <= g <= 3 for g in allocation.groups_to_keep)
    assert all(1 <= c <= 1536 for c in allocation.channels_to_keep)
    removed = sum((3 - g) * DEMO_COST.group + (1536 - c) * DEMO_COST.channel
                  for g, c in zip(allocation.groups_to_keep, allocation.channels_to_keep))
    assert removed == allocation.params_removed


@FAST
@given(st.lists(st.floats(0.0, 0.9) | st.just(0.0), min_size=30, max_size=30),
       st.booleans(), st.booleans(), st.sampled_from(["across", "per_layer"]),
       st.sampled_from([1, 8, 64]))
def test_any_demo_rates_meet_budget(rates, prune_attention, prune_mlp, rounding, multiple):
    if not (prune_attention or prune_mlp):
        prune_attention = prune_mlp = True
    allocation = allocate_units(DEMO_LAYOUT, DEMO_COSTS, rates, DEMO_SCORES,
                                prune_attention, prune_mlp, group_rounding=rounding,
                                channel_multiple=multiple)
    assert all(c % multiple == 0 for c in allocation.channels_to_keep)
    assert all(1 <= g <= 3 for g in allocation.groups_to_keep)
    assert all(1 <= c <= 1536 for c in allocation.channels_to_keep)
    whole = [i for i, r in enumerate(rates) if r == 0]
    assert all(allocation.groups_to_keep[i] == 3 and allocation.channels_to_keep[i] == 1536
               for i in whole)
    if prune_mlp:
        assert allocation.budget_met
        assert abs(allocation.params_removed - allocation.params_budget) <= (
            0.005 * allocation.params_prunable + 1)


def test_quarter_rate_removes_groups_across_layers():
    """int(3 * 0.25) == 0 would remove no group; rounding across layers gives attention its
    share of the budget in whole groups."""
    allocation = allocate_units(DEMO_LAYOUT, DEMO_COSTS, [0.25] * 30, group_rounding="across")
    groups_removed = sum(3 - g for g in allocation.groups_to_keep)
    assert groups_removed in (22, 23)  # 30 layers * 0.75 ideal groups
    assert allocation.budget_met


def test_per_layer_rounding_cuts_a_group_only_from_one_groups_share():
    """The original's rule: floor(rate * 3) groups per layer; channels take up the rest."""
    rates = [0.25] * 10 + [1 / 3] * 10 + [0.5] * 5 + [0.7] * 5
    allocation = allocate_units(DEMO_LAYOUT, DEMO_COSTS, rates, DEMO_SCORES,
                                group_rounding="per_layer")
    assert allocation.groups_to_keep == (3,) * 10 + (2,) * 15 + (1,) * 5
    assert allocation.budget_met
    budget = sum(r * (DEMO_COST.attention + DEMO_COST.mlp) for r in rates)
    assert abs(allocation.params_removed - budget) <= 0.005 * allocation.params_prunable
    quarter = allocate_units(DEMO_LAYOUT, DEMO_COSTS, [0.25] * 30, group_rounding="per_layer")
    assert quarter.groups_to_keep == (3,) * 30
    assert quarter.budget_met


@pytest.mark.parametrize("target", [0.1, 0.2, 0.3])
def test_channel_multiple_keeps_aligned_widths_and_meets_budget(target):
    allocation = allocate_units(DEMO_LAYOUT, DEMO_COSTS, demo_rates(target), DEMO_SCORES,
                                prune_attention=False, channel_multiple=64)
    assert all(c % 64 == 0 and c >= 64 for c in allocation.channels_to_keep)
    assert allocation.budget_met
    assert len(set(allocation.channels_to_keep)) > 1  # rates still differ between layers


def test_channel_multiple_falls_back_to_a_common_divisor():
    assert channel_block([1536, 1536], 64) == 64
    assert channel_block([688, 1536], 64) == 16  # 688 = 43 x 16
    assert channel_block([97], 8) == 1
    layout_ = [LayerLayout(i, 4, 2, 8, 688) for i in range(4)]
    costs = [UnitCost(group=2_048, channel=768, attention=8_192, mlp=528_384)] * 4
    allocation = allocate_units(layout_, costs, [0.3] * 4, prune_attention=False,
                                channel_multiple=64)
    assert all(c % 16 == 0 for c in allocation.channels_to_keep)
    assert allocation.budget_met
    with pytest.raises(ValueError, match="channel_multiple=0"):
        allocate_units(layout_, costs, [0.3] * 4, channel_multiple=0)


def test_unknown_group_rounding_is_refused():
    with pytest.raises(ValueError, match="group_rounding='nearest'"):
        allocate_units(DEMO_LAYOUT, DEMO_COSTS, [0.25] * 30, group_rounding="nearest")


def test_extra_groups_go_to_least_important_layers():
    allocation = allocate_units(DEMO_LAYOUT, DEMO_COSTS, [0.25] * 30, DEMO_SCORES,
                                group_rounding="across")
    cut = [i for i, g in enumerate(allocation.groups_to_keep) if g < 3]
    spared = [i for i, g in enumerate(allocation.groups_to_keep) if g == 3]
    assert max(DEMO_SCORES[i] for i in cut) <= min(DEMO_SCORES[i] for i in spared)


def test_layers_without_rate_are_kept_whole():
    rates = demo_rates(0.3, layer_start=4, layer_end=26)
    allocation = allocate_units(DEMO_LAYOUT, DEMO_COSTS, rates, DEMO_SCORES)
    for i in [*range(4), *range(26, 30)]:
        assert (allocation.groups_to_keep[i], allocation.channels_to_keep[i]) == (3, 1536)
    assert allocation.params_prunable == 22 * (DEMO_COST.attention + DEMO_COST.mlp)
    assert allocation.budget_met


def test_attention_only_reports_achieved_ratio():
    allocation = allocate_units(DEMO_LAYOUT, DEMO_COSTS, demo_rates(0.3), prune_mlp=False)
    assert allocation.params_prunable == 30 * DEMO_COST.attention
    assert allocation.channels_to_keep == (1536,) * 30
    assert allocation.params_removed % DEMO_COST.group == 0
    assert allocation.ratio_achieved == pytest.approx(
        allocation.params_removed / allocation.params_prunable)
    assert allocation.budget_met  # 27 groups of 90: groups rounded across layers hit 30 %


def test_attention_only_says_when_it_misses():
    rates = [0.1] + [0.0] * 29  # 0.3 of a group: nothing to cut
    allocation = allocate_units(DEMO_LAYOUT, DEMO_COSTS, rates, prune_mlp=False)
    assert allocation.params_removed == 0
    assert allocation.ratio_requested == pytest.approx(0.1)
    assert allocation.ratio_achieved == 0.0
    assert not allocation.budget_met


def test_mlp_only_removes_no_groups():
    allocation = allocate_units(DEMO_LAYOUT, DEMO_COSTS, demo_rates(0.3), prune_attention=False)
    assert allocation.groups_to_keep == (3,) * 30
    assert allocation.params_prunable == 30 * DEMO_COST.mlp
    assert allocation.budget_met
    assert allocation.ratio_achieved == pytest.approx(0.3, abs=0.001)


def test_zero_rates_keep_everything():
    allocation = allocate_units(DEMO_LAYOUT, DEMO_COSTS, [0.0] * 30)
    assert allocation.groups_to_keep == (3,) * 30 and allocation.channels_to_keep == (1536,) * 30
    assert (allocation.params_removed, allocation.params_prunable) == (0, 0)


def test_allocation_rejects_bad_input():
    with pytest.raises(ValueError, match="30 layouts, 30 costs, 2 rates"):
        allocate_units(DEMO_LAYOUT, DEMO_COSTS, [0.2, 0.2])
    with pytest.raises(ValueError, match=r"\{3: 1.0\}"):
        allocate_units(DEMO_LAYOUT, DEMO_COSTS, [0.2] * 3 + [1.0] + [0.2] * 26)
    with pytest.raises(ValueError, match="nothing to allocate"):
        allocate_units(DEMO_LAYOUT, DEMO_COSTS, [0.2] * 30, prune_attention=False,
                       prune_mlp=False)


# ---------------------------------------------------------------------------------------------
# unit costs against the weights


@pytest.mark.parametrize(("variant", "group", "channel"), [
    ("llama", 2 * 3 * 8 * 48 + 2 * 8 * 48, 3 * 48),  # E48 D8 q_per_kv3
    ("qwen2_bias", 2 * 3 * 8 * 48 + 2 * 8 * 48 + 3 * 8 + 2 * 8, 3 * 48),  # + q/k/v biases
    ("q_per_kv4", 2 * 4 * 6 * 48 + 2 * 6 * 48, 3 * 48),
])
def test_unit_costs_match_a_cut(make_tiny, variant, group, channel):
    model = make_tiny(variant)
    costs = unit_costs(model)
    assert len(costs) == 3
    assert (costs[0].group, costs[0].channel) == (group, channel)
    layer = decoder_layers(model)[0]
    assert costs[0].attention == sum(p.numel() for p in layer.self_attn.parameters())
    assert costs[0].mlp == sum(p.numel() for p in layer.mlp.parameters())
    before = count_parameters(model)
    plan = identity_plan(layout(model))
    first = plan.layers[0]
    cut = LayerPlan(0, first.q_heads_before, first.kv_heads_before, first.head_dim,
                    first.mlp_before, first.kept_kv_heads[1:], first.kept_mlp_channels[2:])
    apply_plan_(model, plan.with_layer(cut), check=False)
    assert before - count_parameters(model) == group + 2 * channel
    assert unit_costs(model)[0].attention == costs[0].attention - group


def test_unit_costs_on_demo_shapes():
    """The numbers quoted for SmolLM2-135M follow from E=576, D=64, q_per_kv=3, no biases."""
    model = tiny_model(q_heads=9, kv_heads=3, hidden=576, head_dim=64, mlp_width=1536, layers=1)
    assert unit_costs(model)[0] == DEMO_COST
