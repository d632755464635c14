"""Export: save a pruned model under prune_log/, download its plan and report."""

from __future__ import annotations

import json

import streamlit as st

from gqaprune_core import app_export as export
from gqaprune_core import app_support as support
from pages import _charts, _ui

_ui.page_setup("Export")
st.title("Export")
runs: list[support.PruneRun] = st.session_state.get("runs", [])
if not runs:
    st.info("Nothing to export yet: prune a model first.")
    st.page_link(_ui.PRUNE_PAGE, label="Prune & evaluate", icon=":material/content_cut:")
    st.stop()

numbers = [r.number for r in runs]
shown = st.session_state.get("shown_run", numbers[-1])
choice = st.selectbox("Run", numbers, index=numbers.index(shown) if shown in numbers else
                      len(numbers) - 1, format_func=lambda n: runs[numbers.index(n)].label,
                      key="export_run")
run = runs[numbers.index(choice)]

if run.split is not None:
    st.subheader("What was removed")
    st.caption(run.split.summary())
    st.plotly_chart(_charts.budget_split_figure(run.split), key=f"export_split_{run.number}")

st.subheader("Save the pruned model")
if run.model is None and run.checkpoint is None:
    st.warning("This run's model is no longer in memory (only the last few are kept); its plan "
               "and report can still be downloaded below.")
else:
    name = st.text_input("Directory under prune_log/", export.run_directory_name(run),
                         key=f"export_name_{run.number}",
                         help="Holds model/ (safetensors weights, config, GQA plan, tokenizer, "
                              "model card, SHA-256 manifest) and report.json, like a "
                              "command-line run.")
    if st.button("Save", type="primary"):
        try:
            with st.spinner("Saving…"):
                saved = export.save_run(run, name)
        except (ValueError, OSError) as err:
            st.error(f"Could not save: {err}")
        else:
            st.session_state.setdefault("saved_runs", {})[run.number] = str(saved)
    saved = st.session_state.get("saved_runs", {}).get(run.number)
    if saved:
        st.success(f"Saved to `{saved}`")
        st.markdown("Reload it in Python:")
        st.code("from gqaprune_core.checkpoint import load_pruned\n"
                f'model, tokenizer = load_pruned("{saved}/model")', language="python")
        st.markdown(f"Without gqaprune (transformers, llama.cpp, ollama): see the model card "
                    f"`{saved}/model/README.md`.")

st.subheader("GGUF for llama.cpp / ollama")
if run.model is not None:
    gguf_type = st.selectbox("Out type", export.GGUF_OUT_TYPES, key=f"gguf_type_{run.number}",
                             help="q8_0: 8-bit, close to the original; q4_k_m: llama.cpp's "
                                  "4-bit quantizer; f16/bf16/f32: unquantized. Layers with "
                                  "different shapes are written as llama.cpp's `deci`.")
    if st.button("Export GGUF", key=f"gguf_export_{run.number}"):
        try:
            with st.spinner("Writing GGUF…"):
                gguf_path = export.export_run_gguf(run, name, gguf_type)
        except (ValueError, OSError) as err:
            st.error(f"Could not export GGUF: {err}")
        else:
            st.session_state.setdefault("gguf_files", {})[run.number] = str(gguf_path)
    gguf_file = st.session_state.get("gguf_files", {}).get(run.number)
    if gguf_file:
        st.success(f"Wrote `{gguf_file}`")
        st.code(f"llama-cli -m {gguf_file} -cnv\n"
                f"printf 'FROM {gguf_file}\\n' > Modelfile && ollama create pruned -f Modelfile",
                language="bash")

st.subheader("Download")
left, right, _ = st.columns([1, 1, 3])
left.download_button("Plan (JSON)", run.plan.to_json(), file_name=f"plan_run{run.number}.json",
                     mime="application/json", icon=":material/download:",
                     help="Per layer, the kept KV groups and MLP channels (indices before pruning).")
right.download_button("Report (JSON)", json.dumps(run.report, indent=1, default=str),
                      file_name=f"report_run{run.number}.json", mime="application/json",
                      icon=":material/download:",
                      help="Settings, parameters, per-layer shapes, perplexity, timings.")
with st.expander("Plan preview"):
    st.json(run.plan.to_dict(), expanded=1)
