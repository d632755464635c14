"""Faults and bad inputs (issue 15): each gives one clear line, the documented exit status, and
leaves the documented files. README "When things go wrong" names these tests.

Real processes where the fault needs them (a race of two runs, SIGTERM/SIGINT during the save:
tests/failure_driver.py); everything else in-process on the tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gqaprune_core import analyze, cli, outputs, runlock
from gqaprune_core.layer_importance import (layer_importance, matches_weights,
                                            save_importance_config, weights_fingerprint)
from gqaprune_core.models import ModelLoadError, load_model
from gqaprune_core.tiny import char_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
DRIVER = str(REPO / "tests" / "failure_driver.py")
FAST = ["--base_model", "tiny", "--device", "cpu", "--importance_samples", "4",
        "--num_examples", "4", "--importance_method", "activation", "--quiet"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))


def fails(capsys, argv: list[str], status: int) -> str:
    """Run the CLI; it must exit ``status`` with one error line and no traceback."""
    capsys.readouterr()  # drop what the setup printed
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == status, err
    assert len(lines) == 1 and lines[0].startswith("gqaprune: error: "), err
    assert "Traceback" not in err
    return lines[0]


def driver_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "GQAPRUNE_CACHE": str(tmp_path / "cache")}


def save_hf_dir(model, directory: Path, tokenizer=True) -> Path:
    model.save_pretrained(directory)
    if tokenizer:
        char_tokenizer().save_pretrained(directory)
    return directory


# ---- 1. two runs with the same name at once ------------------------------------------------------

def test_racing_runs_one_wins_one_fails_cleanly(tmp_path):
    """Two real processes start the same run name at the same moment, three times."""
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, DRIVER, "race", "3", str(out), "--", *FAST, "--prune_mlp",
         "--save_model"], capture_output=True, text=True, timeout=600, env=driver_env(tmp_path))
    assert done.returncode == 0, done.stderr
    rounds = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rounds) == 3
    for result in rounds:
        codes = sorted(result[r]["code"] for r in ("0.3", "0.5"))
        assert codes == [0, 1], result
        winner = next(r for r in ("0.3", "0.5") if result[r]["code"] == 0)
        loser_err = result["0.5" if winner == "0.3" else "0.3"]["err"]
        assert "is in use by another gqaprune run" in loser_err or "--overwrite" in loser_err
        assert len(loser_err.strip().splitlines()) == 1 and "Traceback" not in loser_err
        run_dir = out / f"race{result['round']}"
        report = json.loads((run_dir / outputs.REPORT_NAME).read_text())
        # every file is the winner's: description, report, model, a single log
        assert report["ratio_requested"] == float(winner)
        assert f"pruning_ratio: {winner}\n" in (run_dir / outputs.DESCRIPTION_NAME).read_text()
        assert Path(report["model_dir"]) == (run_dir / "model").resolve()
        assert not (run_dir / outputs.FAILED_NAME).exists()
        assert len(list(run_dir.glob("*/training.log"))) == 1
        assert not (run_dir / runlock.LOCK_NAME).exists()
        assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []


def test_lock_is_exclusive_and_released(tmp_path):
    root = tmp_path / "run"
    with runlock.lock_run_dir(root):
        with pytest.raises(runlock.RunBusyError, match=f"pid {os.getpid()}"):
            runlock.lock_run_dir(root)  # a second open file description: flock refuses it
        with pytest.raises(runlock.RunBusyError, match="in use"):
            runlock.check_not_busy(root)
    assert not (root / runlock.LOCK_NAME).exists()
    runlock.check_not_busy(root)
    runlock.lock_run_dir(root).release()


def test_busy_run_name_fails_before_loading_and_touches_nothing(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a busy run name")

    root = tmp_path / "busy"
    root.mkdir()
    (root / "report.json").write_text("{}")  # the other run's file
    monkeypatch.setattr("gqaprune_core.models.load_model", refuse)
    with runlock.lock_run_dir(root):
        line = fails(capsys, [*FAST, "--output_dir", str(tmp_path), "--save_ckpt_log_name",
                              "busy", "--overwrite"], 1)
        assert "in use by another gqaprune run" in line
        assert sorted(p.name for p in root.iterdir()) == [runlock.LOCK_NAME, "report.json"]
    assert (root / "report.json").read_text() == "{}"


# ---- 2. SIGTERM / SIGINT during the save --------------------------------------------------------

@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_during_save_cleans_up_and_records_it(tmp_path, signum, status):
    out, marker = tmp_path / "out", tmp_path / "saving"
    process = subprocess.Popen(
        [sys.executable, DRIVER, "slow-save", str(marker), "--", *FAST, "--prune_mlp",
         "--save_model", "--output_dir", str(out), "--save_ckpt_log_name", "sig"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=driver_env(tmp_path))
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), process.communicate(timeout=60)
    staging = Path(marker.read_text()).parent
    assert staging.name.startswith(".model.") and staging.is_dir()  # mid-save, as intended
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert process.returncode == status, err
    assert err.strip().splitlines()[-1] == f"gqaprune: interrupted by {name}"
    run_dir = out / "sig"
    assert (run_dir / outputs.FAILED_NAME).read_text().strip() == f"interrupted by {name}"
    assert not (run_dir / outputs.REPORT_NAME).exists()
    assert not (run_dir / "model").exists()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []  # no staging
    assert f"run failed: interrupted by {name}" in next(run_dir.glob("*/training.log")).read_text()


# ---- 3. scores of another model ---------------------------------------------------------------

@pytest.fixture
def tiny_scores(tmp_path) -> Path:
    """layer_importance_config.json computed for the built-in 'tiny' model."""
    scores = layer_importance(tiny_model(), char_tokenizer(), "activation", samples=4,
                              seq_len=32, model_id="tiny", use_cache=False)
    return save_importance_config(tmp_path / "scores.json", scores)


def test_scores_of_another_model_are_refused(tmp_path, tiny_scores, capsys):
    other = save_hf_dir(tiny_model(seed=1), tmp_path / "other")  # same shapes, other weights
    argv = [*FAST, "--base_model", str(other), "--prune_mlp", "--skip_importance_analysis",
            "--importance_config", str(tiny_scores), "--output_dir", str(tmp_path / "out"),
            "--save_ckpt_log_name", "foreign"]
    line = fails(capsys, argv, 1)
    stored = json.loads(tiny_scores.read_text())["inputs"]["weights"]
    assert "'tiny'" in line and repr(str(other)) in line and stored[:12] in line
    assert "--allow_foreign_importance" in line
    assert not (tmp_path / "out").exists()
    assert cli.main([*argv, "--allow_foreign_importance"]) == 0


def test_same_weights_under_another_name_are_accepted(tmp_path, tiny_scores):
    same = save_hf_dir(tiny_model(seed=0), tmp_path / "same")
    assert cli.main([*FAST, "--base_model", str(same), "--prune_mlp",
                     "--skip_importance_analysis", "--importance_config", str(tiny_scores),
                     "--output_dir", str(tmp_path / "out"), "--save_ckpt_log_name", "same"]) == 0


def test_scores_without_a_fingerprint_are_used_with_a_warning(tmp_path, tiny_scores, capsys):
    content = json.loads(tiny_scores.read_text())
    del content["inputs"]  # as the original project wrote them
    tiny_scores.write_text(json.dumps(content))
    code = cli.main([*FAST, "--prune_mlp", "--skip_importance_analysis", "--importance_config",
                     str(tiny_scores), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0 and "stores no weights fingerprint" in err


def test_fingerprint_recognises_the_same_weights_at_another_precision():
    model = tiny_model()
    in_bf16 = weights_fingerprint(tiny_model().to(torch.bfloat16))
    assert weights_fingerprint(model) != in_bf16
    assert matches_weights(model, in_bf16)
    assert not matches_weights(tiny_model(seed=1), in_bf16)


# ---- 4. pickles --------------------------------------------------------------------------------

class CallsSomething:
    """A pickle whose reduce calls a function: weights_only must refuse to run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # harmless, and visible if it ever ran


