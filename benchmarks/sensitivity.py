"""Sensitivity profiles and the predictor on the demo model: cost, proxy accuracy, prediction.

    python benchmarks/sensitivity.py profile --threads 1          # both modes, cost + accuracy
    python benchmarks/sensitivity.py predict --threads 1          # >= 10 schedules, measured
    python benchmarks/sensitivity.py select --threads 1           # optimized vs heuristic (held out)

``profile`` computes the anchored and the exact profile of the default preset's calibration
(fresh, not from the cache: ``use_cache=False``, then stored in the cache for later steps) and
compares every grid point of the anchored proxy with the exact measurement (Spearman, median
relative error). ``predict`` prunes the demo model with >= 10 varied schedules (strategies,
ratios, attention on/off, the optimized one) and compares the predicted perplexity ratio with
the ratio measured on held-out validation windows of the calibration parts (the ``sel-``
corpora of select_default.py; never the evaluation parts). ``select`` compares the
``optimized`` strategy with the current default on the same validation windows, fitted on the
70 % share (never on evaluation text). Results: ``benchmarks/results/sensitivity*.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from common import RESULTS_DIR, Timer, header, log, read_json, set_threads, write_json  # noqa: E402
from gqaprune_core.config import PRESETS  # noqa: E402
from gqaprune_core.models import load_model  # noqa: E402
from gqaprune_core.sensitivity.profile import ProfileSettings  # noqa: E402
from gqaprune_core.sensitivity.store import sensitivity_profile  # noqa: E402


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


def proxy_accuracy(anchored, exact) -> dict:
    """Every non-anchor grid point: anchored proxy vs exact loss increase."""
    pairs = []
    for layer in range(exact.layers):
        anchors = set(anchored.measured[layer])
        for r in range(1, len(exact.mlp_rates)):
            if f"mlp:{r}" not in anchors:
                pairs.append((anchored.mlp_loss[layer][r], exact.mlp_loss[layer][r]))
        for k in range(1, exact.kv_heads[layer]):
            if f"group:{k}" not in anchors:
                pairs.append((anchored.group_loss[layer][k], exact.group_loss[layer][k]))
    proxy, truth = [p for p, _ in pairs], [t for _, t in pairs]
    relative = sorted(abs(p - t) / max(abs(t), 1e-4) for p, t in pairs)
    return {"points": len(pairs), "spearman": round(spearman(proxy, truth), 4),
            "median_relative_error": round(relative[len(relative) // 2], 4),
            "p90_relative_error": round(relative[int(0.9 * len(relative))], 4),
            "sum_proxy": round(sum(proxy), 4), "sum_exact": round(sum(truth), 4)}


def run_profile(args) -> dict:
    model, tokenizer = load_model("demo", device="cpu")
    config = PRESETS["default"]
    out = header() | {"results": {}}
    profiles = {}
    for mode in args.modes.split(","):
        settings = ProfileSettings.from_config(config.with_(sensitivity_mode=mode))
        log(f"profile {mode}: {settings}")
        with Timer() as clock:
            profiles[mode] = sensitivity_profile(model, tokenizer, settings, model_id="demo",
                                                 use_cache=False)
        from gqaprune_core.sensitivity.store import cache_key, cache_path, profile_windows, save_profile
        fit, ids = profile_windows(tokenizer, settings)
        save_profile(cache_path(cache_key(model, settings, fit, ids, "demo")), profiles[mode])
        out["results"][mode] = {"settings": settings.to_dict(), "seconds": round(clock.seconds, 1),
                                "base_ppl": round(profiles[mode].base_ppl, 3),
                                "tokens": profiles[mode].tokens}
        log(f"profile {mode}: {clock.seconds:.0f} s")
        write_json(args.out, out)
    if {"exact", "anchored"} <= set(profiles):
        out["proxy_accuracy"] = proxy_accuracy(profiles["anchored"], profiles["exact"])
        log(f"proxy accuracy: {out['proxy_accuracy']}")
    write_json(args.out, out)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("profile", "predict", "select"))
    parser.add_argument("--modes", default="anchored,exact")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    args.out = args.out or RESULTS_DIR / f"sensitivity_{args.step}.json"
    if args.step == "profile":
        return run_profile(args)
    raise SystemExit(f"step {args.step} is not written yet")


if __name__ == "__main__":
    main()
