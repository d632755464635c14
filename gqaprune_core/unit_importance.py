"""Scores per GQA group and per MLP channel.

Every method first reduces per-weight saliency to per-row / per-column vectors of each projection
(:class:`LayerSaliency`), then :func:`group_scores` and :func:`channel_scores` sum those over the
rows and columns that make up one unit. Notation: H query heads, G groups, D head_dim, E hidden,
I MLP width, q_per_kv = H / G.

- ``taylor``: first-order Taylor |w * dL/dw| (the original method), gradients from calibration
  batches, accumulated as a running per-row score so that no full set of gradients is ever held;
- ``magnitude``: squared weights (the unit's L2 norm, squared);
- ``activation``: |w| times the norm of that weight's input activation (Wanda-style);
- ``random``: seeded uniform noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from gqaprune_core.models import decoder_layers

UnitMethod = Literal["taylor", "magnitude", "activation", "random"]
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# (module path, reduce over dim): rows are summed over inputs (dim 1), columns over outputs (dim 0)
_LAYOUT = {"q": ("self_attn.q_proj", 1), "k": ("self_attn.k_proj", 1),
           "v": ("self_attn.v_proj", 1), "o": ("self_attn.o_proj", 0),
           "gate": ("mlp.gate_proj", 1), "up": ("mlp.up_proj", 1), "down": ("mlp.down_proj", 0)}


@dataclass
class LayerSaliency:
    """Per-row (q, k, v, gate, up) and per-column (o, down) saliency of one layer, float32.

    Shapes: q (H*D,), k and v (G*D,), o (H*D,), gate and up (I,), down (I,).
    """

    vectors: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.vectors[name]


def group_scores(saliency: LayerSaliency, q_per_kv: int, head_dim: int) -> torch.Tensor:
    """(G,) sum of a group's q rows, k and v rows and o columns."""
    groups = saliency["k"].numel() // head_dim
    per_group = [saliency[name].reshape(groups, -1).sum(dim=1) for name in ("q", "k", "v", "o")]
    return torch.stack(per_group).sum(dim=0)


def query_head_scores(saliency: LayerSaliency, head_dim: int) -> torch.Tensor:
    """(H,) sum of each query head's q rows and o columns (for the naive-heads anti-example)."""
    return (saliency["q"] + saliency["o"]).reshape(-1, head_dim).sum(dim=1)


def kv_head_scores(saliency: LayerSaliency, head_dim: int) -> torch.Tensor:
    """(G,) sum of each KV head's k and v rows."""
    return (saliency["k"] + saliency["v"]).reshape(-1, head_dim).sum(dim=1)


def channel_scores(saliency: LayerSaliency) -> torch.Tensor:
    """(I,) sum of a channel's gate row, up row and down column."""
    return saliency["gate"] + saliency["up"] + saliency["down"]


def _projections(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: layer.get_submodule(path) for name, (path, _) in _LAYOUT.items()}


def _reduce(name: str, weight_saliency: torch.Tensor) -> torch.Tensor:
    return weight_saliency.float().sum(dim=_LAYOUT[name][1])


def magnitude_saliency(layer: nn.Module) -> LayerSaliency:
    """Squared weights per row/column (biases included for rows)."""
    vectors = {}
    for name, linear in _projections(layer).items():
        w = linear.weight.detach().float()
        vectors[name] = _reduce(name, w * w)
        if linear.bias is not None and _LAYOUT[name][1] == 1:
            vectors[name] += linear.bias.detach().float() ** 2
    return LayerSaliency(vectors)


