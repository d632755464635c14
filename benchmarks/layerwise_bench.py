"""Peak memory and wall time: layer-wise pruning against in-memory, on a random Llama shape.

    python benchmarks/layerwise_bench.py                        # CPU: ~1.5 B, both paths
    python benchmarks/layerwise_bench.py --shape llama3-8b --device cuda --paths layerwise
    python benchmarks/layerwise_bench.py --shape llama-70b --layers 4 --device cuda \\
        --paths layerwise                                       # a few layers, extrapolated
    python benchmarks/layerwise_bench.py --shape llama3-8b --device cuda --paths sensitivity

A random model of the shape (weights N(0, 0.02), norms 1) is written once as sharded
safetensors (bf16 by default, 1 GB shards) under ``--workdir``, with the character tokenizer of
the tests (ids < 97, valid in any vocabulary). Each path then runs the ``default`` preset in a
subprocess of its own, so that peak RSS (``ru_maxrss``) belongs to that path alone: in memory
(load the whole model in fp32 on CPU / bf16 on GPU, prune, ``save_pruned``) and layer-wise
(:func:`gqaprune_core.layerwise.pipeline.run_layerwise`, which writes the checkpoint itself).
``--paths sensitivity`` times the sensitivity profile of the ``optimized`` preset's settings
on the whole model in memory (no disk cache; peak memory too). Calibration is small
(``--windows`` x ``--seq-len`` tokens, no evaluation) so the run takes minutes; the numbers are
memory and time, not quality. With ``--layers`` below the shape's, per-layer seconds are
extrapolated to the shape's layer count and stated as such.

Writes ``benchmarks/results/layerwise_<device>_<shape>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # runnable as a script from anywhere

import torch  # noqa: E402

from common import RESULTS_DIR, header, log, write_json  # noqa: E402

SHAPES = {
    # Llama-3.2-1B's widths with untied embeddings: 1.50 B parameters
    "llama-1.5b": {"num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
                   "vocab_size": 128256},
    "llama3-8b": {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
                  "vocab_size": 128256},
    "llama-70b": {"num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
                  "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 28672,
                  "vocab_size": 128256},
    "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
             "vocab_size": 256},
}


def make_model(folder: Path, shape: str, layers: int | None, dtype: torch.dtype,
               seed: int = 0, device: str = "cpu") -> Path:
    """Write a random model of ``shape`` (``layers`` of them) as shards into ``folder``, once
    (random numbers drawn on ``device``: a GPU draws 8 B of them in seconds)."""
    from transformers import LlamaConfig

    from gqaprune_core.export.shards import ShardWriter
    from gqaprune_core.tiny import char_tokenizer

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    settings = dict(SHAPES[shape], num_hidden_layers=layers or SHAPES[shape]["num_hidden_layers"])
    config = LlamaConfig(**settings, tie_word_embeddings=False, rope_theta=500000.0,
                         max_position_embeddings=8192, bos_token_id=None, eos_token_id=1,
                         pad_token_id=1)
    config.dtype = dtype
    generator = torch.Generator(device).manual_seed(seed)
    hidden, width = config.hidden_size, config.intermediate_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim

    def random(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator, device=device) * 0.02).to("cpu", dtype)

    with ShardWriter(folder, max_shard_bytes=10**9) as writer:
        writer.add("model.embed_tokens.weight", random(config.vocab_size, hidden))
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}."
            for name, size in (("self_attn.q_proj", (q_rows, hidden)),
                               ("self_attn.k_proj", (kv_rows, hidden)),
                               ("self_attn.v_proj", (kv_rows, hidden)),
                               ("self_attn.o_proj", (hidden, q_rows)),
                               ("mlp.gate_proj", (width, hidden)), ("mlp.up_proj", (width, hidden)),
                               ("mlp.down_proj", (hidden, width))):
                writer.add(f"{prefix}{name}.weight", random(*size))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                writer.add(f"{prefix}{norm}.weight", torch.ones(hidden, dtype=dtype))
        writer.add("model.norm.weight", torch.ones(hidden, dtype=dtype))
        writer.add("lm_head.weight", random(config.vocab_size, hidden))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def child(path: str, output: str, kind: str, device: str, windows: int, seq_len: int,
          calibration: str = "demo") -> dict:
    """One path's run in this process; returns its measurements."""
    from gqaprune_core.config import PRESETS

    config = PRESETS["default"].with_(
        base_model=path, device=device, importance_samples=windows, importance_seq_len=seq_len,
        num_examples=windows, seq_len=seq_len, calibration_dataset=calibration, eval_datasets=())
    cuda = device.startswith("cuda")
    start = time.perf_counter()
    if kind == "sensitivity":
        return _profile_child(path, config, device, start)
    if kind == "memory":
        from gqaprune_core.checkpoint import save_pruned
        from gqaprune_core.pipeline import run_pipeline

        result = run_pipeline(config, evaluate=False)
        save_pruned(result.model, result.tokenizer, result.plan, output)
        steps = None
    else:
        from gqaprune_core.layerwise.pipeline import run_layerwise

        result = run_layerwise(config, output, evaluate=False)
        steps = result.report["layerwise"]
    if cuda:
        torch.cuda.synchronize()
    return {"path": kind, "wall_s": round(time.perf_counter() - start, 2),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "timings_s": result.report["timings_s"], "params_before": result.report[
                "params_before"], "params_after": result.report["params_after"],
            "layerwise": steps}


