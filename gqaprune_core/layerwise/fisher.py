"""Loss-weighted (Fisher) MLP channel scores, one decoder layer at a time.

Notation: L layers, N windows of T tokens, B windows per batch, E hidden size, I MLP width.

The in-memory :func:`gqaprune_core.unit_importance.fisher_channel_scores` takes one backward
pass through the whole model: ``F_j = Σ_t (h_tj · (g_t · w_j))²`` with ``g_t`` the gradient of
token t's next-token loss (summed over tokens) with respect to the MLP's output. The MLP's
output is added to the residual stream, so ``g_t`` is the gradient with respect to the layer's
output, and that is all a layer needs from the layers after it. Layer by layer:

1. forward: load each layer in turn (attention cut as planned, MLP whole, as the in-memory
   pipeline scores it) and keep its input hidden states (the store: L x N x T x E in the
   model's dtype, in host memory, or with ``spill`` in one safetensors file per layer on disk,
   read back one layer at a time);
2. the loss: the final norm and LM head on the last layer's output give ``g`` for layer L - 1;
3. backward, last layer first: load the layer, run it again on its kept input with gradients,
   take the scores from ``h`` and ``g``, and hand the gradient with respect to its input to the
   layer before. Weights never need gradients.

Two more passes over the weights (forward, then backward: about three forwards' compute) and
the store (host memory, or disk): 2.3 GB for the demo model's 30 layers at the ``default``
preset's 128 x 256 windows in float32, 8.6 GB for the Llama-3-8B shape in bfloat16, 43 GB for
70B.
:func:`store_bytes` tells it before anything runs. Same scores as the in-memory pass up to
float rounding (tested).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from gqaprune_core.config import PruneConfig
from gqaprune_core.export.shards import format_size
from gqaprune_core.layerwise.prune import LayerCut, by_scores
from gqaprune_core.layerwise.source import ModelSource
from gqaprune_core.layerwise.stream import HiddenBatches, OnStep, embed, layers_in_turn
from gqaprune_core.models import LayerLayout
from gqaprune_core.surgery import cut_layer_
from gqaprune_core.unit_importance import fisher_terms

STORE_SHARE = 0.5  # the store may take at most this share of the free host memory
DISK_MARGIN = 1.1  # it goes to disk only where this much of it fits


def store_bytes(num_layers: int, windows: int, seq_len: int, hidden: int,
                dtype: torch.dtype) -> int:
    """Host bytes of the input hidden states every layer keeps for the backward pass."""
    return num_layers * windows * seq_len * hidden * torch.finfo(dtype).bits // 8


def streamable_selection(config: PruneConfig, source: ModelSource, dtype: torch.dtype,
                         spill_dir: Path | None, free_host: int, free_disk: int | None = None
                         ) -> tuple[PruneConfig, str | None, Path | None]:
    """``config`` as it streams, a note when the channel choice is not the plain one (None
    otherwise), and the folder to keep the Fisher pass's hidden states in (None: host memory).

    Fisher channel scores (``fisher``, or the ``default`` preset's ``energy+fisher``) stream
    with a backward pass layer by layer that keeps every layer's input hidden states
    (:func:`store_bytes`): in host memory when they take at most half of the free host memory
    (``free_host`` bytes), else on disk under ``spill_dir`` when its disk has room
    (``free_disk``; default: what the OS reports), else channels are chosen by output energy
    alone. The note says which, with the numbers."""
    if not (config.compensate and config.prune_mlp) or config.channel_selection == "energy":
        return config, None, None
    needed = store_bytes(source.num_layers, config.num_examples, config.seq_len,
                         source.config.hidden_size, dtype)
    if needed <= STORE_SHARE * free_host:
        return config, None, None
    held = (f"{format_size(needed)} of hidden states for its backward pass, more than half of "
            f"the {format_size(free_host)} of free host memory")
    if spill_dir is not None:
        disk = shutil.disk_usage(_existing(spill_dir)).free if free_disk is None else free_disk
        if needed * DISK_MARGIN <= disk:
            return config, (f"{config.channel_selection} (the {held}, kept on disk under "
                            f"{spill_dir} while the scores are computed)"), spill_dir
        held += f" (and {format_size(disk)} free on the disk of {spill_dir})"
    return config.with_(channel_selection="energy"), (
        f"energy (channel_selection {config.channel_selection!r} would keep {held}; fewer "
        "--num_examples or a shorter --seq_len make it fit)"), None


def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where a folder under it would go)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class _Store:
    """Each layer's input hidden states (one tensor per batch): in host memory, or with
    ``spill`` in ``spill/layer-<i>.safetensors``, each file read back and removed when its
    layer's turn comes in the backward pass."""

    def __init__(self, spill: Path | None) -> None:
        self.spill, self.kept = spill, {}

    def put(self, index: int, hidden: list[torch.Tensor]) -> None:
        if self.spill is None:
            self.kept[index] = hidden
            return
        save_file({f"batch{b}": t.contiguous() for b, t in enumerate(hidden)},
                  self.spill / f"layer-{index}.safetensors")

    def take(self, index: int) -> list[torch.Tensor]:
        if self.spill is None:
            return self.kept.pop(index)
        path = self.spill / f"layer-{index}.safetensors"
        tensors = load_file(path)
        path.unlink()
        return [tensors[f"batch{b}"] for b in range(len(tensors))]


def _attention_cut(layer: nn.Module, shape: LayerLayout, cut: LayerCut) -> nn.Module:
    """The layer with its attention cut as the cut pass will cut it (the MLP stays whole): a
    cut copy, since a layer cut in place stays cut in the skeleton, and the cut pass loads the
    whole layer again."""
    plan = by_scores(layer, shape, cut)
    if plan.is_identity:
        return layer
    layer = copy.deepcopy(layer)
    cut_layer_(layer, plan)
    return layer


def _loss_gradient(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, E) gradient of the summed next-token NLL of ``ids`` (B, T) with respect to the
    last decoder layer's output ``hidden``, through the final norm and the LM head."""
    hidden = hidden.detach().requires_grad_()
    logits = model.get_output_embeddings()(model.model.norm(hidden)).float()
    labels = ids.to(logits.device)[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           reduction="sum")
    return torch.autograd.grad(loss, hidden)[0]


def _layer_scores(layer: nn.Module, batches: HiddenBatches, inputs: list[torch.Tensor],
                  grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(I,) float64 scores of ``layer`` and, per batch, the gradient with respect to its input
    (on the store device), given the gradients with respect to its output."""
    down = layer.mlp.down_proj
    seen: dict[str, torch.Tensor] = {}
    handle = down.register_forward_pre_hook(lambda module, args: seen.update(h=args[0]))
    total, upstream = None, []
    try:
        for index, (hidden, grad) in enumerate(zip(inputs, grads)):
            x = hidden.to(batches.device).requires_grad_()
            out = batches.run(layer, index, x)
            grad = grad.to(out.device, out.dtype)
            score = fisher_terms(seen.pop("h"), grad, down.weight)
            total = score if total is None else total + score
            upstream.append(torch.autograd.grad(out, x, grad)[0].to(hidden.device))
    finally:
        handle.remove()
    return total.cpu(), upstream


def streamed_fisher(model: nn.Module, source: ModelSource, shapes: list[LayerLayout],
                    cuts: list[LayerCut], calibration: torch.Tensor, device: torch.device,
                    dtype: torch.dtype, batch_size: int, on_step: OnStep | None = None,
                    spill: Path | None = None) -> dict[int, torch.Tensor]:
    """Per layer, the (I,) Fisher channel scores of the model with its attention cut as
    ``cuts`` say and every MLP whole (module docstring); ``calibration`` (N, T) token ids;
    ``spill``: an empty folder to keep the layers' inputs in instead of host memory.
    Progress: stage ``fisher`` (forward), then ``fisher_backward`` (layers in reverse)."""
    batches = embed(model, calibration, batch_size, device)
    inputs = _Store(spill)
    with torch.no_grad():
        for index, layer in layers_in_turn(model, source, device, dtype, "fisher", on_step):
            inputs.put(index, list(batches.hidden))  # advance() puts new tensors in the list
            batches.advance(_attention_cut(layer, shapes[index], cuts[index]))
    scores: dict[int, torch.Tensor] = {}
    last = source.num_layers - 1
    with torch.enable_grad():  # whatever the caller's mode: weights never require grad here
        grads = [_loss_gradient(model, hidden.to(device), ids).to(hidden.device)
                 for hidden, ids in zip(batches.hidden, batches.ids)]
        batches.hidden.clear()
        for index, layer in layers_in_turn(model, source, device, dtype, "fisher_backward",
                                           on_step, layers=range(last, -1, -1)):
            layer = _attention_cut(layer, shapes[index], cuts[index])
            for parameter in layer.parameters():
                parameter.requires_grad_(False)
            scores[index], grads = _layer_scores(layer, batches, inputs.take(index), grads)
            del layer
    return dict(sorted(scores.items()))