@pytest.fixture
def pickled_dirs(tmp_path) -> dict[str, Path]:
    model = tiny_model()
    dirs = {}
    for kind in ("harmless", "malicious", "pt_only"):
        directory = tmp_path / kind
        directory.mkdir()
        model.config.save_pretrained(directory)
        char_tokenizer().save_pretrained(directory)
        dirs[kind] = directory
    torch.save(model.state_dict(), dirs["harmless"] / "pytorch_model.bin")
    torch.save({"weight": CallsSomething(str(tmp_path / "executed"))},
               dirs["malicious"] / "pytorch_model.bin")
    torch.save(model.state_dict(), dirs["pt_only"] / "model.pt")
    return dirs


def test_pickled_weights_are_refused_by_default(pickled_dirs):
    for kind in ("harmless", "pt_only"):
        with pytest.raises(ModelLoadError, match="only pickled weights.*--allow_pickle"):
            load_model(pickled_dirs[kind], device="cpu")


def test_allow_pickle_reads_a_harmless_pickle_with_the_same_logits(pickled_dirs):
    model, _ = load_model(pickled_dirs["harmless"], device="cpu", allow_pickle=True)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model()(ids).logits)
    with pytest.raises(ModelLoadError, match="only as pytorch_model.bin"):
        load_model(pickled_dirs["pt_only"], device="cpu", allow_pickle=True)


def test_malicious_pickle_is_blocked_in_one_line(pickled_dirs, tmp_path, capsys):
    with pytest.raises(ModelLoadError, match="refused to unpickle") as caught:
        load_model(pickled_dirs["malicious"], device="cpu", allow_pickle=True)
    assert "weights_only=False" not in str(caught.value).replace(" ", "")
    assert not (tmp_path / "executed").exists()
    line = fails(capsys, [*FAST, "--base_model", str(pickled_dirs["malicious"]),
                          "--allow_pickle", "--output_dir", str(tmp_path / "out")], 1)
    assert "refused to unpickle" in line
    assert not (tmp_path / "executed").exists()


