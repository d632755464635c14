"""The one place that knows which query heads belong to which KV head.

With H query heads, G KV heads, q_per_kv = H / G and head_dim D, query head ``h`` reads KV head
``h // q_per_kv`` (Hugging Face's ``repeat_kv``, gpt-fast and torchtune agree). A *GQA group* is
one KV head together with its q_per_kv query heads. Example, H=9, G=3, D=64 (SmolLM2-135M)::

    q_proj rows (H*D = 576)         k_proj / v_proj rows (G*D = 192)
    ┌────┬────┬────┐                ┌────┐
    │ q0 │ q1 │ q2 │  group 0  ───► │ k0 │   rows   0..191  of q  ↔  rows   0..63  of k, v
    ├────┼────┼────┤                ├────┤
    │ q3 │ q4 │ q5 │  group 1  ───► │ k1 │   rows 192..383  of q  ↔  rows  64..127 of k, v
    ├────┼────┼────┤                ├────┤
    │ q6 │ q7 │ q8 │  group 2  ───► │ k2 │   rows 384..575  of q  ↔  rows 128..191 of k, v
    └────┴────┴────┘                └────┘
    o_proj *columns* follow q_proj rows: the attention output of query head h occupies
    columns h*D .. h*D+D-1 of o_proj's input.

Removing group 1 removes q rows 192..383, k/v rows 64..127 and o_proj columns 192..383 together;
groups 0 and 2 then sit at positions 0 and 1 and still pair correctly. Removing single query
heads instead shifts every later head onto the wrong KV head (see ``naive_heads``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def kv_head_of(q_head: int, q_per_kv: int) -> int:
    """The KV head that query head ``q_head`` attends with."""
    return q_head // q_per_kv


def query_heads_of(group: int, q_per_kv: int) -> list[int]:
    """The query heads that share KV head ``group``."""
    return list(range(group * q_per_kv, (group + 1) * q_per_kv))


def check_groups(kept_groups: Sequence[int], num_groups: int, *, where: str = "") -> None:
    """Raise ``ValueError`` unless ``kept_groups`` is sorted, unique, in range and non-empty."""
    prefix = f"{where}: " if where else ""
    groups = list(kept_groups)
    if not groups:
        raise ValueError(f"{prefix}a layer must keep at least one GQA group (kept none)")
    if groups != sorted(set(groups)):
        raise ValueError(f"{prefix}kept groups {groups} must be sorted and unique")
    if groups[0] < 0 or groups[-1] >= num_groups:
        raise ValueError(f"{prefix}kept groups {groups} out of range for {num_groups} KV heads")


def head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row indices (into a ``(heads * D, E)`` projection) of the given heads, in order."""
    heads_t = torch.as_tensor(list(heads), dtype=torch.long)
    return (heads_t[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def group_indices(kept_groups: Sequence[int], q_per_kv: int, head_dim: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices to keep for whole groups.

    Returns:
        ``(q_rows, kv_rows)``: rows of q_proj (also the columns of o_proj), of length
        ``len(kept_groups) * q_per_kv * D``; rows of k_proj and v_proj, of length
        ``len(kept_groups) * D``.
    """
    q_heads = [h for g in kept_groups for h in query_heads_of(g, q_per_kv)]
    return head_rows(q_heads, head_dim), head_rows(kept_groups, head_dim)


def group_view(weight: torch.Tensor, num_groups: int, *, dim: int) -> torch.Tensor:
    """Reshape a projection so that one axis indexes groups.

    ``dim=0`` for q/k/v weights ``(G*X, E)`` → ``(G, X, E)``; ``dim=1`` for o_proj ``(E, G*X)``
    → ``(E, G, X)``.
    """
    if dim == 0:
        return weight.reshape(num_groups, -1, *weight.shape[1:])
    return weight.reshape(weight.shape[0], num_groups, -1)
