"""Prune & evaluate: run the pipeline on a copy of the model in the background; compare runs."""

from __future__ import annotations

import streamlit as st

from gqaprune_core import app_support as support
from gqaprune_core import jobs
from gqaprune_core.config import (CHANNEL_SELECTIONS, MODES, PRESETS, RECOVERY_METHODS,
                                  UNIT_METHODS, PruneConfig)
from gqaprune_core.sensitivity import app_view as sensitivity_view
from pages import _charts, _ui

KEEP_MODELS = 3  # pruned models kept in memory (for Export); older runs keep their report only
UNIT_HELP = {"taylor": "taylor: |weight × gradient| (default)", "magnitude": "magnitude: weight norm",
             "activation": "activation: |weight| × input norm (Wanda-style)",
             "random": "random: a baseline that knows nothing",
             "naive-heads": "naive-heads: the anti-example that scrambles GQA (see GQA structure)"}
CHANNEL_HELP = {"energy": "output energy", "fisher": "loss-weighted (Fisher)",
                "energy+fisher": "output energy + loss-weighted (default)"}
RECOVERY_HELP = {"none": "none (default)", "lora": "LoRA, merged back",
                 "full": "full fine-tuning of the decoder layers (recovers most per step)"}

_ui.page_setup("Prune & evaluate")
st.title("Prune & evaluate")
loaded = _ui.require_model()
tuning = st.session_state.get("tuning", {}).get(loaded.key)  # settings for this model only
preset_name = _ui.preset_name()
preset = PRESETS[preset_name]  # what Rate tuning does not set comes from here
importance = _ui.importance_store().get(loaded.key)
runs: list[support.PruneRun] = st.session_state.setdefault("runs", [])


def describe_settings() -> None:
    if tuning is None:
        st.info(f"No settings from **Rate tuning** yet: this run uses the **{preset_name}** "
                f"preset ({preset.pruning_ratio:.0%} of the {preset.ratio_of} parameters, "
                f"{preset.pruning_strategy} strategy).")
    else:
        t = tuning
        parts = " + ".join(p for p, on in (("attention", t["prune_attention"]),
                                           ("MLP", t["prune_mlp"])) if on)
        end = "last" if t["layer_end"] is None else t["layer_end"] - 1
        st.markdown(f"Settings from **Rate tuning**: remove **{t['pruning_ratio']:.0%}** of the "
                    f"{'prunable' if t['ratio_of'] == 'prunable' else 'total'} parameters, "
                    f"**{t['pruning_strategy']}** strategy, α = {t['alpha']:g}, rates in "
                    f"[{t['min_pruning_rate']:.0%}, {t['max_pruning_rate']:.0%}], layers "
                    f"{t['layer_start']}–{end}, pruning {parts}; the rest from the "
                    f"**{preset_name}** preset.")
    st.page_link(_ui.TUNING_PAGE, label="Change them on Rate tuning", icon=":material/tune:")
    if importance is None:
        st.caption("No layer scores computed for this model yet: the run computes them first "
                   "(or reads them from the disk cache).")


def index_of(options, value) -> int:
    return list(options).index(value) if value in options else 0


