"""Hidden states kept per batch, one decoder layer at a time over them, per-layer progress.

Notation: N windows of T tokens, B windows per batch, E hidden size.

:func:`embed` turns (N, T) token ids into batches of (B, T, E) hidden states kept on the
``store`` device (CPU by default; each batch moves to the compute device only while a layer
runs over it) together with the arguments the model passes its decoder layers for that batch
shape (rotary position embeddings, attention mask, ...). They are captured from the model's own
forward (a pre-hook on layer 0 that stops it), so the layers are called exactly as an in-memory
forward pass would call them: for Llama, Mistral and Qwen2 alike.

:func:`layers_in_turn` loads layer i, hands it to the caller, releases it (and the heap pages it
leaves, :func:`trim_heap`) and reports a :class:`LayerStep` (index, seconds, memory in use)
before loading layer i + 1.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from gqaprune_core.layerwise.source import ModelSource, load_layer, release_layer
from gqaprune_core.models import decoder_layers, layer_output


@dataclass(frozen=True)
class LayerStep:
    """One finished layer of a layer-wise stage (for progress bars and logs)."""

    stage: str
    index: int  # the layer just done
    total: int  # layers in the stage
    seconds: float  # wall time of this layer
    memory_bytes: int  # in use on the compute device now (CPU: resident set size)
    peak_bytes: int  # the most in use so far (CUDA: allocator peak; CPU: peak RSS)

    def describe(self) -> str:
        return (f"{self.stage}: layer {self.index + 1}/{self.total}, {self.seconds:.2f} s, "
                f"{self.memory_bytes / 2**30:.2f} GiB in use (peak {self.peak_bytes / 2**30:.2f})")


OnStep = Callable[[LayerStep], None]


def memory_in_use(device: torch.device) -> tuple[int, int]:
    """``(now, peak)`` bytes: the CUDA allocator's on a GPU, the process's RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    import resource

    import psutil

    now = psutil.Process().memory_info().rss
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return now, max(now, peak_kib * 1024)  # rusage lags the RSS a little


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give the free pages of the C heap back to the OS (glibc; elsewhere this does nothing).

    glibc returns a freed block to the OS only if it was mapped on its own (blocks above the
    mmap threshold, which rises to 32 MB as such blocks are freed); smaller ones stay in the
    heap for reuse, resident. At Llama-3.2-1B's widths in float32 that is the attention
    projections (16 MB), the hidden states and most activations: without trimming, the
    resident set of a CPU run grew by ~0.6 GB over 2 x 8 layers (importance, then prune)
    while the live tensors stayed the same.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _Stop(Exception):
    """Raised by the capture hook to end the model's forward at layer 0."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict) -> None:
        super().__init__("captured")
        self.hidden, self.kwargs = hidden, kwargs


@torch.no_grad()
def _capture(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The embedding output (B, T, E) and layer-0 keyword arguments for ``ids`` (B, T)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        raise _Stop(hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"})

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.model(ids, use_cache=False)
    except _Stop as stop:
        return stop.hidden, stop.kwargs
    finally:
        handle.remove()
    raise RuntimeError("the model's forward never called decoder layer 0")


@dataclass
class HiddenBatches:
    """Hidden states of N windows in batches, and the layer arguments of each batch shape."""

    ids: list[torch.Tensor]  # (B, T) token ids per batch, on CPU
    hidden: list[torch.Tensor]  # (B, T, E) per batch, on the store device
    device: torch.device  # where layers run
    calls: dict[tuple[int, int], dict] = field(default_factory=dict)  # (B, T) -> kwargs

    def run(self, layer: nn.Module, index: int, hidden: torch.Tensor | None = None
            ) -> torch.Tensor:
        """Layer output (B, T, E), on the compute device, of batch ``index``'s hidden states
        (or of ``hidden``, another stream's states for that batch)."""
        hidden = (self.hidden[index] if hidden is None else hidden).to(self.device)
        kwargs = self.calls[tuple(self.ids[index].shape)]
        return layer_output(layer(hidden, **kwargs))

    def advance(self, layer: nn.Module) -> None:
        """Replace every batch's hidden states by ``layer``'s outputs."""
        for index, hidden in enumerate(self.hidden):
            self.hidden[index] = self.run(layer, index).to(hidden.device)


@torch.no_grad()
def embed(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
          store: torch.device | str = "cpu") -> HiddenBatches:
    """Embed ``windows`` (N, T) in batches of ``batch_size``; see :class:`HiddenBatches`."""
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be (N, T) with N >= 1 and T >= 2, got "
                         f"{tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = HiddenBatches([], [], device)
    for ids in windows.split(batch_size):
        ids = ids.contiguous()
        hidden, kwargs = _capture(model, ids.to(device))
        batches.calls.setdefault(tuple(ids.shape), kwargs)
        batches.ids.append(ids.cpu())
        batches.hidden.append(hidden.to(store))
    return batches


def layers_in_turn(model: nn.Module, source: ModelSource, device: torch.device,
                   dtype: torch.dtype, stage: str, on_step: OnStep | None = None,
                   layers: range | None = None) -> Iterator[tuple[int, nn.Module]]:
    """Yield ``(index, layer)`` with the layer's weights on ``device``; after the caller is done
    with it the layer is released and ``on_step`` gets a :class:`LayerStep`.

    A layer the caller cut stays cut (on the meta device) in the skeleton, so that
    :func:`gqaprune_core.models.layout` and parameter counts describe the pruned model.
    """
    order = range(source.num_layers) if layers is None else layers
    for index in order:
        start = time.perf_counter()
        layer = load_layer(model, source, index, device, dtype)
        try:
            yield index, layer
        finally:
            release_layer(layer)
            trim_heap()
        if on_step is not None:
            now, peak = memory_in_use(device)
            on_step(LayerStep(stage, index, len(order), time.perf_counter() - start, now, peak))
