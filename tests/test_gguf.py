"""GGUF export, checked by running the files in llama.cpp (llama-cpp-python).

Tiny seeded models get a real byte-level BPE tokenizer trained on a fixed text
(:func:`gqaprune_core.tiny.tiny_bpe_tokenizer`, 400 tokens), so files stay well under 1 MB.
Tolerances: an f32 export run with an f32 KV cache differs from PyTorch only by summation
order; on these models that is ~1e-6 with logits up to ~3, so 1e-4 leaves a 100x margin and
still fails on any real mistake (a wrong rotary permutation or a missing bias moves logits by
> 0.1). f16 weights carry 11-bit mantissas (relative 5e-4 per weight), hence 2e-2 for f16.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from gqaprune_core.export import gguf as gguf_export
from gqaprune_core.export.__main__ import main as export_main
from gqaprune_core.export.gguf import GgufExportError, export_gguf, write_gguf
from gqaprune_core.export.gguf_tokenizer import TokenizerConversionError
from gqaprune_core.models import layout
from gqaprune_core.plan import LayerPlan, PruningPlan
from gqaprune_core.surgery import apply_plan_
from gqaprune_core.tiny import tiny_bpe_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 400
TEXT = "The quick brown fox jumps over the lazy dog; Grüße aus Köln, 42 times!"
F32_ATOL, F16_ATOL = 1e-4, 2e-2


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer of VOCAB tokens."""
    return tiny_bpe_tokenizer(VOCAB)


def llama_cpp():
    return pytest.importorskip("llama_cpp")


def cut(model, schedule: list[tuple[tuple[int, ...], int]]):
    """Apply per-layer (kept KV groups, kept MLP channels) to a tiny model, in place."""
    layers = []
    for shape, (groups, channels) in zip(layout(model), schedule, strict=True):
        kept = tuple(sorted(random.Random(shape.layer).sample(range(shape.mlp_width), channels)))
        layers.append(LayerPlan(shape.layer, shape.q_heads, shape.kv_heads, shape.head_dim,
                                shape.mlp_width, groups, kept))
    return apply_plan_(model, PruningPlan(tuple(layers), "test"))


SCHEDULES = {
    "dense": None,
    "uniform": [((1,), 24)] * 3,
    "per_layer": [((0, 1), 40), ((1,), 32), ((0,), 16)],
    "mlp_only": [((0, 1), 40), ((0, 1), 24), ((0, 1), 32)],
}
CASES = [("llama", "dense", "llama"), ("llama", "uniform", "llama"),
         ("llama", "per_layer", "deci"), ("mistral", "per_layer", "deci"),
         ("qwen2", "mlp_only", "deci"), ("qwen2", "per_layer", "deci"),
         ("qwen2", "dense", "llama")]


def make_model(architecture: str, schedule: str, tied: bool = True):
    model = tiny_model(architecture=architecture, vocab=VOCAB, tie_embeddings=tied)
    if SCHEDULES[schedule] is not None:
        cut(model, SCHEDULES[schedule])
    return model


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def torch_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("architecture,schedule,expected", CASES)
def test_f32_export_matches_pytorch_logits_and_greedy_tokens(
        architecture, schedule, expected, bpe_tokenizer, tmp_path):
    llama_cpp()
    from gqaprune_core.export.gguf_check import llama_greedy, llama_logits, open_llama

    model = make_model(architecture, schedule)
    result = write_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", "f32")
    assert result.architecture == expected
    ids = bpe_tokenizer(TEXT)["input_ids"]
    reference = torch_logits(model, ids)
    with open_llama(result.path, n_ctx=64) as llm:
        got = llama_logits(llm, ids)
        assert np.abs(got - reference).max() < F32_ATOL
        assert (got.argmax(-1) == reference.argmax(-1)).all()
        assert llama_greedy(llm, ids[:8], 8) == torch_greedy(model, ids[:8], 8)


