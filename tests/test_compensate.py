"""MLP pruning with ridge least-squares compensation toward the original weights."""

from __future__ import annotations

import copy

import pytest
import torch

from gqaprune_core.compensate import (channel_energy, dense_residuals, prune_mlp_compensated_,
                                      refit_down, select_scores)
from gqaprune_core.models import layout
from gqaprune_core.plan import identity_plan
from gqaprune_core.surgery import apply_plan_


def test_refit_keeping_everything_returns_the_original():
    h = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(refit_down(h.T @ h, w, range(6), ridge=1e-3), w)


def test_refit_recovers_a_redundant_channel():
    """Channel 5 = channel 0 + channel 1: after removing it, the others absorb its weight."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 6, dtype=torch.float64, generator=g)
    h[:, 5] = h[:, 0] + h[:, 1]
    w = torch.randn(4, 6, dtype=torch.float64, generator=g)
    new = refit_down(h.T @ h, w, [0, 1, 2, 3, 4], ridge=1e-9)
    torch.testing.assert_close(h[:, :5] @ new.T, h @ w.T, rtol=1e-6, atol=1e-6)
    naive_error = (h[:, :5] @ w[:, :5].T - h @ w.T).norm()
    assert naive_error > 1.0  # dropping it without compensation would lose a lot


def test_large_ridge_stays_at_the_original_weights():
    h = torch.randn(100, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(refit_down(h.T @ h, w, [0, 2, 4], ridge=1e9), w[:, [0, 2, 4]],
                               rtol=1e-6, atol=1e-6)


def test_channel_energy_is_activation_times_weight_norm():
    h = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    assert channel_energy(h.T @ h, w).tolist() == [10.0 * 1.0, 4.0 * 5.0]


def test_compensated_pruning_beats_plain_cut_on_calibration(make_tiny, tiny_ids):
    model = make_tiny("qwen2_bias")
    dense = copy.deepcopy(model)
    calibration = torch.randint(0, 97, (8, 24), generator=torch.Generator().manual_seed(4))
    keep = [25, 30, 20]
    plan = prune_mlp_compensated_(model, calibration, keep, ridge=0.01)
    assert [s.mlp_width for s in layout(model)] == keep
    assert [lp.mlp for lp in plan.layers] == keep
    plain = copy.deepcopy(dense)
    apply_plan_(plain, plan)  # the same channels, without the re-fit
    with torch.no_grad():
        target = dense(calibration).logits
        error = (model(calibration).logits - target).pow(2).mean()
        plain_error = (plain(calibration).logits - target).pow(2).mean()
    assert error < plain_error


def test_compensation_keeps_an_attention_plan(make_tiny):
    model = make_tiny()
    base = identity_plan(layout(model))
    from dataclasses import replace

    base = base.with_layer(replace(base.layers[1], kept_kv_heads=(1,)))
    apply_plan_(model, base)
    calibration = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(5))
    plan = prune_mlp_compensated_(model, calibration, [40, 30, 40], base_plan=base)
    assert plan.layers[1].kept_kv_heads == (1,) and plan.layers[1].mlp == 30
    assert plan.layers[1].kv_heads_before == 2


def test_feedback_pulls_the_residual_stream_toward_the_dense_model(make_tiny):
    """With feedback 1 each layer's re-fit also corrects the drift earlier cuts caused, so the
    last hidden states on the calibration data land closer to the dense model's."""
    dense = make_tiny("qwen2_bias")
    calibration = torch.randint(0, 97, (8, 24), generator=torch.Generator().manual_seed(6))
    keep = [20, 20, 20]
    errors = {}
    for feedback in (0.0, 1.0):
        model = copy.deepcopy(dense)
        plan = prune_mlp_compensated_(model, calibration, keep, ridge=0.01, feedback=feedback)
        assert [lp.mlp for lp in plan.layers] == keep
        with torch.no_grad():
            hidden = model.model(calibration).last_hidden_state
            errors[feedback] = (hidden - dense.model(calibration).last_hidden_state).pow(2).mean()
    assert errors[1.0] < errors[0.0]


def test_dense_residuals_are_the_layer_outputs_in_the_model_dtype(make_tiny):
    """The feedback's dense targets are each layer's output, kept in host memory in the model's
    own dtype (bfloat16 stays bfloat16: half the bytes of float32, nothing lost)."""
    model = make_tiny().to(torch.bfloat16)
    calibration = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    targets = dense_residuals(model, calibration, [0, 1])  # the last one's is normed below
    assert sorted(targets) == [0, 1]
    with torch.no_grad():
        states = model.model(calibration, output_hidden_states=True).hidden_states
    for index, target in targets.items():
        assert target.dtype == torch.bfloat16 and target.device.type == "cpu"
        assert target.shape == (2 * 12, states[0].shape[-1])
        assert torch.equal(target, states[index + 1].reshape(target.shape))


