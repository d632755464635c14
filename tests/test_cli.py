"""The command line: flags → config, the run directory, two-stage reuse, one-line failures.

Runs are in-process (``cli.main`` / ``cli.execute``) on the tiny model with tiny sample counts;
one subprocess checks ``python -m gqaprune_core --help``; one test uses the real demo model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gqaprune_core import cli, outputs
from gqaprune_core.checkpoint import load_pruned
from gqaprune_core.config import PRESETS, PruneConfig
from gqaprune_core.models import count_parameters, layout

TINY = ["--base_model", "tiny", "--device", "cpu", "--importance_samples", "4",
        "--num_examples", "4", "--eval_seq_len", "32", "--max_eval_windows", "2"]
FAST = [*TINY, "--importance_method", "activation", "--quiet"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Layer-importance cache files go to a temporary directory, not the repository's."""
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full CLI run on the tiny model: MLP too, evaluation, saved model."""
    out = tmp_path_factory.mktemp("prune_log")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GQAPRUNE_CACHE", str(out / "cache"))
        run = cli.execute([*TINY, "--prune_mlp", "--test_after_prune", "--save_model",
                           "--eval_datasets", "demo,pydoc", "--output_dir", str(out),
                           "--save_ckpt_log_name", "stage1", "--quiet"])
    return run


def assert_one_line_failure(code: int, err: str, status: int = 1) -> None:
    assert code == status
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gqaprune: error: ") and "Traceback" not in err


# ---- flags -----------------------------------------------------------------------------------

def test_help_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "gqaprune_core", "--help"], capture_output=True,
                          text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    for flag in ("--base_model", "--save_ckpt_log_name", "--skip_importance_analysis",
                 "--gqa_ratio", "--unit_importance", "--ratio_of", "--quiet"):
        assert flag in done.stdout


def test_every_flag_has_help():
    missing = [a.option_strings for a in cli.build_parser()._actions if not a.help]
    assert missing == []


def parse(*argv: str) -> PruneConfig:
    return cli.config_from_args(cli.build_parser().parse_args(list(argv)))


def test_defaults_are_the_original_with_attention_only():
    assert parse() == PRESETS["original"].with_(prune_mlp=False)
    assert parse("--prune_mlp").prune_mlp is True


def test_preset_keeps_its_choices_unless_a_flag_overrides():
    assert parse("--preset", "original") == PRESETS["original"]
    assert parse("--preset", "original", "--no-prune_mlp").prune_mlp is False
    assert parse("--preset", "original", "--alpha", "2").alpha == 2.0
    assert parse("--preset", "default").channel_selection == "energy+fisher"
    assert parse("--preset", "default", "--channel_selection", "energy").channel_selection == "energy"
    assert parse("--preset", "default", "--self_text_share", "0.5").self_text_share == 0.5
    with pytest.raises(cli.UsageError, match="--channel_selection: invalid choice: 'obs'"):
        parse("--channel_selection", "obs")


def test_flag_conversions():
    config = parse("--eval_datasets", "demo, pydoc", "--max_eval_windows", "all", "--dtype",
                   "auto", "--mode", "one-shot", "--unit_importance", "magnitude",
                   "--ratio_of", "total", "--layer_start", "1", "--layer_end", "3")
    assert config.eval_datasets == ("demo", "pydoc") and config.max_eval_windows is None
    assert config.dtype is None and config.mode == "one-shot"
    assert (config.unit_importance, config.ratio_of) == ("magnitude", "total")
    assert (config.layer_start, config.layer_end) == (1, 3)
    assert parse("--max_eval_windows", "5", "--dtype", "bfloat16").max_eval_windows == 5


def test_recovery_flags():
    assert parse().recovery == "none"
    config = parse("--recovery", "lora", "--recovery_steps", "5", "--recovery_time_s", "30",
                   "--recovery_lr", "1e-3", "--recovery_seq_len", "64")
    assert (config.recovery, config.recovery_steps, config.recovery_time_s) == ("lora", 5, 30.0)
    assert (config.recovery_lr, config.recovery_seq_len) == (1e-3, 64)


# ---- a full run --------------------------------------------------------------------------------

def test_run_writes_every_output(tiny_run):
    paths = tiny_run.paths
    for path in (paths.description, paths.importance, paths.plot, paths.report, paths.model):
        assert path.exists(), path
    assert not paths.failed.exists()
    assert paths.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    description = paths.description.read_text()
    for name in PruneConfig().to_dict():
        assert f"\n{name}: " in description
    logs = list(paths.root.glob("*/training.log"))
    assert len(logs) == 1 and "stage timings" in logs[0].read_text()
    assert "perplexity demo" in logs[0].read_text()


def test_report_matches_the_saved_model(tiny_run):
    report = json.loads(tiny_run.paths.report.read_text())
    assert report == json.loads(json.dumps(tiny_run.report))
    for key in ("params_before", "params_after", "ratio_requested", "ratio_achieved_prunable",
                "ratio_achieved_total", "timings_s", "config", "layers", "model_dir"):
        assert key in report
    assert set(report["ppl_before"]) == set(report["ppl_after"]) == {"demo", "pydoc"}
    model, tokenizer = load_pruned(report["model_dir"])
    assert tokenizer is not None
    assert count_parameters(model) == report["params_after"] < report["params_before"]
    shapes = [(s.q_heads, s.kv_heads, s.mlp_width) for s in layout(model)]
    assert shapes == [(row["q_heads"], row["kv_heads"], row["mlp"]) for row in report["layers"]]
    assert report["ratio_achieved_total"] == pytest.approx(
        1 - report["params_after"] / report["params_before"])
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_run.result.model(ids).logits)


def test_importance_file_holds_scores_and_rates(tiny_run):
    saved = json.loads(tiny_run.paths.importance.read_text())
    rates = [saved["layer_pruning_rates"][str(i)] for i in range(3)]
    assert len(saved["layer_importance"]) == 3
    assert rates == pytest.approx([row["rate"] for row in tiny_run.report["layers"]], abs=1e-6)


def test_second_stage_reuses_scores_without_analysis(tiny_run, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("layer importance must not be computed in the second stage")

    monkeypatch.setattr("gqaprune_core.pipeline.layer_importance", refuse)
    monkeypatch.setattr("gqaprune_core.layer_importance.compute_layer_importance", refuse)
    code = cli.main([*FAST, "--prune_mlp", "--pruning_ratio", "0.3", "--gqa_ratio", "3",
                     "--head_dim", "8", "--skip_importance_analysis", "--importance_config",
                     str(tiny_run.paths.importance), "--output_dir", str(tmp_path),
                     "--save_ckpt_log_name", "stage2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "parameters" in captured.out and captured.err == ""  # --quiet: no bars, no log
    first = json.loads(tiny_run.paths.importance.read_text())
    second = json.loads((tmp_path / "stage2" / outputs.IMPORTANCE_NAME).read_text())
    assert second["layer_importance"] == first["layer_importance"]
    assert second["layer_pruning_rates"] != first["layer_pruning_rates"]
    report = json.loads((tmp_path / "stage2" / outputs.REPORT_NAME).read_text())
    assert report["ratio_requested"] == 0.3 and "model_dir" not in report
    assert report["ratio_achieved_prunable"] == pytest.approx(0.3, abs=0.05)
    assert report["ppl_before"] == {} and report["importance_source"].endswith(".json")


# ---- failures ---------------------------------------------------------------------------------

# case -> (flags, expected text, exit status): 2 the command line is wrong, 1 an input is
FAILURES = {
    "skip without a file": (["--skip_importance_analysis"], "--importance_config", 2),
    "gqa ratio": (["--gqa_ratio", "4"], "--gqa_ratio 4 does not match the model: tiny has 3", 2),
    "head dim": (["--head_dim", "16"], "head_dim [8]", 2),
    "min above max": (["--min_pruning_rate", "0.6", "--max_pruning_rate", "0.5"], "0.6", 2),
    "target unreachable": (["--pruning_ratio", "0.7"], "cannot be reached", 2),
    "missing model": (["--base_model", "/no/such/model"], "/no/such/model", 1),
    "missing scores": (["--importance_config", "/no/such.json"], "/no/such.json", 1),
    "unknown calibration corpus": (["--calibration_dataset", "nosuch"], "'nosuch'", 1),
    "unknown eval corpus": (["--test_after_prune", "--eval_datasets", "demo,nope"], "'nope'", 1),
    "too few layers": (["--layer_start", "5"], "layer range", 2),
    "self-text share": (["--self_text_share", "-1"], "self_text_share=-1.0 must lie in [0, 4]", 2),
}


@pytest.mark.parametrize("case", FAILURES)
def test_bad_inputs_fail_in_one_line_and_write_nothing(case, tmp_path, capsys):
    flags, expected, status = FAILURES[case]
    argv = [*TINY, *flags, "--output_dir", str(tmp_path / "out"), "--save_ckpt_log_name", "x"]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert_one_line_failure(code, err, status)
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_rejected_flag_value_exits_2(tmp_path, capsys):
    code = cli.main(["--pruning_strategy", "sideways", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert_one_line_failure(code, err, status=2)
    assert "sideways" in err and list(tmp_path.iterdir()) == []


def test_bad_shard_size_exits_2(tmp_path, capsys):
    code = cli.main([*FAST, "--max_shard_size", "5 parsecs", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert_one_line_failure(code, err, status=2)
    assert "5 parsecs" in err and list(tmp_path.iterdir()) == []


def test_saved_model_has_card_and_manifest(tiny_run):
    model_dir = tiny_run.paths.model
    card = (model_dir / "README.md").read_text()
    assert "python -m gqaprune_core " in card and "--save_ckpt_log_name stage1" in card
    assert "| demo |" in card and "| pydoc |" in card  # perplexities from the report
    assert "trust_remote_code=True" in card  # the tiny run's layers differ
    assert (model_dir / "gqaprune_manifest.json").is_file()


def test_uniform_attention_run_saves_a_plain_sharded_model(tmp_path):
    """The README's uniform recipe: attention only, uniform rates, per-layer rounding. A staging
    folder left by a killed save to the same place is removed by this --overwrite run."""
    from gqaprune_core.export.staging import OWNER_NAME, owner_record

    stale = tmp_path / "uniform" / ".model.saving-0badf00d"
    stale.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (stale / OWNER_NAME).write_text(json.dumps(owner_record() | {"pid": int(dead.stdout)}))
    run = cli.execute([*FAST, "--pruning_strategy", "uniform", "--group_rounding", "per_layer",
                       "--pruning_ratio", "0.5", "--save_model", "--max_shard_size", "20KB",
                       "--output_dir", str(tmp_path), "--save_ckpt_log_name", "uniform",
                       "--overwrite"])
    assert not stale.exists()
    config = json.loads((run.paths.model / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert (run.paths.model / "model.safetensors.index.json").is_file()
    assert len({(s.q_heads, s.kv_heads, s.mlp_width) for s in layout(run.result.model)}) == 1


def test_failure_mid_run_leaves_failed_txt_not_a_report(tmp_path, monkeypatch, capsys):
    def explode(*args, **kwargs):
        raise ValueError("surgery refused: layer 1 says no")

    argv = [*FAST, "--prune_mlp", "--output_dir", str(tmp_path), "--save_ckpt_log_name", "run"]
    with monkeypatch.context() as patch:
        patch.setattr("gqaprune_core.pipeline.prune_model_", explode)
        assert_one_line_failure(cli.main(argv), capsys.readouterr().err)
    run_dir = tmp_path / "run"
    assert "layer 1 says no" in (run_dir / outputs.FAILED_NAME).read_text()
    assert not (run_dir / outputs.REPORT_NAME).exists()
    assert "run failed" in next(run_dir.glob("*/training.log")).read_text()
    # the failed run's directory is not silently reused ...
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert_one_line_failure(code, err)
    assert "--overwrite" in err
    # ... unless asked: then the stale FAILED.txt goes and the report comes
    assert cli.main([*argv, "--overwrite"]) == 0
    assert (run_dir / outputs.REPORT_NAME).exists()
    assert not (run_dir / outputs.FAILED_NAME).exists()


def test_recovery_run_logs_and_reports_both_perplexities(tmp_path, capsys):
    run = cli.execute([*FAST, "--prune_mlp", "--test_after_prune", "--eval_datasets", "demo",
                       "--recovery", "full", "--recovery_steps", "2", "--recovery_seq_len", "32",
                       "--recovery_samples", "4", "--output_dir", str(tmp_path),
                       "--save_ckpt_log_name", "recover"])
    report = json.loads(run.paths.report.read_text())
    assert report["recovery"]["steps_done"] == 2 and "recover" in report["timings_s"]
    assert set(report["ppl_after_pruning"]) == set(report["ppl_after"]) == {"demo"}
    log = next(run.paths.root.glob("*/training.log")).read_text()
    assert "recovery (full" in log and "after pruning ->" in log and "after recovery" in log
    assert "after recovery" in capsys.readouterr().out  # the summary table


def test_summary_table_lists_before_and_after():
    report = {"params_before": 1000, "params_after": 800, "ratio_requested": 0.2,
              "ratio_of": "prunable", "ratio_achieved_prunable": 0.25,
              "ratio_achieved_total": 0.2,
              "ppl_before": {"demo": {"value": 10.0}}, "ppl_after": {"demo": {"value": 12.5}}}
    table = outputs.summary_table(report)
    assert "1,000" in table and "800" in table and "25.00%" in table
    assert "10.000" in table and "12.500" in table


def test_default_run_names_never_collide(tmp_path):
    args = cli.build_parser().parse_args(["--output_dir", str(tmp_path)])
    stamp = "2026-01-01-00-00-00"
    (tmp_path / f"prune-{stamp}").mkdir()
    first, first_lock = cli._claim_run_dir(args, None, stamp)
    second, second_lock = cli._claim_run_dir(args, None, stamp)  # the same second
    assert (first.root.name, second.root.name) == (f"prune-{stamp}-2", f"prune-{stamp}-3")
    first_lock.release()
    second_lock.release()


def test_run_paths_refuse_names_with_separators(tmp_path):
    with pytest.raises(ValueError, match="run name"):
        outputs.run_paths(tmp_path, "../elsewhere", "stamp")


# ---- the demo model -----------------------------------------------------------------------------

@pytest.mark.demo
def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv("GQAPRUNE_CACHE")  # the converted demo model lives in the real cache
    run = cli.execute([
        "--base_model", "demo", "--device", "cpu", "--pruning_ratio", "0.2", "--prune_mlp",
        "--save_model", "--test_after_prune", "--importance_method", "block_influence",
        "--importance_samples", "8", "--num_examples", "4", "--eval_seq_len", "128",
        "--max_eval_windows", "2", "--eval_datasets", "demo", "--mode", "one-shot",
        "--output_dir", str(tmp_path),
        "--save_ckpt_log_name", "demo", "--quiet"])
    report = json.loads(run.paths.report.read_text())
    assert abs(report["ratio_achieved_prunable"] - 0.2) <= 0.005
    assert all(torch.isfinite(torch.tensor(r["value"])) for r in report["ppl_after"].values())
    model, _ = load_pruned(report["model_dir"])
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, run.result.model(ids).logits)
