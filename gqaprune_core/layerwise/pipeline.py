"""The layer-wise run: the in-memory pipeline's stages, one decoder layer at a time.

    open (skeleton + embeddings + head) → layer scores (pass 1 over the layers) → rates → units
      → [perplexity before, streamed] → cut + re-fit each layer, written into output shards
      (pass 2) → [perplexity after, streamed from the output] → report

Memory at any time: the embedding and LM head, one decoder layer (the shard writer puts each
tensor on disk as it comes), the calibration hidden states (on CPU, one batch on the device at
a time) and the Gram matrix of one MLP with its re-fit. Same plan and, up to float rounding,
same weights as :func:`gqaprune_core.pipeline.run_pipeline` for the settings that stream
(:func:`check_streamable`).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import torch
from torch import nn

from gqaprune_core.config import PruneConfig
from gqaprune_core.data import calibration_batch
from gqaprune_core.export.shards import DEFAULT_MAX_SHARD_BYTES
from gqaprune_core.layer_importance import LayerImportance
from gqaprune_core.layerwise.evaluate import streamed_corpora
from gqaprune_core.layerwise.fisher import streamable_selection, streamed_fisher
from gqaprune_core.layerwise.importance import streamed_importance
from gqaprune_core.layerwise.output import write_checkpoint
from gqaprune_core.layerwise.prune import LAYER_LOCAL_UNIT_METHODS, LayerCut, prune_layer_
from gqaprune_core.layerwise.source import (ModelSource, load_tokenizer, meta_skeleton,
                                            open_model, open_source)
from gqaprune_core.layerwise.stream import LayerStep, OnStep, embed, layers_in_turn
from gqaprune_core.models import count_parameters, layout, pick_device, pick_dtype
from gqaprune_core.pipeline import PipelineResult, Progress, build_report, plan_units
from gqaprune_core.plan import PruningPlan
from gqaprune_core.schedule import UnitAllocation

MEMORY_MARGIN = 1.3  # in memory: weights x this + MEMORY_RESERVE must fit the free memory
MEMORY_RESERVE = 2 * 2**30  # activations, the LM head's logits, the allocator's slack


REAL_TEXT_ONLY = ("real calibration text only: windows the model writes itself need the whole "
                  "model in memory for every token (--self_text_share applies in memory)")


def check_streamable(config: PruneConfig) -> None:
    """Raise ``ValueError`` saying why and what to use if ``config`` cannot run layer-wise."""
    scored_by_units = config.prune_attention or (config.prune_mlp and not config.compensate)
    if scored_by_units and config.unit_importance not in LAYER_LOCAL_UNIT_METHODS:
        why = ("Taylor scores need gradients through the whole model"
               if config.unit_importance in ("taylor", "naive-heads")
               else f"{config.unit_importance!r} scores are not implemented layer by layer")
        raise ValueError(
            f"unit_importance={config.unit_importance!r} cannot run layer-wise: {why}. Use "
            "--unit_importance magnitude (or random), or the 'default' preset (MLP channels by "
            "output energy with re-fit), or --layerwise off to prune in memory")
    if config.recovery != "none":
        raise ValueError(f"recovery={config.recovery!r} trains the whole model against the dense "
                         "one and cannot run layer-wise; use --recovery none, or --layerwise off")
    if config.pruning_strategy == "optimized":
        raise ValueError("pruning_strategy='optimized' plans from the sensitivity profile, "
                         "which runs the whole model in memory, and cannot run layer-wise; use "
                         "--pruning_strategy inverse (the 'default' preset's), or --layerwise off")
    if config.max_ppl_increase is not None:
        raise ValueError(f"max_ppl_increase={config.max_ppl_increase} (the quality gate) prunes "
                         "and measures whole copies of the model in memory and cannot run "
                         "layer-wise; leave out --max_ppl_increase, or use --layerwise off")


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (CUDA: the driver's count; CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def needs_layerwise(model_bytes: int, free_bytes: int) -> bool:
    """True when ``model_bytes`` of weights would not fit ``free_bytes`` with margin."""
    return model_bytes * MEMORY_MARGIN + MEMORY_RESERVE > free_bytes


def use_layerwise(config: PruneConfig, device: torch.device | None = None) -> bool:
    """Whether to run layer-wise: ``on``/``off`` as said; ``auto`` when the model would not fit
    the device (and the settings stream; a source that cannot stream, such as a GGUF file or
    ``tiny``, runs in memory)."""
    if config.layerwise != "auto":
        return config.layerwise == "on"
    from gqaprune_core.models import ModelLoadError

    try:
        check_streamable(config)
        source = open_source(config.base_model)
    except ValueError:  # ModelLoadError included: not streamable, so in memory it is
        return False
    target = device or pick_device(config.device)
    try:
        return needs_layerwise(source.compute_bytes(pick_dtype(target, config.dtype)),
                               free_memory(target))
    except ModelLoadError:
        return False
    finally:
        source.close()


def _progress_steps(progress: Progress | None, on_step: OnStep | None,
                    record: list[LayerStep]) -> OnStep:
    def step(event: LayerStep) -> None:
        record.append(event)
        if on_step is not None:
            on_step(event)
        if progress is not None:
            progress(event.stage, event.index + 1, event.total)
    return step


def _cut_settings(config: PruneConfig, allocation: UnitAllocation, index: int) -> LayerCut:
    return LayerCut(allocation.groups_to_keep[index], allocation.channels_to_keep[index],
                    config.unit_importance, config.compensate, config.refit_ridge,
                    config.refit_feedback, config.seed, config.channel_selection)


def _fisher_scores(config: PruneConfig, model: nn.Module, source: ModelSource,
                   allocation: UnitAllocation, calibration: torch.Tensor, device: torch.device,
                   dtype: torch.dtype, batch_size: int, step: OnStep, spill: Path | None
                   ) -> dict:
    """Per layer, Fisher channel scores when ``config`` chooses channels by them and some
    layer's MLP is cut with re-fit (two more passes over the layers); else empty. With
    ``spill``, the pass keeps its hidden states in a temporary folder under it (removed
    after)."""
    shapes = layout(model)
    cuts = [_cut_settings(config, allocation, i) for i in range(len(shapes))]
    if (config.channel_selection == "energy" or not config.compensate
            or all(c.channels >= s.mlp_width for c, s in zip(cuts, shapes))):
        return {}
    if spill is None:
        return streamed_fisher(model, source, shapes, cuts, calibration, device, dtype,
                               batch_size, step)
    spill.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gqaprune-fisher-", dir=spill) as folder:
        return streamed_fisher(model, source, shapes, cuts, calibration, device, dtype,
                               batch_size, step, spill=Path(folder))


def _pruned_tensors(model: nn.Module, source: ModelSource, config: PruneConfig,
                    allocation: UnitAllocation, calibration: torch.Tensor, plans: list,
                    device: torch.device, dtype: torch.dtype, batch_size: int,
                    step: OnStep, spill: Path | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Embedding, each cut layer's tensors as it is done, final norm, untied head."""
    fisher = _fisher_scores(config, model, source, allocation, calibration, device, dtype,
                            batch_size, step, spill)
    shapes = layout(model)
    batches = embed(model, calibration, batch_size, device)
    dense = list(batches.hidden) if config.refit_feedback else None
    inner = model.model
    yield "model.embed_tokens.weight", inner.embed_tokens.weight.detach()
    for index, layer in layers_in_turn(model, source, device, dtype, "prune", step):
        plans.append(prune_layer_(layer, shapes[index], _cut_settings(config, allocation, index),
                                  batches, dense, fisher.pop(index, None)))
        for name, tensor in layer.state_dict().items():
            yield f"model.layers.{index}.{name}", tensor.detach().to("cpu")
    for name, tensor in inner.norm.state_dict().items():
        yield f"model.norm.{name}", tensor.detach()
    head = model.get_output_embeddings()
    if head.weight is not inner.embed_tokens.weight:
        yield "lm_head.weight", head.weight.detach()