def test_feedback_out_of_range_is_refused(make_tiny):
    import pytest

    with pytest.raises(ValueError, match="feedback=1.5"):
        prune_mlp_compensated_(make_tiny(), torch.zeros(1, 4, dtype=torch.long), [40, 40, 40],
                               feedback=1.5)


def test_select_scores_adds_the_shares_of_energy_and_fisher():
    energy = torch.tensor([6.0, 3.0, 1.0], dtype=torch.float64)
    fisher = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    assert select_scores("energy", energy, None) is energy
    assert select_scores("fisher", energy, fisher).tolist() == fisher.tolist()
    torch.testing.assert_close(select_scores("energy+fisher", energy, fisher),
                               torch.tensor([0.6, 0.55, 0.85], dtype=torch.float64))
    with pytest.raises(ValueError, match="needs the Fisher"):
        select_scores("fisher", energy, None)


@pytest.mark.parametrize("selection", ["fisher", "energy+fisher"])
def test_loss_weighted_selection_keeps_what_the_loss_needs(make_tiny, selection):
    """The loss-weighted choices (one backward pass before the cut) keep the channel the loss
    depends on most and choose otherwise than output energy does."""
    from gqaprune_core.unit_importance import fisher_channel_scores

    model = make_tiny("llama")
    calibration = torch.randint(0, 97, (8, 24), generator=torch.Generator().manual_seed(4))
    fisher = fisher_channel_scores(model, calibration)[0]
    width = layout(model)[0].mlp_width
    keep = width // 2
    energy_model = copy.deepcopy(model)
    plan = prune_mlp_compensated_(model, calibration, [keep, width, width], selection=selection)
    energy_plan = prune_mlp_compensated_(energy_model, calibration, [keep, width, width])
    kept, by_energy = set(plan.layers[0].kept_mlp_channels), set(energy_plan.layers[0].kept_mlp_channels)
    assert len(kept) == keep and kept != by_energy
    top = int(fisher.argmax())
    assert top in kept
    if selection == "fisher":
        assert kept == set(torch.topk(fisher, keep).indices.tolist())


@pytest.mark.parametrize("selection,feedback,windows", [
    ("energy", 0.0, 0), ("energy+fisher", 0.0, 12), ("energy+fisher", 0.25, 13)])
def test_progress_counts_the_dense_and_fisher_passes_then_the_layers(make_tiny, selection,
                                                                     feedback, windows):
    model = make_tiny("llama")
    calibration = torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(4))
    width = layout(model)[0].mlp_width
    calls = []
    prune_mlp_compensated_(model, calibration, [width // 2, width, width // 2],
                           selection=selection, feedback=feedback,
                           progress=lambda d, t: calls.append((d, t)))
    # one total: the dense pass (with feedback, one step), the Fisher windows, 2 layers cut
    assert {t for _, t in calls} == {windows + 2}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == windows + 2 and done[-2] == windows + 1
    assert (len(done) > 2) == bool(windows)  # the passes report as they go
    if feedback:  # the bar starts before the dense pass, and that pass is its first step
        assert done[:2] == [0, 1]


@pytest.mark.parametrize("skip,rows,expected", [(0, None, (0, 12)), (0, 5, (0, 5)),
                                                (5, None, (5, 12)), (2, 3, (2, 5))])
def test_fisher_rows_choose_the_windows_of_the_fisher_pass(make_tiny, monkeypatch, skip, rows,
                                                          expected):
    """FISHER_SKIP / FISHER_ROWS (benchmark knobs) pick the calibration rows the backward pass
    reads; the progress bar counts those windows."""
    from gqaprune_core import compensate

    model = make_tiny("llama")
    calibration = torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(4))
    seen = []
    real = compensate.fisher_channel_scores
    monkeypatch.setattr(compensate, "fisher_channel_scores",
                        lambda model, batch, **kw: seen.append(batch) or real(model, batch, **kw))
    monkeypatch.setattr(compensate, "FISHER_SKIP", skip)
    monkeypatch.setattr(compensate, "FISHER_ROWS", rows)
    width = layout(model)[0].mlp_width
    calls = []
    prune_mlp_compensated_(model, calibration, [width // 2, width, width],
                           selection="energy+fisher", progress=lambda d, t: calls.append(t))
    assert len(seen) == 1 and torch.equal(seen[0], calibration[expected[0]:expected[1]])
    assert set(calls) == {expected[1] - expected[0] + 1}


def test_unknown_selection_is_refused(make_tiny):
    with pytest.raises(ValueError, match="selection='obs-greedy'; choose one of energy"):
        prune_mlp_compensated_(make_tiny("llama"), torch.zeros(1, 4, dtype=torch.long), [8],
                               selection="obs-greedy")