def run_settings() -> tuple[PruneConfig, str, int] | None:
    """The form of run-only settings; returns the config when the run was requested."""
    d = _ui.defaults()
    with st.form("run_form"):
        a, b, c = st.columns(3)
        unit = a.selectbox("Unit importance", UNIT_METHODS,
                           index=index_of(UNIT_METHODS, preset.unit_importance),
                           format_func=lambda m: UNIT_HELP.get(m, m), key="run_unit",
                           help="How the groups and channels of a layer are ranked before the "
                                "weakest are cut.")
        mode = b.selectbox("Mode", MODES, index=index_of(MODES, preset.mode), key="run_mode",
                           help="sequential: layers scored and cut one at a time (the original); "
                                "one-shot: one gradient pass scores all layers.")
        corpora = c.multiselect("Evaluate perplexity on", ["demo", "pydoc", "wiki"],
                                default=["demo"], key="run_corpora",
                                help="Evaluation parts (never calibrated on). demo: news; pydoc: "
                                     "Python docs; wiki: Wikipedia articles. Empty: no evaluation.")
        channels = a.selectbox("MLP channels kept by", CHANNEL_SELECTIONS,
                               index=index_of(CHANNEL_SELECTIONS, preset.channel_selection),
                               format_func=CHANNEL_HELP.get, key="run_channels",
                               disabled=not preset.compensate,
                               help="With the down_proj re-fit (the default preset): output "
                                    "energy, the loss-weighted Fisher score (one backward pass "
                                    "more), or both. A layer-wise run uses output energy.")
        # The re-fit of a compensating preset is one forward pass and needs its data: keep the
        # preset's calibration size unless in quick mode.
        calibration_size = ((preset.num_examples, preset.seq_len)
                            if preset.compensate and not _ui.quick()
                            else (d["num_examples"], d["seq_len"]))
        with st.expander("Sample counts and generation (small defaults for a CPU)"):
            a, b, c = st.columns(3)
            examples = a.number_input("Calibration windows", 1, 512, calibration_size[0],
                                      key="run_examples",
                                      help="For unit scores and the down_proj re-fit.")
            seq_len = a.number_input("Tokens per calibration window", 8, 2048, calibration_size[1],
                                     step=8, key="run_seq_len")
            self_share = a.number_input(
                "Self-written windows per real one", 0.0, 4.0, float(preset.self_text_share),
                step=0.25, key="run_self_text",
                help="Windows the dense model writes itself, each from a document break, added "
                     "to the calibration text: the prune then answers to text in general, not "
                     "only to the calibration corpus. Written once per model and window count "
                     "(cached); on a CPU, minutes for the default preset's 128.")
            eval_len = b.number_input("Evaluation window (tokens)", 16, 4096, d["eval_seq_len"],
                                      step=16, key="run_eval_len")
            windows = b.number_input("Evaluation windows per corpus", 1, 512,
                                     d["max_eval_windows"], key="run_windows")
            prompt = c.text_input("Prompt for greedy generation", "The capital of France is",
                                  key="run_prompt", help="Generated before and after pruning; "
                                                         "empty: no generation.")
            tokens = c.number_input("New tokens", 0, 256, d["max_new_tokens"], key="run_tokens")
        with st.expander("Recovery (optional)"):
            a, b, c = st.columns(3)
            recovery = a.selectbox("Method", RECOVERY_METHODS, format_func=RECOVERY_HELP.get,
                                   key="run_recovery", help=(
                                       "After pruning, train the pruned model toward the dense "
                                       "one (distillation) on calibration text; perplexity is "
                                       "shown after pruning and after recovery."))
            steps = b.number_input("Steps at most", 0, 10_000, d["recovery_steps"],
                                   key="run_recovery_steps")
            budget = c.number_input("Time budget (s)", 0, 24 * 3600, d["recovery_time_s"],
                                    step=30, key="run_recovery_time",
                                    help="Recovery stops at the steps or the budget, whichever "
                                         "comes first. A CPU step takes seconds to a minute.")
        with st.expander("Quality gate (optional)"):
            a, b = st.columns([2, 1])
            gate = a.checkbox("Prune the most that stays within a perplexity limit",
                              key="run_gate", help=(
                                  "Searches ratios up to the one set on Rate tuning (or the "
                                  "preset's): the sensitivity profile's prediction first (the "
                                  "profile is computed if missing), then up to 4 "
                                  "prunes of a copy, each measured on validation documents "
                                  "carved from the calibration text (never the evaluation "
                                  "parts). Each measured step is a whole prune: minutes on "
                                  "a CPU."))
            increase = b.number_input("Most perplexity increase (%)", 1.0, 1000.0, 25.0,
                                      step=5.0, key="run_gate_increase")
        start = st.form_submit_button("Prune a copy of the model", type="primary",
                                      disabled=_ui.job_running("prune"))
    if not start:
        return None
    settings = dict(tuning or {})
    if importance is not None:
        settings |= {"importance_method": importance.method,
                     "importance_samples": importance.inputs.get("samples", 50),
                     "importance_seq_len": importance.inputs.get("seq_len", 128)}
    else:
        settings["importance_samples"] = d["importance_samples"]
    try:
        config = preset.with_(base_model=loaded.source, device=loaded.device,
                              dtype=None if loaded.dtype == "auto" else loaded.dtype,
                              unit_importance=unit, mode=mode, channel_selection=channels,
                              num_examples=int(examples), self_text_share=float(self_share),
                              seq_len=int(seq_len), eval_datasets=tuple(corpora),
                              eval_seq_len=int(eval_len), max_eval_windows=int(windows),
                              recovery=recovery, recovery_steps=int(steps),
                              recovery_time_s=float(budget),
                              recovery_seq_len=d["recovery_seq_len"],
                              recovery_samples=d["recovery_samples"],
                              max_ppl_increase=float(increase) / 100 if gate else None,
                              **settings)
    except ValueError as err:
        st.warning(f"These settings cannot be run: {err}")
        return None
    return config, prompt, int(tokens)


