"""Plotly figures of the app: pure functions of plain data (no streamlit), one per chart.

Colours: every KV head has one colour, used for itself and for the query heads trained with it;
red marks what is wrong (a query head reading a foreign KV head) or the target line.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.colors import qualitative

from gqaprune_core.app_rates import BudgetSplit, RatePreview
from gqaprune_core.app_support import HeadScores, head_mapping, layer_counts_table
from gqaprune_core.config import PruneConfig
from gqaprune_core.layer_importance import LayerImportance

KV_COLOURS = qualitative.Set2 + qualitative.Pastel1  # light: black labels stay readable
MISMATCH = "#d62728"
PLOT_FONT = {"size": 13}
BAND = "rgba(110,110,110,0.15)"  # the [min, max] rate band
STRATEGY_COLOURS = {"inverse": "#4c78a8", "proportional": "#f58518", "uniform": "#54a24b",
                    "optimized": "#e45756"}
ATTENTION_COLOUR, MLP_COLOUR = "#d94801", "#31a354"  # as the KV-head and MLP result charts


def kv_colour(kv_head: int) -> str:
    return KV_COLOURS[kv_head % len(KV_COLOURS)]


def _box(fig: go.Figure, x0, x1, y0, y1, fill: str, line: str, width: float, dash: str = "solid"):
    fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, fillcolor=fill,
                  line={"color": line, "width": width, "dash": dash})


def gqa_figure(q_heads: int, kv_heads: int, kept_q: Sequence[int] | None = None,
               kept_kv: Sequence[int] | None = None, title: str = "") -> go.Figure:
    """Query heads (top row) above the KV heads they read (bottom row), as Plotly shapes.

    A query head is filled with the colour of the KV head it was *trained* with; its line goes
    to the KV head it *reads* now. Dashed boxes outline the groups as the attention module sees
    them (by position). Mismatches (a query head reading a foreign KV head) get a red outline,
    a red line and a ✗.
    """
    kept_q = list(range(q_heads)) if kept_q is None else list(kept_q)
    kept_kv = list(range(kv_heads)) if kept_kv is None else list(kept_kv)
    rows = head_mapping(q_heads, kv_heads, kept_q, kept_kv).to_dict("records")
    per_group = len(kept_q) // len(kept_kv)
    x_of = [p + 0.6 * (p // per_group) for p in range(len(kept_q))]  # a gap between groups
    text = {"color": "#111", "size": 14 if len(kept_q) <= 16 else 10}
    fig = go.Figure()
    centres = []
    for g, kv in enumerate(kept_kv):
        left, right = x_of[g * per_group] - 0.5, x_of[(g + 1) * per_group - 1] + 0.5
        centres.append((left + right) / 2)
        _box(fig, left - 0.12, right + 0.12, -0.22, 2.22, "rgba(0,0,0,0)", "#888", 1.5, "dash")
        _box(fig, left + 0.1, right - 0.1, 0.0, 0.7, kv_colour(kv), "#333", 1.5)
        name = f"KV head k{kv}" if per_group > 1 else f"k{kv}"
        fig.add_annotation(x=centres[-1], y=0.35, text=f"<b>{name}</b>", showarrow=False,
                           font=text)
        fig.add_annotation(x=centres[-1], y=2.36, text=f"group {g}", showarrow=False,
                           font={"color": "#555", "size": 12})
    for row, x in zip(rows, x_of):
        ok = bool(row["intact"])
        target = centres[kept_kv.index(row["reads KV head"])]
        fig.add_shape(type="line", x0=x, y0=1.3, x1=target, y1=0.7,
                      line={"color": "#777" if ok else MISMATCH, "width": 1.5 if ok else 3.5})
        _box(fig, x - 0.4, x + 0.4, 1.3, 2.0, kv_colour(row["trained with KV head"]),
             "#333" if ok else MISMATCH, 1.5 if ok else 4)
        label = f"q{row['query head']}" + ("" if ok else " ✗")
        fig.add_annotation(x=x, y=1.65, text=f"<b>{label}</b>", showarrow=False,
                           font=text if ok else text | {"color": MISMATCH})
    fig.add_trace(go.Scatter(  # invisible points carry the hover text (shapes have none)
        x=x_of, y=[1.65] * len(x_of), mode="markers", marker={"opacity": 0, "size": 30},
        hovertemplate="%{text}<extra></extra>", showlegend=False,
        text=[f"query head q{r['query head']}: trained with k{r['trained with KV head']}, "
              f"reads k{r['reads KV head']}" for r in rows]))
    fig.update_xaxes(visible=False, range=[min(x_of) - 0.9, max(x_of) + 0.9], fixedrange=True)
    fig.update_yaxes(visible=False, range=[-0.4, 2.6], fixedrange=True)
    fig.update_layout(title=title, height=260, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      plot_bgcolor="white", font=PLOT_FONT)
    return fig


def group_heatmap(scores: HeadScores) -> go.Figure:
    """Layers x groups, each cell the group's share (%) of its layer's Taylor score."""
    table = scores.table()
    grid = table.pivot(index="layer", columns="group", values="share %")
    raw = table.pivot(index="layer", columns="group", values="score")
    fig = go.Figure(go.Heatmap(
        z=grid.values, x=[f"group {g}" for g in grid.columns], y=list(grid.index),
        customdata=raw.values, colorscale="Viridis", colorbar={"title": "share of layer (%)"},
        hovertemplate="layer %{y}, %{x}<br>share %{z:.1f} %<br>Taylor score %{customdata:.3g}"
                      "<extra></extra>"))
    fig.update_layout(height=max(260, 22 * len(grid) + 120), font=PLOT_FONT,
                      xaxis_title="GQA group (KV head)", yaxis_title="layer",
                      margin={"l": 10, "r": 10, "t": 30, "b": 10})
    fig.update_yaxes(autorange="reversed", dtick=1 if len(grid) <= 32 else None)
    return fig


def importance_figure(importance: LayerImportance) -> go.Figure:
    scores = list(importance.scores)
    units = {"removal": "perplexity increase when the layer is skipped",
             "activation": "mean L2 norm of the layer output",
             "block_influence": "1 − cos(layer input, layer output)"}
    fig = go.Figure(go.Bar(x=list(range(len(scores))), y=scores, marker_color="#4c78a8",
                           hovertemplate="layer %{x}<br>score %{y:.4g}<extra></extra>"))
    fig.update_layout(xaxis_title="layer", yaxis_title=units.get(importance.method, "score"),
                      height=380, font=PLOT_FONT, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    if scores and min(scores) > 0 and max(scores) / min(scores) > 100:
        fig.update_yaxes(type="log")  # removing layer 0 of a small LM dwarfs every other layer
    return fig


def rates_figure(preview: RatePreview, config: PruneConfig, target: float,
                 overlays: dict[str, list[float]] | None = None) -> go.Figure:
    """Per-layer rates as bars, the [min, max] band over the layer range, the target line, the
    rate achieved with whole units as markers, and other strategies as dashed lines."""
    layers = list(range(len(preview.rates)))
    end = len(layers) if config.layer_end is None else min(config.layer_end, len(layers))
    fig = go.Figure()
    fig.add_shape(type="rect", x0=config.layer_start - 0.5, x1=end - 0.5,
                  y0=100 * config.min_pruning_rate, y1=100 * config.max_pruning_rate,
                  fillcolor=BAND, line_width=0, layer="below")
    fig.add_trace(go.Bar(x=layers, y=[100 * r for r in preview.rates],
                         name=f"planned rate ({config.pruning_strategy})",
                         marker_color=STRATEGY_COLOURS[config.pruning_strategy],
                         hovertemplate="layer %{x}<br>rate %{y:.1f} %<extra></extra>"))
    fig.add_trace(go.Scatter(x=layers, y=[100 * a for a in preview.achieved], mode="markers",
                             name="achieved with whole units", marker={"color": "black", "size": 8,
                                                                       "symbol": "diamond"},
                             hovertemplate="layer %{x}<br>achieved %{y:.1f} %<extra></extra>"))
    for strategy, rates in (overlays or {}).items():
        if strategy != config.pruning_strategy:
            fig.add_trace(go.Scatter(
                x=layers, y=[100 * r for r in rates], mode="lines+markers",
                name=f"{strategy} (compare)", line={"dash": "dot", "width": 2,
                                                    "color": STRATEGY_COLOURS[strategy]},
                hovertemplate=f"layer %{{x}}<br>{strategy} %{{y:.1f}} %<extra></extra>"))
    fig.add_hline(y=100 * target, line={"color": MISMATCH, "dash": "dash"},
                  annotation_text=f"target {100 * target:.1f} %", annotation_position="top right",
                  annotation_font_color=MISMATCH, annotation_bgcolor="rgba(255,255,255,0.85)")
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="[min, max] band",
                             marker={"symbol": "square", "size": 12, "color": BAND}))
    fig.update_layout(xaxis_title="layer", yaxis_title="pruning rate (% of the layer's prunable "
                      "parameters)", height=420, font=PLOT_FONT, bargap=0.25,
                      legend={"orientation": "h", "y": 1.12, "x": 0},
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    top = max([config.max_pruning_rate, *preview.rates, *preview.achieved,
                *(r for rates in (overlays or {}).values() for r in rates)])
    fig.update_yaxes(range=[0, 100 * top + 6])
    fig.update_xaxes(dtick=1 if len(layers) <= 16 else None, range=[-0.6, len(layers) - 0.4])
    return fig


def budget_split_figure(split: BudgetSplit) -> go.Figure:
    """Per layer, the parameters removed as one stacked bar: attention (whole GQA groups) below,
    MLP channels above; hovering names the units."""
    layers = list(range(len(split.attention)))
    fig = go.Figure()
    for name, values, units, colour, share in (
            ("attention (GQA groups)", split.attention, split.groups_removed, ATTENTION_COLOUR,
             split.attention_share),
            ("MLP channels", split.mlp, split.channels_removed, MLP_COLOUR, split.mlp_share)):
        unit = "groups" if name.startswith("attention") else "channels"
        fig.add_trace(go.Bar(x=layers, y=list(values), name=f"{name}: {share:.1%} of removed",
                             marker_color=colour, customdata=list(units),
                             hovertemplate=f"layer %{{x}}<br>{name}: %{{y:,}} parameters "
                                           f"(%{{customdata}} {unit})<extra></extra>"))
    fig.update_layout(barmode="stack", xaxis_title="layer", yaxis_title="parameters removed",
                      height=320, font=PLOT_FONT, bargap=0.25,
                      legend={"orientation": "h", "y": 1.15, "x": 0},
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    fig.update_xaxes(dtick=1 if len(layers) <= 16 else None, range=[-0.6, len(layers) - 0.4])
    return fig


def head_counts_figure(report: dict) -> go.Figure:
    """Per layer two bars, query heads and KV heads: the light bar is before, the dark one in
    front of it what is left."""
    table = layer_counts_table(report)
    fig = go.Figure()
    for kind, light, dark in (("Q", "#c6dbef", "#2171b5"), ("KV", "#fdd0a2", "#d94801")):
        for when, colour in (("before", light), ("after", dark)):
            column = f"{kind} heads {when}"
            fig.add_trace(go.Bar(x=table["layer"], y=table[column], name=column,
                                 marker_color=colour, offsetgroup=kind,
                                 hovertemplate=f"layer %{{x}}<br>{column}: %{{y}}<extra></extra>"))
    fig.update_layout(barmode="group", xaxis_title="layer", yaxis_title="heads", height=360,
                      font=PLOT_FONT, legend={"orientation": "h", "y": 1.15},
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def mlp_figure(report: dict) -> go.Figure:
    table = layer_counts_table(report)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=table["layer"], y=table["MLP before"], name="before",
                         marker_color="#d9d9d9"))
    fig.add_trace(go.Bar(x=table["layer"], y=table["MLP after"], name="after",
                         marker_color="#31a354"))
    fig.update_layout(barmode="overlay", xaxis_title="layer", yaxis_title="MLP width (channels)",
                      height=320, font=PLOT_FONT, legend={"orientation": "h", "y": 1.15},
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig



def profile_heatmap(z: list[list[float]], x: list[str], y: list[int]) -> go.Figure:
    """The sensitivity profile: perplexity ratio of each layer cut alone (rows) at each MLP
    rate (columns), on a log colour scale."""
    import math

    fig = go.Figure(go.Heatmap(
        z=[[math.log10(v) for v in row] for row in z], x=x, y=y, customdata=z,
        colorscale="Reds", colorbar={"title": "log10(ppl x)"},
        hovertemplate="layer %{y}, %{x} of the MLP cut<br>perplexity x%{customdata:.3f}"
                      "<extra></extra>"))
    fig.update_layout(xaxis_title="MLP channels removed (this layer only)", yaxis_title="layer",
                      height=460, font=PLOT_FONT, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return fig


def group_cost_figure(table) -> go.Figure:
    """Perplexity ratio when one layer alone loses its k weakest GQA groups, per layer."""
    fig = go.Figure()
    for removed, rows in table.groupby("groups removed"):
        fig.add_trace(go.Bar(x=rows["layer"], y=rows["perplexity x dense"],
                             name=f"{removed} group{'s' if removed > 1 else ''} removed",
                             hovertemplate="layer %{x}<br>perplexity x%{y:.3f}<extra></extra>"))
    fig.update_layout(barmode="group", xaxis_title="layer", yaxis_title="perplexity x dense "
                      "(only this layer cut)", yaxis_type="log", height=380, font=PLOT_FONT,
                      margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return fig


def gate_figure(curve, limit: float) -> go.Figure:
    """The quality gate's ratio-to-perplexity curve: predicted points (open) and measured ones
    (filled), with the gate's limit as a dashed line."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=curve["ratio %"], y=curve["predicted x dense"], name="predicted",
                             mode="lines+markers", marker={"symbol": "circle-open", "size": 9},
                             line={"dash": "dot", "color": "#6baed6"},
                             hovertemplate="%{x:.1f} %: predicted x%{y:.3f}<extra></extra>"))
    measured = curve.dropna(subset=["measured x dense"])
    fig.add_trace(go.Scatter(x=measured["ratio %"], y=measured["measured x dense"],
                             name="measured", mode="markers", marker={"size": 11,
                                                                      "color": "#d94801"},
                             hovertemplate="%{x:.1f} %: measured x%{y:.3f}<extra></extra>"))
    fig.add_hline(y=limit, line_dash="dash", line_color="#636363",
                  annotation_text=f"gate x{limit:.3g}")
    fig.update_layout(xaxis_title="parameters removed (%)", yaxis_title="perplexity x dense "
                      "(validation text)", height=340, font=PLOT_FONT,
                      legend={"orientation": "h", "y": 1.15},
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig
