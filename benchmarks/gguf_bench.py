"""GGUF export of the demo model, dense and pruned: size, export time, llama.cpp perplexity and
speed (issue 13, "Measured").

For the dense demo model and the ``default`` preset at each ``--ratios`` (of ALL parameters):

- per out type: file size, export time (``write_gguf`` on the in-memory model), llama.cpp
  perplexity on the evaluation part of the ``demo`` corpus, next to PyTorch's on the same windows;
- llama.cpp prompt processing and generation speed (tokens/s) for ``--speed-outtypes``, the
  models measured alternately (dense, pruned 20 %, pruned 30 %, dense, ...) for ``--rounds``
  rounds in one process, so that load from other processes hits every model alike; the median
  is reported. Speed runs use llama.cpp's default f16 KV cache, as a user would; perplexity runs
  an f32 cache (see ``gqaprune_core.export.gguf_check``).

    python benchmarks/gguf_bench.py --threads 2 --out benchmarks/results/gguf.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import REPO_ROOT, RESULTS_DIR, header, set_threads, write_json
from gqaprune_core.config import PRESETS
from gqaprune_core.data import evaluation_windows
from gqaprune_core.evaluate import perplexity
from gqaprune_core.export.gguf import OUT_TYPES, write_gguf
from gqaprune_core.export.gguf_check import llama_perplexity, open_llama
from gqaprune_core.models import count_parameters, layout, load_model
from gqaprune_core.pipeline import run_pipeline

PROMPT = ("The city council met on Tuesday to discuss the new budget. Members argued about the "
          "cost of roads, schools and the hospital, and the mayor said that ") * 8


def build_models(ratios: list[float], workdir: Path) -> tuple[dict, object]:
    """{name: model} for dense and each ratio of the default preset, and the tokenizer.

    Pruned models are saved as checkpoints in ``workdir`` and reused by a later run (the
    pipeline is the slow part on a shared CPU); delete them to prune afresh.
    """
    from gqaprune_core.checkpoint import is_checkpoint, load_pruned, save_pruned

    dense, tokenizer = load_model("demo", device="cpu")
    models = {"dense": dense}
    for ratio in ratios:
        directory = workdir / f"default-{round(100 * ratio)}pct"
        if is_checkpoint(directory):
            models[f"default {ratio:.0%}"] = load_pruned(directory)[0]
            continue
        config = PRESETS["default"].with_(pruning_ratio=ratio, ratio_of="total", device="cpu")
        result = run_pipeline(config, dense, tokenizer, evaluate=False)
        save_pruned(result.model, tokenizer, result.plan, directory)
        models[f"default {ratio:.0%}"] = result.model
    return models, tokenizer


def describe(model) -> dict:
    shapes = layout(model)
    return {"parameters": count_parameters(model),
            "q_heads": [s.q_heads for s in shapes], "kv_heads": [s.kv_heads for s in shapes],
            "mlp": [s.mlp_width for s in shapes]}


def measure_exports(name: str, model, tokenizer, windows: torch.Tensor, outtypes: list[str],
                    keep: set[str], workdir: Path, threads: int) -> dict:
    """Export per out type; size, seconds, llama.cpp perplexity. Files in ``keep`` stay."""
    record = {"pytorch_ppl": perplexity(model, windows).value, "outtypes": {}}
    slug = name.replace(" ", "_").replace("%", "pct")
    for outtype in outtypes:
        result = write_gguf(model, tokenizer, workdir / f"{slug}-{outtype}.gguf", outtype,
                            overwrite=True, name=f"SmolLM2-135M {name}")
        ppl = llama_perplexity(result.path, windows.tolist(), threads=threads)
        record["outtypes"][outtype] = {"architecture": result.architecture,
                                       "size_bytes": result.size_bytes,
                                       "export_s": round(result.seconds, 2),
                                       "llama_cpp_ppl": ppl}
        print(f"{name:12s} {outtype:7s} {result.size_bytes / 2**20:7.1f} MiB "
              f"{result.seconds:6.1f} s  ppl llama.cpp {ppl:8.3f} (PyTorch "
              f"{record['pytorch_ppl']:.3f})", flush=True)
        if outtype not in keep:
            result.path.unlink()
    return record


def speed_once(path: Path, prompt_ids: list[int], new_tokens: int, threads: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one fresh llama.cpp context."""
    with open_llama(path, n_ctx=len(prompt_ids) + new_tokens + 8, threads=threads,
                    f32_cache=False) as llm:
        start = time.perf_counter()
        llm.eval(prompt_ids)
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        token = prompt_ids[-1]
        for _ in range(new_tokens):
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([token])
        generate_s = time.perf_counter() - start
    return len(prompt_ids) / prompt_s, new_tokens / generate_s