def test_per_layer_shapes_are_written_as_deci_arrays_and_tied_output_is_omitted(
        bpe_tokenizer, tmp_path):
    from gguf import GGUFReader

    model = make_model("llama", "per_layer")
    path = write_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", "f32").path
    reader = GGUFReader(str(path))
    field = reader.fields
    assert field["general.architecture"].contents() == "deci"
    assert field["deci.attention.head_count"].contents() == [6, 3, 3]
    assert field["deci.attention.head_count_kv"].contents() == [2, 1, 1]
    assert field["deci.feed_forward_length"].contents() == [40, 32, 16]
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert tuple(next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight").shape) \
        == (48, 24)  # GGUF lists ne0 first: (E, H_1 * D)


def test_untied_model_writes_output_weight_and_uniform_model_plain_llama(bpe_tokenizer, tmp_path):
    from gguf import GGUFReader

    path = write_gguf(make_model("llama", "uniform", tied=False), bpe_tokenizer,
                      tmp_path / "m.gguf", "f32").path
    reader = GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count"].contents() == 3
    assert "output.weight" in {t.name for t in reader.tensors}


def test_rotary_permutation_interleaves_the_halves_of_each_head():
    rows = torch.arange(2 * 4, dtype=torch.float32)[:, None]  # 2 heads, D = 4
    permuted = gguf_export.permute_rotary(rows, heads=2)[:, 0].tolist()
    assert permuted == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 2.0},
])
def test_rope_scaling_matches_pytorch(scaling, bpe_tokenizer, tmp_path):
    llama_cpp()
    from transformers import LlamaForCausalLM

    from gqaprune_core.export.gguf_check import llama_logits, open_llama

    base = make_model("llama", "dense")
    config = copy.deepcopy(base.config)
    config.rope_parameters = {"rope_theta": 10000.0} | scaling
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(base.state_dict())
    ids = bpe_tokenizer(TEXT)["input_ids"]
    reference = torch_logits(model, ids)
    assert np.abs(reference - torch_logits(base, ids)).max() > 1e-2  # the scaling matters here
    path = write_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", "f32").path
    with open_llama(path, n_ctx=64) as llm:
        assert np.abs(llama_logits(llm, ids) - reference).max() < F32_ATOL


def test_half_and_q8_exports_stay_close_to_f32(bpe_tokenizer, tmp_path):
    llama_cpp()
    from gqaprune_core.export.gguf_check import (llama_logits, llama_perplexity, nll_sum,
                                                 open_llama)

    model = make_model("llama", "per_layer")
    ids = bpe_tokenizer(TEXT + " " + TEXT[::-1])["input_ids"]
    paths = {kind: write_gguf(model, bpe_tokenizer, tmp_path / f"{kind}.gguf", kind).path
             for kind in ("f32", "f16", "bf16", "q8_0")}
    with open_llama(paths["f16"], n_ctx=128) as llm:
        assert np.abs(llama_logits(llm, ids) - torch_logits(model, ids)).max() < F16_ATOL
    perplexity = {kind: llama_perplexity(path, [ids]) for kind, path in paths.items()}
    torch_ppl = float(np.exp(np.divide(*nll_sum(torch_logits(model, ids), ids))))
    assert perplexity["f32"] == pytest.approx(torch_ppl, rel=1e-4)
    for kind in ("f16", "bf16", "q8_0"):  # q8_0: 8-bit blocks of 32, stated bound 2 %
        assert perplexity[kind] == pytest.approx(perplexity["f32"], rel=0.02), kind
    assert paths["q8_0"].stat().st_size < 0.6 * paths["f32"].stat().st_size


def test_q4_k_m_goes_through_llama_cpps_quantizer(bpe_tokenizer, tmp_path):
    llama_cpp()
    from gguf import GGUFReader

    from gqaprune_core.export.gguf_check import llama_logits, open_llama

    model = make_model("llama", "per_layer")
    result = write_gguf(model, bpe_tokenizer, tmp_path / "q.gguf", "q4_k_m")
    assert GGUFReader(str(result.path)).fields["general.file_type"].contents() == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]  # the f16 temp is gone
    with open_llama(result.path, n_ctx=32) as llm:
        assert np.isfinite(llama_logits(llm, bpe_tokenizer("Hello world")["input_ids"])).all()


