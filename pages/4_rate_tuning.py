"""Rate tuning: what-if per-layer pruning rates, redrawn live as the sliders move."""

from __future__ import annotations

import streamlit as st

from gqaprune_core import app_rates
from gqaprune_core import app_support as support
from gqaprune_core.config import PRESETS, STRATEGIES
from gqaprune_core.models import layout
from gqaprune_core.pipeline import prunable_target
from gqaprune_core.sensitivity import app_view as sensitivity_view
from pages import _charts, _ui

_ui.page_setup("Rate tuning")
st.title("Rate tuning")
loaded = _ui.require_model()
STRATEGY_HELP = {"inverse": "important layers are pruned less (default)",
                 "proportional": "important layers are pruned more",
                 "uniform": "every layer in range gets the target",
                 "optimized": "groups and channels per layer with the least predicted loss "
                              "(needs the sensitivity profile; alpha and min rate unused)"}


def importance_or_stop():
    """This model's layer scores; offers to compute them (settings of the importance page)."""
    importance = _ui.importance_store().get(loaded.key)
    if importance is not None:
        return importance
    method = st.session_state.get("importance_method",
                                  PRESETS[_ui.preset_name()].importance_method)
    samples = int(st.session_state.get("importance_samples", _ui.defaults()["importance_samples"]))
    seq_len = int(st.session_state.get("importance_seq_len", 128))
    corpus = st.session_state.get("importance_corpus", "demo")
    st.info(f"Rates follow the layer scores, and there are none yet for this model. Compute them "
            f"here ({method}, {samples} windows of {seq_len} tokens of {corpus}; a cache hit is "
            "instant) or choose other settings on the Layer importance page.")
    if st.button("Compute layer importance", type="primary",
                 disabled=_ui.job_running("importance")):
        _ui.start_importance(loaded, method, corpus, samples, seq_len)
    _ui.collect_importance(loaded)
    st.stop()


PRESET_KEYS = {"tune_ratio": "pruning_ratio", "tune_ratio_of": "ratio_of",
               "tune_strategy": "pruning_strategy", "tune_alpha": "alpha",
               "tune_min": "min_pruning_rate", "tune_max": "max_pruning_rate",
               "tune_attention": "prune_attention", "tune_mlp": "prune_mlp"}


def apply_preset(name: str) -> None:
    """Set the tuning widgets to a preset (a callback: runs before the widgets are drawn)."""
    preset = PRESETS[name]
    for key, field in PRESET_KEYS.items():
        st.session_state[key] = getattr(preset, field)
    st.session_state["preset"] = name  # its other settings (e.g. compensation) go to the run


def preset_picker() -> None:
    current = _ui.preset_name()
    left, right, note = st.columns([2, 1, 4], vertical_alignment="bottom")
    name = left.selectbox("Preset", list(PRESETS), index=list(PRESETS).index(current),
                          key="tune_preset_choice",
                          help="default: gqaprune's recommended settings (the sliders start "
                               "there); original: the original project's algorithm.")
    right.button("Apply preset", on_click=apply_preset, args=(name,))
    note.caption(f"Runs start from the **{current}** preset; the sliders below override it.")


def settings_widgets(layers: int) -> dict:
    """The tuning widgets; their values persist across pages. They start at the app's starting
    preset (``support.START_PRESET``, gqaprune's recommended settings)."""
    keep = {"persist_state": "session"}
    start = PRESETS[support.START_PRESET]
    target = st.slider("Target pruning ratio", 0.0, 0.9, start.pruning_ratio, 0.01,
                       key="tune_ratio", format="percent", **keep,
                       help="Fraction of parameters to remove (see 'Ratio of' below).")
    ratio_of = st.radio("Ratio of", ["prunable", "total"], horizontal=True, key="tune_ratio_of",
                        index=["prunable", "total"].index(start.ratio_of),
                        format_func={"prunable": "attention + MLP of the pruned layers",
                                     "total": "all parameters"}.get, **keep)
    strategy = st.segmented_control("Strategy", STRATEGIES, default=start.pruning_strategy,
                                    required=True,
                                    key="tune_strategy", help=" · ".join(
                                        f"{k}: {v}" for k, v in STRATEGY_HELP.items()), **keep)
    alpha = st.slider("alpha (how strongly scores spread the rates)", 0.0, 5.0, start.alpha, 0.1,
                      key="tune_alpha", **keep,
                      help="The most and least favoured layers differ by a factor 2^alpha before "
                           "clipping; 0 is uniform.")
    low, high = st.columns(2)
    min_rate = low.slider("min rate", 0.0, 0.95, start.min_pruning_rate, 0.01, key="tune_min",
                          format="percent", **keep)
    max_rate = high.slider("max rate", 0.0, 0.95, start.max_pruning_rate, 0.01, key="tune_max",
                           format="percent", **keep)
    first, last = st.slider("Layers to prune", 0, layers - 1, (0, layers - 1),
                            key=f"tune_layers_{layers}", **keep)  # a model of other depth: anew
    st.markdown("Prune")
    attention, mlp = st.columns(2)
    prune_attention = attention.toggle("attention groups", start.prune_attention,
                                       key="tune_attention", **keep)
    prune_mlp = mlp.toggle("MLP channels", start.prune_mlp, key="tune_mlp", **keep)
    return {"pruning_ratio": target, "ratio_of": ratio_of, "pruning_strategy": strategy,
            "alpha": alpha, "min_pruning_rate": min_rate, "max_pruning_rate": max_rate,
            "layer_start": first, "layer_end": None if last == layers - 1 else last + 1,
            "prune_attention": prune_attention, "prune_mlp": prune_mlp}


