"""Optional recovery after pruning: a short knowledge distillation from the dense model.

Pruning removes whole units; the remaining weights were trained to work with the removed ones.
A few hundred optimiser steps that pull the pruned model's next-token distribution toward the
dense model's win back part of the loss. The target is the dense model itself (knowledge
distillation), not the text: its full distribution at every position carries far more signal
per token than one label, and it asks the student to become the model it was, not a new one.

Loss: ``KL(teacher || student)`` over the full vocabulary at every position, temperature 1,
averaged over positions and computed in float32 whatever the model's dtype.

Methods:

- ``lora``: LoRA adapters (peft) on q/k/v/o and gate/up/down of every decoder layer (never the
  embeddings or the LM head), trained, then merged into the weights. The model keeps its class,
  its pruned shapes and its parameter count: no peft module is left behind.
- ``full``: every decoder-layer weight is trained; embeddings, the final norm and the LM head
  stay frozen (the demo model ties the LM head to the embeddings: training either moves both).
  With bfloat16 weights small updates round away; float32 suits ``full`` better.

Both work on pruned models whose layers differ in heads and MLP width: LoRA sizes every
adapter from its own layer, full training needs no shapes at all.

Learning rate: ``cosine`` (default) decays it from ``lr`` to zero over the requested steps, so
that a run ends on small steps rather than on a noisy large one (at 40 steps on held-out text
it was within noise of a constant rate, see BENCHMARKS.md); ``constant`` keeps it. A run cut
short by its time budget ends before the decay does.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from gqaprune_core.config import RECOVERY_DEFAULT_LR
from gqaprune_core.models import decoder_layers

Method = Literal["lora", "full"]
METHODS: tuple[str, ...] = ("lora", "full")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
DEFAULT_LR = RECOVERY_DEFAULT_LR  # when no lr is given
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Progress = Callable[[int, int], None]  # (steps done, steps requested)


@dataclass(frozen=True)
class RecoveryReport:
    """What a recovery run did and what it cost.

    ``loss_first`` / ``loss_last``: the distillation loss (nats per position) of the first and
    the last step, each on its own batch; None when no step ran. ``stopped_by``: ``"steps"``
    when every requested step ran, ``"time"`` when the time budget ended it first.
    """

    method: str
    steps_done: int
    steps_requested: int
    tokens_seen: int
    seconds: float
    loss_first: float | None
    loss_last: float | None
    stopped_by: Literal["steps", "time"]
    trainable_params: int
    lr: float
    schedule: str = "cosine"

    def to_dict(self) -> dict:
        return asdict(self)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(teacher || student)`` for (..., V) logits, in float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """The share of the base learning rate used by step ``step`` (0-based) of ``steps``."""
    if schedule == "constant" or steps <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / steps))


def _batches(count: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices, ``batch_size`` at a time, through a fresh seeded permutation per epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator)
        yield from order.split(batch_size)


def _check_arguments(method: str, tokens: torch.Tensor, steps: int, lr: float,
                     batch_size: int, time_budget_s: float, rank: int, schedule: str) -> None:
    if method not in METHODS:
        raise ValueError(f"recovery method {method!r}; choose one of {', '.join(METHODS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"recovery schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be an (N, T) tensor of token ids with N, T >= 1, got shape "
                         f"{tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    for name, value in (("steps", steps), ("time_budget_s", time_budget_s)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    for name, value in (("lr", lr), ("batch_size", batch_size), ("rank", rank)):
        if value <= 0:
            raise ValueError(f"{name}={value} must be > 0")


@contextlib.contextmanager
def _lora(student: nn.Module, rank: int, seed: int) -> Iterator[list[nn.Parameter]]:
    """Wrap ``student`` with LoRA adapters for the duration; merge them in on the way out.

    Merging also happens when training fails half-way, so the caller's model never keeps peft
    modules; the adapters' partial training is then merged too (it only moved toward the
    teacher).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("recovery method 'lora' needs peft: pip install peft") from err

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                        target_modules=list(LORA_TARGETS))
    with torch.random.fork_rng(devices=[]):  # seeded adapter init, global RNG left alone
        torch.manual_seed(seed)
        wrapped = get_peft_model(student, config)
    try:
        yield [p for name, p in student.named_parameters() if "lora_" in name]
    finally:
        wrapped.merge_and_unload()  # peft swaps the student's own modules back, in place