# ---- 5. a run that removes nothing ------------------------------------------------------------

def test_run_that_removes_nothing_fails_even_quiet(tmp_path, capsys):
    """The original default (20 %, attention only, per-layer rounding) on 2 KV heads."""
    line = fails(capsys, [*FAST, "--output_dir", str(tmp_path), "--save_ckpt_log_name", "noop"],
                 1)
    for words in ("removes nothing", "per_layer", "--group_rounding across", "--prune_mlp"):
        assert words in line
    assert "RemovalShortfallError" in (tmp_path / "noop" / outputs.FAILED_NAME).read_text()
    assert not (tmp_path / "noop" / outputs.REPORT_NAME).exists()


def test_shortfall_with_known_scores_fails_before_writing(tmp_path, tiny_scores, capsys):
    line = fails(capsys, [*FAST, "--skip_importance_analysis", "--importance_config",
                          str(tiny_scores), "--output_dir", str(tmp_path / "out")], 1)
    assert "removes nothing" in line
    assert not (tmp_path / "out").exists()


def test_ratio_zero_stays_a_deliberate_no_op(tmp_path):
    assert cli.main([*FAST, "--pruning_ratio", "0", "--output_dir", str(tmp_path),
                     "--save_ckpt_log_name", "zero"]) == 0
    report = json.loads((tmp_path / "zero" / outputs.REPORT_NAME).read_text())
    assert report["params_after"] == report["params_before"]


def test_missed_budget_warns_on_stderr_even_quiet(tmp_path, capsys):
    code = cli.main([*FAST, "--group_rounding", "across", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0 and "budget was missed" in err and "--prune_mlp" in err


# ---- 6. messages --------------------------------------------------------------------------------

def write_gguf(path: Path) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gguf_names_the_file_and_what_to_do(tmp_path, damage):
    path = write_gguf(tmp_path / "model.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"XXXX" + data[4:])
    with pytest.raises(ModelLoadError) as caught:
        load_model(path, device="cpu")
    assert str(path) in str(caught.value) and "re-download or re-export" in str(caught.value)


def test_binary_garbage_as_importance_config(tmp_path, capsys):
    garbage = tmp_path / "scores.json"
    garbage.write_bytes(bytes(range(256)) * 4)
    line = fails(capsys, [*FAST, "--skip_importance_analysis", "--importance_config",
                          str(garbage), "--output_dir", str(tmp_path / "out")], 1)
    assert str(garbage) in line and "not a JSON text file" in line


def test_model_dir_without_tokenizer_files(tmp_path):
    directory = save_hf_dir(tiny_model(), tmp_path / "no_tokenizer", tokenizer=False)
    with pytest.raises(ModelLoadError, match="has no tokenizer files"):
        load_model(directory, device="cpu")


def test_analyze_on_a_checkpoint_without_its_plan(tmp_path, capsys):
    from gqaprune_core.checkpoint import PLAN_NAME

    assert cli.main([*FAST, "--prune_mlp", "--save_model", "--output_dir", str(tmp_path),
                     "--save_ckpt_log_name", "cut"]) == 0
    model_dir = tmp_path / "cut" / "model"
    (model_dir / PLAN_NAME).unlink()
    capsys.readouterr()
    assert analyze.main(["--original_model", "tiny", "--pruned_model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"whose {PLAN_NAME} is missing" in err
    assert "MISMATCH" not in err and "trust_remote_code" not in err


USAGE_ERRORS = {
    "layer_end past the model": (["--layer_end", "99"], "--layer_end 99 is past the model's 3"),
    "config value": (["--alpha", "-1"], "alpha=-1.0 must be >= 0"),
    "ratio out of range": (["--pruning_ratio", "1.5"], "pruning_ratio=1.5"),
    "run name": (["--save_ckpt_log_name", "../up"], "run name '../up'"),
    "unknown choice": (["--group_rounding", "sideways"], "sideways"),
    "not a number": (["--alpha", "much"], "much"),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_bad_values_exit_2(case, tmp_path, capsys, monkeypatch):
    flags, expected = USAGE_ERRORS[case]
    if case != "layer_end past the model":  # all others are refused before the model loads
        monkeypatch.setattr("gqaprune_core.models.load_model",
                            lambda *a, **k: pytest.fail("loaded the model"))
    assert expected in fails(capsys, [*FAST, *flags, "--output_dir", str(tmp_path / "out")], 2)
    assert not (tmp_path / "out").exists()


# ---- the README table ----------------------------------------------------------------------------

def test_every_row_of_the_readme_failure_table_names_a_test_that_exists():
    import re

    readme = (REPO / "README.md").read_text()
    section = readme.split("## When things go wrong", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 20
    for row in rows[1:]:  # after the header
        cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`", row)
        assert cited or "(see Deploy)" in row, row
        for path, name, case in cited:
            source = (REPO / path).read_text()
            assert f"def {name}(" in source, (path, name)
            if case:  # a parametrized case: its id must be in the file
                assert f'"{case}"' in source, (path, name, case)
