"""Perplexity after removing the same share of parameters with each pruning method.

    python benchmarks/quality.py                      # full grid: 10/20/30 %, every method
    python benchmarks/quality.py --ratios 0.2 --methods original,global_taylor
    python benchmarks/quality.py --quick              # < 5 min on 2 cores

Every method removes ``ratio`` of ALL the dense model's parameters (embeddings counted once) and
must land within 0.5 % of that parameter count; every model is scored on the same evaluation
windows. Results go to ``benchmarks/results/quality.json`` (raw, updated after every method, so
an interrupted run keeps what it finished; ``--resume`` skips finished entries) and a plot
``quality.png`` beside it. See BENCHMARKS.md for the method definitions and the numbers.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # runnable as a script from anywhere

import torch  # noqa: E402

from baselines import depth_prune_, global_taylor_plan  # noqa: E402
from common import (RESULTS_DIR, PeakRSS, Timer, default_preset, header, log, mib,  # noqa: E402
                    read_json, self_text_settings, set_threads, write_json)
from gqaprune_core.config import PRESETS, PruneConfig  # noqa: E402
from gqaprune_core.data import calibration_batch, evaluation_windows  # noqa: E402
from gqaprune_core.evaluate import perplexity  # noqa: E402
from gqaprune_core.layer_importance import LayerImportance, layer_importance  # noqa: E402
from gqaprune_core.models import count_parameters, layout, load_model  # noqa: E402
from gqaprune_core.pipeline import prunable_target, run_pipeline  # noqa: E402
from gqaprune_core.surgery import apply_plan_  # noqa: E402

METHODS = ("original", "default", "uniform_taylor", "global_taylor", "magnitude", "random",
           "activation", "depth", "naive-heads", "default-own-calibration", "default+lora",
           "default-own-calibration+lora", "default-own-calibration+full", "optimized",
           "optimized-own-calibration")
QUICK_METHODS = ("original", "default", "global_taylor", "naive-heads")
UNIFORM_UNIT_METHODS = {"uniform_taylor": "taylor", "magnitude": "magnitude", "random": "random",
                        "activation": "activation"}
TOLERANCE = 0.005  # achieved parameter count within 0.5 % of the target


def method_config(method: str, ratio: float, args) -> tuple[PruneConfig, list[str]]:
    """The pipeline configuration of a method at ``ratio`` of all parameters, and notes on any
    setting changed from its preset."""
    notes = []
    if method.startswith("default"):
        base, source = default_preset()
        notes.append(source)
    elif method.startswith("optimized"):  # units from the sensitivity profile (issue 16)
        base = PRESETS["optimized"]
        notes.append("PRESETS['optimized']")
    else:
        base = PRESETS["original"]
    # METHOD+RECOVERY: METHOD, then distillation by RECOVERY (lora or full)
    name, _, recovery = method.partition("+")
    # default-own-calibration: the preset's own calibration mix, not the benchmark's corpus
    own = name in ("default-own-calibration", "optimized-own-calibration")
    calibration = base.calibration_dataset if own else args.calibration
    config = base.with_(pruning_ratio=ratio, ratio_of="total", base_model=args.model,
                        calibration_dataset=calibration, seed=args.seed)
    if recovery:
        config = config.with_(recovery=recovery, recovery_steps=args.recovery_steps,
                              recovery_time_s=args.recovery_time, recovery_lr=args.recovery_lr)
        notes.append(f"{recovery} distillation, at most {args.recovery_steps} steps / "
                     f"{args.recovery_time} s on the calibration corpus")
    if method in UNIFORM_UNIT_METHODS:
        # Bounds do not shape uniform rates; (0, 0.9) only keeps the range check from refusing.
        # Groups rounded across layers: one group goes in most layers, as in LLM-Pruner-style
        # uniform head pruning (and the reference numbers in issue 7).
        config = config.with_(pruning_strategy="uniform", unit_importance=UNIFORM_UNIT_METHODS[method],
                              mode="one-shot", min_pruning_rate=0.0, max_pruning_rate=0.9,
                              group_rounding="across")
    elif method == "naive-heads":
        # Groups' worth of heads rounded across layers, so that most layers lose heads (with the
        # original's per-layer rounding no layer reaches one group's share at these budgets,
        # and naive-heads would cut no head at all).
        config = config.with_(unit_importance="naive-heads", group_rounding="across")
        if args.quick:  # the anti-example needs no sequential re-scoring to show the collapse
            config = config.with_(mode="one-shot")
            notes.append("--quick: one-shot unit scores instead of the original's sequential ones")
    overrides = {name: value for name, value in (
        ("importance_samples", args.importance_samples), ("importance_seq_len", args.importance_seq_len),
        ("num_examples", args.examples), ("seq_len", args.example_seq_len)) if value is not None}
    if overrides:
        config = config.with_(**overrides)
        notes.append(f"sample sizes overridden: {overrides}")
    return config, notes


def fit_rate_bounds(config: PruneConfig, model) -> tuple[PruneConfig, list[str]]:
    """Lower ``min_pruning_rate`` when the target (as a share of the prunable parameters) lies
    below it, which the schedule would refuse: 10 % of all parameters is 12.7 % of the demo
    model's attention+MLP parameters, under the original's 0.15."""
    target = prunable_target(config, model, range(len(layout(model))))
    if target >= config.min_pruning_rate:
        return config, []
    lowered = round(target / 2, 4)
    note = (f"min_pruning_rate lowered from {config.min_pruning_rate} to {lowered}: the target is "
            f"{target:.4f} of the prunable parameters, below the preset's minimum")
    return config.with_(min_pruning_rate=lowered), [note]


def cached_importance(model, tokenizer, method: str, config: PruneConfig
                      ) -> tuple[LayerImportance, dict]:
    """Layer importance through the library's disk cache, and its cost: ``compute_s`` is the
    time the scores took when computed (also on a cache hit), ``fetch_s`` the time spent here."""
    with Timer() as clock:
        importance = layer_importance(model, tokenizer, method, config.calibration_dataset,
                                      config.importance_samples, config.importance_seq_len,
                                      config.seed, model_id=config.base_model)
    return importance, {"method": method, "compute_s": round(importance.seconds, 2),
                        "fetch_s": round(clock.seconds, 2)}


def run_library_method(method: str, model, tokenizer, ratio: float, args) -> tuple:
    """Prune a copy with :func:`run_pipeline`. Returns ``(model, details, importance cost)``."""
    config, notes = method_config(method, ratio, args)
    config, more = fit_rate_bounds(config, model)
    importance, cost = cached_importance(model, tokenizer, config.importance_method, config)
    result = run_pipeline(config, model, tokenizer, importance=importance, copy_model=True,
                          evaluate=False)
    details = {"config": config.to_dict(), "notes": notes + more,
               "self_text": self_text_settings() if config.self_text_share else None,
               "layer_importance": importance.method,
               "groups_kept": list(result.allocation.groups_to_keep),
               "channels_kept": list(result.allocation.channels_to_keep),
               "pipeline_timings_s": result.report["timings_s"],
               "recovery": None if result.recovery is None else result.recovery.to_dict()}
    return result.model, details, cost


def run_global_taylor(model, tokenizer, ratio: float, args) -> tuple:
    config, notes = method_config("global_taylor", ratio, args)
    pruned = copy.deepcopy(model)
    calibration = calibration_batch(tokenizer, config.calibration_dataset, config.num_examples,
                                    config.seq_len, config.seed)
    plan = global_taylor_plan(pruned, calibration, round(ratio * count_parameters(model)),
                              config.seed)
    apply_plan_(pruned, plan)
    details = {"notes": notes + ["one-shot Taylor, one ranking of all units by score per parameter"],
               "samples": [config.num_examples, config.seq_len],
               "groups_kept": [lp.kv_heads for lp in plan.layers],
               "channels_kept": [lp.mlp for lp in plan.layers]}
    return pruned, details, None


def run_depth(model, tokenizer, ratio: float, args) -> tuple:
    config, notes = method_config("depth", ratio, args)
    importance, cost = cached_importance(model, tokenizer, "block_influence", config)
    pruned = copy.deepcopy(model)
    calibration = calibration_batch(tokenizer, config.calibration_dataset, config.num_examples,
                                    config.seq_len, config.seed)
    info = depth_prune_(pruned, importance.scores, calibration,
                        round(ratio * count_parameters(model)), config.seed)
    details = {"notes": notes + ["block influence 1-cos, layers removed once (ShortGPT), then "
                                 "uniform one-shot Taylor MLP channels for the rest"],
               "importance_samples": [config.importance_samples, config.importance_seq_len],
               **info}
    return pruned, details, cost


def prune(method: str, model, tokenizer, ratio: float, args) -> tuple:
    if method == "global_taylor":
        return run_global_taylor(model, tokenizer, ratio, args)
    if method == "depth":
        return run_depth(model, tokenizer, ratio, args)
    if method in METHODS:
        return run_library_method(method, model, tokenizer, ratio, args)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def evaluate(model, windows: dict[str, torch.Tensor]) -> dict:
    return {name: perplexity(model, w, corpus=name).to_dict() for name, w in windows.items()}


def measure(method: str, model, tokenizer, ratio: float, windows, dense: dict, args) -> dict:
    """Prune, check the parameter count, evaluate; one results entry."""
    dense_params = dense["params"]
    target = round((1 - ratio) * dense_params)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as memory, Timer(cuda) as clock:
        pruned, details, importance = prune(method, model, tokenizer, ratio, args)
    # Layer scores may come from the disk cache: count what computing them costs instead.
    total_s = clock.seconds if importance is None else (
        clock.seconds - importance["fetch_s"] + importance["compute_s"])
    params = count_parameters(pruned)
    entry = {"method": method, "ratio": ratio, "params_target": target, "params": params,
             "ratio_achieved": round((dense_params - params) / dense_params, 6),
             "params_off_target": round((params - target) / target, 6),
             "within_tolerance": abs(params - target) <= TOLERANCE * target,
             "prune_s": round(total_s, 2), "wall_s": round(clock.seconds, 2),
             "layer_importance": importance,
             "peak_rss_mib": mib(memory.peak), "rss_increase_mib": mib(memory.delta),
             "layers": len(layout(pruned)), "details": details}
    if cuda:
        entry["peak_gpu_mib"] = mib(torch.cuda.max_memory_allocated())
    if not entry["within_tolerance"]:
        log(f"{method} @ {ratio}: {params} parameters, {entry['params_off_target']:+.2%} off the "
            "target: not evaluated")
        return entry
    with Timer(cuda) as clock:
        entry["ppl"] = evaluate(pruned, windows)
    entry["eval_s"] = round(clock.seconds, 2)
    entry["ppl_ratio"] = {name: round(r["value"] / dense["ppl"][name]["value"], 4)
                          for name, r in entry["ppl"].items()}
    return entry


def settings(args, windows) -> dict:
    return {"model": args.model, "device": args.device, "dtype": args.dtype,
            "calibration": args.calibration, "seq_len": args.seq_len,
            "windows": {name: list(w.shape) for name, w in windows.items()},
            "importance_samples": args.importance_samples, "importance_seq_len":
            args.importance_seq_len, "examples": args.examples,
            "example_seq_len": args.example_seq_len, "seed": args.seed}


def plot(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = list(data["dense"]["ppl"])
    figure, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.5), squeeze=False)
    methods = [m for m in METHODS if any(e["method"] == m and "ppl" in e for e in data["results"])]
    for axis, corpus in zip(axes[0], corpora):
        for number, method in enumerate(methods):
            points = sorted((e["ratio"], e["ppl_ratio"][corpus]) for e in data["results"]
                            if e["method"] == method and corpus in e.get("ppl_ratio", {}))
            if not points:
                continue
            # 10 colours cycle: later methods get square markers and dotted lines
            axis.plot([100 * x for x, _ in points], [y for _, y in points],
                      marker="os"[number // 10 % 2], label=method,
                      linestyle="--" if method == "naive-heads" else "-:"[number // 10 % 2])
        dense = data["dense"]["ppl"][corpus]
        axis.set_yscale("log")
        axis.set_xticks(sorted({100 * e["ratio"] for e in data["results"]}))
        axis.set_xlabel("parameters removed (% of all)")
        axis.set_ylabel("perplexity / dense perplexity")
        axis.set_title(f"{corpus}: dense ppl {dense['value']:.1f}, {dense['windows']} x "
                       f"{dense['seq_len']} tokens")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    figure.suptitle(f"{data['settings']['model']}: perplexity after structured pruning")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def merged(paths: list[Path]) -> dict:
    """Result files merged (later files win on the same method and ratio): the first file's
    dense entry and settings, only evaluated entries, tagged with their file name."""
    entries, first = {}, None
    for path in paths:
        data = read_json(path)
        first = first or data
        for entry in data["results"]:
            if "ppl" in entry:
                entries[(entry["ratio"], entry["method"])] = entry | {"file": path.name}
    return first | {"results": list(entries.values())}


def table(paths: list[Path]) -> str:
    """A markdown table of every evaluated entry in ``paths`` (see :func:`merged`), sorted by
    budget, then by the geometric mean of the ratios over the corpora every entry has."""
    data = merged(paths)
    corpora = [c for c in data["dense"]["ppl"]
               if all(c in e["ppl_ratio"] for e in data["results"])]
    extra = sorted({c for e in data["results"] for c in e["ppl_ratio"]} - set(corpora))
    head = ["removed (of all)", "method", "params after",
            *[f"{c} ppl (x dense)" for c in corpora + extra], "geo-mean ratio", "prune s", "file"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def geo(entry):
        ratios = [entry["ppl_ratio"][c] for c in corpora]
        return math.exp(sum(map(math.log, ratios)) / len(ratios))

    def cell(entry, corpus):
        if corpus not in entry["ppl"]:
            return "-"
        return f"{entry['ppl'][corpus]['value']:,.2f} ({entry['ppl_ratio'][corpus]:,.2f})"

    for entry in sorted(data["results"], key=lambda e: (e["ratio"], geo(e))):
        cells = [f"{entry['ratio']:.0%}", entry["method"], f"{entry['params']:,}",
                 *[cell(entry, c) for c in corpora + extra], f"{geo(entry):,.2f}",
                 f"{entry['prune_s']:,.0f}", entry["file"]]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.1,0.2,0.3", help="shares of ALL parameters")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--windows", type=int, default=24, help="evaluation windows per corpus")
    parser.add_argument("--seq-len", type=int, default=512, help="evaluation window length")
    parser.add_argument("--corpora", default="demo,pydoc", help="evaluation corpora")
    parser.add_argument("--calibration", default="demo", help="calibration corpus")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; perplexities agree, "
                        "times and memory do not")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--importance-samples", type=int, help="override the presets' 50")
    parser.add_argument("--importance-seq-len", type=int, help="override the presets' 128")
    parser.add_argument("--examples", type=int, help="override the presets' 10")
    parser.add_argument("--example-seq-len", type=int, help="override the presets' 64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recovery-steps", type=int, default=40,
                        help="steps of the methods with recovery (NAME+lora, NAME+full)")
    parser.add_argument("--recovery-lr", type=float,
                        help="their learning rate (default: the recovery method's)")
    parser.add_argument("--recovery-time", type=float, default=900.0,
                        help="their time budget in seconds")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true",
                        help="20 %% only, 4 windows, 4 methods, 8 importance samples, "
                        "8 calibration windows, naive-heads one-shot")
    parser.add_argument("--resume", action="store_true", help="skip entries already in --out")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--table", nargs="+", type=Path, metavar="JSON",
                        help="print a markdown table of these result files and exit")
    parser.add_argument("--plot-from", nargs="+", type=Path, metavar="JSON",
                        help="plot these result files merged into --out's .png and exit")
    args = parser.parse_args(argv)
    if args.quick:
        explicit = set(argv if argv is not None else sys.argv[1:])
        args.ratios = "0.2" if "--ratios" not in explicit else args.ratios
        args.methods = ",".join(QUICK_METHODS) if "--methods" not in explicit else args.methods
        args.windows = 4 if "--windows" not in explicit else args.windows
        # The removal scan and the original's sequential Taylor scores grow with these sizes:
        # at 16 each the quick run took 6.6 minutes on 2 cores, at 8 about 4.
        args.importance_samples = args.importance_samples or 8
        args.examples = args.examples or 8
    if args.out is None:
        args.out = RESULTS_DIR / ("quality_quick.json" if args.quick else "quality.json")
    args.ratio_list = [float(r) for r in args.ratios.split(",")]
    args.method_list = args.methods.split(",")
    unknown = set(args.method_list) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.table:
        print(table(args.table))
        return {}
    if args.plot_from:
        print(plot(merged(args.plot_from), args.out.with_suffix(".png")))
        return {}
    set_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    windows = {name: evaluation_windows(tokenizer, name, args.seq_len, args.windows)
               for name in args.corpora.split(",")}
    run_settings = settings(args, windows)
    previous = read_json(args.out) if args.resume else None
    if previous is not None:  # files from before --device/--dtype existed ran on CPU, fp32
        previous["settings"] = {"device": "cpu", "dtype": "float32"} | previous["settings"]
    if previous is not None and previous["settings"] != run_settings:
        log(f"--resume: {args.out} was made with other settings; starting afresh")
        previous = None
    data = header(None if argv is None else ["benchmarks/quality.py", *argv])
    data |= {"settings": run_settings, "tolerance": TOLERANCE,
             "default_preset": default_preset()[1]}
    if previous is not None:
        data["dense"], data["results"] = previous["dense"], previous["results"]
        data["resumed_from"] = previous.get("date")
    else:
        with Timer(args.device.startswith("cuda")) as clock:
            dense_ppl = evaluate(model, windows)
        data["dense"] = {"params": count_parameters(model), "ppl": dense_ppl,
                         "eval_s": round(clock.seconds, 2)}
        data["results"] = []
        log("dense: " + ", ".join(f"{n} {r['value']:.2f}" for n, r in dense_ppl.items()))
    write_json(args.out, data)
    done = {(e["method"], e["ratio"]) for e in data["results"]}
    failures = []
    for ratio in args.ratio_list:
        for method in args.method_list:
            if (method, ratio) in done:
                continue
            entry = measure(method, model, tokenizer, ratio, windows, data["dense"], args)
            data["results"].append(entry)
            write_json(args.out, data)
            if not entry["within_tolerance"]:
                failures.append(f"{method}@{ratio}")
                continue
            log(f"{method} @ {ratio:.0%}: " + ", ".join(
                f"{n} {r['value']:.2f} (x{entry['ppl_ratio'][n]:.2f})" for n, r in entry["ppl"].items())
                + f"; params {entry['params']:,}; prune {entry['prune_s']} s")
    data["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out, data)
    if not args.no_plot:
        plot(data, args.out.with_suffix(".png"))
    if failures:
        raise SystemExit(f"outside the {TOLERANCE:.1%} parameter tolerance: {', '.join(failures)}")
    return data


if __name__ == "__main__":
    main()
