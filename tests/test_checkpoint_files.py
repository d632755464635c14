"""Checkpoint files: shards, the SHA-256 manifest, stale staging folders, the model card."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gqaprune_core.analyze import main as analyze_main
from gqaprune_core.checkpoint import CheckpointError, load_pruned, save_pruned
from gqaprune_core.export.manifest import MANIFEST_NAME, NO_VERIFY_ENV
from gqaprune_core.export.model_card import CardInfo
from gqaprune_core.export.shards import INDEX_NAME, SINGLE_NAME, parse_size
from gqaprune_core.export.staging import OWNER_NAME, owner_record, remove_stale
from gqaprune_core.models import layout
from gqaprune_core.plan import PruningPlan, identity_plan
from gqaprune_core.surgery import apply_plan_

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def mixed_plan(model) -> PruningPlan:
    """Layer 0 keeps group 1 only, layer 1 every other MLP channel, layer 2 everything."""
    plan = identity_plan(layout(model), method="hand")
    plan = plan.with_layer(replace(plan.layers[0], kept_kv_heads=(1,)))
    return plan.with_layer(replace(plan.layers[1], kept_mlp_channels=tuple(range(0, 40, 2))))


@pytest.fixture
def pruned(make_tiny):
    model = make_tiny(tie_embeddings=True)
    plan = mixed_plan(model)
    apply_plan_(model, plan)
    return model, plan


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


# ---- shards ----------------------------------------------------------------------------------

def test_sharded_round_trip_is_bit_exact(pruned, tiny_tokenizer, tiny_ids, tmp_path):
    model, plan = pruned
    target = save_pruned(model, tiny_tokenizer, plan, tmp_path / "ckpt", max_shard_size="20KB")

    index = json.loads((target / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (target / SINGLE_NAME).exists()
    assert all((target / name).stat().st_size <= 20_000 + 10_000 for name in shards)  # + header
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    loaded, _ = load_pruned(target)
    assert torch.equal(logits(loaded, tiny_ids), logits(model, tiny_ids))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_default_size_writes_one_file(pruned, tmp_path):
    target = save_pruned(pruned[0], None, pruned[1], tmp_path / "ckpt")
    assert (target / SINGLE_NAME).is_file() and not (target / INDEX_NAME).exists()


@pytest.mark.parametrize("text, expected", [
    ("5GB", 5 * 10**9), ("200MB", 200 * 10**6), ("1GiB", 2**30), ("1.5kb", 1500), (123, 123),
    (" 7 MiB ", 7 * 2**20),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5 parsecs", "", "-1GB", "0", "GB", True])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError, match="shard size"):
        parse_size(text)


def test_missing_shard_is_named(pruned, tmp_path):
    target = save_pruned(pruned[0], None, pruned[1], tmp_path / "ckpt", max_shard_size="20KB")
    second = sorted(target.glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(CheckpointError, match=f"{second.name} is listed in .* but missing"):
        load_pruned(target)
    with pytest.raises(CheckpointError, match=f"names shard files that are missing.*{second.name}"):
        load_pruned(target, verify=False)  # the index names it too


# ---- manifest --------------------------------------------------------------------------------

def flip_middle(path: Path, count: int = 256) -> None:
    """Invert ``count`` bytes in the middle of ``path``; the size stays."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


@pytest.fixture
def saved_pair(pruned, make_tiny, tiny_tokenizer, tmp_path):
    before = save_pruned(make_tiny(tie_embeddings=True), tiny_tokenizer, None, tmp_path / "dense")
    after = save_pruned(pruned[0], tiny_tokenizer, pruned[1], tmp_path / "pruned")
    return before, after


def test_manifest_lists_every_file_with_its_digest(saved_pair):
    import hashlib

    target = saved_pair[1]
    files = json.loads((target / MANIFEST_NAME).read_text())["files"]
    on_disk = {p.name for p in target.iterdir()} - {MANIFEST_NAME}
    assert set(files) == on_disk
    assert {"config.json", "gqaprune_plan.json", "tokenizer.json", "README.md",
            SINGLE_NAME} <= on_disk
    for name, entry in files.items():
        data = (target / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_flipped_bytes_are_refused_by_load_and_analyze(saved_pair, tiny_ids, capsys,
                                                      monkeypatch):
    before, after = saved_pair
    expected = logits(pruned_model := load_pruned(after)[0], tiny_ids).clone()
    del pruned_model  # its tensors map the file, which is changed in place next
    flip_middle(after / SINGLE_NAME)

    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its SHA-256.*"
                                              r"re-save .*verify=False / GQAPRUNE_NO_VERIFY=1"):
        load_pruned(after)
    argv = ["--original_model", str(before), "--pruned_model", str(after)]
    assert analyze_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SHA-256" in err and "model.safetensors" in err

    unchecked, _ = load_pruned(after, verify=False)  # the skip: loads, and the damage shows
    assert not torch.equal(logits(unchecked, tiny_ids), expected)
    assert analyze_main([*argv, "--no_verify"]) == 0
    monkeypatch.setenv(NO_VERIFY_ENV, "1")
    load_pruned(after)


