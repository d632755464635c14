"""Streamlit pieces every page shares: page setup and sidebar, the shared model, job panels.

Every page calls :func:`page_setup` itself instead of relying on ``app.py`` for it: Streamlit
runs a page script on its own when it treats ``pages/`` as a v1 pages folder (AppTest always
does, the server does for a deep link before the first ``st.navigation`` call).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: the app runs torch on several threads (jobs, script runs), and
# spinning OpenMP teams starve each other; on a busy 2-core machine a forward pass took 8x longer.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import uuid  # noqa: E402
from dataclasses import dataclass
from typing import Any

import streamlit as st

from gqaprune_core import app_support as support
from gqaprune_core import jobs

MODEL_PAGE = "pages/1_model.py"
IMPORTANCE_PAGE = "pages/3_layer_importance.py"
TUNING_PAGE = "pages/4_rate_tuning.py"
PRUNE_PAGE = "pages/5_prune.py"
EXPORT_PAGE = "pages/6_export.py"
JOB_TITLES = {"importance": "Layer importance", "group_scores": "Group scores",
              "prune": "Pruning", "sensitivity": "Sensitivity profile"}
JOB_PAGES = {"importance": "Layer importance", "group_scores": "GQA structure",
             "prune": "Prune & evaluate",
             "sensitivity": "Rate tuning"}  # where a finished job's result is shown
STAGES = {"starting": "starting", "copy model": "copying the model",
          "generate before": "generating (before)", "importance": "layer importance",
          "evaluate_before": "perplexity before", "prune": "scoring and cutting layers",
          "evaluate_after": "perplexity after", "generate after": "generating (after)",
          "recover": "recovery (distillation steps)",
          "evaluate_recovered": "perplexity after recovery",
          "calibration": "calibration text",
          "self_text": "calibration text the dense model writes",
          "taylor": "Taylor scores (backward passes)",
          "sensitivity": "sensitivity profile (single-layer cuts)"}


def quick() -> bool:
    """``GQAPRUNE_APP_QUICK=1``: tiny sample counts everywhere (tests, slow machines)."""
    return os.environ.get("GQAPRUNE_APP_QUICK", "") not in ("", "0")


def defaults() -> dict[str, Any]:
    """Default sample counts: small on CPU, tiny in quick mode, the CLI's on a GPU."""
    import torch

    if quick():
        return {"importance_samples": 4, "num_examples": 2, "seq_len": 32,
                "eval_seq_len": 128, "max_eval_windows": 2, "max_new_tokens": 12,
                "score_samples": 2, "recovery_steps": 2, "recovery_time_s": 60,
                "recovery_seq_len": 32, "recovery_samples": 4}
    if torch.cuda.is_available():
        return {"importance_samples": 50, "num_examples": 10, "seq_len": 64,
                "eval_seq_len": 512, "max_eval_windows": 24, "max_new_tokens": 32,
                "score_samples": 16, "recovery_steps": 100, "recovery_time_s": 600,
                "recovery_seq_len": 256, "recovery_samples": None}
    # CPU: a recovery step of 4 x 256 tokens takes ~11 s on the demo model (2 threads);
    # 128 tokens, a budget of 5 minutes
    return {"importance_samples": 16, "num_examples": 6, "seq_len": 64, "eval_seq_len": 256,
            "max_eval_windows": 8, "max_new_tokens": 24, "score_samples": 8,
            "recovery_steps": 20, "recovery_time_s": 300, "recovery_seq_len": 128,
            "recovery_samples": None}


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


def preset_name() -> str:
    """The preset this session's runs start from: ``support.START_PRESET`` (gqaprune's
    recommended settings) until another is applied on Rate tuning."""
    return st.session_state.setdefault("preset", support.START_PRESET)


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
    preset_name()  # set before any page reads st.session_state["preset"]
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
        if any(job_running(name) for name in JOB_TITLES):
            _sidebar_jobs()  # live, wherever the user is
        else:
            _job_notes()


@st.fragment(run_every=2.0)
def _sidebar_jobs() -> None:
    _job_notes()


def _job_notes() -> None:
    """One line per job of this session that runs, or ended and waits to be looked at."""
    for name, label in JOB_TITLES.items():
        job = jobs.JOBS.get(owner(), name)
        if job is None:
            continue
        if job.running:
            st.caption(f":material/hourglass_top: {label}: {STAGES.get(job.stage, job.stage)}"
                       f" ({job.fraction:.0%}, {job.elapsed:.0f} s)")
        else:
            outcome = "failed" if job.error else "finished"
            st.caption(f":material/task_alt: {label} {outcome}: see **{JOB_PAGES[name]}**")


def finished_result(name: str) -> Any:
    """The result of this session's job ``name``, returned once when it has succeeded.

    While the job runs, shows its progress (polled every second). A failure is shown as an
    error, which stays until the next job of that name starts.
    """
    job = jobs.JOBS.get(owner(), name)
    if job is not None and job.running:
        _poll(name)
        return None
    job = jobs.JOBS.pop(owner(), name)
    if job is not None and job.error:
        st.session_state[f"_failed_{name}"] = job
    failed = st.session_state.get(f"_failed_{name}")
    if failed is not None:
        st.error(f"{JOB_TITLES.get(name, name)} failed: {failed.error}")
        with st.expander("Details"):
            st.code(failed.details, language=None)
    return None if job is None or job.error else job.result