def measure_speed(files: dict[str, Path], prompt_ids: list[int], new_tokens: int, rounds: int,
                  threads: int) -> dict:
    """Median tokens/s per file, the files measured in turn, ``rounds`` times."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in files}
    for round_index in range(rounds):
        for name, path in files.items():
            samples[name].append(speed_once(path, prompt_ids, new_tokens, threads))
            print(f"round {round_index}: {name:24s} prompt {samples[name][-1][0]:7.1f} tok/s, "
                  f"generate {samples[name][-1][1]:6.1f} tok/s", flush=True)
    return {name: {"prompt_tokens_per_s": statistics.median(s[0] for s in runs),
                   "generate_tokens_per_s": statistics.median(s[1] for s in runs),
                   "samples": runs} for name, runs in samples.items()}


def markdown(results: dict) -> str:
    """The BENCHMARKS.md tables of a results file."""
    lines = ["| model | parameters | out type | arch | file MiB | export s | ppl llama.cpp | "
             "ppl PyTorch |", "|---|---|---|---|---|---|---|---|"]
    for name, model in results["models"].items():
        for outtype, row in model["outtypes"].items():
            lines.append(f"| {name} | {model['parameters']:,} | {outtype} | {row['architecture']} "
                         f"| {row['size_bytes'] / 2**20:.1f} | {row['export_s']:.1f} | "
                         f"{row['llama_cpp_ppl']:.3f} | {model['pytorch_ppl']:.3f} |")
    speed = results.get("speed")
    if speed:
        dense = {k.split(" ", 1)[1]: v for k, v in speed["models"].items() if k.startswith("dense")}
        lines += ["", "| model | prompt tok/s | generate tok/s | speed-up prompt / generate |",
                  "|---|---|---|---|"]
        for name, row in speed["models"].items():
            base = dense[name.rsplit(" ", 1)[1]]
            lines.append(f"| {name} | {row['prompt_tokens_per_s']:.1f} | "
                         f"{row['generate_tokens_per_s']:.1f} | "
                         f"{row['prompt_tokens_per_s'] / base['prompt_tokens_per_s']:.2f}x / "
                         f"{row['generate_tokens_per_s'] / base['generate_tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--outtypes", default=",".join(OUT_TYPES))
    parser.add_argument("--speed-outtypes", default="q8_0,q4_k_m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=str(REPO_ROOT / "cache" / "gguf_bench"))
    parser.add_argument("--out", default=str(RESULTS_DIR / "gguf.json"))
    parser.add_argument("--table", metavar="JSON", help="only print the tables of a results file")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    threads = set_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    outtypes, speed_types = args.outtypes.split(","), args.speed_outtypes.split(",")
    results = header() | {"settings": vars(args), "models": {}}
    models, tokenizer = build_models([float(r) for r in args.ratios.split(",")], workdir)
    windows = evaluation_windows(tokenizer, "demo", seq_len=args.seq_len, max_windows=args.windows)
    results["windows"] = {"corpus": "demo (evaluation part)", "count": windows.shape[0],
                          "seq_len": windows.shape[1],
                          "scored_tokens": windows.shape[0] * (windows.shape[1] - 1)}
    for name, model in models.items():
        results["models"][name] = describe(model) | measure_exports(
            name, model, tokenizer, windows, outtypes, set(speed_types), workdir, threads)
        write_json(args.out, results)
    prompt_ids = tokenizer(PROMPT)["input_ids"][: args.prompt_tokens]
    files = {f"{name} {kind}": workdir / f"{name.replace(' ', '_').replace('%', 'pct')}-{kind}.gguf"
             for kind in speed_types for name in models}
    results["speed"] = {"threads": threads, "prompt_tokens": len(prompt_ids),
                        "new_tokens": args.new_tokens, "rounds": args.rounds,
                        "kv_cache": "f16 (llama.cpp default)",
                        "models": measure_speed(files, prompt_ids, args.new_tokens, args.rounds,
                                                threads)}
    print("wrote", write_json(args.out, results))
    print(markdown(results))


if __name__ == "__main__":
    main()