def start_run(config: PruneConfig, prompt: str, tokens: int) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    scores = importance
    profile = _ui.profile_store().get(loaded.key)  # None: computed by the run if it needs one
    if config.max_ppl_increase is not None:
        # the gate calibrates everything on the fit share of the calibration text, so that its
        # validation documents stay unseen: the run reads (or computes) its own scores and profile
        scores = profile = None

    def work(job: jobs.Job) -> support.PruneRun:
        return support.prune_job(config, model, tokenizer, scores, prompt, tokens, job.progress,
                                 profile=profile)

    _ui.submit("prune", work)


def collect_finished() -> None:
    run = _ui.finished_result("prune")
    if run is None:
        return
    run.number = max((r.number for r in runs), default=0) + 1
    runs.append(run)
    for old in runs[:-KEEP_MODELS]:
        old.model = None  # free memory; the report stays
    st.session_state["shown_run"] = run.number
    st.rerun()  # redraw the sidebar, which was drawn while the job was still listed


def show_run(run: support.PruneRun) -> None:
    report = run.report
    cells = st.columns(4)
    cells[0].metric("parameters", support.human_count(report["params_after"]),
                    f"−{report['ratio_achieved_total']:.1%} of all", delta_color="off",
                    delta_arrow="off")
    cells[1].metric("removed of the pruned parts", f"{report['ratio_achieved_prunable']:.1%}")
    ppl = support.perplexity_table(report)
    for cell, row in zip(cells[2:], ppl.itertuples(index=False)):
        cell.metric(f"perplexity {row.corpus}", f"{row[2]:.2f}", f"{row[4]:+.1f} %",
                    delta_color="inverse")
    if run.split is not None:
        st.caption(run.split.summary())
    substituted = (report.get("layerwise") or {}).get("channel_selection")
    if substituted:
        st.info(f"Pruned layer by layer from disk: MLP channels were chosen by {substituted}.")
    left, right = st.columns(2)
    left.plotly_chart(_charts.head_counts_figure(report), key=f"heads_{run.number}")
    right.plotly_chart(_charts.mlp_figure(report), key=f"mlp_{run.number}")
    st.markdown("**Per layer, before and after**")
    st.dataframe(support.layer_counts_table(report), hide_index=True, key=f"layers_{run.number}")
    if not ppl.empty:
        st.markdown("**Perplexity** (lower is better)")
        st.dataframe(ppl, hide_index=True, column_config={
            "perplexity before": st.column_config.NumberColumn(format="%.3f"),
            "perplexity after": st.column_config.NumberColumn(format="%.3f"),
            "delta": st.column_config.NumberColumn(format="%+.3f"),
            "delta %": st.column_config.NumberColumn(format="%+.1f %%")})
    show_prediction(run)
    show_gate(run)
    show_recovery(run)
    if run.prompt:
        st.markdown(f"**Greedy generation** from “{run.prompt}”")
        before, after = st.columns(2)
        after_title = "after pruning" + (" and recovery" if run.config.recovery != "none" else "")
        for column, title, text in ((before, "before pruning", run.text_before),
                                    (after, after_title, run.text_after)):
            column.caption(title)
            column.code(run.prompt + text, language=None, wrap_lines=True)
    stages = " · ".join(f"{name.replace('_', ' ')} {seconds:.1f} s"
                        for name, seconds in report["timings_s"].items() if seconds >= 0.05)
    st.caption(f"{run.label}: {run.seconds:.1f} s in all ({stages})")


