"""Checkpoints with per-layer shapes load in plain transformers, where gqaprune is not installed.

Each test saves a pruned model, then runs a child Python with ``-I -S`` (no current directory, no
PYTHONPATH, no ``.pth`` files, so neither the repository nor the editable install of gqaprune is
importable: the child asserts it) and only the site-packages directories on ``sys.path``. The
child loads the folder with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
and ``AutoTokenizer``, and writes logits and greedy generations (with and without KV cache).

Tolerance: logits within 1e-5 absolute of :func:`load_pruned`'s (both fp32 on CPU with one
thread and the same sdpa kernels: they agree bit for bit here, the bound only allows for a
different reduction order in another build); greedy tokens equal.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gqaprune_core.checkpoint import load_pruned, save_pruned
from gqaprune_core.export.hf_config import CODE_FILES
from gqaprune_core.models import layout
from gqaprune_core.plan import PruningPlan, identity_plan
from gqaprune_core.surgery import apply_plan_

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5
NEW_TOKENS = 8

CHILD = r'''
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
try:
    import gqaprune_core
except ImportError:
    pass
else:
    raise SystemExit(f"gqaprune_core is importable from {gqaprune_core.__file__}")
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
jobs, ids, text = json.loads(sys.argv[2]), torch.tensor(json.loads(sys.argv[3])), sys.argv[4]
results = {}
for folder, out in jobs:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        logits = model(ids).logits
        prompt = ids[:1]
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=NEW, min_new_tokens=NEW, use_cache=True)
        uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=NEW, min_new_tokens=NEW, use_cache=False)
    save_file({"logits": logits.contiguous()}, out)
    results[folder] = {
        "class": type(model).__name__, "cached": cached.tolist(), "uncached": uncached.tolist(),
        "text_ids": tokenizer(text).input_ids,
        "shapes": [[l.self_attn.q_proj.out_features, l.self_attn.k_proj.out_features,
                    l.mlp.gate_proj.out_features] for l in model.model.layers]}
print(json.dumps(results))
'''.replace("NEW", str(NEW_TOKENS))


def run_without_gqaprune(folders: list[Path], ids: torch.Tensor, text: str,
                         work: Path) -> dict[Path, dict]:
    """Load each folder in one child process that cannot import gqaprune_core; the results.

    The child's stdin is closed: were transformers to ask whether to run remote code, it would
    read EOF (and refuse) instead of waiting.
    """
    from safetensors.torch import load_file

    jobs = [(str(folder), str(work / f"logits_{i}.safetensors")) for i, folder in enumerate(folders)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env |= {"HF_MODULES_CACHE": str(work / "hf_modules"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD, json.dumps(site.getsitepackages()),
         json.dumps(jobs), json.dumps(ids.tolist()), text],
        capture_output=True, text=True, timeout=600, cwd=work, env=env,
        stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {Path(folder): results[folder] | {"logits": load_file(out)["logits"]}
            for folder, out in jobs}


def varied_plan(model) -> PruningPlan:
    """Layers with three different shapes: fewer groups, fewer MLP channels, both."""
    plan = identity_plan(layout(model), method="hand")
    first, width = plan.layers[0], plan.layers[0].mlp_before
    plan = plan.with_layer(replace(first, kept_kv_heads=first.kept_kv_heads[1:]))
    second = plan.layers[1]
    plan = plan.with_layer(replace(second, kept_mlp_channels=tuple(range(0, width, 2))))
    last = plan.layers[-1]
    return plan.with_layer(replace(last, kept_kv_heads=last.kept_kv_heads[:1],
                                   kept_mlp_channels=tuple(range(width // 3))))


def check_against_load_pruned(folder: Path, child: dict, ids: torch.Tensor, text: str,
                              tokenizer) -> None:
    ours, _ = load_pruned(folder)
    with torch.no_grad():
        expected = ours(ids).logits
    assert child["shapes"] == [[s.q_heads * s.head_dim, s.kv_heads * s.head_dim, s.mlp_width]
                               for s in layout(ours)]
    assert (child["logits"] - expected).abs().max().item() <= ATOL
    assert child["cached"] == child["uncached"]
    assert len(child["cached"][0]) == ids.shape[1] + NEW_TOKENS
    assert child["text_ids"] == tokenizer(text).input_ids


TINY_CASES = {  # name -> (tiny variant, overrides, remote class)
    "llama": ("llama", {}, "GQAPruneLlamaForCausalLM"),
    "llama_tied": ("llama", {"tie_embeddings": True}, "GQAPruneLlamaForCausalLM"),
    "mistral": ("mistral", {}, "GQAPruneMistralForCausalLM"),
    "qwen2": ("qwen2_bias", {}, "GQAPruneQwen2ForCausalLM"),
}
TEXT = "Hi, there!"


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Every case of :data:`TINY_CASES` pruned, saved in shards, and loaded by one child."""
    from conftest import TINY_VARIANTS
    from gqaprune_core.tiny import char_tokenizer, tiny_model

    work = tmp_path_factory.mktemp("hf_remote")
    folders = {}
    for name, (variant, overrides, _) in TINY_CASES.items():
        model = tiny_model(**(TINY_VARIANTS[variant] | overrides))
        plan = varied_plan(model)
        apply_plan_(model, plan)
        folders[name] = save_pruned(model, char_tokenizer(), plan, work / name / "model",
                                    max_shard_size="30KB")
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    results = run_without_gqaprune(list(folders.values()), ids, TEXT, work)
    return {name: (folder, results[folder] | {"ids": ids}) for name, folder in folders.items()}


