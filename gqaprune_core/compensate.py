"""MLP channel pruning with least-squares compensation, in one calibration forward pass.

For each layer, in order, a hook on the MLP sees the input ``x`` that the *already pruned* model
produces (so earlier cuts are accounted for), computes the full intermediate activations
``h = act(gate(x)) * up(x)`` (N tokens x I), and its Gram matrix ``C = hᵀh``. It then

1. keeps the channels with the largest output energy ``C_jj * ||down[:, j]||²`` (how much each
   channel adds to the layer's output on this data), or (``selection``) with the largest
   loss-weighted cost from one backward pass before the cut (``fisher``), or both as shares of
   the layer total added (``energy+fisher``, the ``default`` preset's), or with given scores;
2. re-fits ``down_proj`` on the kept channels K so that the pruned MLP reproduces the full one::

       W_K = argmin ||h_K W_Kᵀ - h Wᵀ||² + λ ||W_K - W[:, K]||²
           = (C_KK + λ I)⁻¹ (C_K: Wᵀ + λ W[:, K]ᵀ)          λ = ridge * mean(diag C_KK)

   The ridge pulls toward the ORIGINAL weights, not toward zero: pulling toward zero overfits
   the calibration domain; pulling toward the original keeps what the model knew elsewhere.

   With ``feedback`` β > 0 the target also corrects the drift that earlier cuts caused: a first
   pass records the DENSE model's residual stream after each pruned layer, ``r + m``, and the
   target becomes ``(1 - β) h Wᵀ + β (r + m - r̃)`` with ``r̃`` the pruned model's residual
   before the MLP (what the layer would have to add to land where the dense model is).

The MLP then runs with its new weights, so the next layer is fitted on the pruned model's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gqaprune_core.config import CHANNEL_SELECTIONS
from gqaprune_core.linalg import BLOCK, kept_block_, spd_solve_
from gqaprune_core.models import decoder_layers, layer_output, layout
from gqaprune_core.plan import LayerPlan, PruningPlan, identity_plan, top_k
from gqaprune_core.surgery import cut_layer_, sync_config_, validate
from gqaprune_core.unit_importance import fisher_channel_scores

# The windows of the Fisher pass: the calibration's rows from FISHER_SKIP on, at most
# FISHER_ROWS of them (None: to the end). The pipeline's calibration holds the real windows
# first, then those the model wrote; benchmarks/select_default.py's thirteenth round sets these
# to fit the Fisher scores on either kind alone (both lost to all windows on unseen text:
# BENCHMARKS.md, "Thirteenth round").
FISHER_SKIP = 0
FISHER_ROWS: int | None = None


def select_scores(selection: str, energy: torch.Tensor, fisher: torch.Tensor | None
                  ) -> torch.Tensor:
    """(I,) the scores channels are kept by: ``energy`` (output energy), ``fisher`` (the
    loss-weighted cost, :func:`gqaprune_core.unit_importance.fisher_channel_scores`) or
    ``energy+fisher``: each as a share of its layer total, added, so that a channel is kept
    when it carries much of the layer's output or much of what the loss depends on."""
    if selection == "energy":
        return energy
    if fisher is None:
        raise ValueError(f"selection {selection!r} needs the Fisher channel scores")
    fisher = fisher.to(energy.device, energy.dtype)
    if selection == "fisher":
        return fisher
    return energy / energy.sum().clamp_min(1e-30) + fisher / fisher.sum().clamp_min(1e-30)


def channel_energy(gram: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """(I,) output energy of each channel: C_jj * ||down[:, j]||²."""
    return gram.diagonal() * down_weight.float().pow(2).sum(dim=0)


def channel_obs_scores(gram: torch.Tensor, down_weight: torch.Tensor, ridge: float) -> torch.Tensor:
    """(I,) Optimal-brain-surgeon cost of removing each channel with the others compensating:
    ``||down[:, j]||² / [(C + λI)⁻¹]_jj``."""
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    inverse = torch.linalg.inv(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                      device=gram.device))
    return down_weight.double().pow(2).sum(dim=0).to(gram.device) / inverse.diagonal()