def show_prediction(run: support.PruneRun) -> None:
    table = sensitivity_view.predicted_vs_measured(run.report)
    if table.empty:
        st.caption("No predicted perplexity for this run: it had no sensitivity profile "
                   "(compute one on Layer importance, then the next run shows the prediction "
                   "next to the measurement).")
        return
    st.markdown("**Predicted next to measured** (perplexity x dense after pruning; the "
                "prediction adds up the sensitivity profile's single-layer losses, scaled by "
                "how they compounded when the profile's probe cut every layer at once)")
    st.dataframe(table, hide_index=True, key=f"predicted_{run.number}", column_config={
        name: st.column_config.NumberColumn(format="%.3f")
        for name in table.columns if name != "corpus"})


def show_gate(run: support.PruneRun) -> None:
    curve = sensitivity_view.gate_curve(run.report)
    if curve.empty:
        return
    message = sensitivity_view.gate_summary(run.report, run.config.pruning_ratio)
    (st.warning if run.report["gate"]["ratio"] <= 0 else st.success)(message)
    st.plotly_chart(_charts.gate_figure(curve, run.report["gate"]["limit"]),
                    key=f"gate_chart_{run.number}")
    st.dataframe(curve, hide_index=True, key=f"gate_{run.number}", column_config={
        name: st.column_config.NumberColumn(format="%.3f")
        for name in curve.columns if name.endswith("x dense")} | {
        "ratio %": st.column_config.NumberColumn(format="%.1f")})


def show_recovery(run: support.PruneRun) -> None:
    cost = support.recovery_cost(run.report)
    if not cost:
        return
    st.markdown("**Recovery** (perplexity, lower is better; the metrics above are after "
                "recovery)")
    table = support.recovery_table(run.report)
    if not table.empty:
        number = st.column_config.NumberColumn(format="%.3f")
        st.dataframe(table, hide_index=True, key=f"recovery_{run.number}", column_config={
            "before pruning": number, "after pruning": number, "after recovery": number,
            "won back %": st.column_config.NumberColumn(format="%.1f %%")})
    st.caption(f"Recovery cost: {cost}")


describe_settings()
request = run_settings()
if request is not None:
    start_run(*request)
collect_finished()

if runs:
    st.subheader("Results")
    numbers = [r.number for r in runs]
    shown = st.session_state.get("shown_run", numbers[-1])
    choice = st.selectbox("Run", numbers, index=numbers.index(shown) if shown in numbers else
                          len(numbers) - 1, format_func=lambda n: runs[numbers.index(n)].label)
    st.session_state["shown_run"] = choice
    show_run(runs[numbers.index(choice)])
    st.subheader("Compare runs")
    st.dataframe(support.runs_table(runs), hide_index=True, key="runs_table")
    if st.button("Forget all runs"):
        runs.clear()
        st.rerun()
    st.page_link(_ui.EXPORT_PAGE, label="Next: export a pruned model", icon=":material/save:")
elif not _ui.job_running("prune"):
    st.info("No runs yet: **Prune a copy of the model** starts one. It runs in the background; "
            "you may move sliders or change page meanwhile.")
