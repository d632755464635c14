"""Sensitivity profiles and the predictor on the demo model: cost, proxy accuracy, prediction.

    python benchmarks/sensitivity.py measure --threads 1                      # everything
    python benchmarks/sensitivity.py measure --steps proxy --out A.json       # proxy check only
    python benchmarks/sensitivity.py measure --steps schedules --only a,b --out B.json
    python benchmarks/sensitivity.py measure --merge A.json B.json            # table

Everything is fitted on the 70 % share of the calibration parts of news, pydoc and wiki (the
``sel-`` corpora of select_default.py) and validated on the other 30 % (and, unless
``--no-licenses``, the never-fitted license texts); evaluation parts are never used. Steps:
the anchored profile of the ``optimized`` config (timed; from the disk cache when present);
``proxy``: every grid point of ``--exact-layers`` measured exactly against the anchored proxy;
``schedules``: >= 10 varied schedules (strategies, ratios, attention on/off, the optimized
one) pruned, their predicted perplexity ratio against the one measured on the validation
windows; the heuristic (current default) and optimized rows are also the selection.
Results: ``benchmarks/results/sensitivity*.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from common import (RESULTS_DIR, Timer, header, log, read_json, self_text_settings,  # noqa: E402
                    set_threads, write_json)
from gqaprune_core.config import PRESETS  # noqa: E402
from gqaprune_core.sensitivity.profile import ProfileSettings  # noqa: E402


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else float("nan")


SEL_FIT = "sel-demo+sel-pydoc+sel-wiki"  # the 70 % fit share of the three calibration parts


def held_out_setup(args):
    """The demo model, the held-out validation windows (the 30 % of each calibration part that
    nothing is fitted on, and the never-fitted license texts), their dense perplexities, and
    the base configs fitted on the 70 % share."""
    from select_default import demo_and_held_out_windows
    from gqaprune_core.evaluate import perplexity

    model, tokenizer, windows = demo_and_held_out_windows(args.windows, 512)
    if args.no_licenses:
        windows.pop("sel-licenses", None)
    dense = {n: perplexity(model, w, corpus=n).value for n, w in windows.items()}
    heuristic = PRESETS["default"].with_(calibration_dataset=SEL_FIT, num_examples=args.examples,
                                         eval_datasets=())
    optimized = heuristic.with_(pruning_strategy="optimized", prune_attention=True,
                                max_pruning_rate=0.9)
    return model, tokenizer, windows, dense, heuristic, optimized


def exact_layers(model, tokenizer, config, layers: list[int]) -> dict:
    """Exact losses of every grid point of ``layers`` (the anchored profile's check)."""
    from gqaprune_core.models import decoder_layers, layout
    from gqaprune_core.sensitivity.grams import fit_grams
    from gqaprune_core.sensitivity.cuts import layer_cuts
    from gqaprune_core.sensitivity.profile import _saliency, held_out_pass, measure_cut
    from gqaprune_core.sensitivity.store import profile_windows

    settings = ProfileSettings.from_config(config)
    fit, ids = profile_windows(tokenizer, settings)
    saliency = _saliency(model, settings, fit)
    grams = list(fit_grams(model, fit))
    held = held_out_pass(model, ids)
    shapes = layout(model)
    out = {}
    for layer in layers:
        cuts = layer_cuts(shapes[layer], decoder_layers(model)[layer], grams[layer], held,
                          settings, saliency[layer])
        out[layer] = {f"{c.part}:{c.step}": measure_cut(model, held, c)[0] for c in cuts}
        log(f"exact layer {layer}: {out[layer]}")
    return out


def compare_proxy(profile, exact: dict) -> dict:
    pairs = []
    for layer, values in exact.items():
        for key, truth in values.items():
            if key in profile.measured[layer]:
                continue
            part, step = key.split(":")
            table = profile.mlp_loss if part == "mlp" else profile.group_loss
            pairs.append((table[layer][int(step)], truth))
    proxy, truth = [p for p, _ in pairs], [t for _, t in pairs]
    relative = sorted(abs(p - t) / max(abs(t), 1e-3) for p, t in pairs)
    return {"points": len(pairs), "spearman": round(spearman(proxy, truth), 4),
            "median_relative_error": round(relative[len(relative) // 2], 4),
            "p90_relative_error": round(relative[int(0.9 * len(relative))], 4),
            "sum_proxy": round(sum(proxy), 4), "sum_exact": round(sum(truth), 4)}


def schedules(heuristic, optimized) -> dict:
    """name -> config: >= 10 varied schedules (strategy, ratio, parts, alpha)."""
    out = {}
    for ratio in (0.1, 0.2, 0.3):
        out[f"heuristic@{ratio}"] = heuristic.with_(pruning_ratio=ratio)
        out[f"optimized@{ratio}"] = optimized.with_(pruning_ratio=ratio)
    out["optimized-mlp-only@0.2"] = optimized.with_(pruning_ratio=0.2, prune_attention=False)
    out["uniform@0.2"] = heuristic.with_(pruning_ratio=0.2, pruning_strategy="uniform")
    out["proportional@0.2"] = heuristic.with_(pruning_ratio=0.2, pruning_strategy="proportional")
    out["heuristic+groups@0.2"] = heuristic.with_(pruning_ratio=0.2, prune_attention=True,
                                                  group_rounding="across")
    out["inverse-alpha1@0.3"] = heuristic.with_(pruning_ratio=0.3, alpha=1.0)
    out["uniform@0.1"] = heuristic.with_(pruning_ratio=0.1, pruning_strategy="uniform")
    return out


def run_measure(args) -> dict:
    """Profile (timed), proxy check, then every schedule pruned and measured held out."""
    import time as _time

    from select_default import validate
    from gqaprune_core.pipeline import profile_for, run_pipeline
    from gqaprune_core.sensitivity.optimize import optimize_units
    from gqaprune_core.sensitivity.predict import predict_kept

    model, tokenizer, windows, dense, heuristic, optimized = held_out_setup(args)
    out = read_json(args.out) or (header() | {"results": {}})
    out["dense"] = dense
    with Timer() as clock:
        profile = profile_for(optimized, model, tokenizer, lambda stage, done, total: log(
            f"{stage} {done}/{total}") if done % 10 == 0 or done == total else None)
    out["profile"] = {"settings": ProfileSettings.from_config(optimized).to_dict(),
                      "computed_s": round(profile.seconds, 1), "fetch_s": round(clock.seconds, 1),
                      "base_ppl": round(profile.base_ppl, 3), "tokens": profile.tokens,
                      "mlp_loss": profile.mlp_loss, "group_loss": profile.group_loss}
    log(f"profile: {profile.seconds:.0f} s to compute")
    write_json(args.out, out)
    if args.exact_layers and "proxy" not in out and "proxy" in args.steps:
        layers = [int(x) for x in args.exact_layers.split(",")]
        with Timer() as clock:
            exact = exact_layers(model, tokenizer, optimized, layers)
        out["proxy"] = compare_proxy(profile, exact) | {"layers": layers,
                                                         "seconds": round(clock.seconds, 1),
                                                         "exact": exact}
        log(f"proxy: {out['proxy']}")
        write_json(args.out, out)
    for name, config in schedules(heuristic, optimized).items():
        if "schedules" not in args.steps:
            break
        if name in out["results"] or (args.only and name not in args.only.split(",")):
            continue
        with Timer() as clock:
            result = run_pipeline(config, model, tokenizer, evaluate=False, profile=profile)
        entry = {"predicted": result.report["predicted"], "prune_s": round(clock.seconds, 1),
                 "groups_kept": list(result.allocation.groups_to_keep),
                 "channels_kept": list(result.allocation.channels_to_keep),
                 "ratio_achieved_total": round(result.report["ratio_achieved_total"], 5),
                 "self_text": self_text_settings() if config.self_text_share else None,
                 **validate(result.model, windows, dense)}
        seen = [entry["ratio"][n] for n in ("sel-demo", "sel-pydoc", "sel-wiki")]
        entry["geo_mean_fitted_kinds"] = round(math.exp(sum(map(math.log, seen)) / 3), 4)
        out["results"][name] = entry
        write_json(args.out, out)
        log(f"{name}: predicted {entry['predicted']['ratio']:.3f} "
            f"[{entry['predicted']['low']:.3f}, {entry['predicted']['high']:.3f}], measured "
            f"{entry['geo_mean_fitted_kinds']:.3f} (all {entry['geo_mean']:.3f}) {entry['ratio']}")
        del result
    if len(out["results"]) >= 3:
        out["accuracy"] = accuracy(out["results"])
    start = _time.perf_counter()
    shapes_costs = _shapes_costs(model)
    for _ in range(20):
        predict_kept(profile, [3] * profile.layers, [1000] * profile.layers)
    out["predict_ms"] = round((_time.perf_counter() - start) / 20 * 1000, 3)
    with Timer() as clock:
        optimize_units(profile, *shapes_costs, 0.2 * sum(c.mlp + c.attention
                                                        for c in shapes_costs[1]),
                       range(profile.layers), channel_multiple=8)
    out["optimize_ms"] = round(clock.seconds * 1000, 1)
    write_json(args.out, out)
    return out


def _shapes_costs(model):
    from gqaprune_core.models import layout
    from gqaprune_core.schedule import unit_costs
    return layout(model), unit_costs(model)


def accuracy(results: dict) -> dict:
    """Predicted vs measured ratio (geo-mean over the three fitted kinds of text): the
    prediction as shipped (scaled by the probe's compounding factor, when the profile has one)
    and, under ``additive``, the plain sum of single-layer losses."""
    names = sorted(results)
    measured = [results[n]["geo_mean_fitted_kinds"] for n in names]

    def stats(predicted: list[float]) -> dict:
        relative = [abs(p - m) / m for p, m in zip(predicted, measured)]
        log_ratio = [math.log(m) / math.log(p) for p, m in zip(predicted, measured)
                     if p > 1.0001]
        return {"spearman": round(spearman(predicted, measured), 4),
                "mean_relative_error": round(sum(relative) / len(relative), 4),
                "max_relative_error": round(max(relative), 4),
                "measured_log_over_predicted_log": [round(x, 3) for x in log_ratio]}

    shipped = stats([results[n]["predicted"]["ratio"] for n in names])
    inside = sum(results[n]["predicted"]["low"] <= m <= results[n]["predicted"]["high"]
                 for n, m in zip(names, measured))
    out = {"schedules": len(names), **shipped, "inside_interval": inside}
    if all("additive" in results[n]["predicted"] for n in names):
        out["compounding"] = results[names[0]]["predicted"]["compounding"]
        out["additive"] = stats([math.exp(results[n]["predicted"]["additive"]) for n in names])
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("measure",))
    parser.add_argument("--windows", type=int, default=4, help="validation windows per corpus")
    parser.add_argument("--examples", type=int, default=32, help="calibration windows of a prune")
    parser.add_argument("--exact-layers", default="0,7,14,21,29",
                        help="layers measured exactly to check the anchored proxy")
    parser.add_argument("--only", help="comma-separated schedule names")
    parser.add_argument("--steps", default="proxy,schedules", help="proxy and/or schedules")
    parser.add_argument("--no-licenses", action="store_true",
                        help="validate on the three calibration kinds only")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="print the predicted-vs-measured table of these files and exit")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    args.out = args.out or RESULTS_DIR / f"sensitivity_{args.step}.json"
    if args.merge:
        print(merged_table(args.merge))
        return {}
    return run_measure(args)


def merged_table(paths: list[Path]) -> str:
    """Markdown: every schedule of ``paths``, predicted against measured, and the accuracy."""
    results = {}
    for path in paths:
        results |= read_json(path)["results"]
    rows = ["| schedule | groups kept | channels kept | predicted x dense [range] | measured: news "
            "| pydoc | wiki | geo-mean | prune s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in sorted(results.items(), key=lambda kv: kv[1]["geo_mean_fitted_kinds"]):
        p = e["predicted"]
        rows.append(f"| {name} | {sum(e['groups_kept'])} | {sum(e['channels_kept']):,} | "
                    f"{p['ratio']:.2f} [{p['low']:.2f}, {p['high']:.2f}] | "
                    f"{e['ratio']['sel-demo']:.2f} | {e['ratio']['sel-pydoc']:.2f} | "
                    f"{e['ratio']['sel-wiki']:.2f} | {e['geo_mean_fitted_kinds']:.2f} | "
                    f"{e['prune_s']:.0f} |")
    return "\n".join(rows) + f"\n\naccuracy: {accuracy(results)}"


if __name__ == "__main__":
    main()