def refit_down(gram: torch.Tensor, down_weight: torch.Tensor, kept: Sequence[int],
               ridge: float, drift: torch.Tensor | None = None, feedback: float = 0.0, *,
               overwrite_gram: bool = False) -> torch.Tensor:
    """Least-squares down_proj (E, K) for the kept channels, pulled toward the original weights.

    Args:
        gram: (I, I) ``hᵀh`` of the full intermediate activations, float64 preferred.
        down_weight: (E, I) the original down_proj weight.
        kept: K channel indices, increasing.
        ridge: λ relative to the mean diagonal of ``C_KK``.
        drift: (I, E) ``hᵀ (r + m - r̃ - h Wᵀ)``: how the activations correlate with what the
            layer misses of the dense model's residual stream; used with ``feedback`` > 0.
        feedback: β, the share of that drift the fit also corrects.
        overwrite_gram: solve in ``gram``'s memory (its content is lost): the re-fit then
            needs one (K, E) matrix beyond the Gram matrix, otherwise one (K, K) more
            (:mod:`gqaprune_core.linalg`).
    """
    index = torch.as_tensor(list(kept), dtype=torch.long, device=gram.device)
    w = down_weight.to(gram.device)  # (E, I), in its own dtype
    lam = ridge * gram.diagonal()[index].mean().clamp_min(1e-12)
    rhs = w.T.index_select(0, index).to(gram.dtype).mul_(lam)  # (K, E), cast after the gather
    # + C_K: Wᵀ in (b, I) x (I, b) blocks: W cast to the Gram matrix's dtype at once would be
    # one more (E, I) matrix (in float64 twice the size of down_proj in float32)
    for start in range(0, len(index), BLOCK):
        rows = slice(start, start + BLOCK)
        gathered = gram[index[rows]]  # (b, I)
        for col in range(0, w.shape[0], BLOCK):
            cols = slice(col, col + BLOCK)
            rhs[rows, cols] += gathered @ w[cols].to(gram.dtype).T
        del gathered  # not kept through the solve
    del w
    if drift is not None and feedback:
        rhs += feedback * drift[index]
    lhs = kept_block_(gram, index) if overwrite_gram else gram[index[:, None], index]  # C_KK
    lhs.diagonal().add_(lam)
    return spd_solve_(lhs, rhs).T.to(down_weight.dtype)


