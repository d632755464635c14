"""Layer importance: one score per layer, computed in the background and cached on disk."""

from __future__ import annotations

import streamlit as st

from gqaprune_core.config import IMPORTANCE_METHODS, PRESETS
from gqaprune_core.sensitivity import app_view as sensitivity_view
from pages import _charts, _ui

_ui.page_setup("Layer importance")
st.title("Layer importance")
loaded = _ui.require_model()

METHODS = {"removal": "removal: perplexity increase when the layer is skipped (the original's)",
           "activation": "activation: mean norm of the layer's output (one forward pass)",
           "block_influence": "block influence (ShortGPT): 1 − cos(input, output), one forward "
                              "pass (the default preset's)"}
st.markdown("How much does each layer matter? The scores decide how hard each layer is pruned "
            "on **Rate tuning**. Results are cached on disk under `cache/importance/` together "
            "with the command-line tool, keyed by model weights, corpus, method and sample count:"
            " asking again for the same settings returns at once.")

running = _ui.job_running("importance")
with st.form("importance_form"):
    first, second, third, fourth = st.columns([2, 1, 1, 1])
    keep = {"persist_state": "session"}  # the Rate tuning page reuses these settings
    method = first.selectbox("Method", IMPORTANCE_METHODS, format_func=METHODS.get,
                             index=IMPORTANCE_METHODS.index(
                                 PRESETS[_ui.preset_name()].importance_method),
                             key="importance_method", **keep)  # starts at the preset's method
    samples = second.number_input("Calibration windows", 1, 1024,
                                  _ui.defaults()["importance_samples"], key="importance_samples",
                                  help="The command-line tool uses 50 by default.", **keep)
    seq_len = third.number_input("Tokens per window", 8, 4096, 128, step=8,
                                 key="importance_seq_len", **keep)
    corpus = fourth.selectbox("Calibration corpus", ["demo", "pydoc"], key="importance_corpus",
                              help="demo: news articles; pydoc: Python reference documentation",
                              **keep)
    start = st.form_submit_button("Compute layer importance", type="primary", disabled=running)

if start:
    _ui.start_importance(loaded, method, corpus, int(samples), int(seq_len))
_ui.collect_importance(loaded)

importance = _ui.importance_store().get(loaded.key)
if importance is None:
    if not _ui.job_running("importance"):
        st.info("No scores yet for this model: choose the settings and **Compute layer "
                "importance**.")
    st.stop()

inputs = importance.inputs
st.plotly_chart(_charts.importance_figure(importance), key="importance_chart")
cached = " (read from the disk cache now)" if st.session_state.get("importance_from_cache") else ""
st.caption(f"{importance.method} scores on {inputs.get('samples')} windows of "
           f"{inputs.get('seq_len')} tokens of `{inputs.get('corpus')}`, computed in "
           f"{importance.seconds:.1f} s{cached}. Higher = more important; the y axis turns "
           "logarithmic when one layer dwarfs the rest.")
statistics = {k: v for k, v in importance.statistics.items() if not isinstance(v, (list, dict))}
if statistics:
    st.dataframe([statistics], hide_index=True)

st.subheader("Sensitivity profile")
st.markdown("What cutting each layer *alone* costs: the perplexity (x dense, on calibration "
            "documents held out from the fit) with a share of its MLP channels removed and "
            "re-fit as a run would, everything else intact. Rate tuning adds these up, scaled "
            "by how they compounded when the profile cut every layer at once, into the "
            "predicted perplexity, and the **optimized** strategy spends the budget where it "
            "costs least.")
profile = _ui.profile_panel(loaded)
if profile is not None:
    st.plotly_chart(_charts.profile_heatmap(*sensitivity_view.heatmap(profile)),
                    key="profile_heatmap")
    st.caption(f"{profile.mode} profile on {profile.tokens:,} scored tokens, computed in "
               f"{profile.seconds:.0f} s (cached on disk under `cache/sensitivity/`); dense "
               f"perplexity there {profile.base_ppl:.2f}.")
st.page_link(_ui.TUNING_PAGE, label="Next: tune the pruning rates", icon=":material/tune:")