@st.fragment(run_every=1.0)
def _poll(name: str) -> None:
    job = jobs.JOBS.get(owner(), name)
    if job is None or not job.running:
        st.rerun()  # a full rerun lets the page collect the result
    stage = STAGES.get(job.stage, job.stage)
    counts = f" {job.done}/{job.total}" if job.total > 1 else ""
    st.progress(job.fraction, text=f"{JOB_TITLES.get(name, name)}: {stage}{counts} · "
                                   f"{job.elapsed:.0f} s — keeps running if you change page")


def job_running(name: str) -> bool:
    job = jobs.JOBS.get(owner(), name)
    return job is not None and job.running


def submit(name: str, work) -> None:
    """Start a background job; show the refusal if one of that name is running.

    A started job reruns the page, so that its start button is drawn disabled at once (the
    page drew it before the job existed; only the progress fragment reruns meanwhile).
    """
    try:
        jobs.JOBS.submit(owner(), name, work)
    except RuntimeError as err:
        st.warning(str(err))
    else:
        st.session_state.pop(f"_failed_{name}", None)
        st.rerun()


def start_importance(loaded: Loaded, method: str, corpus: str, samples: int,
                     seq_len: int) -> None:
    """Layer importance in the background; the result is ``(scores, read_from_cache)``."""
    from gqaprune_core.layer_importance import layer_importance
    from gqaprune_core.models import cache_dir

    model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source

    def work(job: jobs.Job):
        job.progress("calibration", 0, 1)
        files = cache_dir() / "importance"
        with support.SHARED_MODEL_LOCK:  # hooks on the shared model: one such job at a time
            before = set(files.glob("*.json"))
            scores = layer_importance(model, tokenizer, method, corpus, samples, seq_len,
                                      model_id=source,
                                      progress=lambda d, t: job.progress("importance", d, t))
            return scores, not set(files.glob("*.json")) - before

    submit("importance", work)


def collect_importance(loaded: Loaded) -> None:
    """Store a finished importance job's scores for this model (shows progress or errors)."""
    result = finished_result("importance")
    if result is not None:
        importance_store()[loaded.key], st.session_state["importance_from_cache"] = result
        st.rerun()  # redraw the sidebar, which was drawn while the job was still listed


def importance_store() -> dict:
    """Layer importance results of this session, keyed by model choice."""
    return st.session_state.setdefault("importance", {})


def profile_store() -> dict:
    """Sensitivity profiles of this session, keyed by model choice."""
    return st.session_state.setdefault("sensitivity", {})


def profile_config(loaded: Loaded):
    """The config whose profile the app computes: the session's preset on this model (tiny
    sample counts in quick mode)."""
    from gqaprune_core.config import PRESETS

    config = PRESETS[preset_name()].with_(base_model=loaded.source)
    if quick():
        config = config.with_(sensitivity_samples=2, sensitivity_seq_len=16,
                              sensitivity_fit_samples=2, seq_len=24)
    return config


def start_profile(loaded: Loaded) -> None:
    """The sensitivity profile in the background (a disk-cache hit returns at once)."""
    from gqaprune_core.sensitivity.app_view import compute_profile_for

    model, tokenizer, config = loaded.model, loaded.tokenizer, profile_config(loaded)

    def work(job: jobs.Job):
        job.progress("sensitivity", 0, 1)
        with support.SHARED_MODEL_LOCK:  # hooks on the shared model: one such job at a time
            return compute_profile_for(config, model, tokenizer,
                                       lambda d, t: job.progress("sensitivity", d, t))

    submit("sensitivity", work)


def collect_profile(loaded: Loaded) -> None:
    """Store a finished profile job's result for this model (shows progress or errors)."""
    result = finished_result("sensitivity")
    if result is not None:
        profile_store()[loaded.key] = result
        st.rerun()


def profile_panel(loaded: Loaded) -> Any:
    """This model's sensitivity profile, or a button that computes it (and None)."""
    collect_profile(loaded)
    profile = profile_store().get(loaded.key)
    if profile is not None:
        return profile
    config = profile_config(loaded)
    st.info(f"No sensitivity profile yet: the loss of cutting each layer alone at 10 MLP rates "
            f"and each number of GQA groups ({config.sensitivity_mode}, "
            f"{config.sensitivity_samples} x {config.sensitivity_seq_len} tokens of "
            f"{config.calibration_dataset}; minutes on a CPU, cached on disk). It gives the "
            "predicted perplexity and the optimized strategy.")
    if st.button("Compute sensitivity profile", disabled=job_running("sensitivity")):
        start_profile(loaded)
        collect_profile(loaded)
    return None


def head_score_store() -> dict:
    return st.session_state.setdefault("head_scores", {})