def _decoder_parameters(student: nn.Module) -> list[nn.Parameter]:
    """Every decoder-layer parameter, minus any shared with the embeddings or LM head."""
    outside = {id(p) for name, p in student.named_parameters() if ".layers." not in name}
    params = {id(p): p for p in decoder_layers(student).parameters() if id(p) not in outside}
    return list(params.values())


@contextlib.contextmanager
def _trainable(student: nn.Module, method: str, rank: int, seed: int
               ) -> Iterator[list[nn.Parameter]]:
    """The parameters to train, everything else frozen; requires_grad flags restored after."""
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    try:
        for p in student.parameters():
            p.requires_grad_(False)
        if method == "lora":
            with _lora(student, rank, seed) as params:
                yield params
        else:
            params = _decoder_parameters(student)
            for p in params:
                p.requires_grad_(True)
            yield params
    finally:
        for name, p in student.named_parameters():
            p.requires_grad_(flags.get(name, False))
            p.grad = None


def recover_(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor, *,
             method: Method = "lora", steps: int = 100, lr: float | None = None,
             batch_size: int = 4, time_budget_s: float = 600.0, rank: int = 8, seed: int = 0,
             schedule: str = "cosine", progress: Progress | None = None) -> RecoveryReport:
    """Distil ``teacher`` into ``student`` in place on the (N, T) windows ``tokens``.

    Runs ``steps`` AdamW steps on batches of ``batch_size`` windows (a seeded shuffle, then the
    next shuffle when all windows were used), or fewer when ``time_budget_s`` runs out: the
    budget is checked before every step, so a budget of 0 runs none. The student computes on
    its own device and dtype; the teacher runs in eval mode without gradients.

    Afterwards the student is in eval mode, its ``requires_grad`` flags are as they were, it
    holds no gradients and, for ``lora``, no adapters (they are merged into the weights).

    Args:
        lr: None for the method's default (:data:`DEFAULT_LR`).
        rank: LoRA rank r (alpha is 2r); ignored by ``full``.
        schedule: ``cosine`` (decay to zero over ``steps``) or ``constant``.
        progress: called with (steps done, steps requested) before the first and after every
            step.

    Raises:
        ValueError: an unknown method or a bad value, named with it.
    """
    lr = DEFAULT_LR.get(method, 1.0) if lr is None else lr
    _check_arguments(method, tokens, steps, lr, batch_size, time_budget_s, rank, schedule)
    report_progress = progress or (lambda done, total: None)
    start = time.perf_counter()
    device = next(student.parameters()).device
    teacher_device = next(teacher.parameters()).device
    teacher_was_training = teacher.training
    teacher.eval()
    batches = _batches(tokens.shape[0], min(batch_size, tokens.shape[0]), seed)
    losses: list[float] = []
    tokens_seen, stopped_by = 0, "steps"
    report_progress(0, steps)
    try:
        with _trainable(student, method, rank, seed) as params:
            trainable = sum(p.numel() for p in params)
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            student.train()
            for step in range(steps):
                if time.perf_counter() - start >= time_budget_s:
                    stopped_by = "time"
                    break
                batch = tokens[next(batches)]
                with torch.no_grad():
                    target = teacher(batch.to(teacher_device), use_cache=False).logits
                logits = student(batch.to(device), use_cache=False).logits
                loss = distillation_loss(logits, target.to(logits.device))
                del target, logits
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(step, steps, schedule)
                optimizer.step()
                losses.append(loss.item())
                tokens_seen += batch.numel()
                report_progress(step + 1, steps)
            del optimizer  # its moment buffers are as large as the trained parameters
    finally:
        student.eval()
        teacher.train(teacher_was_training)
    return RecoveryReport(method, len(losses), steps, tokens_seen,
                          round(time.perf_counter() - start, 3),
                          losses[0] if losses else None, losses[-1] if losses else None,
                          stopped_by, trainable, lr, schedule)
