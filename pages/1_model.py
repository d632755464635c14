"""Model: choose a source, device and dtype; load; show the architecture."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from gqaprune_core import app_support as support
from pages import _ui

_ui.page_setup("Model")
st.title("Model")

SOURCES = {"demo": "Demo: SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads)",
           "tiny": "Tiny: random 3-layer test model (instant, meaningless text)",
           "hf": "Hugging Face model directory", "gguf": "GGUF file"}


def device_options() -> list[str]:
    import torch

    return ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def chosen_source() -> tuple[str, str]:
    """(source for load_model, kind); the path widgets appear only for local files."""
    current = st.session_state.get("model_choice", (support.default_source(),))[0]
    guess = current if current in ("demo", "tiny") else (
        "gguf" if current.endswith(".gguf") else "hf")
    kinds = list(SOURCES)
    kind = st.radio("Source", kinds, index=kinds.index(guess), format_func=SOURCES.get,
                    key="model_kind")
    if kind in ("demo", "tiny"):
        return kind, kind
    placeholder = "/path/to/model-directory" if kind == "hf" else "/path/to/model.gguf"
    path = st.text_input("Path", value="" if current in ("demo", "tiny") else current,
                         placeholder=placeholder, key=f"model_path_{kind}",
                         help="A local directory with config.json and safetensors weights (Llama,"
                              " Mistral, Qwen2, SmolLM2), or a .gguf file with its tokenizer.")
    return path.strip(), kind


with st.container(border=True):
    source, kind = chosen_source()
    left, right = st.columns(2)
    current = st.session_state.get("model_choice", (None, "auto", "auto"))
    devices = device_options()
    device = left.selectbox("Device", devices, index=devices.index(current[1])
                            if current[1] in devices else 0,
                            help="auto: the GPU with the most free memory, else the CPU")
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    dtype = right.selectbox("Data type", dtypes, index=dtypes.index(current[2]),
                            help="auto: bfloat16 on a GPU, float32 on the CPU")
    clicked = st.button("Load model", type="primary", disabled=not source)

if clicked:
    with st.status(f"Loading {source} …", expanded=True) as status:
        st.write("Reading weights and checking that the heads form GQA groups.")
        try:
            loaded = _ui.load(source, device, dtype)
        except Exception as err:  # UI boundary: a wrong path or model is a message, not a crash
            status.update(label=f"Could not load {source}", state="error")
            _ui.show_load_error(source, err)
            st.stop()
        status.update(label=f"Loaded {source}", state="complete", expanded=False)
    _ui.remember(loaded)
    st.rerun()

if "model_choice" not in st.session_state:
    st.info(f"No model loaded yet. **Load model** loads the choice above; the other pages load "
            f"`{support.default_source()}` on their own.")
    st.stop()

loaded = _ui.require_model()
summary = support.model_summary(loaded.model)
st.subheader(f"Architecture of `{loaded.source}`")
for cell, name in zip(st.columns(6), ("layers", "query heads", "KV heads", "q_per_kv",
                                      "head_dim", "MLP width")):
    cell.metric(name, summary[name])
cells = st.columns(6)
cells[0].metric("parameters", support.human_count(summary["parameters"]))
cells[1].metric("memory", support.human_bytes(summary["memory_bytes"]),
                help="Parameters and buffers, as loaded.")
cells[2].metric("data type", summary["dtype"])
cells[3].metric("device", summary["device"])
st.caption(f"Each layer has {summary['KV heads']} GQA groups: one KV head shared by "
           f"{summary['q_per_kv']} query heads. Pruning removes whole groups and MLP channels.")

components = support.component_table(loaded.model)
left, right = st.columns([2, 3])
with left:
    st.markdown("**Parameters by component**")
    st.dataframe(components, hide_index=True,
                 column_config={"parameters": st.column_config.NumberColumn(format="localized"),
                                "share %": st.column_config.NumberColumn(format="%.1f %%")})
with right:
    parts = components[components["component"] != "total"]
    figure = go.Figure(go.Bar(x=parts["parameters"] / 1e6, y=parts["component"], orientation="h",
                              marker_color="#4c78a8",
                              hovertemplate="%{y}: %{x:.2f} M parameters<extra></extra>"))
    figure.update_layout(xaxis_title="parameters (millions)", height=260,
                         margin={"l": 10, "r": 10, "t": 10, "b": 10})
    st.plotly_chart(figure, key="components_chart")

st.markdown("**Layers** (read from the weights: a pruned model's layers may differ)")
st.dataframe(support.architecture_table(loaded.model), hide_index=True, height=300)
