"""The model card (README.md) of a saved checkpoint: what was cut, how well it does, how to run it.

Notation: H query heads, G KV heads (groups), I MLP width.

Sections: the base model and the parameter count; the command and settings (when the caller
knows them, :class:`CardInfo`); per layer H, G and I before and after; perplexities from the
run's report with corpus, windows and tokens; and how to load the folder with transformers
(``trust_remote_code=True`` only when the layers differ), gqaprune, llama.cpp and ollama (through
a GGUF export) and vLLM (uniform checkpoints only). Plain Markdown with a small YAML header, as
the Hugging Face hub reads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


from gqaprune_core.plan import PruningPlan

CARD_NAME = "README.md"
MODEL_DIR = "path/to/this/folder"
# settings shown in the card, in this order, when the caller passes them
SHOWN_SETTINGS = ("base_model", "pruning_ratio", "ratio_of", "pruning_strategy",
                  "importance_method", "unit_importance", "prune_attention", "prune_mlp",
                  "group_rounding", "channel_multiple", "compensate", "mode", "recovery",
                  "recovery_steps", "calibration_dataset", "num_examples", "seq_len", "seed")


@dataclass(frozen=True)
class CardInfo:
    """What the card says beyond the shapes; every field optional.

    Attributes:
        base_model: the source the model was pruned from (a hub id, a path, "demo").
        command: the command line that produced it.
        settings: the run's settings (``PruneConfig.to_dict()``); :data:`SHOWN_SETTINGS` shown.
        report: the run's ``report.json`` contents (parameter counts, perplexities).
    """

    base_model: str | None = None
    command: str | None = None
    settings: Mapping[str, object] = field(default_factory=dict)
    report: Mapping[str, object] = field(default_factory=dict)


def _base_model(config, info: CardInfo) -> str:
    return str(info.base_model or info.settings.get("base_model")
               or info.report.get("model") or getattr(config, "_name_or_path", "")
               or "unknown")


def _header(config, info: CardInfo) -> list[str]:
    base = _base_model(config, info)
    lines = ["---", "library_name: transformers", "tags: [gqaprune, pruned, gqa]"]
    if base.count("/") == 1 and not Path(base).exists():  # looks like a hub id
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {Path(base).name or base}, pruned with gqaprune", "",
              f"Pruned from `{base}` by removing whole GQA groups (one KV head with the query "
              "heads that share it) and MLP channels; the Q:KV structure is intact in every "
              "layer."]
    report = info.report
    if "params_before" in report and "params_after" in report:
        before, after = int(report["params_before"]), int(report["params_after"])
        lines += ["", f"Parameters: {before:,} -> {after:,} "
                      f"({100 * (before - after) / before:.1f} % removed)."]
    return lines


def _settings(info: CardInfo) -> list[str]:
    lines = []
    if info.command:
        lines += ["", "## How it was made", "", "```bash", info.command, "```"]
    shown = [(k, info.settings[k]) for k in SHOWN_SETTINGS if k in info.settings]
    if shown:
        if not info.command:
            lines += ["", "## How it was made"]
        lines += ["", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | `{json.dumps(value)}` |" for key, value in shown]
    return lines


def _layers(plan: PruningPlan) -> list[str]:
    def cell(before: int, after: int) -> str:
        return str(after) if before == after else f"{before} -> {after}"

    lines = ["", "## Layers", "", "| layer | q heads | kv heads | MLP width |", "|---:|---:|---:|---:|"]
    for p in plan.layers:
        lines.append(f"| {p.layer} | {cell(p.q_heads_before, p.q_heads)} | "
                     f"{cell(p.kv_heads_before, p.kv_heads)} | {cell(p.mlp_before, p.mlp)} |")
    return lines


def _perplexities(report: Mapping[str, object]) -> list[str]:
    after = report.get("ppl_after") or {}
    if not isinstance(after, Mapping) or not after:
        return []
    before = report.get("ppl_before") or {}
    lines = ["", "## Perplexity", "",
             "Measured by the run on held-out windows (never used for calibration).", "",
             "| corpus | dense | pruned | windows | tokens per window | tokens scored |",
             "|---|---:|---:|---:|---:|---:|"]
    for corpus, result in after.items():
        dense = before.get(corpus, {}).get("value") if isinstance(before, Mapping) else None
        dense_text = f"{dense:.3f}" if isinstance(dense, int | float) else "-"
        lines.append(f"| {corpus} | {dense_text} | {result['value']:.3f} | {result['windows']} "
                     f"| {result['seq_len']} | {result['tokens']} |")
    return lines


def _loading(kind: str) -> list[str]:
    remote = kind == "remote"
    lines = ["", "## Load it", "", "### transformers", ""]
    if kind == "skeleton":
        lines += ["The layers differ and this architecture has no per-layer modeling code: load "
                  "it with gqaprune (below)."]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{MODEL_DIR}"'
                  + (", trust_remote_code=True)" if remote else ")"),
                  f'tokenizer = AutoTokenizer.from_pretrained("{MODEL_DIR}"'
                  + (", trust_remote_code=True)" if remote else ")"), "```"]
        if remote:
            lines += ["", "The layers have their own shapes, which no built-in transformers class "
                      "describes: `configuration_gqaprune.py` and `modeling_gqaprune.py` in this "
                      "folder (small, read them) build each decoder layer from its own head and "
                      "MLP counts. gqaprune itself is not needed. The tokenizer is the base "
                      "model's; `trust_remote_code=True` there only stops transformers from "
                      "asking about the code named in config.json."]
    lines += ["", "### gqaprune", "", "```python",
              "from gqaprune_core.checkpoint import load_pruned", "",
              f'model, tokenizer = load_pruned("{MODEL_DIR}")  # checks gqaprune_manifest.json',
              "```"]
    return lines + _runtimes(kind)


def _runtimes(kind: str) -> list[str]:
    lines = ["", "### llama.cpp, ollama, LM Studio (GGUF)", "", "```bash",
             f"python -m gqaprune_core.export --pruned_model {MODEL_DIR} --gguf model.gguf "
             "--outtype q8_0",
             'llama-cli -m model.gguf -p "Hello"', "```", "",
             "For ollama, a `Modelfile` beside `model.gguf`:", "", "```", "FROM ./model.gguf",
             "```", "", "then `ollama create pruned -f Modelfile` and `ollama run pruned`.",
             "", "### vLLM and other servers", ""]
    if kind == "plain":
        lines += ["All layers have the same shape: the folder is a plain model of its base "
                  f"architecture (`vllm serve {MODEL_DIR}`)."]
    else:
        lines += ["Not supported: vLLM, TensorRT-LLM and SGLang vary only the KV heads per layer, "
                  "not the query heads or (freely) the MLP width. Prune with a uniform schedule "
                  "to serve the result there (gqaprune's README, *Deploy a pruned model*)."]
    return lines


def card_text(config, plan: PruningPlan, kind: str, info: CardInfo) -> str:
    """The card as Markdown; ``kind`` is the config kind (see ``hf_config.config_kind``)."""
    lines = (_header(config, info) + _settings(info) + _layers(plan)
             + _perplexities(info.report) + _loading(kind))
    lines += ["", "## Integrity", "",
              "`gqaprune_manifest.json` holds the size and SHA-256 of every file; `load_pruned` "
              "and `python -m gqaprune_core.analyze` check it (`sha256sum` gives the same "
              "digests)."]
    return "\n".join(lines) + "\n"


def write_card(path: Path, config, plan: PruningPlan, kind: str, info: CardInfo) -> None:
    """Write the card for a model of Hugging Face ``config`` pruned by ``plan``."""
    path.write_text(card_text(config, plan, kind, info))
