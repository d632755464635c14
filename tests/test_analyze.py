"""analyze: parameter counts by component, per-layer GQA checks, and the CLI."""

from __future__ import annotations

import copy
import json
import runpy
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gqaprune_core.analyze import compare, component_parameters, format_report, main
from gqaprune_core.checkpoint import WEIGHTS_NAME, save_pruned
from gqaprune_core.models import count_parameters, layout
from gqaprune_core.plan import PruningPlan, identity_plan
from gqaprune_core.surgery import apply_plan_

E, D, VOCAB = 48, 8, 97  # tiny llama: hidden, head_dim, vocabulary; q_per_kv 3


pytestmark = pytest.mark.usefixtures("one_thread")


def mixed_plan(model) -> PruningPlan:
    """Layer 0 keeps group 1 only; layer 1 keeps half the MLP (every other channel)."""
    plan = identity_plan(layout(model), method="hand")
    plan = plan.with_layer(replace(plan.layers[0], kept_kv_heads=(1,)))
    return plan.with_layer(replace(plan.layers[1], kept_mlp_channels=tuple(range(0, 40, 2))))


def test_component_parameters_add_up(make_tiny):
    model = make_tiny()
    counts = component_parameters(model)
    assert counts["total"] == count_parameters(model)
    assert counts["embeddings"] == counts["lm_head"] == VOCAB * E
    assert counts["other"] == 0
    assert counts["mlp"] == 3 * 3 * 40 * E
    assert counts["norms"] == (2 * 3 + 1) * E


def test_tied_head_is_counted_once_under_embeddings(make_tiny):
    counts = component_parameters(make_tiny(tie_embeddings=True))
    assert counts["embeddings"] == VOCAB * E and counts["lm_head"] == 0


def test_compare_counts_what_the_plan_removed(make_tiny):
    original = make_tiny()
    pruned = apply_plan_(copy.deepcopy(original), mixed_plan(original))
    report = compare(original, pruned)

    attention = 2 * (3 * D * E) + 2 * (D * E)  # one group: q rows + o columns, k and v rows
    mlp = 3 * 20 * E  # 20 channels of gate, up and down
    params = report["parameters"]
    assert params["attention"]["removed"] == attention
    assert params["mlp"]["removed"] == mlp
    assert params["total"]["after"] == params["total"]["before"] - attention - mlp
    assert params["total"]["after"] == count_parameters(pruned)
    assert params["embeddings"]["removed"] == params["norms"]["removed"] == 0
    assert params["mlp"]["reduction_pct"] == pytest.approx(100 * mlp / (3 * 3 * 40 * E), abs=1e-3)
    first = report["layers"][0]
    assert (first["q_heads_after"], first["kv_heads_after"], first["q_per_kv_after"]) == (3, 1, 3)
    assert report["layers"][1]["mlp_after"] == 20 and report["all_ok"]
    text = format_report(report)
    assert "    0    6 -> 3     2 -> 1     3 -> 3      40 -> 40     ok" in text


def test_compare_flags_a_changed_q_per_kv(make_tiny):
    report = compare(make_tiny(), make_tiny("q_per_kv4"))  # 3 query heads per group, then 4
    assert not report["all_ok"] and not any(row["ok"] for row in report["layers"])
    assert "FAIL" in format_report(report)


def test_compare_refuses_different_depths(make_tiny):
    with pytest.raises(ValueError, match="original has 3 layers, pruned has 2"):
        compare(make_tiny(), make_tiny(layers=2))


@pytest.fixture
def saved_pair(make_tiny, tiny_tokenizer, tmp_path) -> tuple[Path, Path]:
    original = make_tiny()
    plan = mixed_plan(original)
    before = save_pruned(original, tiny_tokenizer, None, tmp_path / "original")
    after = save_pruned(apply_plan_(original, plan), tiny_tokenizer, plan, tmp_path / "pruned")
    return before, after


def test_cli_prints_one_json_object(saved_pair, capsys):
    before, after = saved_pair
    assert main(["--original_model", str(before), "--pruned_model", str(after), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["all_ok"] and report["disk"]["pruned"] < report["disk"]["original"]
    assert report["parameters"]["total"]["removed"] == 2 * (3 * D * E) + 2 * (D * E) + 3 * 20 * E


def test_cli_runs_as_a_module(saved_pair, monkeypatch, capsys):
    # runpy executes the ``__main__`` block like ``python -m`` does, without a second interpreter
    # (a subprocess re-imports torch and transformers: ~5 s on a busy 2-core machine).
    before, after = saved_pair
    monkeypatch.setattr(sys, "argv", ["analyze", "--original_model", str(before),
                                      "--pruned_model", str(after), "--json"])
    monkeypatch.delitem(sys.modules, "gqaprune_core.analyze")  # as a fresh `python -m` would
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("gqaprune_core.analyze", run_name="__main__")
    assert stop.value.code == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["kv_heads_after"] == 1


def test_cli_text_report(saved_pair, capsys):
    before, after = saved_pair
    assert main(["--original_model", str(before), "--pruned_model", str(after)]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "size on disk (pruned)" in out and "every layer: yes" in out


def test_cli_bad_path_exits_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["--original_model", "tiny", "--pruned_model", str(missing)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err


def test_cli_unreadable_checkpoint_exits_with_one_line(saved_pair, capsys):
    before, after = saved_pair
    (after / WEIGHTS_NAME).write_bytes(b"garbage")
    assert main(["--original_model", str(before), "--pruned_model", str(after)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "safetensors" in err