def test_q4_k_m_without_llama_cpp_python_is_a_clear_error(bpe_tokenizer, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    with pytest.raises(GgufExportError, match="llama-cpp-python"):
        write_gguf(make_model("llama", "dense"), bpe_tokenizer, tmp_path / "q.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(bpe_tokenizer, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    model = make_model("llama", "dense")
    with pytest.raises(GgufExportError, match="exists.*--overwrite"):
        write_gguf(model, bpe_tokenizer, target, "f16")
    assert target.read_bytes() == b"old"
    write_gguf(model, bpe_tokenizer, target, "f16", overwrite=True)
    assert target.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_leaves_no_file(failure, bpe_tokenizer, tmp_path,
                                                      monkeypatch):
    from gguf import GGUFWriter

    def broken(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(type(failure)):
        write_gguf(make_model("llama", "dense"), bpe_tokenizer, tmp_path / "m.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_refusals_name_the_value(bpe_tokenizer, tiny_tokenizer, tmp_path):
    model = make_model("llama", "dense")
    with pytest.raises(GgufExportError, match="'q3_k'.*f32, f16"):
        write_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", "q3_k")
    with pytest.raises(TokenizerConversionError, match="WordLevel"):
        write_gguf(tiny_model(), tiny_tokenizer, tmp_path / "m.gguf", "f32")
    with pytest.raises(TokenizerConversionError, match="no tokenizer"):
        write_gguf(model, None, tmp_path / "m.gguf", "f32")
    biased = make_model("llama", "dense")
    layer = biased.model.layers[0].self_attn
    layer.o_proj.bias = torch.nn.Parameter(torch.zeros(48))
    with pytest.raises(GgufExportError, match="o_proj"):
        write_gguf(biased, bpe_tokenizer, tmp_path / "m.gguf", "f32")
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        export_gguf(tmp_path, tmp_path / "m.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_checkpoint_and_reports_bad_input_in_one_line(bpe_tokenizer, tmp_path,
                                                                   capsys):
    from gqaprune_core.checkpoint import save_pruned

    model = make_model("llama", "per_layer")
    save_pruned(model, bpe_tokenizer, None, tmp_path / "ckpt")
    out = tmp_path / "m.gguf"
    argv = ["--pruned_model", str(tmp_path / "ckpt"), "--gguf", str(out), "--outtype", "q8_0"]
    assert export_main(argv) == 0
    assert "deci, q8_0" in capsys.readouterr().out and out.is_file()
    assert export_main(argv) == 2
    error = capsys.readouterr().err
    assert "exists" in error and "--overwrite" in error and len(error.strip().splitlines()) == 1
    assert export_main(argv + ["--overwrite"]) == 0
    assert export_main(["--pruned_model", str(tmp_path / "nowhere"), "--gguf",
                        str(tmp_path / "x.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--pruned_model", "demo", "--gguf", str(out), "--outtype", "q2"])
    assert exit_info.value.code == 2


def demo_plan(model) -> PruningPlan:
    """A per-layer cut of the demo model: every third layer loses one of its 3 KV groups, MLP
    widths 1536 - 64 * (l % 4) keeping the channels with the largest down_proj columns."""
    layers = []
    for shape, layer in zip(layout(model), model.model.layers, strict=True):
        groups = (0, 2) if shape.layer % 3 == 0 else (0, 1, 2)
        width = shape.mlp_width - 64 * (shape.layer % 4)
        norms = layer.mlp.down_proj.weight.norm(dim=0)
        kept = tuple(sorted(norms.topk(width).indices.tolist()))
        layers.append(LayerPlan(shape.layer, shape.q_heads, shape.kv_heads, shape.head_dim,
                                shape.mlp_width, groups, kept))
    return PruningPlan(tuple(layers), "demo-test")


@pytest.mark.demo
def test_demo_model_pruned_per_layer_runs_in_llama_cpp(demo, tmp_path):
    llama_cpp()
    from gqaprune_core.data import evaluation_windows
    from gqaprune_core.evaluate import perplexity
    from gqaprune_core.export.gguf_check import (llama_greedy, llama_logits, llama_perplexity,
                                                 open_llama)

    base, tokenizer = demo
    model = apply_plan_(copy.deepcopy(base), demo_plan(base))
    f32 = write_gguf(model, tokenizer, tmp_path / "f32.gguf", "f32")
    q8 = write_gguf(model, tokenizer, tmp_path / "q8.gguf", "q8_0")
    assert f32.architecture == "deci"
    ids = tokenizer(TEXT)["input_ids"]
    reference = torch_logits(model, ids)
    with open_llama(f32.path, n_ctx=64) as llm:
        got = llama_logits(llm, ids)
        # fp32 on both sides, 30 layers, logits up to 34: summation order gave 1e-4 here.
        assert np.abs(got - reference).max() < 2e-3
        assert (got.argmax(-1) == reference.argmax(-1)).all()
        assert llama_greedy(llm, ids[:10], 8) == torch_greedy(model, ids[:10], 8)
    windows = evaluation_windows(tokenizer, "demo", seq_len=128, max_windows=3)
    torch_ppl = perplexity(model, windows).value
    as_lists = windows.tolist()
    f32_ppl, q8_ppl = (llama_perplexity(path, as_lists) for path in (f32.path, q8.path))
    assert f32_ppl == pytest.approx(torch_ppl, rel=1e-3)
    assert q8_ppl == pytest.approx(f32_ppl, rel=0.02)  # q8_0: stated bound 2 %


def test_app_export_writes_the_runs_gguf_under_prune_log(bpe_tokenizer, tmp_path):
    from types import SimpleNamespace

    from gqaprune_core.app_export import export_run_gguf

    run = SimpleNamespace(model=make_model("llama", "per_layer"), tokenizer=bpe_tokenizer,
                          number=1, config=SimpleNamespace(base_model="demo", pruning_ratio=0.2))
    path = export_run_gguf(run, "app-run", "q8_0", output_dir=tmp_path)
    assert path == tmp_path / "app-run" / "model-q8_0.gguf" and path.read_bytes()[:4] == b"GGUF"
    with pytest.raises(GgufExportError, match="exists"):
        export_run_gguf(run, "app-run", "q8_0", output_dir=tmp_path)
    with pytest.raises(ValueError, match="plain, non-empty directory name"):
        export_run_gguf(run, "../x", "q8_0", output_dir=tmp_path)
