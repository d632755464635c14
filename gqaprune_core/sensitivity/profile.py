"""Sensitivity profile: per layer and part, the loss increase when ONLY that layer is cut.

Notation: L layers, G KV groups, D head_dim, I MLP width, E hidden size, R MLP grid rates,
B profile windows of T tokens.

For every layer l the profile holds (mean next-token NLL increase, nats per token, on the
profile windows):

- ``mlp_loss[l][r]``: layer l loses ``round(MLP_RATES[r] * I)`` MLP channels, chosen and
  compensated as the pipeline does (``compensate``: output energy and the ridge re-fit of
  ``down_proj`` toward the original weights, see :mod:`gqaprune_core.compensate`; otherwise the
  unit-importance channel scores and no re-fit);
- ``group_loss[l][k]``: layer l loses its k lowest-scoring whole GQA groups (k = 0..G-1) by
  the configured unit scores.

How, forward-only (Taylor unit scores add one backward pass over a few windows):

1. one pass over the *profile* windows (drawn from 30 % of the calibration part's documents,
   which the fit windows never come from: :func:`.store.profile_windows`) records every
   layer's input and the per-window base NLL;
2. then layer by layer: the *fit* windows (from the other 70 %) advance through layer l,
   giving the Gram matrix ``hᵀh`` (I x I) of its MLP activations (channel choice and
   re-fit), and layer l re-run on its recorded profile input gives the Grams of its MLP
   activations and of ``o_proj``'s input on that text (:mod:`.grams`: one layer's Grams in
   memory at a time, not all L);
3. a cut (:mod:`.cuts`) is applied to a copy of layer l, and the recorded input of layer l
   runs through the copy and layers l+1..L-1 only (layers before l are never recomputed): the
   measured loss;
4. with compensation, the joint probe (:mod:`.probe`) cuts a copy of layer l too, at one MLP
   rate for all layers, and carries its own streams on through it: after the last layer, the
   loss of every layer cut at once (``probe_loss``), which the predictor scales by.

``mode="exact"`` does step 3 at every grid point. ``mode="anchored"`` (default, about 5x
cheaper) does it at one anchor per layer and part (:data:`ANCHOR_MLP_RATE`, one group) and
reads every other point as ``c * err``, where ``err = mean_t ||Δy_t||²`` is the change of the
layer's output (closed form from the held-out Grams, no forward pass) and ``c`` the anchor's
measured loss over its ``err``. ``benchmarks/sensitivity.py`` measures this proxy against exact.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from gqaprune_core.evaluate import nll_from_hidden
from gqaprune_core.layer_calls import record_calls  # the shared prefix-reuse machinery
from gqaprune_core.models import LayerLayout, decoder_layers, layout
from gqaprune_core.sensitivity.cuts import MLP_RATES, LayerCut, layer_cuts, mlp_steps
from gqaprune_core.sensitivity.grams import fit_grams
from gqaprune_core.sensitivity.probe import PROBE_MLP_RATE, JointProbe
from gqaprune_core.surgery import cut_layer_
from gqaprune_core.unit_importance import LayerSaliency, layer_saliency

Mode = Literal["exact", "anchored"]
MODES: tuple[str, ...] = ("exact", "anchored")
ANCHOR_MLP_RATE = 0.5
PROFILE_SEED_OFFSET = 7919  # profile windows are drawn apart from the pipeline's calibration
SCORE_WINDOWS = 8  # fit windows used for Taylor/activation unit scores
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ProfileSettings:
    """What determines a profile (besides the model). ``from_config`` mirrors a PruneConfig."""

    corpus: str = "demo"
    fit_samples: int = 32
    fit_seq_len: int = 256
    samples: int = 8
    seq_len: int = 128
    seed: int = 0
    unit_importance: str = "taylor"
    compensate: bool = True
    refit_ridge: float = 0.1
    refit_feedback: float = 0.0  # the joint probe's, as the pipeline's (single cuts: no drift)
    mode: Mode = "anchored"
    probe_rate: float = PROBE_MLP_RATE  # the joint probe's MLP rate (probe.py); 0: none

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sensitivity mode={self.mode!r}; choose one of {', '.join(MODES)}")
        if self.unit_importance == "naive-heads":
            raise ValueError("the sensitivity profile models whole GQA groups; unit_importance "
                             "'naive-heads' (the anti-example) has no profile: use taylor")
        for name in ("fit_samples", "samples"):
            if getattr(self, name) < 2:
                raise ValueError(f"sensitivity {name}={getattr(self, name)} must be >= 2 "
                                 "(the uncertainty needs at least two windows)")
        if not 0.0 <= self.refit_feedback <= 1.0:
            raise ValueError(f"sensitivity refit_feedback={self.refit_feedback} must lie in "
                             "[0, 1]")
        if not 0.0 <= self.probe_rate < 1.0:
            raise ValueError(f"sensitivity probe_rate={self.probe_rate} must lie in [0, 1)")
        for name in ("fit_seq_len", "seq_len"):
            if getattr(self, name) < 2:
                raise ValueError(f"sensitivity {name}={getattr(self, name)} must be >= 2")

    @classmethod
    def from_config(cls, config: Any) -> ProfileSettings:
        """The settings a :class:`gqaprune_core.config.PruneConfig` implies."""
        return cls(corpus=config.calibration_dataset, fit_samples=config.sensitivity_fit_samples,
                   fit_seq_len=config.seq_len, samples=config.sensitivity_samples,
                   seq_len=config.sensitivity_seq_len, seed=config.seed,
                   unit_importance=config.unit_importance, compensate=config.compensate,
                   refit_ridge=config.refit_ridge, refit_feedback=config.refit_feedback,
                   mode=config.sensitivity_mode)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SensitivityProfile:
    """Per-layer loss increases (nats per token) of single-layer cuts; see the module docstring.

    Shapes: ``mlp_loss``/``mlp_sigma``/``mlp_error`` (L, R) over :attr:`mlp_rates`;
    ``group_loss``/``group_sigma``/``group_error`` (L, G_l) over k = 0..G_l-1 groups removed.
    ``*_sigma``: standard error of the mean over the B windows (paired with the dense model).
    ``*_error``: the local output change ``mean_t ||Δy_t||²`` on the profile windows.
    ``measured``: per layer, the grid points measured by a forward pass, as ``"mlp:r"`` /
    ``"group:k"`` (all of them in exact mode, the anchors in anchored mode).
    """

    mlp_rates: tuple[float, ...]
    mlp_loss: tuple[tuple[float, ...], ...]
    mlp_sigma: tuple[tuple[float, ...], ...]
    group_loss: tuple[tuple[float, ...], ...]
    group_sigma: tuple[tuple[float, ...], ...]
    mlp_widths: tuple[int, ...]
    kv_heads: tuple[int, ...]
    base_loss: float
    tokens: int
    mode: str
    mlp_error: tuple[tuple[float, ...], ...] = ()
    group_error: tuple[tuple[float, ...], ...] = ()
    measured: tuple[tuple[str, ...], ...] = ()
    inputs: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    probe_rate: float = 0.0  # the joint probe (probe.py): its MLP rate, 0 if none was run,
    probe_loss: float = 0.0  # and its measured loss increase with standard error
    probe_sigma: float = 0.0

    @property
    def layers(self) -> int:
        return len(self.mlp_widths)

    @property
    def base_ppl(self) -> float:
        return math.exp(self.base_loss)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SensitivityProfile:
        def table(key: str) -> tuple[tuple, ...]:
            return tuple(tuple(row) for row in data.get(key, ()))

        return cls(tuple(float(r) for r in data["mlp_rates"]), table("mlp_loss"),
                   table("mlp_sigma"), table("group_loss"), table("group_sigma"),
                   tuple(int(w) for w in data["mlp_widths"]),
                   tuple(int(g) for g in data["kv_heads"]), float(data["base_loss"]),
                   int(data["tokens"]), str(data["mode"]), table("mlp_error"),
                   table("group_error"), table("measured"), dict(data.get("inputs") or {}),
                   float(data.get("seconds", 0.0)), float(data.get("probe_rate", 0.0)),
                   float(data.get("probe_loss", 0.0)), float(data.get("probe_sigma", 0.0)))


# ---------------------------------------------------------------------------------------------
# the profile windows' pass


@dataclass
class HeldOut:
    """The profile windows' pass: every layer's recorded call and the base NLL per window (B,)."""

    ids: torch.Tensor
    calls: list
    base_rows: torch.Tensor

    @property
    def positions(self) -> int:
        return self.ids.shape[0] * (self.ids.shape[1] - 1)


@torch.no_grad()
def held_out_pass(model: nn.Module, ids: torch.Tensor) -> HeldOut:
    """Record the profile windows ``ids`` (B, T) through the dense model (see :class:`HeldOut`)."""
    ids = ids.to(next(model.parameters()).device)
    calls, final = record_calls(model, ids)
    base = nll_from_hidden(model, final, ids, normalized=True)
    return HeldOut(ids, calls, base)


def _passes(shape: LayerLayout, mode: str) -> int:
    """Forward passes the layer's cuts take: every cut (exact) or its anchors."""
    mlp, groups = len(mlp_steps(shape)), shape.kv_heads - 1
    return mlp + groups if mode == "exact" else min(mlp, 1) + min(groups, 1)