@pytest.mark.parametrize("name", list(TINY_CASES))
def test_per_layer_checkpoint_loads_without_gqaprune(tiny_exports, tiny_tokenizer, name):
    folder, child = tiny_exports[name]
    config = json.loads((folder / "config.json").read_text())
    base = config["model_type"].removeprefix("gqaprune_")
    assert config["model_type"] == f"gqaprune_{base}" and base in ("llama", "mistral", "qwen2")
    assert config["layer_num_attention_heads"] == [3, 6, 3]
    assert config["layer_num_key_value_heads"] == [1, 2, 1]
    assert config["layer_intermediate_size"] == [40, 20, 13]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert all((folder / file).is_file() for file in CODE_FILES)
    assert (folder / "model.safetensors.index.json").is_file()
    assert child["class"] == TINY_CASES[name][2]
    check_against_load_pruned(folder, child, child["ids"], TEXT, tiny_tokenizer)


def test_code_files_are_copied_unchanged(tiny_exports):
    from gqaprune_core.export.hf_config import CODE_DIR

    folder, _ = tiny_exports["qwen2"]
    for file in CODE_FILES:
        assert (folder / file).read_bytes() == (CODE_DIR / file).read_bytes()


def test_uniform_checkpoint_has_no_remote_code(make_tiny, tiny_tokenizer, tmp_path):
    model = make_tiny()
    plan = identity_plan(layout(model), method="hand")
    for layer in plan.layers:
        plan = plan.with_layer(replace(layer, kept_kv_heads=(0,)))
    apply_plan_(model, plan)
    folder = save_pruned(model, tiny_tokenizer, plan, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not any((folder / name).exists() for name in CODE_FILES)


def test_uniform_shape_the_base_config_refuses_gets_remote_code(tmp_path, tiny_ids):
    """LlamaConfig requires hidden % H == 0: 48 hidden, 12 -> 9 query heads breaks it."""
    from gqaprune_core.tiny import tiny_model

    model = tiny_model(q_heads=12, kv_heads=4, head_dim=4)
    plan = identity_plan(layout(model), method="hand")
    for layer in plan.layers:
        plan = plan.with_layer(replace(layer, kept_kv_heads=(0, 1, 3)))
    apply_plan_(model, plan)
    folder = save_pruned(model, None, plan, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gqaprune_llama"
    assert config["num_attention_heads"] == 12 and config["layer_num_attention_heads"] == [9] * 3
    loaded, _ = load_pruned(folder)
    with torch.no_grad():
        assert torch.equal(loaded(tiny_ids).logits, model(tiny_ids).logits)


@pytest.mark.demo
def test_pruned_demo_model_loads_without_gqaprune(demo, tmp_path):
    import copy

    model, tokenizer = demo
    model = copy.deepcopy(model)
    plan = varied_plan(model)
    apply_plan_(model, plan)
    folder = save_pruned(model, tokenizer, plan, tmp_path / "model")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    text = "Grüße, 東京! def f(x): return x"
    child = run_without_gqaprune([folder], ids, text, tmp_path)[folder]
    assert child["class"] == "GQAPruneLlamaForCausalLM"
    check_against_load_pruned(folder, child, ids, text, tokenizer)


def test_code_files_ship_as_package_data():
    import tomllib

    from gqaprune_core.export.hf_config import CODE_DIR

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["gqaprune_core.export"]
    assert any(CODE_DIR.joinpath(name).match(f"*/export/{p}") for p in patterns
               for name in CODE_FILES)
    assert not (CODE_DIR / "__init__.py").exists()  # data copied into checkpoints, not imported
