"""In-place linear algebra for the re-fit of large MLPs, where every (K, K) copy counts.

Notation: I the MLP width, K the channels kept, E the hidden size, b the block size.

``torch.linalg.solve(A, B)`` keeps A, its LU factors and the solution: two (K, K) matrices
and two (K, E). For a Llama-3-70B MLP (K ~ 23,000, float64) each (K, K) is 4.2 GB. Here the
symmetric positive definite system is solved in A's own memory (a blocked Cholesky
factorization, then two blocked triangular solves into B), and :func:`kept_block_` gathers
``C_KK`` out of the Gram matrix into the Gram matrix's own storage, so a re-fit needs the
(I, I) Gram matrix and one (K, E) right-hand side, plus (b, I) and (b, E) blocks.
"""

from __future__ import annotations

import torch

BLOCK = 1024  # rows per block: (b, I) temporaries stay near 117 MB in float64 at I = 14,336


def kept_block_(gram: torch.Tensor, index: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``gram[index][:, index]`` (K, K), written over the first K² elements of ``gram``'s
    memory, which is then that block's only valid content.

    ``index`` must be strictly increasing. Row block [s, e) lands on elements [sK, eK), and
    every later source row r >= e starts at ``index[r] * I >= e * I >= e * K``, past it; the
    block's own rows are gathered into a temporary first.
    """
    if not gram.is_contiguous() or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a contiguous square matrix, got {tuple(gram.shape)}")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError("kept indices must be strictly increasing")
    k = index.numel()
    flat = gram.view(-1)
    for start in range(0, k, block):
        rows = index[start:start + block]
        flat[start * k:(start + rows.numel()) * k] = gram[rows][:, index].reshape(-1)
    return flat[:k * k].view(k, k)


def spd_solve_(a: torch.Tensor, b: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Solve ``a x = b`` for symmetric positive definite ``a`` (K, K); returns ``b`` (K, E),
    overwritten by ``x``. ``a``'s lower triangle is overwritten by its Cholesky factor L and
    its upper triangle by scratch values.

    Raises:
        ValueError: ``a`` is not positive definite (NaN or inf in the statistics, say).
    """
    n = a.shape[0]
    starts = list(range(0, n, block))
    for k in starts:  # right-looking blocked Cholesky: a = L Lᵀ
        end = min(k + block, n)
        factor, info = torch.linalg.cholesky_ex(a[k:end, k:end])
        if int(info) != 0:
            raise ValueError(f"the re-fit's system is not positive definite (leading minor "
                             f"{k + int(info)} of {n}); are there NaN or inf activations?")
        a[k:end, k:end] = factor
        if end < n:
            panel = torch.linalg.solve_triangular(factor.mT, a[end:, k:end], upper=True,
                                                  left=False)  # A_ik L_kkᵀ⁻¹
            a[end:, k:end] = panel
            a[end:, end:].addmm_(panel, panel.mT, alpha=-1.0)  # trailing update (both halves)
    for k in starts:  # L y = b
        end = min(k + block, n)
        b[k:end] = torch.linalg.solve_triangular(a[k:end, k:end], b[k:end], upper=False)
        if end < n:
            b[end:].addmm_(a[end:, k:end], b[k:end], alpha=-1.0)
    for k in reversed(starts):  # Lᵀ x = y
        end = min(k + block, n)
        b[k:end] = torch.linalg.solve_triangular(a[k:end, k:end].mT, b[k:end], upper=True)
        if k:
            b[:k].addmm_(a[k:end, :k].mT, b[k:end], alpha=-1.0)
    return b