def test_edited_config_is_refused(saved_pair):
    config = saved_pair[1] / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))
    with pytest.raises(CheckpointError, match=r"config\.json has \d+ bytes, .* recorded"):
        load_pruned(saved_pair[1])


def test_unreadable_manifest_is_named(saved_pair):
    (saved_pair[1] / MANIFEST_NAME).write_bytes(b"\xff\xfe not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        load_pruned(saved_pair[1])


# ---- stale staging folders -------------------------------------------------------------------

def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def make_sibling(target: Path, purpose: str, owner: dict | None) -> Path:
    path = target.with_name(f".{target.name}.{purpose}-0000abcd")
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"partial")
    if owner is not None:
        (path / OWNER_NAME).write_text(json.dumps(owner))
    return path


def test_only_siblings_of_dead_local_processes_are_removed(tmp_path):
    target = tmp_path / "model"
    dead = make_sibling(target, "saving", owner_record() | {"pid": dead_pid(), "start": None})
    aside = make_sibling(target, "old", owner_record() | {"pid": dead_pid(), "start": None})
    mine = target.with_name(f".{target.name}.saving-live0001")
    mine.mkdir()
    (mine / OWNER_NAME).write_text(json.dumps(owner_record()))
    remote = target.with_name(f".{target.name}.saving-remote01")
    remote.mkdir()
    (remote / OWNER_NAME).write_text(json.dumps(owner_record() | {"host": "elsewhere",
                                                                    "pid": dead_pid()}))
    unowned = target.with_name(f".{target.name}.saving-unowned1")
    unowned.mkdir()

    assert sorted(remove_stale(target)) == sorted([dead, aside])
    assert not dead.exists() and not aside.exists()
    assert mine.exists() and remote.exists() and unowned.exists()


def test_recycled_pid_counts_as_dead(tmp_path):
    target = tmp_path / "model"
    recycled = make_sibling(target, "saving", owner_record() | {"start": "1"})  # our pid, other start
    if owner_record()["start"] is None:
        pytest.skip("no /proc: start times unknown")
    assert remove_stale(target) == [recycled]


def test_killed_save_is_cleaned_by_the_next_save(pruned, tmp_path):
    target = tmp_path / "run" / "model"
    code = ("import sys, time; from pathlib import Path\n"
            "from gqaprune_core.export.staging import staged\n"
            "with staged(Path(sys.argv[1])) as staging:\n"
            "    (staging / 'model.safetensors').write_bytes(b'half')\n"
            "    print(staging, flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE,
                             text=True, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    staging = Path(child.stdout.readline().strip())
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert staging.is_dir() and (staging / OWNER_NAME).is_file()  # what a kill leaves

    save_pruned(pruned[0], None, pruned[1], target, overwrite=True)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]
    assert not (target / OWNER_NAME).exists()


# ---- model card ------------------------------------------------------------------------------

def test_model_card_states_settings_layers_perplexity_and_loading(pruned, tmp_path):
    report = {"model": "tiny", "params_before": 30000, "params_after": 24000,
              "ppl_before": {"demo": {"value": 90.0}},
              "ppl_after": {"demo": {"corpus": "demo", "value": 97.5, "seq_len": 32,
                                     "windows": 2, "tokens": 62, "nll": 4.58}}}
    card = CardInfo(base_model="tiny", command="python -m gqaprune_core --base_model tiny",
                    settings={"pruning_ratio": 0.2, "prune_mlp": True}, report=report)
    target = save_pruned(pruned[0], None, pruned[1], tmp_path / "ckpt", card=card)
    text = (target / "README.md").read_text()
    for expected in ("python -m gqaprune_core --base_model tiny", "| pruning_ratio | `0.2` |",
                     "| 0 | 6 -> 3 | 2 -> 1 | 40 |", "| 1 | 6 | 2 | 40 -> 20 |",
                     "| demo | 90.000 | 97.500 | 2 | 32 | 62 |", "20.0 % removed",
                     "trust_remote_code=True", "llama-cli -m model.gguf", "FROM ./model.gguf",
                     "--gguf model.gguf --outtype q8_0", "vLLM"):
        assert expected in text, expected


def test_uniform_model_card_needs_no_remote_code(make_tiny, tmp_path):
    model = make_tiny()
    target = save_pruned(model, None, None, tmp_path / "dense")
    text = (target / "README.md").read_text()
    assert "trust_remote_code" not in text and "vllm serve" in text
    assert not (target / "modeling_gqaprune.py").exists()
