"""Layer importance: one score per layer, computed in the background and cached on disk."""

from __future__ import annotations

import streamlit as st

from gqaprune_core import app_support as support
from gqaprune_core.config import IMPORTANCE_METHODS
from gqaprune_core.layer_importance import layer_importance
from pages import _charts, _ui

_ui.page_setup("Layer importance")
st.title("Layer importance")
loaded = _ui.require_model()

METHODS = {"removal": "removal: perplexity increase when the layer is skipped (default)",
           "activation": "activation: mean norm of the layer's output (one forward pass)",
           "block_influence": "block influence (ShortGPT): 1 − cos(input, output)"}
st.markdown("How much does each layer matter? The scores decide how hard each layer is pruned "
            "on **Rate tuning**. Results are cached on disk under `cache/importance/` together "
            "with the command-line tool, keyed by model weights, corpus, method and sample count:"
            " asking again for the same settings returns at once.")

running = _ui.job_running("importance")
with st.form("importance_form"):
    first, second, third, fourth = st.columns(4)
    method = first.selectbox("Method", IMPORTANCE_METHODS, format_func=METHODS.get,
                             key="importance_method")
    samples = second.number_input("Calibration windows", 1, 1024,
                                  _ui.defaults()["importance_samples"], key="importance_samples",
                                  help="The command-line tool uses 50 by default.")
    seq_len = third.number_input("Tokens per window", 8, 4096, 128, step=8,
                                 key="importance_seq_len")
    corpus = fourth.selectbox("Calibration corpus", ["demo", "pydoc"], key="importance_corpus",
                              help="demo: news articles; pydoc: Python reference documentation")
    start = st.form_submit_button("Compute layer importance", type="primary", disabled=running)

if start:
    model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source

    def work(job: support.Job):
        job.progress("calibration", 0, 1)
        with support.SHARED_MODEL_LOCK:  # hooks on the shared model: one job at a time
            return layer_importance(model, tokenizer, method, corpus, int(samples), int(seq_len),
                                    model_id=source,
                                    progress=lambda d, t: job.progress("importance", d, t))

    _ui.submit("importance", work)

job = _ui.finished_job("importance")
if job is not None:
    if job.error:
        _ui.show_job_error(job)
    else:
        _ui.importance_store()[loaded.key] = job.result
        st.session_state["importance_request_seconds"] = job.elapsed

importance = _ui.importance_store().get(loaded.key)
if importance is None:
    if not _ui.job_running("importance"):
        st.info("No scores yet for this model: choose the settings and **Compute layer "
                "importance**.")
    st.stop()

inputs = importance.inputs
st.plotly_chart(_charts.importance_figure(importance), key="importance_chart")
took = st.session_state.get("importance_request_seconds")
answer = f"This request took {took:.1f} s" if took is not None else ""
if took is not None and took < 0.5 * importance.seconds:
    answer += " (read from the disk cache)"
st.caption(f"{importance.method} scores on {inputs.get('samples')} windows of "
           f"{inputs.get('seq_len')} tokens of `{inputs.get('corpus')}`, computed in "
           f"{importance.seconds:.1f} s. {answer}. Higher = more important; the y axis turns "
           "logarithmic when one layer dwarfs the rest.")
statistics = {k: v for k, v in importance.statistics.items() if not isinstance(v, (list, dict))}
if statistics:
    st.dataframe([statistics], hide_index=True)
st.page_link(_ui.TUNING_PAGE, label="Next: tune the pruning rates", icon=":material/tune:")
