"""Choose the recovery stage's method and learning rate on held-out CALIBRATION text.

    python benchmarks/select_recovery.py --variants lora-2e-4,full-1e-4 --steps 40 --every 20

The default preset prunes ``--ratio`` of all parameters ONCE, fitted on the fit share (70 %) of
the calibration parts of news, pydoc and wiki (the held-out split of
``benchmarks/select_default.py``). Every variant then distils the dense model into its own copy
of that pruned model on other windows of the same fit share (as the pipeline's recovery does),
and is validated every ``--every`` steps on the held-out 30 % of each calibration part and on the
license texts that nothing is ever fitted on. Evaluation text is never looked at.

Results: ``benchmarks/results/select_recovery.json`` (validation curves per variant, resumable).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from common import (RESULTS_DIR, Timer, header, log, read_json, same_settings,  # noqa: E402
                    set_threads, write_json)
from select_default import (BASE, DPW, FIT_FRACTION, demo_and_held_out_windows,  # noqa: E402
                            validate)

from gqaprune_core import data  # noqa: E402
from gqaprune_core.evaluate import perplexity  # noqa: E402
from gqaprune_core.models import count_parameters  # noqa: E402
from gqaprune_core.pipeline import run_pipeline  # noqa: E402
from gqaprune_core.recovery import recover_  # noqa: E402

# name -> (method, learning rate, schedule); the first four ran before the cosine schedule existed
VARIANTS: dict[str, tuple[str, float, str]] = {
    "lora-2e-4": ("lora", 2e-4, "constant"),
    "lora-1e-3": ("lora", 1e-3, "constant"),
    "full-2e-5": ("full", 2e-5, "constant"),
    "full-1e-4": ("full", 1e-4, "constant"),
    "full-1e-4-cosine": ("full", 1e-4, "cosine"),
    "full-2e-4-cosine": ("full", 2e-4, "cosine"),
}


def run_variant(name: str, pruned, dense_model, tokens, windows: dict, dense: dict, config,
                args) -> dict:
    """Distil into a copy of ``pruned`` with variant ``name``; validate every ``args.every``
    steps. ``train_s`` leaves the validation time out."""
    method, lr, schedule = VARIANTS[name]
    student = copy.deepcopy(pruned)
    curve, validating = [], Timer()  # validating.seconds: validation time to leave out

    def checkpoint(done: int, total: int) -> None:
        if done and (done % args.every == 0 or done == total):
            with Timer() as timer:
                student.eval()  # LoRA adapters, if any, still apply: no merge needed
                curve.append({"steps": done, **validate(student, windows, dense)})
                student.train()
            validating.seconds += timer.seconds
            log(f"{name} step {done}: {curve[-1]}")

    with Timer() as clock:
        report = recover_(student, dense_model, tokens, method=method, lr=lr, steps=args.steps,
                          batch_size=config.recovery_batch_size, time_budget_s=float("inf"),
                          seed=config.seed, schedule=schedule, progress=checkpoint)
    return {"method": method, "lr": lr, "schedule": schedule, "curve": curve,
            "train_s": round(clock.seconds - validating.seconds, 1), "report": report.to_dict()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--ratio", type=float, default=0.2, help="share of ALL parameters")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=20, help="validate every this many steps")
    parser.add_argument("--windows", type=int, default=4, help="validation windows per corpus")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--recovery-windows", type=int,
                        help="calibration windows to distil on (default: steps x batch)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "select_recovery.json")
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    set_threads(args.threads)
    dense_model, tokenizer, windows = demo_and_held_out_windows(args.windows, args.seq_len)
    config = BASE.with_(pruning_ratio=args.ratio, calibration_dataset=DPW, eval_datasets=(),
                        recovery_steps=args.steps, recovery_samples=args.recovery_windows)
    tokens = data.calibration_batch(tokenizer, DPW, config.recovery_windows(),
                                    config.recovery_seq_len, config.seed + 1)
    out = header(None if argv is None else ["benchmarks/select_recovery.py", *argv])
    out["settings"] = {"ratio": args.ratio, "fit_fraction": FIT_FRACTION, "fit": DPW,
                       "steps": args.steps, "every": args.every,
                       "batch": [config.recovery_batch_size, config.recovery_seq_len],
                       "recovery_windows": list(tokens.shape),
                       "windows": {n: list(w.shape) for n, w in windows.items()},
                       "base": config.to_dict()}
    previous = read_json(args.out) or {}
    same = same_settings(previous, out["settings"])
    out["results"] = previous.get("results", {}) if same else {}
    out["dense"] = {n: perplexity(dense_model, w, corpus=n).value for n, w in windows.items()}
    with Timer() as clock:
        pruned = run_pipeline(config, dense_model, tokenizer, copy_model=True,
                              evaluate=False).model
    out["pruned"] = {"params": count_parameters(pruned), "prune_s": round(clock.seconds, 1),
                     **validate(pruned, windows, out["dense"])}
    log(f"pruned: {out['pruned']}")
    for name in args.variants.split(","):
        if name in out["results"]:
            continue
        out["results"][name] = run_variant(name, pruned, dense_model, tokens, windows,
                                           out["dense"], config, args)
        write_json(args.out, out)
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
