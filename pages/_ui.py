"""Streamlit pieces every page shares: page setup and sidebar, the shared model, job panels.

Every page calls :func:`page_setup` itself instead of relying on ``app.py`` for it: Streamlit
runs a page script on its own when it treats ``pages/`` as a v1 pages folder (AppTest always
does, the server does for a deep link before the first ``st.navigation`` call).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import streamlit as st

from gqaprune_core import app_support as support

MODEL_PAGE = "pages/1_model.py"
IMPORTANCE_PAGE = "pages/3_layer_importance.py"
TUNING_PAGE = "pages/4_rate_tuning.py"
PRUNE_PAGE = "pages/5_prune.py"
EXPORT_PAGE = "pages/6_export.py"
JOB_TITLES = {"importance": "Layer importance", "group_scores": "Group scores",
              "prune": "Pruning"}
STAGES = {"starting": "starting", "copy model": "copying the model",
          "generate before": "generating (before)", "importance": "layer importance",
          "evaluate_before": "perplexity before", "prune": "scoring and cutting layers",
          "evaluate_after": "perplexity after", "generate after": "generating (after)",
          "calibration": "calibration text", "taylor": "Taylor scores (backward passes)"}


def quick() -> bool:
    """``GQAPRUNE_APP_QUICK=1``: tiny sample counts everywhere (tests, slow machines)."""
    return os.environ.get("GQAPRUNE_APP_QUICK", "") not in ("", "0")


def defaults() -> dict[str, Any]:
    """Default sample counts: small on CPU, tiny in quick mode, the CLI's on a GPU."""
    import torch

    if quick():
        return {"importance_samples": 4, "num_examples": 2, "seq_len": 32,
                "eval_seq_len": 128, "max_eval_windows": 2, "max_new_tokens": 12,
                "score_samples": 2}
    if torch.cuda.is_available():
        return {"importance_samples": 50, "num_examples": 10, "seq_len": 64,
                "eval_seq_len": 512, "max_eval_windows": 24, "max_new_tokens": 32,
                "score_samples": 16}
    return {"importance_samples": 16, "num_examples": 6, "seq_len": 64, "eval_seq_len": 256,
            "max_eval_windows": 8, "max_new_tokens": 24, "score_samples": 8}


@dataclass(frozen=True)
class Loaded:
    """The shared model of this session and how it was chosen."""

    source: str
    device: str
    dtype: str
    model: Any
    tokenizer: Any

    @property
    def key(self) -> tuple[str, str, str]:
        return self.source, self.device, self.dtype


def owner() -> str:
    """This browser session's key in the job registry."""
    return st.session_state.setdefault("_owner", uuid.uuid4().hex)


@st.cache_resource(show_spinner=False, max_entries=2)
def _load(source: str, device: str, dtype: str):
    from gqaprune_core.models import load_model

    return load_model(source, device=device, dtype=None if dtype == "auto" else dtype)


def load(source: str, device: str = "auto", dtype: str = "auto") -> Loaded:
    """The cached (shared, never to be modified) model; raises the loader's errors."""
    model, tokenizer = _load(source, device, dtype)
    return Loaded(source, device, dtype, model, tokenizer)


def remember(loaded: Loaded) -> None:
    if st.session_state.get("model_choice") != loaded.key:
        st.session_state["model_choice"] = loaded.key
        st.session_state["model_info"] = support.model_summary(loaded.model)


def show_load_error(source: str, err: Exception) -> None:
    from gqaprune_core.checkpoint import CheckpointError
    from gqaprune_core.models import ModelLoadError

    st.error(f"Could not load **{source}**: {err}")
    if not isinstance(err, (ModelLoadError, CheckpointError, FileNotFoundError)):
        with st.expander("Details"):
            st.code(f"{type(err).__name__}: {err}")


def require_model() -> Loaded:
    """The session's model; the default one is loaded on first need. Stops the page on failure."""
    choice = st.session_state.get("model_choice") or (support.default_source(), "auto", "auto")
    try:
        with st.spinner(f"Loading model **{choice[0]}** (the first load of the demo model "
                        "converts it, about a minute; later loads take a second)…"):
            loaded = load(*choice)
    except Exception as err:  # UI boundary: any loader failure becomes a message
        show_load_error(choice[0], err)
        st.page_link(MODEL_PAGE, label="Choose another model on the Model page",
                     icon=":material/memory:")
        st.stop()
    if st.session_state.get("model_choice") != loaded.key:
        remember(loaded)
        st.rerun()  # the sidebar above was drawn before the model was there
    return loaded


def page_setup(title: str) -> None:
    """Page config and the sidebar: the loaded model and any running jobs."""
    st.set_page_config(page_title=f"{title} · gqaprune", page_icon=":material/content_cut:",
                       layout="wide")
    with st.sidebar:
        info = st.session_state.get("model_info")
        choice = st.session_state.get("model_choice")
        if info and choice:
            st.markdown(f"**Model:** `{choice[0]}`  \n{support.human_count(info['parameters'])} "
                        f"parameters · {info['layers']} layers · {info['device']} · "
                        f"{info['dtype']}")
        else:
            st.markdown(f"**Model:** not loaded yet (`{support.default_source()}` loads when a "
                        "page needs it)")
        for name, label in JOB_TITLES.items():
            job = support.JOBS.get(owner(), name)
            if job is not None and job.running:
                st.caption(f":material/hourglass_top: {label}: {STAGES.get(job.stage, job.stage)}"
                           f" ({job.fraction:.0%}, {job.elapsed:.0f} s)")


def finished_job(name: str) -> support.Job | None:
    """Show a running job's progress (polled every second); return it once, when it ends."""
    job = support.JOBS.get(owner(), name)
    if job is None:
        return None
    if job.running:
        _poll(name)
        return None
    return support.JOBS.pop(owner(), name)


@st.fragment(run_every=1.0)
def _poll(name: str) -> None:
    job = support.JOBS.get(owner(), name)
    if job is None or not job.running:
        st.rerun()  # a full rerun lets the page collect the result
    stage = STAGES.get(job.stage, job.stage)
    counts = f" {job.done}/{job.total}" if job.total > 1 else ""
    st.progress(job.fraction, text=f"{JOB_TITLES.get(name, name)}: {stage}{counts} · "
                                   f"{job.elapsed:.0f} s — keeps running if you change page")


def job_running(name: str) -> bool:
    job = support.JOBS.get(owner(), name)
    return job is not None and job.running


def submit(name: str, work) -> None:
    """Start a background job; show the refusal if one of that name is running."""
    try:
        support.JOBS.submit(owner(), name, work)
    except RuntimeError as err:
        st.warning(str(err))


def show_job_error(job: support.Job) -> None:
    st.error(f"{JOB_TITLES.get(job.name, job.name)} failed: {job.error}")
    with st.expander("Details"):
        st.code(job.details)


def importance_store() -> dict:
    """Layer importance results of this session, keyed by model choice."""
    return st.session_state.setdefault("importance", {})


def head_score_store() -> dict:
    return st.session_state.setdefault("head_scores", {})