def prediction_metric(cell, profile, allocation) -> None:
    """The predicted perplexity ratio with its range (or a hint without a profile)."""
    if profile is None:
        cell.metric("predicted perplexity", "—", "compute the sensitivity profile",
                    delta_color="off", delta_arrow="off")
        return
    view = sensitivity_view.prediction_view(profile, allocation)
    p = view.prediction
    cell.metric("predicted perplexity", f"x{p.ratio:.2f}", f"range x{p.low:.2f}–x{p.high:.2f}",
                delta_color="off", delta_arrow="off", help=view.summary())
    st.session_state["prediction_ms"] = view.elapsed_ms  # measured on every redraw


@st.fragment
def tuner(importance, profile) -> None:
    """Widgets and plan; a slider move reruns only this fragment (no importance recomputed)."""
    model = loaded.model
    controls, view = st.columns([1, 2], gap="large")
    with controls:
        settings = settings_widgets(len(layout(model)))
        compare = st.toggle("Overlay the other strategies", True, key="tune_compare",
                            persist_state="session")
    with view:
        try:
            preset = PRESETS[_ui.preset_name()]
            config = preset.with_(base_model=loaded.source, **settings)
            preview = app_rates.rate_preview(config, model, importance, profile)
            end = len(preview.rates) if config.layer_end is None else config.layer_end
            target = prunable_target(config, model, range(config.layer_start, end))
        except ValueError as err:  # the library names the impossible setting
            st.warning(f"These settings cannot be met: {err}")
            return
        st.session_state["tuning"] = {loaded.key: settings}  # what the Prune page will run
        allocation = preview.allocation
        removed_total = allocation.params_removed / preview.params_total
        cells = st.columns(4)
        cells[0].metric("parameters after", support.human_count(preview.params_after),
                        f"−{removed_total:.1%} of all", delta_color="off", delta_arrow="off",
                        help=f"{preview.params_after:,} of {preview.params_total:,}")
        cells[1].metric("removed of the pruned parts", f"{allocation.ratio_achieved:.1%}",
                        f"requested {allocation.ratio_requested:.1%}", delta_color="off",
                        delta_arrow="off")
        cells[2].metric("GQA groups kept",
                        f"{sum(allocation.groups_to_keep)} / "
                        f"{sum(s.kv_heads for s in layout(model))}")
        prediction_metric(cells[3], profile, allocation)
        if not allocation.budget_met:
            st.caption("Whole GQA groups are coarse: with attention alone the budget can be "
                       "missed by up to one group per layer.")
        split = preview.split
        parts = st.columns(2)
        for cell, label, removed, share, units in (
                (parts[0], "removed from attention", split.attention_total,
                 split.attention_share, f"{sum(split.groups_removed)} GQA groups"),
                (parts[1], "removed from the MLP", split.mlp_total, split.mlp_share,
                 f"{sum(split.channels_removed):,} channels")):
            cell.metric(label, support.human_count(removed), f"{share:.1%} of removed · {units}",
                        delta_color="off", delta_arrow="off",
                        help=f"{removed:,} of the {split.total:,} parameters removed")
        overlays = (app_rates.strategy_rates(config, model, importance, profile) if compare
                    else None)
        st.plotly_chart(_charts.rates_figure(preview, config, target, overlays),
                        key="rates_chart")
        st.plotly_chart(_charts.budget_split_figure(split), key="split_chart")
    st.markdown("**What each layer would keep**")
    st.dataframe(preview.table, hide_index=True,
                 column_config={"score": st.column_config.NumberColumn(format="%.4g"),
                                "rate %": st.column_config.NumberColumn(format="%.1f"),
                                "achieved %": st.column_config.NumberColumn(format="%.1f")})


importance = importance_or_stop()
st.markdown(f"Scores: **{importance.method}** on {importance.inputs.get('samples')} windows. "
            "Bars are the planned per-layer rates, diamonds what whole units (groups, channels) "
            "achieve, the grey band is [min, max] over the pruned layers. The second chart "
            "splits each layer's removed parameters between attention (whole GQA groups) and "
            "MLP channels.")
preset_picker()
profile = _ui.profile_panel(loaded)
tuner(importance, profile)
st.page_link(_ui.PRUNE_PAGE, label="Next: prune with these settings",
             icon=":material/content_cut:")