def random_saliency(layer: nn.Module, seed: int, layer_index: int) -> LayerSaliency:
    """Seeded uniform noise of the right shapes (a baseline that knows nothing)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + layer_index)
    vectors = {}
    for name, linear in _projections(layer).items():
        size = linear.weight.shape[0 if _LAYOUT[name][1] == 1 else 1]
        vectors[name] = torch.rand(size, generator=generator)
    return LayerSaliency(vectors)


def _chunks(batches: torch.Tensor, chunk_size: int):
    for start in range(0, batches.shape[0], chunk_size):
        yield batches[start:start + chunk_size]


@contextmanager
def _frozen_weights(model: nn.Module) -> Iterator[None]:
    """Every parameter ``requires_grad=False`` inside (the caller may unfreeze some); the flags
    are restored and the gradients dropped on exit."""
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in saved_flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = None


def _backward_in_chunks(model: nn.Module, batches: torch.Tensor, chunk_size: int,
                        scale: Callable[[torch.Tensor], float],
                        progress: Callable[[int, int], None] | None) -> None:
    """Backward of the mean next-token NLL of each ``chunk_size`` rows of ``batches`` (N, T),
    times ``scale(chunk_ids)``; the hooks the caller set collect what they need."""
    device = next(model.parameters()).device
    count = batches.shape[0]
    with torch.enable_grad():
        for done, chunk in enumerate(_chunks(batches, chunk_size)):
            ids = chunk.to(device)
            (model(ids, labels=ids, use_cache=False).loss * scale(ids)).backward()
            if progress is not None:
                progress(min((done + 1) * chunk_size, count), count)


def taylor_saliency(model: nn.Module, batches: torch.Tensor, layers: Sequence[int] | None = None,
                    chunk_size: int = 10, progress: Callable[[int, int], None] | None = None
                    ) -> dict[int, LayerSaliency]:
    """First-order Taylor saliency |w * dL/dw| of the chosen layers' projections.

    The loss is the mean next-token NLL over ``batches`` (N, T), computed ``chunk_size`` rows at
    a time; each chunk's |w * g| is added to a running per-row vector inside a gradient hook and
    the gradient is freed at once, so peak memory holds one projection's gradient, not all.
    Only the scored layers require grad, so backward stops at the first scored layer.
    """
    all_layers = decoder_layers(model)
    chosen = list(range(len(all_layers))) if layers is None else list(layers)
    totals: dict[int, dict[str, torch.Tensor]] = {i: {} for i in chosen}
    handles = []

    def make_hook(index: int, name: str):
        def hook(param: torch.Tensor) -> None:
            value = _reduce(name, (param.detach() * param.grad).abs())
            acc = totals[index]
            acc[name] = acc[name] + value if name in acc else value
            param.grad = None

        return hook

    count = batches.shape[0]
    with _frozen_weights(model):
        try:
            for index in chosen:
                for name, linear in _projections(all_layers[index]).items():
                    linear.weight.requires_grad_(True)
                    handles.append(linear.weight.register_post_accumulate_grad_hook(
                        make_hook(index, name)))
            _backward_in_chunks(model, batches, chunk_size, lambda ids: ids.shape[0] / count,
                                progress)
        finally:
            for handle in handles:
                handle.remove()
    return {i: LayerSaliency({k: v.cpu() for k, v in totals[i].items()}) for i in chosen}


@torch.no_grad()
def activation_norms(model: nn.Module, batches: torch.Tensor, chunk_size: int = 10
                     ) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer, the L2 norm over tokens of each input feature of every projection.

    Returns ``{layer: {"q": (E,), "k": (E,), "v": (E,), "o": (H*D,), "gate": (E,), "up": (E,),
    "down": (I,)}}``. Hooks are always removed.
    """
    sums: dict[int, dict[str, torch.Tensor]] = {}
    handles = []

    def make_hook(index: int, name: str):
        def hook(module, inputs):
            x = inputs[0].detach().float()
            value = (x * x).reshape(-1, x.shape[-1]).sum(dim=0)
            acc = sums.setdefault(index, {})
            acc[name] = acc[name] + value if name in acc else value

        return hook

    device = next(model.parameters()).device
    try:
        for index, layer in enumerate(decoder_layers(model)):
            for name, linear in _projections(layer).items():
                handles.append(linear.register_forward_pre_hook(make_hook(index, name)))
        for chunk in _chunks(batches, chunk_size):
            model(chunk.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {i: {k: v.sqrt().cpu() for k, v in acc.items()} for i, acc in sums.items()}


def activation_saliency(layer: nn.Module, norms: dict[str, torch.Tensor]) -> LayerSaliency:
    """Wanda-style |W_ij| * ||X_j|| summed per row/column of each projection."""
    vectors = {}
    for name, linear in _projections(layer).items():
        w = linear.weight.detach().float().abs().cpu()
        vectors[name] = _reduce(name, w * norms[name][None, :])
    return LayerSaliency(vectors)


def layer_saliency(model: nn.Module, method: UnitMethod, batches: torch.Tensor | None,
                   layers: Sequence[int] | None = None, seed: int = 0, chunk_size: int = 10,
                   progress: Callable[[int, int], None] | None = None
                   ) -> dict[int, LayerSaliency]:
    """Saliency of the chosen layers by ``method`` (see module docstring)."""
    all_layers = decoder_layers(model)
    chosen = list(range(len(all_layers))) if layers is None else list(layers)
    if method == "taylor":
        return taylor_saliency(model, batches, chosen, chunk_size, progress)
    if method == "magnitude":
        return {i: magnitude_saliency(all_layers[i]) for i in chosen}
    if method == "random":
        return {i: random_saliency(all_layers[i], seed, i) for i in chosen}
    if method == "activation":
        norms = activation_norms(model, batches, chunk_size)
        return {i: activation_saliency(all_layers[i], norms[i]) for i in chosen}
    raise ValueError(f"unknown unit importance method {method!r}; choose one of "
                     "taylor, magnitude, activation, random")


def fisher_terms(h: torch.Tensor, grad: torch.Tensor, down_weight: torch.Tensor
                 ) -> torch.Tensor:
    """(I,) float64 ``Σ_t (h_tj · (g_t · w_j))²`` over one batch: ``h`` (B, T, I) the MLP's
    intermediate activations, ``grad`` (B, T, E) the loss gradient at its output,
    ``down_weight`` (E, I)."""
    along = grad @ down_weight.detach()  # (B, T, I): g_t · w_j
    return (h.detach() * along).double().pow(2).sum(dim=(0, 1))


def fisher_channel_scores(model: nn.Module, batches: torch.Tensor, chunk_size: int = 8,
                          progress: Callable[[int, int], None] | None = None
                          ) -> dict[int, torch.Tensor]:
    """Per layer, the (I,) float64 loss-weighted cost of removing each MLP channel alone::

        F_j = Σ_t (h_tj · (g_t · w_j))²

    with ``h_tj`` the channel's activation at token t, ``w_j`` its down_proj column and ``g_t``
    the gradient of token t's next-token loss with respect to the MLP's output: a diagonal
    Fisher (second-order) estimate of the loss increase, where output energy (``Σ_t h_tj²
    ||w_j||²``) counts every direction of the residual stream alike. One backward pass over
    ``batches`` (N, T), ``chunk_size`` rows at a time, every weight frozen (gradients flow
    through the activations only); hooks and requires_grad flags are restored.
    """
    layers = decoder_layers(model)
    inputs: dict[int, torch.Tensor] = {}
    totals: dict[int, torch.Tensor] = {}

    def keep_input(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs[index] = args[0].detach()
        return hook

    def add_score(index: int):
        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            score = fisher_terms(inputs.pop(index), grad_output[0].detach(), module.weight)
            totals[index] = totals[index] + score if index in totals else score
        return hook

    embeddings = model.get_input_embeddings()
    handles = [embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_())]
    with _frozen_weights(model):
        try:
            for index, layer in enumerate(layers):
                down = layer.mlp.down_proj
                handles.append(down.register_forward_pre_hook(keep_input(index)))
                handles.append(down.register_full_backward_hook(add_score(index)))
            # summed, not averaged, over tokens: g_t is each token's own loss gradient
            _backward_in_chunks(model, batches, chunk_size, lambda ids: ids[:, 1:].numel(),
                                progress)
        finally:
            for handle in handles:
                handle.remove()
            inputs.clear()
    return {i: v.cpu() for i, v in totals.items()}