def _importance(config: PruneConfig, model: nn.Module, source: ModelSource, tokenizer,
                device: torch.device, dtype: torch.dtype, step: OnStep) -> LayerImportance:
    calibration = calibration_batch(tokenizer, config.calibration_dataset,
                                    config.importance_samples, config.importance_seq_len,
                                    config.seed)
    inputs = {"model_id": config.base_model, "weights": f"layerwise:{source.path}",
              "corpus": config.calibration_dataset, "samples": config.importance_samples,
              "seq_len": config.importance_seq_len, "seed": config.seed,
              "method": config.importance_method}
    return streamed_importance(model, source, calibration, config.importance_method, device,
                               dtype, batch_size=32 if device.type == "cuda" else 8,
                               on_step=step, inputs=inputs)


def _evaluate(config: PruneConfig, model: nn.Module, source: ModelSource, tokenizer,
              device: torch.device, dtype: torch.dtype, stage: str, step: OnStep,
              timings: dict) -> list:
    """Streamed perplexity on every evaluation corpus, timed into ``timings[stage]``."""
    start = time.perf_counter()
    results = streamed_corpora(model, source, tokenizer, config.eval_datasets, device, dtype,
                            seq_len=config.eval_seq_len, max_windows=config.max_eval_windows,
                            batch_size=max(1, 16384 // config.eval_seq_len)
                            if device.type == "cuda" else 4, on_step=step, stage=stage)
    timings[stage] = round(time.perf_counter() - start, 3)
    return results


def run_layerwise(config: PruneConfig, output: str | os.PathLike, *,
                  importance: LayerImportance | None = None, evaluate: bool = True,
                  overwrite: bool = False, progress: Progress | None = None,
                  on_step: OnStep | None = None, batch_size: int = 8,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> PipelineResult:
    """Prune ``config.base_model`` from its weights on disk into the checkpoint ``output``.

    Args:
        importance: layer scores to reuse (else one streamed pass computes them).
        batch_size: calibration windows per device batch in the cut pass.
        max_shard_bytes: the most tensor bytes per output file (memory does not depend on it).
        on_step: gets a :class:`LayerStep` (index, seconds, memory) after every layer of every
            stage; ``progress(stage, done, total)`` counts layers.

    Returns:
        A :class:`PipelineResult` whose ``model`` is the pruned skeleton (layers on the meta
        device: shapes and parameter counts are right, the weights are in ``output``).
        ``report["layerwise"]`` holds the output directory and per-layer seconds and memory.

    Raises:
        ValueError: settings that do not stream (:func:`check_streamable`), a source that
            cannot be read lazily, an ``output`` that exists (without ``overwrite``).
    """
    check_streamable(config)
    timings: dict[str, float] = {}
    steps: list[LayerStep] = []
    step = _progress_steps(progress, on_step, steps)
    evaluate = evaluate and bool(config.eval_datasets)
    device = pick_device(config.device)
    dtype = pick_dtype(device, config.dtype)
    start = time.perf_counter()
    with closing(open_source(config.base_model)) as source:
        config, substituted, spill = streamable_selection(
            config, source, dtype, Path(output).resolve().parent, free_memory(torch.device("cpu")))
        real_only = config.self_text_share > 0
        if real_only:  # writing text runs the whole model for every token
            config = config.with_(self_text_share=0.0)
        tokenizer = load_tokenizer(source)
        model = open_model(source, device, dtype)
        timings["load"] = round(time.perf_counter() - start, 3)
        torch.manual_seed(config.seed)
        params_before = count_parameters(model)
        if importance is None:
            start = time.perf_counter()
            importance = _importance(config, model, source, tokenizer, device, dtype, step)
            timings["importance"] = round(time.perf_counter() - start, 3)
        if len(importance.scores) != source.num_layers:
            raise ValueError(f"layer importance has {len(importance.scores)} scores, model has "
                             f"{source.num_layers} layers")
        rates, allocation = plan_units(config, model, importance)
        ppl_before = (_evaluate(config, model, source, tokenizer, device, dtype,
                                "evaluate_before", step, timings) if evaluate else [])
        start = time.perf_counter()
        plan = _write_pruned(config, model, source, tokenizer, allocation, output, device,
                             dtype, batch_size, step, overwrite, max_shard_bytes, spill)
        timings["prune"] = round(time.perf_counter() - start, 3)
    del model  # the source's embedding and head
    pruned = open_source(output)
    try:  # the embedding and head are loaded only to evaluate
        pruned_model = open_model(pruned, device, dtype) if evaluate else meta_skeleton(pruned)
        ppl_after = (_evaluate(config, pruned_model, pruned, tokenizer, device, dtype,
                               "evaluate_after", step, timings) if evaluate else [])
    finally:
        pruned.close()
    report = build_report(config, pruned_model, params_before, plan, rates, allocation,
                          ppl_before, ppl_after, timings)
    report["layerwise"] = layerwise_summary(Path(output), steps, device)
    if substituted:
        report["layerwise"]["channel_selection"] = substituted
    if real_only:
        report["layerwise"]["self_text"] = REAL_TEXT_ONLY
    return PipelineResult(pruned_model, tokenizer, plan, importance, rates, allocation, report,
                          ppl_before, ppl_after, ppl_after)


def _write_pruned(config: PruneConfig, model: nn.Module, source: ModelSource, tokenizer,
                  allocation: UnitAllocation, output, device: torch.device, dtype: torch.dtype,
                  batch_size: int, step: OnStep, overwrite: bool, max_shard_bytes: int,
                  spill: Path | None = None) -> PruningPlan:
    """Pass 2: cut every layer and stream it into the checkpoint ``output``; returns the plan.
    ``spill``: where the Fisher pass keeps its hidden states (None: host memory)."""
    calibration = calibration_batch(tokenizer, config.calibration_dataset, config.num_examples,
                                    config.seq_len, config.seed)
    plans: list = []
    notes = {"mode": config.mode}

    def finish() -> PruningPlan:
        return PruningPlan(tuple(plans), config.unit_importance, notes)

    tensors = _pruned_tensors(model, source, config, allocation, calibration, plans, device,
                              dtype, batch_size, step, spill)
    write_checkpoint(output, tensors, source.config, finish, tokenizer,
                     _generation_config(source.path), architecture=type(model).__name__,
                     overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    return finish()


def _generation_config(path: Path):
    if not (path / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(path)


def layerwise_summary(output: Path, steps: list[LayerStep], device: torch.device) -> dict:
    """Per stage: layers, mean and max seconds per layer, peak memory; and the output path."""
    stages: dict[str, dict] = {}
    for event in steps:
        entry = stages.setdefault(event.stage, {"layers": 0, "seconds": []})
        entry["layers"] += 1
        entry["seconds"].append(event.seconds)
    summary = {name: {"layers": e["layers"],
                      "seconds_per_layer_mean": round(sum(e["seconds"]) / len(e["seconds"]), 3),
                      "seconds_per_layer_max": round(max(e["seconds"]), 3)}
               for name, e in stages.items()}
    peak = max((event.peak_bytes for event in steps), default=0)
    return {"output": str(output.resolve()), "device": str(device), "peak_memory_bytes": peak,
            "stages": summary}


def decide_layerwise(config: PruneConfig) -> bool:
    """``config.layerwise``: ``"on"`` (settings that cannot stream are refused with the reason),
    ``"off"``, or ``"auto"`` (layer-wise when the weights would not fit the device; with a
    device map, when accelerate would offload weights, see :func:`dispatch_would_offload`).

    Raises:
        ValueError: ``"on"`` with settings that cannot stream, or together with a device map.
    """
    if config.layerwise == "on":
        check_streamable(config)
        if config.device_map is not None:
            raise ValueError("--layerwise on brings one layer at a time onto --device; "
                             "--device_map is for in-memory runs (use one or the other)")
    if config.device_map is None:
        return use_layerwise(config)
    return config.layerwise == "auto" and dispatch_would_offload(config)


def dispatch_would_offload(config: PruneConfig) -> bool:
    """Whether accelerate's ``device_map="auto"`` within ``config.max_memory`` would offload
    weights (to disk, or to CPU beside GPUs): gqaprune cuts weights in place, which offloaded
    weights do not allow, so ``--layerwise auto`` streams the model instead. False for
    settings or sources that cannot stream (the in-memory load then says what is wrong)."""
    from accelerate import infer_auto_device_map

    from gqaprune_core.models import parse_max_memory

    try:
        check_streamable(config)
        source = open_source(config.base_model)
    except ValueError:  # ModelLoadError included
        return False
    try:
        skeleton = meta_skeleton(source)
    finally:
        source.close()
    places = set(infer_auto_device_map(
        skeleton, max_memory=parse_max_memory(config.max_memory),
        no_split_module_classes=skeleton._no_split_modules,
        dtype=pick_dtype(pick_device(config.device), config.dtype)).values())
    on_gpu = any(not isinstance(place, str) or place.startswith("cuda") for place in places)
    return "disk" in places or (on_gpu and "cpu" in places)
