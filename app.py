"""gqaprune's app: ``streamlit run app.py`` (or ``make app``). Navigation and the home page.

Pages live in ``pages/``; the logic they show lives in ``gqaprune_core`` (``app_support``,
``app_rates``, ``app_layerwise`` and ``app_export`` for the app-specific parts), so every page
is a thin shell of widgets and charts.
"""

from __future__ import annotations

import streamlit as st

from pages import _ui

PAGES = [
    ("pages/1_model.py", "Model", ":material/memory:",
     "choose and load a model; see its layers, heads and parameters"),
    ("pages/2_gqa_structure.py", "GQA structure", ":material/hub:",
     "how query heads share KV heads, and why pruning must remove whole groups"),
    ("pages/3_layer_importance.py", "Layer importance", ":material/bar_chart:",
     "how much each layer matters (cached on disk, shared with the CLI)"),
    ("pages/4_rate_tuning.py", "Rate tuning", ":material/tune:",
     "what-if: per-layer pruning rates and the units each layer would keep, live"),
    ("pages/5_prune.py", "Prune & evaluate", ":material/content_cut:",
     "prune a copy of the model, measure perplexity, compare runs"),
    ("pages/6_export.py", "Export", ":material/save:",
     "save a pruned model under prune_log/ and download its plan and report"),
]


def home() -> None:
    _ui.page_setup("Home")
    st.title("gqaprune")
    st.markdown(
        "**gqaprune** makes grouped-query-attention language models smaller by removing whole "
        "**GQA groups** (one KV head and the query heads that share it) and MLP channels.\n\n"
        "1. **Model** loads a model (the SmolLM2-135M demo by default) and shows its layout.\n"
        "2. **GQA structure** shows why heads must go in groups; **Layer importance** scores "
        "every layer.\n"
        "3. **Rate tuning** turns scores into per-layer rates, starting from gqaprune's "
        "recommended **default** preset (the **original** one is a click away): move the "
        "sliders, watch the plan and how much attention and MLP each give.\n"
        "4. **Prune & evaluate** cuts a copy of the model and measures perplexity; **Export** "
        "saves it.")
    st.subheader("Pages")
    for path, title, icon, description in PAGES:
        left, right = st.columns([1, 3], vertical_alignment="center")
        left.page_link(path, label=title, icon=icon)
        right.caption(description)


navigation = st.navigation(
    [st.Page(home, title="Home", icon=":material/home:", default=True)]
    + [st.Page(path, title=title, icon=icon) for path, title, icon, _ in PAGES])
navigation.run()
