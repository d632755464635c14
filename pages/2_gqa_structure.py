"""GQA structure: which query heads share which KV head, and why pruning must remove groups."""

from __future__ import annotations

import streamlit as st

from gqaprune_core import app_support as support
from gqaprune_core import jobs
from gqaprune_core.models import layout
from gqaprune_core.sensitivity import app_view as sensitivity_view
from pages import _charts, _ui

_ui.page_setup("GQA structure")
st.title("GQA structure")
loaded = _ui.require_model()
shapes = layout(loaded.model)

st.markdown(
    "In **grouped-query attention** several query heads share one key/value (KV) head. Query "
    "head *h* reads KV head *h // q_per_kv*: the attention module pairs them **by position**, "
    "it keeps no table of who belongs to whom. A **GQA group** is one KV head with its query "
    "heads. Remove a whole group and every remaining query head still sits next to its own KV "
    "head. Remove query heads and KV heads one by one (\"naive head pruning\") and the heads "
    "after the gap slide into another group's KV head: their keys and values are now foreign.")

scores = _ui.head_score_store().get(loaded.key)
controls, diagram = st.columns([1, 3])
with controls:
    layer = st.selectbox("Layer", range(len(shapes)), key="gqa_layer")
    shape = shapes[layer]
    group_scores = scores.groups[layer] if scores else None
    lowest = min(range(shape.kv_heads), key=group_scores.__getitem__) if group_scores else 0
    removed = st.selectbox("GQA group to remove", range(shape.kv_heads), index=lowest,
                           format_func=lambda g: f"group {g} (k{g})", key=f"gqa_group_{layer}",
                           help="Preselected: the least important group by Taylor score, once "
                                "scores are computed below.")
    compare = st.toggle("Compare with naive pruning", value=True, key="gqa_compare")
with diagram:
    st.plotly_chart(_charts.gqa_figure(shape.q_heads, shape.kv_heads,
                                       title=f"Layer {layer}: {shape.q_heads} query heads, "
                                             f"{shape.kv_heads} KV heads, q_per_kv {shape.q_per_kv}"),
                    key="gqa_full")

kept_q, kept_kv = support.group_cut(shape.q_heads, shape.kv_heads, [removed])
if shape.kv_heads == 1:
    st.info("This layer has a single KV head: its only group cannot be removed.")
else:
    group_figure = _charts.gqa_figure(shape.q_heads, shape.kv_heads, kept_q, kept_kv,
                                      title=f"Group pruning: group {removed} removed — intact")
    if not compare:
        st.plotly_chart(group_figure, key="gqa_group_cut")
    else:
        if scores:
            by_score = sorted(range(shape.q_heads), key=scores.query_heads[layer].__getitem__)
            default_heads = sorted(by_score[:shape.q_per_kv])
        else:
            default_heads = support.example_naive_heads(shape.q_heads, shape.kv_heads)
        naive_heads = st.multiselect(
            f"Query heads naive pruning removes (pick {shape.q_per_kv}; KV head k{removed} "
            "goes too)", range(shape.q_heads), default=default_heads,
            format_func=lambda h: f"q{h}", max_selections=shape.q_per_kv,
            key=f"gqa_naive_{layer}_{removed}",
            help="Preselected: the lowest-scoring single query heads once Taylor scores exist, "
                 "otherwise heads spread over the groups, as scoring heads one by one tends to "
                 "pick.")
        left, right = st.columns(2)
        left.plotly_chart(group_figure, key="gqa_group_cut")
        if len(naive_heads) != shape.q_per_kv:
            right.info(f"Pick {shape.q_per_kv} query heads to remove.")
        else:
            naive_q = [h for h in range(shape.q_heads) if h not in naive_heads]
            mapping = support.head_mapping(shape.q_heads, shape.kv_heads, naive_q, kept_kv)
            broken = int((~mapping["intact"]).sum())
            verdict = "intact" if broken == 0 else f"{broken} of {len(naive_q)} heads broken"
            right.plotly_chart(_charts.gqa_figure(shape.q_heads, shape.kv_heads, naive_q, kept_kv,
                                                  title=f"Naive head pruning — {verdict}"),
                               key="gqa_naive_cut")
            if broken:
                st.warning(f"After naive pruning, {broken} of {len(naive_q)} query heads read a "
                           "KV head they were not trained with (red, ✗): the model's attention "
                           "is scrambled, not just smaller. Group pruning keeps every pairing.")
            else:
                st.success(f"These are exactly the query heads of group {removed}: naive pruning "
                           "happens to equal group pruning here.")
            with st.expander("Mapping after naive pruning"):
                st.dataframe(mapping, hide_index=True)

st.subheader("Group importance across layers")
st.markdown("First-order **Taylor** score of each group, |weight × gradient| summed over its "
            "q/k/v rows and o_proj columns, on a few calibration windows. Each cell shows the "
            "group's share of its layer's total: the darkest cell per row is what pruning keeps "
            "longest.")
running = _ui.job_running("group_scores")
with st.form("group_scores_form", border=False):
    left, right, button = st.columns([1, 1, 1], vertical_alignment="bottom")
    samples = left.number_input("Calibration windows", 1, 256, _ui.defaults()["score_samples"],
                                key="score_samples")
    seq_len = right.number_input("Tokens per window", 8, 2048, 64, step=8, key="score_seq_len")
    start = button.form_submit_button("Compute group scores", disabled=running,
                                      type="primary" if scores is None else "secondary")
if start:
    model, tokenizer = loaded.model, loaded.tokenizer

    def work(job: jobs.Job) -> support.HeadScores:
        return support.taylor_head_scores(model, tokenizer, "demo", int(samples), int(seq_len),
                                          progress=lambda d, t: job.progress("taylor", d, t))

    _ui.submit("group_scores", work)
result = _ui.finished_result("group_scores")
if result is not None:
    _ui.head_score_store()[loaded.key] = result
    st.rerun()
if scores:
    st.plotly_chart(_charts.group_heatmap(scores), key="group_heatmap")
    st.caption(f"Taylor scores on {scores.samples} windows of {scores.seq_len} tokens of the "
               "demo corpus. Hover a cell for the raw score.")
elif not _ui.job_running("group_scores"):
    st.info("No group scores yet: **Compute group scores** runs a few backward passes.")

st.subheader("What cutting groups costs")
st.markdown("From the **sensitivity profile**: the perplexity (x dense, on held-out calibration "
            "text) when one layer alone loses its weakest GQA group, or two, everything else intact. "
            "One group of this model is a third of a layer's attention; compare with what the "
            "same parameters in MLP channels cost on *Layer importance*.")
group_profile = _ui.profile_panel(loaded)
if group_profile is not None:
    costs = sensitivity_view.group_costs(group_profile)
    if costs.empty:
        st.caption("Every layer keeps a single group: there is no group left to cut.")
    else:
        st.plotly_chart(_charts.group_cost_figure(costs), key="group_cost_chart")
