"""Sensitivity profiles on disk: JSON under ``cache/sensitivity/``, keyed like the layer scores.

The key holds everything that determines a profile: ``model_id``, the weights fingerprint of
:func:`gqaprune_core.layer_importance.weights_fingerprint`, the :class:`ProfileSettings`,
digests of the fit and profile tokens (an edited text file or another tokenizer misses), the
MLP grid and the format version. Files are written atomically (temporary file, then
``os.replace``); a damaged or mismatching file is recomputed and overwritten. The CLI and the
app call :func:`sensitivity_profile` and so share one cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gqaprune_core.data import CorpusError, calibration_batch, fit_and_validation, load_corpus
from gqaprune_core.layer_importance import weights_fingerprint
from gqaprune_core.models import cache_dir, layout
from gqaprune_core.outputs import write_atomic
from gqaprune_core.sensitivity.cuts import MLP_RATES
from gqaprune_core.sensitivity.profile import (PROFILE_SEED_OFFSET, Progress, ProfileSettings,
                                               SensitivityProfile, compute_profile)

FORMAT_VERSION = 2  # 2: profile windows from validation documents, fit windows from the rest


def _digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def profile_windows(tokenizer, settings: ProfileSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, ids)``: the fit windows (channel choice and re-fit) from the first 70 % of each
    source's calibration documents (``NAME:fit``), the profile windows (the measured losses)
    from the other 30 %, documents the cuts were not fitted on, as the text a pruned model
    meets is not. A source too small to split that way (one calibration document, or a share
    shorter than a window) falls back to the pipeline's calibration draw and other windows of
    the same documents (seed + PROFILE_SEED_OFFSET)."""
    def draw(fit_corpus, held) -> tuple[torch.Tensor, torch.Tensor]:
        return (calibration_batch(tokenizer, fit_corpus, settings.fit_samples,
                                  settings.fit_seq_len, settings.seed),
                calibration_batch(tokenizer, held, settings.samples, settings.seq_len,
                                  settings.seed + PROFILE_SEED_OFFSET))

    try:
        return draw(*fit_and_validation(settings.corpus))
    except CorpusError:
        whole = load_corpus(settings.corpus)
        return draw(whole, whole)


def cache_key(model: nn.Module, settings: ProfileSettings, fit: torch.Tensor, ids: torch.Tensor,
              model_id: str) -> dict[str, Any]:
    """Everything that determines the profile, as a JSON-able dict."""
    return {"model_id": model_id, "weights": weights_fingerprint(model),
            "settings": settings.to_dict(), "fit_tokens": _digest(fit), "tokens": _digest(ids),
            "grid": list(MLP_RATES), "format_version": FORMAT_VERSION}


def cache_path(inputs: dict[str, Any], cache_root: Path | None = None) -> Path:
    """``<cache_root or cache_dir()>/sensitivity/<model>-<mode>-<hash of inputs>.json``."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(inputs.get("model_id") or "model"))[-48:]
    root = cache_dir() if cache_root is None else Path(cache_root)
    return root / "sensitivity" / f"{model}-{inputs['settings']['mode']}-{key}.json"


def save_profile(path: str | os.PathLike, profile: SensitivityProfile) -> Path:
    """Write ``profile`` as JSON atomically. Returns the path."""
    content = json.dumps(profile.to_dict() | {"format_version": FORMAT_VERSION})
    return write_atomic(Path(path), lambda staging: staging.write_text(content, encoding="utf-8"))


def load_profile(path: str | os.PathLike) -> SensitivityProfile:
    """Read a profile written by :func:`save_profile`.

    Raises:
        ValueError: an unreadable file, bad JSON, another format version or missing fields.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"cannot read sensitivity profile {path}: {err}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"sensitivity profile {path} is not valid JSON: {err}") from err
    if not isinstance(content, dict) or content.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a sensitivity profile of format version {FORMAT_VERSION}")
    content.pop("format_version")
    try:
        return SensitivityProfile.from_dict(content)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: damaged sensitivity profile ({err!r})") from err


def _cached(path: Path, inputs: dict, model: nn.Module) -> SensitivityProfile | None:
    if not path.is_file():
        return None
    try:
        found = load_profile(path)
    except ValueError:
        return None
    shapes = layout(model)
    same_shape = (found.mlp_widths == tuple(s.mlp_width for s in shapes)
                  and found.kv_heads == tuple(s.kv_heads for s in shapes))
    return found if found.inputs == inputs and same_shape else None


def sensitivity_profile(model: nn.Module, tokenizer, settings: ProfileSettings,
                        model_id: str = "", use_cache: bool = True,
                        cache_root: Path | None = None, progress: Progress | None = None
                        ) -> SensitivityProfile:
    """The profile of ``model`` under ``settings``, from the disk cache or computed (and then
    cached; ``use_cache=False`` neither reads nor writes). ``seconds`` of a hit is the time
    the profile took when computed."""
    fit, ids = profile_windows(tokenizer, settings)
    inputs = cache_key(model, settings, fit, ids, model_id)
    path = cache_path(inputs, cache_root)
    if use_cache and (hit := _cached(path, inputs, model)) is not None:
        return hit
    batch = 32 if next(model.parameters()).is_cuda else 8
    profile = compute_profile(model, fit, ids, settings, progress, batch_size=batch)
    profile = SensitivityProfile(**(profile.__dict__ | {"inputs": inputs}))
    if use_cache:
        save_profile(path, profile)
    return profile
