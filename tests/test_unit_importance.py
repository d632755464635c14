"""Unit scores per GQA group / MLP channel, pruning modes and the naive-heads anti-example."""

from __future__ import annotations

import pytest
import torch

from gqaprune_core.models import layout
from gqaprune_core.pruner import prune_model_
from gqaprune_core.unit_importance import (activation_norms, channel_scores,
                                           fisher_channel_scores, group_scores,
                                           layer_saliency, taylor_saliency)


def calibration(n: int = 6, t: int = 12) -> torch.Tensor:
    return torch.randint(0, 97, (n, t), generator=torch.Generator().manual_seed(3))


def direct_taylor(model, ids, layer: int):
    """|w * grad| per group and channel, computed from full gradients by hand."""
    model.zero_grad()
    model(ids, labels=ids, use_cache=False).loss.backward()
    attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
    s = {name: (lin.weight * lin.weight.grad).abs().detach()
         for name, lin in [("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj),
                           ("o", attn.o_proj), ("gate", mlp.gate_proj), ("up", mlp.up_proj),
                           ("down", mlp.down_proj)]}
    shape = layout(model)[layer]
    g, d, qk = shape.kv_heads, shape.head_dim, shape.q_per_kv
    groups = torch.stack([
        s["q"][i * qk * d:(i + 1) * qk * d].sum() + s["k"][i * d:(i + 1) * d].sum()
        + s["v"][i * d:(i + 1) * d].sum() + s["o"][:, i * qk * d:(i + 1) * qk * d].sum()
        for i in range(g)])
    channels = s["gate"].sum(1) + s["up"].sum(1) + s["down"].sum(0)
    model.zero_grad()
    return groups, channels


@pytest.mark.parametrize("variant", ["llama", "q_per_kv4", "qwen2_bias"])
def test_taylor_scores_match_direct_computation(make_tiny, variant):
    model = make_tiny(variant)
    ids = calibration()
    expected_groups, expected_channels = direct_taylor(model, ids, 1)
    shape = layout(model)[1]
    saliency = taylor_saliency(model, ids, [1], chunk_size=len(ids))[1]
    torch.testing.assert_close(group_scores(saliency, shape.q_per_kv, shape.head_dim),
                               expected_groups, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(channel_scores(saliency), expected_channels, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_taylor_chunks_bound_memory_and_stay_close(make_tiny):
    model = make_tiny()
    ids = calibration(8)
    one = taylor_saliency(model, ids, [0], chunk_size=8)[0]
    four = taylor_saliency(model, ids, [0], chunk_size=2)[0]
    # per-chunk |w*g| sums upper-bound the full-batch |w*g| (triangle inequality)
    assert torch.all(channel_scores(four) >= channel_scores(one) * (1 - 1e-5))


def test_activation_norms_hooks_removed(make_tiny):
    model = make_tiny()
    norms = activation_norms(model, calibration())
    assert set(norms[0]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert norms[0]["down"].shape == (40,) and norms[0]["o"].shape == (48,)
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["magnitude", "random", "activation", "taylor"])
def test_every_method_gives_one_score_per_unit(make_tiny, method):
    model = make_tiny()
    saliency = layer_saliency(model, method, calibration(), seed=1)
    for index, shape in enumerate(layout(model)):
        assert group_scores(saliency[index], shape.q_per_kv, shape.head_dim).shape == (2,)
        assert torch.isfinite(channel_scores(saliency[index])).all()


@pytest.mark.parametrize("mode", ["sequential", "one-shot"])
def test_modes_produce_consistent_plans(make_tiny, mode):
    model = make_tiny("qwen2_bias")
    plan = prune_model_(model, calibration(), [1, 2, 1], [30, 20, 40], "taylor", mode)
    shapes = layout(model)
    assert [s.kv_heads for s in shapes] == [1, 2, 1]
    assert [s.mlp_width for s in shapes] == [30, 20, 40]
    assert [p.kv_heads for p in plan.layers] == [1, 2, 1]
    assert all(s.q_per_kv == 3 for s in shapes)


def test_sequential_rescoring_differs_from_one_shot(make_tiny):
    """Sequential recomputes gradients after each cut, so later layers can choose differently."""
    plans = {}
    for mode in ("sequential", "one-shot"):
        model = make_tiny(layers=3, mlp_width=40)
        plans[mode] = prune_model_(model, calibration(), [1, 1, 1], [10, 10, 10], "taylor", mode)
    assert plans["sequential"].layers[0] == plans["one-shot"].layers[0]  # same model so far
    assert plans["sequential"] != plans["one-shot"]


def test_naive_heads_mismatches_query_and_kv_heads(make_tiny):
    model = make_tiny("llama", layers=2)
    plan = prune_model_(model, calibration(), [1, 1], [40, 40], "naive-heads", "one-shot")
    mismatched = 0
    for lp in plan.layers:
        assert lp.kept_q_heads is not None and len(lp.kept_q_heads) == 3
        # After the cut, surviving query head at position p reads KV position p // 3, i.e.
        # the original KV head kept_kv_heads[p // 3]; its true KV head is h // 3.
        for position, head in enumerate(lp.kept_q_heads):
            true_kv = head // lp.q_per_kv
            read_kv = lp.kept_kv_heads[position // lp.q_per_kv]
            mismatched += true_kv != read_kv
    assert mismatched > 0
    assert torch.isfinite(model(calibration(), use_cache=False).logits).all()


def test_impossible_unit_counts_are_refused(make_tiny):
    model = make_tiny()
    with pytest.raises(ValueError, match="layer 1: cannot keep 0 of 2 groups"):
        prune_model_(model, calibration(), [2, 0, 2], [40, 40, 40])


def direct_fisher(model, ids, layer: int) -> torch.Tensor:
    """Σ_t (h_tj (g_t · w_j))² by hand: g from the summed loss, h from a hook."""
    seen = {}
    down = model.model.layers[layer].mlp.down_proj

    def hook(module, args, out):
        seen["h"] = args[0].detach()
        out.retain_grad()
        seen["out"] = out

    handle = down.register_forward_hook(hook)
    loss = model(ids, labels=ids, use_cache=False).loss * ids[:, 1:].numel()
    loss.backward()
    handle.remove()
    model.zero_grad()
    g = seen["out"].grad
    return ((seen["h"] * (g @ down.weight.detach())) ** 2).sum(dim=(0, 1)).double()


@pytest.mark.parametrize("variant", ["llama", "qwen2_bias"])
def test_fisher_channel_scores_match_direct_computation(make_tiny, variant):
    model = make_tiny(variant)
    ids = calibration(4, 10)
    scores = fisher_channel_scores(model, ids, chunk_size=4)
    assert sorted(scores) == list(range(len(layout(model))))
    for layer in range(len(layout(model))):
        torch.testing.assert_close(scores[layer], direct_fisher(model, ids, layer),
                                   rtol=1e-4, atol=1e-12)
    # summed over tokens, so the chunking does not change it
    for layer, value in fisher_channel_scores(model, ids, chunk_size=1).items():
        torch.testing.assert_close(value, scores[layer], rtol=1e-4, atol=1e-12)


def test_fisher_scores_leave_the_model_as_it_was_and_see_dead_channels(make_tiny):
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 5] = 0.0  # channel 5 feeds nothing
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    scores = fisher_channel_scores(model, calibration(4, 10))
    assert scores[1][5] == 0 and (scores[1] > 0).sum() == scores[1].numel() - 1
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks
              or m._backward_hooks]
    assert hooked == []