@torch.no_grad()
def measure_cut(model: nn.Module, held: HeldOut, cut: LayerCut) -> tuple[float, float]:
    """Mean NLL increase per token and its standard error over the windows, with only
    ``cut`` applied (to a copy of its layer), from the recorded input of that layer on."""
    layers = decoder_layers(model)
    index = cut.plan.layer
    variant = copy.deepcopy(layers[index])
    cut_layer_(variant, cut.plan)
    if cut.down is not None:
        variant.mlp.down_proj.weight.data.copy_(cut.down.to(variant.mlp.down_proj.weight.dtype))
    hidden = held.calls[index].run(variant, held.calls[index].hidden)
    for later in range(index + 1, len(layers)):
        hidden = held.calls[later].run(layers[later], hidden)
    return loss_increase(model, held, hidden)


@torch.no_grad()
def loss_increase(model: nn.Module, held: HeldOut, hidden: torch.Tensor) -> tuple[float, float]:
    """Mean NLL increase per token over the dense model, and its standard error over the
    windows, of the last layer's outputs ``hidden`` (B, T, E) on the profile windows."""
    rows = nll_from_hidden(model, hidden, held.ids, normalized=False).cpu()
    per_token = (rows - held.base_rows.cpu()) / (held.ids.shape[1] - 1)
    return float(per_token.mean()), float(per_token.std() / math.sqrt(per_token.numel()))


