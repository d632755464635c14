"""Layer-wise pruning and perplexity against the in-memory path: same plan, same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from gqaprune_core.checkpoint import load_pruned, save_pruned
from gqaprune_core.config import PRESETS, PruneConfig
from gqaprune_core.evaluate import perplexity
from gqaprune_core.export.shards import INDEX_NAME
from gqaprune_core.layerwise.evaluate import streamed_perplexity
from gqaprune_core.layerwise.pipeline import (check_streamable, needs_layerwise, run_layerwise,
                                              use_layerwise)
from gqaprune_core.layerwise.source import open_model, open_source
from gqaprune_core.models import ModelLoadError, count_parameters, layout
from gqaprune_core.pipeline import run_pipeline
from gqaprune_core.tiny import char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# calibration on demo alone: the default preset's mix tokenizes slowly with the character tokenizer
SMALL = {"importance_samples": 4, "importance_seq_len": 16, "num_examples": 6, "seq_len": 24,
         "eval_seq_len": 32, "max_eval_windows": 2, "channel_multiple": 1, "device": "cpu",
         "pruning_ratio": 0.1, "calibration_dataset": "demo", "eval_datasets": ("demo", "pydoc"),
         "self_text_share": 0.0}  # layer-wise runs calibrate on real text only (tested apart)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))


def _saved(make_tiny, tmp_path, variant: str = "llama", **overrides):
    """A tiny model saved as a Hugging Face directory; returns (model, tokenizer, path)."""
    model, tokenizer = make_tiny(variant, **overrides), char_tokenizer()
    path = tmp_path / f"src-{variant}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


def _assert_same_run(in_memory, layerwise, output, atol: float = 1e-5) -> None:
    assert layerwise.plan == in_memory.plan
    assert layerwise.importance.scores == pytest.approx(in_memory.importance.scores, rel=1e-6)
    loaded, _ = load_pruned(output)
    expected = in_memory.model.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=atol, rtol=1e-4, msg=name)
    for before, after in zip(in_memory.ppl_after, layerwise.ppl_after):
        assert after.value == pytest.approx(before.value, rel=1e-5)
    assert layerwise.report["params_after"] == in_memory.report["params_after"]


# Most settings choose MLP channels by output energy (one pass); "fisher" and "fisher_groups"
# are the default preset's energy + Fisher shares (a backward pass, layer by layer).
ENERGY = PRESETS["default"].with_(channel_selection="energy")
SETTINGS = {
    "default": ENERGY.with_(**SMALL),
    "fisher": PRESETS["default"].with_(**SMALL),
    "fisher_groups": PRESETS["default"].with_(**SMALL | {"pruning_ratio": 0.3},
                                              unit_importance="magnitude", prune_attention=True),
    "feedback": ENERGY.with_(**SMALL, refit_feedback=0.5),
    "groups_magnitude": PRESETS["original"].with_(**SMALL | {"pruning_ratio": 0.3},
                                                  unit_importance="magnitude", prune_mlp=True,
                                                  importance_method="activation"),
    "groups_and_refit": ENERGY.with_(**SMALL | {"pruning_ratio": 0.3},
                                                 unit_importance="random", prune_attention=True,
                                                 importance_method="removal"),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_layerwise_equals_in_memory(make_tiny, tmp_path, setting):
    model, tokenizer, path = _saved(make_tiny, tmp_path)
    config = SETTINGS[setting].with_(base_model=str(path))
    in_memory = run_pipeline(config, model, tokenizer)
    layerwise = run_layerwise(config, tmp_path / "out", batch_size=4)
    assert not layerwise.plan.layers[0].is_identity or not layerwise.plan.layers[1].is_identity
    _assert_same_run(in_memory, layerwise, tmp_path / "out")


def test_layerwise_calibrates_on_real_text_only_and_says_so(make_tiny, tmp_path):
    """Writing text needs the whole model for every token: a layer-wise run with a share of
    self-written windows prunes exactly as in memory without them, and reports why."""
    model, tokenizer, path = _saved(make_tiny, tmp_path)
    config = SETTINGS["default"].with_(base_model=str(path), max_eval_windows=1)
    layerwise = run_layerwise(config.with_(self_text_share=1.0), tmp_path / "out")
    assert "real calibration text only" in layerwise.report["layerwise"]["self_text"]
    _assert_same_run(run_pipeline(config.with_(self_text_share=0.0), model, tokenizer),
                     layerwise, tmp_path / "out")


@pytest.mark.parametrize("setting", ["groups_and_refit", "fisher_groups"])
@pytest.mark.parametrize("variant,overrides", [("qwen2_bias", {}), ("mistral", {}),
                                               ("llama", {"tie_embeddings": True})])
def test_layerwise_equals_in_memory_on_other_architectures(make_tiny, tmp_path, variant,
                                                           overrides, setting):
    model, tokenizer, path = _saved(make_tiny, tmp_path, variant, **overrides)
    config = SETTINGS[setting].with_(base_model=str(path))
    in_memory = run_pipeline(config, model, tokenizer)
    layerwise = run_layerwise(config, tmp_path / "out", batch_size=3)
    _assert_same_run(in_memory, layerwise, tmp_path / "out")


def test_streamed_perplexity_equals_whole_model(make_tiny, tmp_path):
    model, _, path = _saved(make_tiny, tmp_path)
    windows = torch.randint(0, 97, (5, 20), generator=torch.Generator().manual_seed(3))
    source = open_source(path)
    skeleton = open_model(source, torch.device("cpu"), torch.float32)
    streamed, = streamed_perplexity(skeleton, source, [windows], torch.device("cpu"),
                                    torch.float32, batch_size=2)
    whole = perplexity(model, windows, batch_size=4)
    assert streamed.value == pytest.approx(whole.value, rel=1e-6)
    assert (streamed.tokens, streamed.windows, streamed.seq_len) == (95, 5, 20)


def test_skeleton_needs_no_accelerate(make_tiny, tmp_path, monkeypatch):
    import sys

    model, _, path = _saved(make_tiny, tmp_path, tie_embeddings=True)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    source = open_source(path)
    skeleton = open_model(source, torch.device("cpu"), torch.float32)
    windows = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(4))
    streamed, = streamed_perplexity(skeleton, source, [windows], torch.device("cpu"),
                                    torch.float32)
    assert streamed.value == pytest.approx(perplexity(model, windows).value, rel=1e-6)


def test_pruned_checkpoint_is_pruned_again_like_in_memory(make_tiny, tmp_path):
    model, tokenizer, _ = _saved(make_tiny, tmp_path)
    first = run_pipeline(SETTINGS["groups_magnitude"].with_(base_model="tiny"), model, tokenizer,
                         evaluate=False)
    save_pruned(first.model, tokenizer, first.plan, tmp_path / "ckpt")
    config = SETTINGS["default"].with_(base_model=str(tmp_path / "ckpt"), max_eval_windows=1)
    reloaded, _ = load_pruned(tmp_path / "ckpt")
    in_memory = run_pipeline(config, reloaded, tokenizer)
    layerwise = run_layerwise(config, tmp_path / "out")
    _assert_same_run(in_memory, layerwise, tmp_path / "out")


def test_streamed_fisher_scores_equal_the_whole_model_backward(make_tiny, tmp_path):
    from gqaprune_core.layerwise.fisher import streamed_fisher
    from gqaprune_core.layerwise.prune import LayerCut
    from gqaprune_core.unit_importance import fisher_channel_scores

    model, _, path = _saved(make_tiny, tmp_path)
    windows = torch.randint(0, 97, (5, 20), generator=torch.Generator().manual_seed(5))
    expected = fisher_channel_scores(model, windows, chunk_size=2)
    source = open_source(path)
    skeleton = open_model(source, torch.device("cpu"), torch.float32)
    shapes = layout(skeleton)
    whole = [LayerCut(s.kv_heads, s.mlp_width, "magnitude", True) for s in shapes]
    with torch.no_grad():  # the caller's grad mode does not matter
        got = streamed_fisher(skeleton, source, shapes, whole, windows, torch.device("cpu"),
                              torch.float32, batch_size=3)
    assert sorted(got) == sorted(expected)
    for index in expected:
        torch.testing.assert_close(got[index], expected[index], rtol=1e-4, atol=0.0)
        assert expected[index].abs().sum() > 0


def test_fisher_store_goes_to_disk_or_falls_back_to_energy_when_memory_is_short(make_tiny,
                                                                                tmp_path):
    """The backward pass keeps every layer's input: in host memory when it takes at most half
    of what is free, else on disk when there is room, else channels are chosen by energy; the
    note says which, with the numbers."""
    from gqaprune_core.export.shards import format_size
    from gqaprune_core.layerwise.fisher import store_bytes, streamable_selection

    _, _, path = _saved(make_tiny, tmp_path)
    config = SETTINGS["fisher"].with_(base_model=str(path))
    source = open_source(path)
    needed = store_bytes(source.num_layers, config.num_examples, config.seq_len,
                         source.config.hidden_size, torch.float32)
    assert needed == source.num_layers * 6 * 24 * source.config.hidden_size * 4
    spill = tmp_path / "runs" / "new"  # need not exist yet
    assert streamable_selection(config, source, torch.float32, spill, free_host=2 * needed,
                                free_disk=0) == (config, None, None)
    same, note, folder = streamable_selection(config, source, torch.float32, spill,
                                              free_host=needed, free_disk=2 * needed)
    assert same == config and folder == spill and "kept on disk under" in note
    fallback, note, folder = streamable_selection(config, source, torch.float32, spill,
                                                  free_host=needed, free_disk=needed)
    assert fallback.channel_selection == "energy" and folder is None
    assert "--num_examples" in note and format_size(needed) in note
    assert f"and {format_size(needed)} free on the disk" in note
    unchanged = SETTINGS["default"].with_(base_model=str(path))
    assert streamable_selection(unchanged, source, torch.float32, spill, free_host=0,
                                free_disk=0) == (unchanged, None, None)
    source.close()


def test_fisher_pass_through_disk_gives_the_in_memory_model(make_tiny, tmp_path, monkeypatch):
    from gqaprune_core.layerwise import pipeline as layerwise_pipeline

    model, tokenizer, path = _saved(make_tiny, tmp_path)
    config = SETTINGS["fisher_groups"].with_(base_model=str(path))
    in_memory = run_pipeline(config, model, tokenizer)
    monkeypatch.setattr(layerwise_pipeline, "free_memory", lambda device: 2**10)
    layerwise = run_layerwise(config, tmp_path / "runs" / "out", batch_size=4)
    assert "kept on disk under" in layerwise.report["layerwise"]["channel_selection"]
    _assert_same_run(in_memory, layerwise, tmp_path / "runs" / "out")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["out"]  # spill removed


def test_output_is_sharded_and_streamed_back(make_tiny, tmp_path):
    _, _, path = _saved(make_tiny, tmp_path)
    config = SETTINGS["default"].with_(base_model=str(path))
    result = run_layerwise(config, tmp_path / "out", max_shard_bytes=20_000, evaluate=False)
    assert (tmp_path / "out" / INDEX_NAME).is_file()
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 2
    source = open_source(tmp_path / "out")
    assert source.plan == result.plan
    skeleton = open_model(source, torch.device("cpu"), torch.float32)
    assert layout(skeleton) == layout(result.model)
    assert count_parameters(skeleton) == result.report["params_after"]


def test_existing_output_is_refused_and_kept(make_tiny, tmp_path):
    _, _, path = _saved(make_tiny, tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        run_layerwise(SETTINGS["default"].with_(base_model=str(path)), tmp_path / "out",
                      evaluate=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_progress_reports_every_layer_of_every_stage(make_tiny, tmp_path):
    _, _, path = _saved(make_tiny, tmp_path)
    steps, calls = [], []
    run_layerwise(SETTINGS["default"].with_(base_model=str(path)), tmp_path / "out",
                  on_step=steps.append, progress=lambda *a: calls.append(a))
    stages = ["importance", "evaluate_before", "prune", "evaluate_after"]
    assert [(s.stage, s.index) for s in steps] == [(st, i) for st in stages for i in range(3)]
    assert calls == [(st, i + 1, 3) for st in stages for i in range(3)]
    assert all(s.seconds > 0 and s.memory_bytes > 0 and s.peak_bytes >= s.memory_bytes
               for s in steps)
    assert "layer 3/3" in steps[-1].describe()


@pytest.mark.parametrize("changes,words", [
    ({"prune_attention": True, "unit_importance": "taylor"}, "gradients through the whole model"),
    ({"prune_attention": True, "unit_importance": "activation"}, "not implemented layer by"),
    ({"compensate": False, "unit_importance": "taylor"}, "--unit_importance magnitude"),
    ({"recovery": "lora"}, "--recovery none"),
    ({"pruning_strategy": "optimized"}, "sensitivity profile"),
    ({"max_ppl_increase": 0.25}, "quality gate"),
])
def test_settings_that_cannot_stream_are_refused_with_what_to_use(changes, words):
    config = PRESETS["default"].with_(**changes)
    with pytest.raises(ValueError, match=words):
        check_streamable(config)
    assert not use_layerwise(config.with_(base_model="demo"))  # auto: in memory then


def test_layerwise_choice():
    check_streamable(PRESETS["default"])  # the default preset streams
    assert needs_layerwise(100 * 2**30, 80 * 2**30)
    assert not needs_layerwise(2**30, 80 * 2**30)
    assert not use_layerwise(PRESETS["default"].with_(base_model="tiny"))  # not on disk
    assert use_layerwise(PRESETS["default"].with_(base_model="tiny", layerwise="on"))
    assert not use_layerwise(PRESETS["default"].with_(layerwise="off"))
    with pytest.raises(ValueError, match="layerwise='sometimes'; choose one of auto, on, off"):
        PruneConfig(layerwise="sometimes")
    with pytest.raises(ModelLoadError, match="exists only in memory"):
        run_layerwise(PRESETS["default"].with_(base_model="tiny"), "unused")


@pytest.mark.demo
def test_demo_model_layerwise_equals_in_memory(demo, tmp_path):
    """The default preset as shipped (energy + Fisher channels, feedback) on the demo model;
    layer-wise it calibrates on real text only, as the in-memory run without written text."""
    model, tokenizer = demo
    config = PRESETS["default"].with_(
        importance_samples=2, importance_seq_len=64, num_examples=4, seq_len=64,
        calibration_dataset="demo", eval_datasets=("demo",), eval_seq_len=128,
        max_eval_windows=1, device="cpu")
    in_memory = run_pipeline(config.with_(self_text_share=0.0), copy.deepcopy(model), tokenizer,
                             copy_model=False)
    layerwise = run_layerwise(config, tmp_path / "out", batch_size=8)
    assert "real calibration text only" in layerwise.report["layerwise"]["self_text"]
    _assert_same_run(in_memory, layerwise, tmp_path / "out", atol=1e-4)
    assert layerwise.ppl_before[0].value == pytest.approx(in_memory.ppl_before[0].value,
                                                          rel=1e-5)


# ---- command line ------------------------------------------------------------------------------

def _cli_args(path, out, *extra: str) -> list[str]:
    return ["--base_model", str(path), "--device", "cpu", "--preset", "default",
            "--importance_samples", "4", "--num_examples", "4", "--eval_seq_len", "32",
            "--max_eval_windows", "2", "--channel_multiple", "1", "--pruning_ratio", "0.1",
            "--calibration_dataset", "demo", "--eval_datasets", "demo", "--output_dir", str(out),
            "--channel_selection", "energy", "--quiet", *extra]


def test_cli_layerwise_writes_the_model_and_reports_layers(make_tiny, tmp_path):
    from gqaprune_core import cli

    _, _, path = _saved(make_tiny, tmp_path)
    run = cli.execute(_cli_args(path, tmp_path / "runs", "--layerwise", "on",
                                "--save_ckpt_log_name", "lw", "--test_after_prune",
                                "--max_shard_size", "20KB"))
    # the default preset's self-written windows need the whole model: layer-wise, real text
    in_memory = cli.execute(_cli_args(path, tmp_path / "runs", "--layerwise", "off",
                                      "--save_ckpt_log_name", "mem", "--test_after_prune",
                                      "--save_model", "--self_text_share", "0"))
    assert "real calibration text only" in run.report["layerwise"]["self_text"]
    assert "real calibration text only" in next(
        (tmp_path / "runs" / "lw").glob("*/training.log")).read_text()
    assert run.report["layerwise"]["stages"]["prune"]["layers"] == 3
    assert run.report["model_dir"] == str((tmp_path / "runs" / "lw" / "model").resolve())
    assert "layerwise" not in in_memory.report
    assert run.result.plan == in_memory.result.plan
    for corpus, entry in in_memory.report["ppl_after"].items():
        assert run.report["ppl_after"][corpus]["value"] == pytest.approx(entry["value"])
    loaded, _ = load_pruned(tmp_path / "runs" / "lw" / "model")
    assert layout(loaded) == layout(in_memory.result.model)
    # --max_shard_size applies layer-wise too: the tiny model's weights exceed 20 KB
    shards = sorted(p.name for p in (tmp_path / "runs" / "lw" / "model").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")


def test_cli_refuses_taylor_layerwise_in_one_line(make_tiny, tmp_path, capsys):
    from gqaprune_core import cli

    _, _, path = _saved(make_tiny, tmp_path)
    capsys.readouterr()  # save_pretrained's own progress bar
    code = cli.main(_cli_args(path, tmp_path / "runs", "--layerwise", "on", "--prune_attention",
                              "--unit_importance", "taylor"))
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "Taylor scores need gradients through the whole model" in err
    assert "--layerwise off" in err and not (tmp_path / "runs").exists()


# ---- the app's decision ------------------------------------------------------------------------

def test_app_prunes_layerwise_when_a_copy_would_not_fit(make_tiny, tmp_path, monkeypatch):
    from gqaprune_core import app_export, app_layerwise, app_support
    from gqaprune_core.layerwise import pipeline as layerwise_pipeline

    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))  # its run folder goes there
    model, tokenizer, path = _saved(make_tiny, tmp_path)
    config = SETTINGS["default"].with_(base_model=str(path), eval_datasets=("demo",))
    assert not app_layerwise.prune_layerwise_instead(config, model)  # a copy fits
    assert not app_layerwise.prune_layerwise_instead(config.with_(base_model="tiny"), model)
    monkeypatch.setattr(layerwise_pipeline, "free_memory", lambda device: 2**20)
    assert app_layerwise.prune_layerwise_instead(config, model)
    assert not app_layerwise.prune_layerwise_instead(config.with_(layerwise="off"), model)
    with pytest.raises(ValueError, match="Taylor"):
        app_layerwise.prune_layerwise_instead(
            config.with_(layerwise="on", prune_attention=True), model)
    stages = []
    before = copy.deepcopy(model.state_dict())
    run = app_support.prune_job(config, model, tokenizer, None, "Hello", 4,
                                lambda stage, done, total: stages.append(stage))
    assert run.model is None and run.checkpoint.is_dir() and "layer by layer" in run.text_after
    assert any("s/layer" in stage for stage in stages)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not cut
    saved = app_export.save_run(run, "lw", output_dir=tmp_path / "runs")
    loaded, _ = load_pruned(saved / "model")
    assert count_parameters(loaded) == run.report["params_after"]


# ---- accelerate's dispatch (in memory) ---------------------------------------------------------

@pytest.mark.parametrize("setting", ["default", "groups_magnitude", "default_fisher"])
def test_dispatched_model_prunes_like_a_plain_one(make_tiny, tmp_path, setting):
    from gqaprune_core.models import load_model

    model, tokenizer, path = _saved(make_tiny, tmp_path)
    settings = SETTINGS | {"default_fisher": PRESETS["default"].with_(**SMALL)}  # its backward
    config = settings[setting].with_(base_model=str(path), unit_importance="taylor")
    dispatched, _ = load_model(path, "cpu", device_map="auto", max_memory="cpu=4GiB")
    plain = run_pipeline(config, model, tokenizer)
    spread = run_pipeline(config, dispatched, tokenizer)
    assert spread.plan == plain.plan
    assert spread.report["ppl_after"]["demo"]["value"] == pytest.approx(
        plain.report["ppl_after"]["demo"]["value"], rel=1e-5)


def test_auto_streams_a_model_that_dispatch_would_offload(make_tiny, tmp_path):
    """--device_map auto within too little --max_memory would offload weights to disk, which
    in-place cuts cannot use: --layerwise auto foresees it and streams the model instead (the
    same plan as in memory); with room enough it stays in memory; --layerwise off is refused."""
    from gqaprune_core import cli
    from gqaprune_core.layerwise.pipeline import decide_layerwise, dispatch_would_offload

    _, _, path = _saved(make_tiny, tmp_path)
    tight = SETTINGS["default"].with_(base_model=str(path), device_map="auto",
                                      max_memory="cpu=20KiB,disk=1GiB")
    assert dispatch_would_offload(tight) and decide_layerwise(tight)
    roomy = tight.with_(max_memory="cpu=4GiB")
    assert not dispatch_would_offload(roomy) and not decide_layerwise(roomy)
    assert not decide_layerwise(tight.with_(layerwise="off"))
    run = cli.execute(_cli_args(path, tmp_path / "runs", "--device_map", "auto",
                                "--max_memory", "cpu=20KiB,disk=1GiB", "--save_ckpt_log_name",
                                "spread"))
    in_memory = cli.execute(_cli_args(path, tmp_path / "runs", "--save_ckpt_log_name", "mem",
                                      "--self_text_share", "0"))  # layer-wise: real text only
    assert "layerwise" in run.report and run.result.plan == in_memory.result.plan
    assert cli.main(_cli_args(path, tmp_path / "runs", "--device_map", "auto", "--max_memory",
                              "cpu=20KiB,disk=1GiB", "--layerwise", "off")) == 1


def test_offloaded_weights_are_refused_with_what_to_do(make_tiny, tmp_path):
    from gqaprune_core.models import load_model, parse_max_memory

    _, _, path = _saved(make_tiny, tmp_path)
    with pytest.raises(ModelLoadError, match="offload.*--layerwise auto"):
        load_model(path, "cpu", device_map="auto", max_memory="cpu=20KiB,disk=1GiB")
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB",
                                                              "cpu": "64GiB"}
    with pytest.raises(ValueError, match="not DEVICE=SIZE"):
        parse_max_memory("gpu0:20GiB")
    with pytest.raises(ValueError, match="needs device_map"):
        PruneConfig(max_memory="0=20GiB")
