"""Smoke test of the benchmark scripts on tiny models: every code path runs, results hold up.

Both scripts run end to end on seeded random models and a small text corpus written here, so
this needs no demo model and stays well under 30 s on two cores.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import baselines  # noqa: E402
import quality  # noqa: E402
import speed  # noqa: E402
from gqaprune_core.layer_importance import compute_layer_importance  # noqa: E402
from gqaprune_core.models import count_parameters, layout  # noqa: E402

WORDS = ("the model keeps every group of heads that share one key and value while the "
         "channels of the feed forward block are ranked by their scores and cut").split()


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    """A small .txt corpus (documents separated by blank lines) and an empty score cache."""
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))
    generator = torch.Generator().manual_seed(0)
    documents = []
    for _ in range(24):
        picks = torch.randint(0, len(WORDS), (60,), generator=generator).tolist()
        documents.append(" ".join(WORDS[i] for i in picks) + ".")
    path = tmp_path / "words.txt"
    path.write_text("\n\n".join(documents))
    return path


def test_quality_script_on_tiny_model(corpus, tmp_path):
    out = tmp_path / "quality.json"
    data = quality.main([
        "--model", "tiny", "--ratios", "0.3", "--methods", "original,global_taylor,depth",
        "--windows", "2", "--seq-len", "64", "--corpora", str(corpus),
        "--calibration", str(corpus), "--importance-samples", "4", "--importance-seq-len", "32",
        "--examples", "4", "--example-seq-len", "16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert len(saved["results"]) == len(data["results"]) == 3
    assert out.with_suffix(".png").is_file()
    assert {"date", "command", "machine", "code"} <= set(saved)
    dense = saved["dense"]["params"]
    for entry in saved["results"]:
        assert entry["within_tolerance"], entry["method"]
        assert abs(entry["params"] - 0.7 * dense) <= quality.TOLERANCE * 0.7 * dense
        ppl = entry["ppl"][str(corpus)]
        assert ppl["windows"] == 2 and ppl["tokens"] == 2 * 63
    depth = next(e for e in saved["results"] if e["method"] == "depth")
    assert depth["layers"] == 2 and depth["details"]["removed_layers"]


def test_quality_script_recovery_row(corpus, tmp_path):
    data = quality.main([
        "--model", "tiny", "--ratios", "0.1", "--methods", "default+lora", "--recovery-steps", "1",
        "--windows", "2", "--seq-len", "64", "--corpora", str(corpus),
        "--calibration", str(corpus), "--importance-samples", "4", "--importance-seq-len", "32",
        "--out", str(tmp_path / "q.json"), "--no-plot"])
    (entry,) = data["results"]
    assert entry["within_tolerance"] and "ppl" in entry
    assert entry["details"]["recovery"]["steps_done"] == 1
    assert entry["details"]["config"]["recovery"] == "lora"
    from gqaprune_core import self_text
    assert entry["details"]["config"]["self_text_share"] > 0
    assert entry["details"]["self_text"] == {"prompt_tokens": self_text.PROMPT_TOKENS,
                                             "top_p": self_text.TOP_P,
                                             "temperature": self_text.TEMPERATURE}


def test_results_name_the_commit_they_were_measured_at(tmp_path, monkeypatch):
    """Every results file records the commit and whether tracked files differed from it;
    outside a git checkout it says so (None) instead of failing."""
    import common

    if not (common.REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    code = common.code_version()
    assert len(code["commit"]) == 40 and int(code["commit"], 16) >= 0
    assert isinstance(code["dirty"], bool)
    monkeypatch.setattr(common, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert common.code_version() is None


def test_speed_script_on_tiny_llama(corpus, tmp_path):
    out = tmp_path / "speed.json"
    data = speed.main([
        "--shape", "tiny-llama", "--random-weights", "--device", "cpu", "--importance-samples",
        "4", "--importance-seq-len", "32", "--examples", "4", "--example-seq-len", "16",
        "--eval-windows", "2", "--eval-seq-len", "32", "--matmul-size", "256",
        "--full-eval-windows", "3", "--calibration", str(corpus), "--out", str(out)])
    assert data["errors"] == [], {k: v.get("error") for k, v in data["stages"].items()}
    stages = data["stages"]
    for name in ("importance_removal_prefix_reuse", "importance_removal_naive",
                 "prune_taylor_sequential", "surgery_apply_plan", "evaluate",
                 "pipeline_original", "pipeline_default", "full_procedure_default_in_place",
                 "evaluate_pruned_multiple_1", "evaluate_pruned_multiple_8",
                 "recovery_lora_5_steps", "recovery_full_5_steps"):
        assert stages[name]["seconds"] > 0, name
    assert stages["full_procedure_default_in_place"]["eval_tokens_each"] == 3 * 31
    assert stages["removal_naive_over_prefix_reuse"]["max_relative_score_difference"] < 1e-5
    assert json.loads(out.read_text())["model"]["name"] == "tiny-llama"


def test_naive_removal_matches_prefix_reuse(make_tiny):
    model = make_tiny()
    ids = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(2))
    naive, naive_stats = baselines.naive_removal_importance(model, ids, batch_size=2)
    prefix, prefix_stats = compute_layer_importance(model, ids, "removal", batch_size=2)
    assert naive == pytest.approx(prefix, rel=1e-5, abs=1e-6)
    assert naive_stats["base_ppl"] == pytest.approx(prefix_stats["base_ppl"], rel=1e-6)


def test_global_unit_counts_meet_budget_and_keep_one_of_each():
    groups = [torch.tensor([1.0, 5.0]), torch.tensor([0.1, 0.2])]
    channels = [torch.tensor([3.0, 4.0, 9.0]), torch.tensor([0.5, 0.05, 8.0])]
    removed_groups, removed_channels = baselines.global_unit_counts(
        groups, channels, [10, 10], [1, 1], params_to_remove=14)
    assert sum(removed_groups) * 10 + sum(removed_channels) == 14
    assert all(g <= 1 for g in removed_groups) and all(c <= 2 for c in removed_channels)


def test_remove_layers_keeps_kv_cache_consistent(make_tiny):
    model = make_tiny(layers=4)
    baselines.remove_layers_(model, [1, 2])
    assert model.config.num_hidden_layers == 2 and len(layout(model)) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    full = model(ids, use_cache=False).logits[:, -1]
    prefix = model(ids[:, :-1], use_cache=True)
    step = model(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        baselines.remove_layers_(model, [0, 1])


def test_forward_flops_counts_weights_twice_per_token(make_tiny):
    model = make_tiny()
    embedding = model.get_input_embeddings().weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    weights = count_parameters(model) - embedding - norms  # layers' matrices and the LM head
    shape = layout(model)[0]
    attention = 3 * 2 * 10 ** 2 * shape.q_heads * shape.head_dim  # 3 layers, 2 x T^2 x H x D
    assert speed.forward_flops(model, 10, 1) == pytest.approx(2 * 10 * weights + attention)


def test_quick_mode_keeps_the_original_sequential_and_shrinks_samples():
    args = quality.parse_args(["--quick"])
    assert (args.ratio_list, args.windows, args.importance_samples, args.examples) == ([0.2], 4, 8, 8)
    assert args.method_list == list(quality.QUICK_METHODS)
    original, _ = quality.method_config("original", 0.2, args)
    naive, notes = quality.method_config("naive-heads", 0.2, args)
    assert original.mode == "sequential" and naive.mode == "one-shot"
    assert any("one-shot" in note for note in notes)
    assert quality.method_config("naive-heads", 0.2, quality.parse_args([]))[0].mode == "sequential"


def test_results_written_with_tuples_still_match_their_settings(tmp_path):
    """A resumed selection run keeps the earlier results: settings read back from JSON (tuples
    as lists) match the ones the run builds (a plain == dropped them every time)."""
    from common import read_json, same_settings, write_json

    settings = {"ratio": 0.2, "base": {"eval_datasets": ("demo", "pydoc")}}
    write_json(tmp_path / "r.json", {"settings": settings, "results": {"a": 1}})
    previous = read_json(tmp_path / "r.json")
    assert previous["settings"] != settings  # why the JSON comparison is needed
    assert same_settings(previous, settings)
    assert not same_settings(previous, {**settings, "ratio": 0.3})
    assert not same_settings(None, settings)


def test_leave_one_out_folds_leave_each_kind_out_once_and_judge_by_the_unseen_sets():
    """Each fold fits on two of the three calibration kinds; the summary puts the left-out kind
    and the licenses (never fitted) on the unseen side, the other two on the fitted side."""
    import select_default

    folds = select_default.folds("default", select_default.DPW)
    assert [unseen for _, _, unseen in folds] == ["sel-demo", "sel-pydoc", "sel-wiki"]
    for name, fit, unseen in folds:
        assert unseen not in fit.split("+") and len(fit.split("+")) == 2
        assert name.startswith("default@without-")
    with pytest.raises(SystemExit, match="sel-demo\\+sel-wiki"):
        select_default.folds("nw/uniform", select_default.NW)

    ratios = {"sel-demo": 2.0, "sel-pydoc": 1.5, "sel-wiki": 3.0, "sel-licenses": 4.0}
    results = {name: {"variant": "v", "unseen": unseen,
                      "ratio": {c: r * (2 if c == unseen else 1) for c, r in ratios.items()}}
               for name, _, unseen in folds}
    results["plain"] = {"variant": "w", "unseen": None, "ratio": ratios}
    summary = select_default.unseen_summary(results)
    assert set(summary) == {"v"} and summary["v"]["folds"] == 3
    unseen = [4.0, 4.0, 4.0, 4.0, 3.0, 6.0]  # licenses thrice; demo, pydoc, wiki doubled
    fitted = [1.5, 3.0, 2.0, 3.0, 2.0, 1.5]
    geo = lambda v: torch.tensor(v).log().mean().exp().item()  # noqa: E731
    assert summary["v"]["unseen"] == pytest.approx(geo(unseen), abs=1e-4)
    assert summary["v"]["fitted"] == pytest.approx(geo(fitted), abs=1e-4)


def test_the_review_set_is_evaluation_only_unlabelled_and_counted_as_unseen():
    """``--reviews``: gensim's movie reviews, label prefixes stripped, no calibration part, on
    the unseen side of a leave-one-out summary like the licenses."""
    import select_default

    documents = select_default.review_documents()
    assert len(documents) == 210 and all(documents)
    assert not any(d.startswith(("__label__", "_*")) for d in documents)
    assert "simplistic , silly and tedious ." in documents
    corpora = select_default.held_out_corpora(reviews=True)
    assert corpora["sel-reviews"].calibration == () and corpora["sel-reviews"].evaluation
    assert "sel-reviews" not in select_default.held_out_corpora()
    results = {"fold": {"variant": "v", "unseen": "sel-demo",
                        "ratio": {"sel-demo": 2.0, "sel-pydoc": 1.5, "sel-reviews": 8.0}}}
    summary = select_default.unseen_summary(results)["v"]
    assert summary["unseen"] == pytest.approx(4.0) and summary["fitted"] == pytest.approx(1.5)


def test_a_results_file_from_before_a_new_setting_is_resumed_with_the_setting_off():
    """A config field added since a selection file was written is read as off (PruneConfig's
    own value): the file's results stay; a base that differs in any written field does not."""
    import select_default
    from common import same_settings

    from gqaprune_core.config import PruneConfig

    base = PruneConfig().to_dict()
    old_base = {k: v for k, v in base.items() if k != "self_text_share"}
    previous = json.loads(json.dumps(  # as read back from the file
        {"settings": {"ratio": 0.3, "base": old_base}, "results": {"a": {}}}))
    then = {"prompt_tokens": 4, "top_p": 0.95, "temperature": 1.0}  # before it was written
    assert not same_settings(previous, {"ratio": 0.3, "base": base, "self_text": then})
    assert same_settings(select_default.with_new_fields(previous),
                         {"ratio": 0.3, "base": base, "self_text": then})
    turned_on = base | {"self_text_share": 1.0}
    assert not same_settings(select_default.with_new_fields(previous),
                             {"ratio": 0.3, "base": turned_on, "self_text": then})
    assert select_default.with_new_fields(None) is None