def _anchors(cuts: Sequence[LayerCut]) -> list[LayerCut]:
    """The cuts measured in anchored mode: the MLP rate nearest ANCHOR_MLP_RATE, one group."""
    chosen = []
    mlp = [c for c in cuts if c.part == "mlp"]
    if mlp:
        chosen.append(min(mlp, key=lambda c: abs(MLP_RATES[c.step] - ANCHOR_MLP_RATE)))
    chosen += [c for c in cuts if c.part == "group" and c.step == 1]
    return chosen


def _layer_values(model: nn.Module, held: HeldOut, cuts: Sequence[LayerCut], mode: str,
                  tick: Callable[[], None]) -> dict[tuple[str, int], tuple[float, float]]:
    """(part, step) -> (loss, sigma) of one layer's cuts: measured, or scaled from the anchor
    of the same part by the local output change (anchored mode)."""
    measured = list(cuts) if mode == "exact" else _anchors(cuts)
    values = {}
    for cut in measured:
        values[(cut.part, cut.step)] = measure_cut(model, held, cut)
        tick()
    if mode == "anchored":
        for anchor in measured:
            loss, sigma = values[(anchor.part, anchor.step)]
            scale = max(loss, 0.0) / anchor.error if anchor.error > 0 else 0.0
            relative = sigma / anchor.error if anchor.error > 0 else 0.0
            for cut in cuts:
                if cut.part == anchor.part and (cut.part, cut.step) not in values:
                    values[(cut.part, cut.step)] = (scale * cut.error, relative * cut.error)
    return values


def _saliency(model: nn.Module, settings: ProfileSettings, fit: torch.Tensor
              ) -> dict[int, LayerSaliency]:
    """Unit scores of every layer (groups always; channels too without compensation), from
    the first SCORE_WINDOWS fit windows where the method reads data."""
    return layer_saliency(model, settings.unit_importance, fit[:SCORE_WINDOWS],  # type: ignore[arg-type]
                          seed=settings.seed)