def _profile_child(path: str, config, device: str, start: float) -> dict:
    """The sensitivity profile of the ``optimized`` preset's settings on the whole model in
    memory (issue 16's cost on a GPU): seconds, peak memory, no disk cache."""
    from gqaprune_core.config import PRESETS
    from gqaprune_core.models import load_model
    from gqaprune_core.sensitivity.profile import ProfileSettings
    from gqaprune_core.sensitivity.store import sensitivity_profile

    model, tokenizer = load_model(path, device=device)
    loaded = time.perf_counter()
    settings = ProfileSettings.from_config(PRESETS["optimized"].with_(
        calibration_dataset=config.calibration_dataset, seq_len=config.seq_len))
    profile = sensitivity_profile(model, tokenizer, settings, path, use_cache=False)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    return {"path": "sensitivity", "wall_s": round(time.perf_counter() - start, 2),
            "load_s": round(loaded - start, 2), "profile_s": round(profile.seconds, 2),
            "settings": settings.to_dict(), "base_ppl": profile.base_ppl,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "measured_points": sum(len(row) for row in profile.measured)}


def _run_child(args: argparse.Namespace, model: Path, kind: str) -> dict:
    output = Path(args.workdir) / f"out-{args.shape}-{kind}"
    subprocess.run(["rm", "-rf", str(output)], check=True)
    command = [sys.executable, __file__, "--child", kind, "--model", str(model), "--output",
               str(output), "--device", args.device, "--windows", str(args.windows),
               "--seq-len", str(args.seq_len), "--calibration", args.calibration]
    log(f"{kind}: {' '.join(command)}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        log(f"{kind} failed:\n{done.stderr[-3000:]}")
        return {"path": kind, "error": done.stderr[-3000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", str(output)], check=True)
    cuda = result.get("peak_cuda_bytes")
    log(f"{kind}: {result['wall_s']} s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB"
        + (f", peak CUDA {cuda / 2**30:.2f} GiB" if cuda else ""))
    return result


def _extrapolate(result: dict, layers: int, full: int) -> dict | None:
    """Seconds for ``full`` layers from the per-layer means of a run over ``layers``."""
    stages = (result.get("layerwise") or {}).get("stages")
    if not stages or layers == full:
        return None
    per_layer = sum(s["seconds_per_layer_mean"] for s in stages.values())
    fixed = result["wall_s"] - per_layer * layers
    return {"layers_run": layers, "layers_extrapolated_to": full,
            "seconds_per_layer_all_passes": round(per_layer, 3),
            "estimated_wall_s": round(fixed + per_layer * full, 1),
            "note": "extrapolated: measured per-layer means x layers + the measured rest"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1.5b")
    parser.add_argument("--layers", type=int, help="decoder layers to build (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paths", default="memory,layerwise",
                        help="comma-separated: memory, layerwise, sensitivity (the profile of "
                             "the optimized preset, in memory)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration", default="demo",
                        help="calibration corpus (pydoc needs nothing beyond the stdlib)")
    parser.add_argument("--disk-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp") + "/gqaprune-lw")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out")
    parser.add_argument("--child", choices=("memory", "layerwise", "sensitivity"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.output, args.child, args.device, args.windows,
                               args.seq_len, args.calibration)))
        return
    full = SHAPES[args.shape]["num_hidden_layers"]
    layers = args.layers or full
    start = time.perf_counter()
    folder = Path(args.workdir) / f"{args.shape}-{layers}"
    model = make_model(folder, args.shape, layers, getattr(torch, args.disk_dtype),
                       device="cuda" if args.device.startswith("cuda") else "cpu")
    log(f"model at {model} ({time.perf_counter() - start:.0f} s)")
    runs = [_run_child(args, model, kind) for kind in args.paths.split(",")]
    for run in runs:
        if "error" not in run:
            run["extrapolation"] = _extrapolate(run, layers, full)
    results = header() | {
        "shape": args.shape, "layers": layers, "disk_dtype": args.disk_dtype,
        "device": args.device, "windows": args.windows, "seq_len": args.seq_len,
        "calibration": args.calibration,
        "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "weights_bytes_on_disk": sum(p.stat().st_size for p in model.glob("*.safetensors")),
        "runs": runs}
    out = args.out or RESULTS_DIR / f"layerwise_{args.device.split(':')[0]}_{args.shape}.json"
    write_json(out, results)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