def test_a_results_file_written_with_other_self_text_prompts_is_not_resumed():
    """The written windows' prompt length is a module constant, not a config field: the
    settings record it, so a file of 4-token prompts (or another nucleus) never answers for
    today's default."""
    import select_default
    from common import same_settings

    base = select_default.BASE.to_dict()
    now = {"ratio": 0.2, "base": base, "self_text": select_default.self_text_settings()}
    eighth_round = json.loads(json.dumps({"settings": {"ratio": 0.2, "base": base}}))
    resumed = select_default.with_new_fields(eighth_round)
    eighth = {"prompt_tokens": 4, "top_p": 0.95, "temperature": 1.0}
    assert resumed["settings"]["self_text"] == eighth
    assert same_settings(resumed, now) == (select_default.self_text_settings() == eighth)
    with select_default.constants({"gqaprune_core.self_text.PROMPT_TOKENS": 4,
                                   "gqaprune_core.self_text.TOP_P": 0.95}):
        assert same_settings(resumed, now | {"self_text": select_default.self_text_settings()})
    with select_default.constants({"gqaprune_core.self_text.PROMPT_TOKENS": 4}):  # nucleus 1
        assert not same_settings(resumed,
                                 now | {"self_text": select_default.self_text_settings()})


def test_a_variants_module_constants_hold_for_its_run_only():
    """``constants`` sets each dotted name for the block and restores it, even on an error;
    every name a variant sets exists (a typo would silently try nothing)."""
    import select_default

    from gqaprune_core import self_text

    before, top_p = self_text.PROMPT_TOKENS, self_text.TOP_P
    with select_default.constants({"gqaprune_core.self_text.PROMPT_TOKENS": before + 3}):
        assert self_text.PROMPT_TOKENS == before + 3
    assert self_text.PROMPT_TOKENS == before
    with pytest.raises(RuntimeError), \
            select_default.constants({"gqaprune_core.self_text.TOP_P": top_p / 2}):
        assert self_text.TOP_P == top_p / 2
        raise RuntimeError
    assert self_text.TOP_P == top_p
    with pytest.raises(AttributeError):
        with select_default.constants({"gqaprune_core.self_text.NO_SUCH_NAME": 1}):
            pass
    for name, values in select_default.CONSTANTS.items():
        assert name in select_default.VARIANTS
        for dotted in values:
            module, attribute = dotted.rsplit(".", 1)
            assert hasattr(importlib.import_module(module), attribute), dotted