@torch.no_grad()
def dense_residuals(model: nn.Module, calibration: torch.Tensor, layers: Sequence[int]
                    ) -> dict[int, torch.Tensor]:
    """(N, E) residual stream after each of ``layers`` (attention and MLP added), from one
    forward pass of the model as it is now (before any cut), in the model's own dtype (widening
    bfloat16 to float32 would add nothing but bytes). Kept in host memory, not on the model's
    device: one such matrix per layer (128 x 256 windows: 75 MB a layer on the demo model in
    float32, 0.27 GB on the Llama-3-8B shape in bfloat16, 8.6 GB for its 32 layers) could
    outgrow the model on an accelerator."""
    out: dict[int, torch.Tensor] = {}
    all_layers = decoder_layers(model)
    handles = []

    def make_hook(index: int):
        def hook(module, args, output):
            hidden = layer_output(output)
            out[index] = hidden.reshape(-1, hidden.shape[-1]).to("cpu")
        return hook

    try:
        for index in layers:
            handles.append(all_layers[index].register_forward_hook(make_hook(index)))
        # the decoder stack only (decoder_layers checked model.model): the LM head's logits of one
        # 128 x 256 batch would be 6.4 GB of float32 (demo vocabulary) that no hook reads
        model.model(calibration.to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return out


def mlp_activations(mlp: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float64
                    ) -> torch.Tensor:
    """(N, I) intermediate activations ``act(gate(x)) * up(x)`` of the (not yet cut) MLP, in
    ``dtype`` (float64 for the re-fit's Gram matrix; the sensitivity profile sums float32
    products)."""
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    return h.reshape(-1, h.shape[-1]).to(dtype)


@torch.no_grad()
def prune_mlp_compensated_(model: nn.Module, calibration: torch.Tensor,
                           channels_to_keep: Sequence[int], ridge: float = 0.1,
                           scores: dict[int, torch.Tensor] | None = None,
                           base_plan: PruningPlan | None = None, selection: str = "energy",
                           feedback: float = 0.0,
                           progress: Callable[[int, int], None] | None = None) -> PruningPlan:
    """Cut MLP channels layer by layer and re-fit ``down_proj``; returns the plan applied.

    Args:
        calibration: (N, T) token ids, run as ONE batch (the fit needs all tokens at once).
        channels_to_keep: per layer.
        scores: optional per-layer channel scores; default is :func:`channel_energy`.
        base_plan: a plan already applied to the model's attention (kept groups are copied
            from it into the result so that one plan describes the whole model).
        feedback: β in [0, 1], the share of the drift from the dense model's residual stream
            that each layer's re-fit also corrects (module docstring); 0 = none.
        selection: how channels are chosen when ``scores`` is None: one of
            :data:`CHANNEL_SELECTIONS` (see :func:`select_scores`; ``fisher`` and
            ``energy+fisher`` cost one backward pass over ``calibration`` first).
        progress: ``(done, total)`` over the dense pass (one step, with feedback), the Fisher
            pass's windows (when it runs) and then the layers cut.
    """
    if not 0.0 <= feedback <= 1.0:
        raise ValueError(f"feedback={feedback} must lie in [0, 1]")
    if selection not in (*CHANNEL_SELECTIONS, "obs"):
        raise ValueError(f"selection={selection!r}; choose one of {', '.join(CHANNEL_SELECTIONS)}")
    shapes = layout(model)  # after any attention cut; MLP widths are still the original ones
    plan = base_plan or identity_plan(shapes, "compensated")
    layers = decoder_layers(model)
    todo = [i for i, keep in enumerate(channels_to_keep) if keep < shapes[i].mlp_width]
    results: dict[int, LayerPlan] = {}
    handles = []
    fisher = None  # loss-weighted scores of the model as it is now (attention cut, MLPs whole)
    needs_fisher = bool(todo) and scores is None and selection in ("fisher", "energy+fisher")
    # progress counts the dense pass (with feedback), the Fisher pass's windows, then the
    # layers cut: one bar for all
    dense = 1 if feedback and todo else 0
    fisher_batch = calibration[FISHER_SKIP:None if FISHER_ROWS is None
                               else FISHER_SKIP + FISHER_ROWS]
    passes = dense + (fisher_batch.shape[0] if needs_fisher else 0)  # steps before the layers
    if progress is not None and dense:
        progress(0, passes + len(todo))
    targets = dense_residuals(model, calibration, todo) if feedback else {}
    if progress is not None and dense:
        progress(dense, passes + len(todo))
    if needs_fisher:
        fisher = fisher_channel_scores(model, fisher_batch, progress=None if progress is None else
                                       lambda done, total: progress(dense + done,
                                                                    passes + len(todo)))
    before_mlp: dict[int, torch.Tensor] = {}  # r̃: the pruned model's residual before the MLP

    def norm_hook(index: int):
        def hook(module: nn.Module, args):
            before_mlp[index] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    def make_hook(index: int):
        def hook(mlp: nn.Module, args):
            x = args[0]
            h = mlp_activations(mlp, x)
            gram = h.T @ h
            drift = None
            if feedback:  # hᵀ (r + m - r̃ - h Wᵀ), in float64
                missing = (targets.pop(index).to(h.device, torch.float64)
                           - before_mlp.pop(index).double()
                           - h @ mlp.down_proj.weight.double().T)
                drift = h.T @ missing
            if scores is not None:
                layer_scores = scores[index]
            elif selection == "obs":
                layer_scores = channel_obs_scores(gram, mlp.down_proj.weight, ridge)
            else:
                layer_scores = select_scores(selection, channel_energy(gram, mlp.down_proj.weight),
                                             None if fisher is None else fisher[index])
            kept = top_k(layer_scores, channels_to_keep[index])
            new_down = refit_down(gram, mlp.down_proj.weight, kept, ridge, drift, feedback,
                                  overwrite_gram=True)
            before = plan.layers[index]
            layer_plan = LayerPlan(before.layer, before.q_heads_before, before.kv_heads_before,
                                   before.head_dim, before.mlp_before, before.kept_kv_heads, kept)
            now = shapes[index]
            mlp_only = LayerPlan(index, now.q_heads, now.kv_heads, now.head_dim, now.mlp_width,
                                 tuple(range(now.kv_heads)), kept)
            cut_layer_(layers[index], mlp_only)
            mlp.down_proj.weight.data.copy_(new_down)
            results[index] = layer_plan
            if progress is not None:
                progress(passes + len(results), passes + len(todo))

        return hook

    device = next(model.parameters()).device
    try:
        for index in todo:
            if feedback:
                handles.append(layers[index].post_attention_layernorm.register_forward_pre_hook(
                    norm_hook(index)))
            handles.append(layers[index].mlp.register_forward_pre_hook(make_hook(index)))
        model.model(calibration.to(device), use_cache=False)  # decoder only, as in dense_residuals
    finally:
        for handle in handles:
            handle.remove()
    for layer_plan in results.values():
        plan = plan.with_layer(layer_plan)
    sync_config_(model)
    validate(model)
    return plan
