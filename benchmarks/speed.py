"""Wall time of each pruning stage, and of the whole pipeline, on CPU or GPU.

    python benchmarks/speed.py                                      # demo model, CPU
    python benchmarks/speed.py --shape llama3-8b --random-weights   # Llama-3-8B shape, GPU
    python benchmarks/speed.py --shape tiny-llama --random-weights  # smoke test, CPU

Stages: load (or build), a large matmul (the device's measured peak), layer importance by
removal (prefix reuse, the library), removal without prefix reuse (baselines.py), activation and
block influence, Taylor unit scores (one-shot, and pruning one-shot and sequential), surgery,
evaluation per window, and the whole pipeline with the ``original`` preset next to gqaprune's
default one (evaluate=False; layer importance computed, not read from a cache). Each stage is
timed once, after a warm-up forward and backward pass; a stage that fails is recorded with its
error and the others still run. Forward-only stages also report FLOP/s and the share of the
measured matmul rate. Writes ``benchmarks/results/speed_cpu.json`` (demo) or
``speed_<device>_<shape>.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # runnable as a script from anywhere

import torch  # noqa: E402

from baselines import naive_removal_importance  # noqa: E402
from common import (RESULTS_DIR, PeakRSS, Timer, default_preset, header, log, mib,  # noqa: E402
                    set_threads, temporary_cache, write_json)
from gqaprune_core.config import PRESETS  # noqa: E402
from gqaprune_core.evaluate import perplexity  # noqa: E402
from gqaprune_core.layer_importance import LayerImportance, compute_layer_importance  # noqa: E402
from gqaprune_core.models import count_parameters, layout  # noqa: E402
from gqaprune_core.pipeline import plan_units, run_pipeline  # noqa: E402
from gqaprune_core.plan import build_plan  # noqa: E402
from gqaprune_core.pruner import prune_model_  # noqa: E402
from gqaprune_core.schedule import allocate_units, unit_costs  # noqa: E402
from gqaprune_core.surgery import apply_plan_  # noqa: E402
from gqaprune_core.unit_importance import layer_saliency  # noqa: E402

SHAPES = {
    # Meta-Llama-3-8B: 8.03 B parameters, untied embeddings
    "llama3-8b": {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
                  "vocab_size": 128256, "rope_theta": 500000.0},
    # small enough for the CPU smoke test, same code path
    "tiny-llama": {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 8,
                   "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 688,
                   "vocab_size": 1024, "rope_theta": 10000.0},
}


# ---------------------------------------------------------------------------------------------
# models and inputs


def build_random(shape: str, device: torch.device, dtype: torch.dtype):
    """A LlamaForCausalLM of the named shape with random weights, built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=1,
                         pad_token_id=1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of 8 B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def random_ids(vocab: int, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# FLOPs


def forward_flops(model, tokens_per_row: int, rows: int, layers_run: float | None = None,
                  heads_run: int = 1) -> float:
    """Matmul FLOPs of ``rows`` sequences of ``tokens_per_row`` tokens through ``layers_run``
    decoder layers (default all) and ``heads_run`` LM-head passes.

    Per token: 2 x (the layer's q/k/v/o and gate/up/down weights) per layer and 2 x E x V for the
    head; attention adds 2 x T^2 x H x D per sequence and layer (Q K^T and A V, causal: half of
    the full T x T square). Norms, rotary embeddings and softmax are left out.
    """
    shapes = layout(model)
    hidden = model.config.hidden_size
    per_layer = sum(2 * hidden * s.q_heads * s.head_dim + 2 * hidden * s.kv_heads * s.head_dim
                    + 3 * hidden * s.mlp_width for s in shapes) / len(shapes)
    attention = sum(s.q_heads * s.head_dim for s in shapes) / len(shapes)
    layers = len(shapes) if layers_run is None else layers_run
    tokens = rows * tokens_per_row
    layer_flops = 2 * tokens * per_layer + 2 * rows * tokens_per_row ** 2 * attention
    head_flops = 2 * tokens * hidden * model.config.vocab_size
    return layers * layer_flops + heads_run * head_flops


def removal_flops(model, ids: torch.Tensor, prefix_reuse: bool) -> float:
    """Layer evaluations of removal importance: with prefix reuse one full pass, then layers
    i+1..L-1 and the head for every bypassed i; without, L + 1 full passes less the bypassed
    layer each time."""
    count = len(layout(model))
    rows, length = ids.shape
    if prefix_reuse:
        return forward_flops(model, length, rows, count + count * (count - 1) / 2, count + 1)
    return forward_flops(model, length, rows, (count + 1) * count - count, count + 1)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> dict:
    """FLOP/s of a ``size``-cubed ``torch.matmul`` on random data (mean of ``repeats`` after 3
    warm-ups): the reference for the share of peak reached by the model's passes."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    with Timer(cuda=device.type == "cuda") as clock:
        for _ in range(repeats):
            torch.matmul(a, b)
    flops = 2 * size ** 3 * repeats
    return {"size": size, "dtype": str(dtype), "repeats": repeats, "seconds": clock.seconds,
            "tflops": flops / clock.seconds / 1e12}


# ---------------------------------------------------------------------------------------------
# stages


class Bench:
    """Collects one record per stage: seconds, peak memory, tokens/s, FLOP/s, errors."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stages: dict[str, dict] = {}
        self.peak_tflops: float | None = None
        self.save: Callable[[], object] | None = None

    @contextmanager
    def stage(self, name: str, tokens: int | None = None, flops: float | None = None):
        record: dict = {}
        self.stages[name] = record
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            at_start = torch.cuda.memory_allocated()
        memory = PeakRSS()
        try:
            with memory, Timer(self.cuda) as clock:
                yield record
        except Exception as err:  # record and go on: one broken stage must not lose the rest
            record["error"] = f"{type(err).__name__}: {err}"
            record["traceback"] = traceback.format_exc(limit=6)
            log(f"{name}: FAILED {record['error']}")
            return
        record["peak_rss_mib"] = mib(memory.peak)
        if self.cuda:  # extra: above what was already held (the model, a copy made before)
            record["peak_gpu_mib"] = mib(torch.cuda.max_memory_allocated())
            record["gpu_mib_at_start"] = mib(at_start)
            record["extra_gpu_mib"] = mib(torch.cuda.max_memory_allocated() - at_start)
        self.finish(name, record, clock.seconds, record.pop("tokens", tokens),
                    record.pop("flops", flops))

    def finish(self, name: str, record: dict, seconds: float, tokens: int | None = None,
               flops: float | None = None) -> None:
        """Store ``seconds`` and the rates derived from it in ``record`` under ``name``."""
        self.stages[name] = record
        record["seconds"] = round(seconds, 4)
        if tokens:
            record["tokens"] = tokens
            record["tokens_per_s"] = round(tokens / seconds, 1)
        if flops:
            record["tflops"] = round(flops / 1e12, 3)
            record["tflop_per_s"] = round(flops / seconds / 1e12, 3)
            if self.peak_tflops:
                record["fraction_of_matmul_peak"] = round(flops / seconds / 1e12
                                                          / self.peak_tflops, 4)
        if self.save is not None:
            self.save()
        log(f"{name}: {seconds:.2f} s" + "".join(
            f", {k} {v}" for k, v in record.items() if k in ("tokens_per_s", "tflop_per_s",
                                                             "fraction_of_matmul_peak",
                                                             "peak_gpu_mib", "extra_gpu_mib")))


def warm_up(model, ids: torch.Tensor) -> None:
    """One forward and backward pass, so that one-time kernel and allocator setup is not
    charged to the first timed stage."""
    model(ids.to(next(model.parameters()).device), labels=ids.to(next(model.parameters()).device),
          use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)


def removal_comparison(bench: Bench, model, ids: torch.Tensor, batch_size: int = 8
                       ) -> LayerImportance | None:
    """Removal importance with prefix reuse (the library) and by the naive loop (baselines.py),
    alternated batch by batch so that a change in machine load hits both alike; each variant's
    time is the sum over its batches. Returns the library's scores averaged over batches."""
    seconds = {"prefix_reuse": 0.0, "naive": 0.0}
    scores: dict[str, list[list[float]]] = {"prefix_reuse": [], "naive": []}
    base_ppl = []
    with bench.stage("importance_removal_both_interleaved") as record:
        for batch in ids.split(batch_size):
            with Timer(bench.cuda) as clock:
                batch_scores, stats = compute_layer_importance(model, batch, "removal", batch_size)
            seconds["prefix_reuse"] += clock.seconds
            scores["prefix_reuse"].append(batch_scores)
            base_ppl.append(stats["base_ppl"])
            with Timer(bench.cuda) as clock:
                batch_scores, _ = naive_removal_importance(model, batch, batch_size)
            seconds["naive"] += clock.seconds
            scores["naive"].append(batch_scores)
        record["note"] = f"both variants, alternated per batch of {batch_size} windows"
    if "error" in record:
        return None
    rows, length = ids.shape
    for variant, prefix_reuse in (("prefix_reuse", True), ("naive", False)):
        shared = {k: record[k] for k in ("peak_gpu_mib", "peak_rss_mib") if k in record}
        bench.finish(f"importance_removal_{variant}", shared, seconds[variant], rows * length,
                     removal_flops(model, ids, prefix_reuse))
    bench.stages["importance_removal_prefix_reuse"]["base_ppl_first_batch"] = base_ppl[0]
    differences = [abs(a - b) / max(abs(b), 1e-12) for x, y in zip(scores["naive"],
                   scores["prefix_reuse"]) for a, b in zip(x, y)]
    bench.stages["removal_naive_over_prefix_reuse"] = {
        "ratio": round(seconds["naive"] / seconds["prefix_reuse"], 3),
        "max_relative_score_difference": max(differences)}
    per_layer = zip(*scores["prefix_reuse"])
    return LayerImportance("removal", tuple(sum(v) / len(v) for v in per_layer))


def importance_stages(bench: Bench, model, ids: torch.Tensor, removal_batch: int = 8
                      ) -> LayerImportance | None:
    importance = removal_comparison(bench, model, ids, removal_batch)
    rows, length = ids.shape
    for method in ("activation", "block_influence"):
        with bench.stage(f"importance_{method}", rows * length,
                         forward_flops(model, length, rows)):
            compute_layer_importance(model, ids, method)
    return importance


def unit_stages(bench: Bench, model, ids: torch.Tensor, importance: LayerImportance | None) -> None:
    rows, length = ids.shape
    with bench.stage("unit_scores_taylor_one_shot", rows * length):
        layer_saliency(model, "taylor", ids, None)
    if importance is None:
        return
    config = PRESETS["original"]
    _, allocation = plan_units(config, model, importance)
    plans = {}
    for mode in ("one-shot", "sequential"):
        pruned = copy.deepcopy(model)
        with bench.stage(f"prune_taylor_{mode}", rows * length) as record:
            plans[mode] = prune_model_(pruned, ids, allocation.groups_to_keep,
                                       allocation.channels_to_keep, "taylor", mode)
            record["note"] = "scores, plan, cut and validate; original preset's 20% of prunable"
        del pruned
    if "one-shot" in plans:
        pruned = copy.deepcopy(model)
        with bench.stage("surgery_apply_plan") as record:
            apply_plan_(pruned, plans["one-shot"])
            record["note"] = "cut every layer, then validate (forward, KV cache, generate)"
        bench.stages["surgery_apply_plan"]["params_after"] = count_parameters(pruned)
        del pruned


def evaluation_stage(bench: Bench, model, windows: torch.Tensor) -> None:
    rows, length = windows.shape
    perplexity(model, windows[:4], corpus="warm-up")
    with bench.stage("evaluate", rows * length, forward_flops(model, length, rows)) as record:
        result = perplexity(model, windows, corpus="eval")
        record["windows"], record["seq_len"] = rows, length
        record["ppl"] = result.value
    if "seconds" in bench.stages["evaluate"]:
        bench.stages["evaluate"]["seconds_per_window"] = round(
            bench.stages["evaluate"]["seconds"] / rows, 4)


def alignment_stages(bench: Bench, model, windows: torch.Tensor, multiples=(1, 8, 128),
                     skip: frozenset = frozenset()) -> None:
    """Evaluation speed of pruned copies whose MLP widths are, or are not, multiples of 8 / 128:
    27 % of the MLP channels removed (rates 0.20 .. 0.34 across the layers, so widths differ),
    kept at ``channel_multiple`` 1, 8 and 128. GPU matrix kernels can slow down on widths that
    are not multiples of 8."""
    shapes, costs = layout(model), unit_costs(model)
    count = len(shapes)
    rates = [0.2 + 0.14 * i / max(1, count - 1) for i in range(count)]
    windows = windows.repeat(4, 1)
    rows, length = windows.shape
    for multiple in multiples:
        allocation = allocate_units(shapes, costs, rates, prune_attention=False,
                                    channel_multiple=multiple)
        plan = build_plan(shapes, [torch.ones(s.kv_heads) for s in shapes],
                          [torch.arange(s.mlp_width, 0, -1).float() for s in shapes],
                          allocation.groups_to_keep, allocation.channels_to_keep, "alignment")
        pruned = copy.deepcopy(model)
        apply_plan_(pruned, plan)
        perplexity(pruned, windows[:4], corpus="warm-up")
        with bench.stage(f"evaluate_pruned_multiple_{multiple}", rows * length,
                         forward_flops(pruned, length, rows)) as record:
            perplexity(pruned, windows, corpus="eval")
            record["mlp_widths_first_layers"] = list(allocation.channels_to_keep[:4])
            record["params"] = count_parameters(pruned)
        if multiple == 8 and "recovery" not in skip:
            recovery_stage(bench, pruned, model, windows[:16, :256])
        del pruned


def recovery_stage(bench: Bench, pruned, dense, ids: torch.Tensor, steps: int = 5) -> None:
    """Seconds per LoRA distillation step (batch 4 x 256): the cost of the optional recovery."""
    from gqaprune_core.recovery import recover_

    for method in ("lora", "full"):
        with bench.stage(f"recovery_{method}_{steps}_steps", steps * 4 * ids.shape[1]) as record:
            report = recover_(pruned, dense, ids, method=method, steps=steps, batch_size=4,
                              time_budget_s=300)
            record |= {"seconds_per_step": round(report.seconds / max(1, report.steps_done), 3),
                       "steps_done": report.steps_done, "trainable_params": report.trainable_params}


def pipeline_stages(bench: Bench, model, tokenizer, calibration: str, sample_sizes: dict
                    ) -> None:
    default, source = default_preset()
    for name, config in (("original", PRESETS["original"]), ("default", default)):
        config = config.with_(calibration_dataset=calibration, **sample_sizes)
        with temporary_cache(), bench.stage(f"pipeline_{name}") as record:
            result = run_pipeline(config, model, tokenizer, copy_model=True, evaluate=False)
            record["timings_s"] = result.report["timings_s"]
            record["params_after"] = result.report["params_after"]
            record["config"] = config.to_dict()
            if name == "default":
                record["preset"] = source
            del result
    original, default_run = bench.stages["pipeline_original"], bench.stages["pipeline_default"]
    if "seconds" in original and "seconds" in default_run:
        bench.stages["pipeline_default_over_original"] = {
            "ratio": round(default_run["seconds"] / original["seconds"], 3)}


def full_procedure_stage(bench: Bench, model, tokenizer, calibration: str, eval_corpus: str,
                         eval_windows: int, eval_seq_len: int) -> None:
    """The default pipeline at its own sample sizes, IN PLACE (no copy: the peak is what a user
    pays), with perplexity before and after on ``eval_windows`` windows. Cuts ``model``: run it
    last."""
    default, _ = default_preset()
    config = default.with_(calibration_dataset=calibration, eval_datasets=(eval_corpus,),
                           max_eval_windows=eval_windows, eval_seq_len=eval_seq_len)
    with temporary_cache(), bench.stage("full_procedure_default_in_place") as record:
        result = run_pipeline(config, model, tokenizer, copy_model=False, evaluate=True)
        record["timings_s"] = result.report["timings_s"]
        record["eval_tokens_each"] = result.report["ppl_before"][eval_corpus]["tokens"]
        record["params_after"] = result.report["params_after"]
        record["note"] = ("default preset, no copy of the model, evaluation before and after "
                          "included")


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="a model shape with random weights instead of the demo model")
    parser.add_argument("--random-weights", action="store_true",
                        help="required with --shape: the weights are random, no download")
    parser.add_argument("--device", default="auto", help="auto: CUDA if available, else CPU")
    parser.add_argument("--importance-samples", type=int, default=50)
    parser.add_argument("--importance-seq-len", type=int, default=128)
    parser.add_argument("--examples", type=int, default=10)
    parser.add_argument("--example-seq-len", type=int, default=64)
    parser.add_argument("--removal-batch-size", type=int, default=8,
                        help="windows per batch of removal importance (the library's default 8); "
                        "smaller batches interleave the two variants more finely")
    parser.add_argument("--eval-windows", type=int, help="default: 8 (demo), 32 (--shape)")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--calibration", help="pipeline calibration corpus; default demo, or "
                        "pydoc with --shape (read through a character tokenizer)")
    parser.add_argument("--matmul-size", type=int, help="default 8192 on GPU, 2048 on CPU")
    parser.add_argument("--skip", default="", help="comma-separated stage groups to skip: "
                        "importance,units,evaluate,alignment,recovery,pipeline,full")
    parser.add_argument("--full-eval-windows", type=int, default=560,
                        help="windows of the last stage's evaluation before and after (560 x 512 "
                        "= 287k tokens, about WikiText-2's test split under a Llama-3 tokenizer)")
    parser.add_argument("--dtype", help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.shape and not args.random_weights:
        parser.error("--shape builds a model with random weights: pass --random-weights")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    skip = set(filter(None, args.skip.split(",")))
    data = header(None if argv is None else ["benchmarks/speed.py", *argv])
    out = args.out or RESULTS_DIR / (f"speed_{device.type}.json" if not args.shape
                                     else f"speed_{'gpu' if device.type == 'cuda' else 'cpu'}_"
                                          f"{args.shape}.json")
    bench = Bench(device)
    data["stages"] = bench.stages
    bench.save = lambda: write_json(out, data)  # after every stage: a killed run keeps its part
    started = time.perf_counter()
    with bench.stage("matmul_peak") as record:
        record |= matmul_rate(device, dtype,
                              args.matmul_size or (8192 if device.type == "cuda" else 2048))
    bench.peak_tflops = bench.stages["matmul_peak"].get("tflops")
    if args.shape:
        from gqaprune_core.tiny import char_tokenizer

        with bench.stage("build_random_model"):
            model = build_random(args.shape, device, dtype)
        tokenizer, calibration_corpus = char_tokenizer(), args.calibration or "pydoc"
        vocab = model.config.vocab_size
        importance_ids = random_ids(vocab, args.importance_samples, args.importance_seq_len)
        unit_ids = random_ids(vocab, args.examples, args.example_seq_len, seed=1)
        windows = random_ids(vocab, args.eval_windows or 32, args.eval_seq_len, seed=2)
        inputs = (f"random token ids; the pipeline calibrates on {calibration_corpus} through a "
                  "character tokenizer")
    else:
        from gqaprune_core.data import calibration_batch, evaluation_windows
        from gqaprune_core.models import load_model

        load_model("demo", device=str(device), dtype=dtype)  # first load may convert GGUF; not timed
        with bench.stage("load_demo_model"):
            model, tokenizer = load_model("demo", device=str(device), dtype=dtype)
        calibration_corpus = args.calibration or "demo"
        importance_ids = calibration_batch(tokenizer, "demo", args.importance_samples,
                                           args.importance_seq_len)
        unit_ids = calibration_batch(tokenizer, "demo", args.examples, args.example_seq_len)
        windows = evaluation_windows(tokenizer, "demo", args.eval_seq_len, args.eval_windows or 8)
        inputs = "demo corpus: calibration part for scores, evaluation part for perplexity"
    data["model"] = {"name": args.shape or "demo", "params": count_parameters(model),
                     "dtype": str(dtype), "device": str(device), "layers": len(layout(model)),
                     "inputs": inputs}
    data["settings"] = {"importance": list(importance_ids.shape), "units": list(unit_ids.shape),
                        "evaluation": list(windows.shape), "calibration_corpus": calibration_corpus}
    warm_up(model, unit_ids[:2, :16])
    importance = None
    if "importance" not in skip:
        importance = importance_stages(bench, model, importance_ids.to(device),
                                       args.removal_batch_size)
    if "units" not in skip:
        if importance is None:  # the prune stages need rates; any scores will do for timing
            importance = LayerImportance("uniform", tuple([0.0] * len(layout(model))))
        unit_stages(bench, model, unit_ids, importance)
    if "evaluate" not in skip:
        evaluation_stage(bench, model, windows)
    if "alignment" not in skip:
        alignment_stages(bench, model, windows, skip=frozenset(skip))
    if "pipeline" not in skip:
        sample_sizes = {"importance_samples": args.importance_samples, "importance_seq_len":
                        args.importance_seq_len, "num_examples": args.examples,
                        "seq_len": args.example_seq_len}
        pipeline_stages(bench, model, tokenizer, calibration_corpus, sample_sizes)
    if "full" not in skip:  # cuts the model: last
        full_procedure_stage(bench, model, tokenizer, calibration_corpus, calibration_corpus,
                             args.full_eval_windows, args.eval_seq_len)
    data["wall_s"] = round(time.perf_counter() - started, 1)
    errors = [name for name, record in bench.stages.items() if "error" in record]
    data["errors"] = errors
    write_json(out, data)
    log(f"wrote {out}; failed stages: {errors or 'none'}")
    return data


if __name__ == "__main__":
    main()