def compute_profile(model: nn.Module, fit: torch.Tensor, ids: torch.Tensor,
                    settings: ProfileSettings, progress: Progress | None = None,
                    batch_size: int = 8) -> SensitivityProfile:
    """The profile of ``model`` (see the module docstring).

    Args:
        fit: (N, T_fit) fit windows (channel choice and re-fit; the first SCORE_WINDOWS also
            give Taylor/activation unit scores).
        ids: (B, T) profile windows, B >= 2, on which losses are measured.
        progress: ``(done, total)`` over the forward passes of step 3.

    The model is not changed (each cut is applied to a copy of one layer); eval mode is used
    and the previous mode restored.
    """
    if ids.dim() != 2 or ids.shape[0] < 2 or ids.shape[1] < 2:
        raise ValueError(f"profile windows must be (B, T) with B >= 2 and T >= 2, got "
                         f"{tuple(ids.shape)}")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        saliency = _saliency(model, settings, fit)
        held = held_out_pass(model, ids)
        shapes, layers = layout(model), decoder_layers(model)
        grams = fit_grams(model, fit, batch_size) if settings.compensate else None
        probe = (JointProbe(model, fit, held.calls[0], settings.probe_rate, settings.refit_ridge,
                            batch_size, settings.refit_feedback)
                 if settings.compensate and settings.probe_rate else None)
        total = sum(_passes(shape, settings.mode) for shape in shapes)
        done = [0]

        def tick() -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], total)

        per_layer, values = [], []
        for shape, layer in zip(shapes, layers):  # one layer's Grams and cuts at a time
            fit_gram = next(grams) if grams is not None else None
            cuts = layer_cuts(shape, layer, fit_gram, held, settings, saliency[shape.layer])
            values.append(_layer_values(model, held, cuts, settings.mode, tick))
            per_layer.append([replace(cut, down=None) for cut in cuts])  # errors and plans
            del fit_gram, cuts
            if probe is not None:
                probe.step(shape, layer, held.calls[shape.layer])
        probed = loss_increase(model, held, probe.hidden) if probe is not None else (0.0, 0.0)
    finally:
        model.train(was_training)
    profile = _assemble(shapes, per_layer, values, held, settings, time.perf_counter() - start)
    return replace(profile, probe_rate=settings.probe_rate if probe is not None else 0.0,
                   probe_loss=probed[0], probe_sigma=probed[1])


def _assemble(shapes: Sequence[LayerLayout], per_layer: Sequence[Sequence[LayerCut]],
              values: Sequence[dict], held: HeldOut, settings: ProfileSettings,
              seconds: float) -> SensitivityProfile:
    def row(value: dict, errors: dict, part: str, steps: int, which: int) -> tuple[float, ...]:
        return tuple(0.0 if k == 0 or (part, k) not in value else
                     (value[(part, k)][which] if which < 2 else errors[(part, k)])
                     for k in range(steps))

    tables: dict[str, list] = {key: [] for key in
                               ("mlp_loss", "mlp_sigma", "mlp_error", "group_loss",
                                "group_sigma", "group_error", "measured")}
    for shape, cuts, value in zip(shapes, per_layer, values):
        errors = {(c.part, c.step): c.error for c in cuts}
        for part, steps in (("mlp", len(MLP_RATES)), ("group", shape.kv_heads)):
            for which, suffix in enumerate(("loss", "sigma", "error")):
                tables[f"{part}_{suffix}"].append(row(value, errors, part, steps, which))
        anchors = _anchors(cuts)
        measured = [f"{c.part}:{c.step}" for c in cuts
                    if settings.mode == "exact" or any(c is a for a in anchors)]
        tables["measured"].append(tuple(measured))
    base = float(held.base_rows.sum()) / held.positions
    return SensitivityProfile(
        MLP_RATES, tuple(tables["mlp_loss"]), tuple(tables["mlp_sigma"]),
        tuple(tables["group_loss"]), tuple(tables["group_sigma"]),
        tuple(s.mlp_width for s in shapes), tuple(s.kv_heads for s in shapes), base,
        held.positions, settings.mode, tuple(tables["mlp_error"]), tuple(tables["group_error"]),
        tuple(tables["measured"]), {}, seconds)
