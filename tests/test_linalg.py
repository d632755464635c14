"""In-place re-fit algebra: the kept block gathered in the Gram matrix's memory, the blocked
Cholesky solve, and the re-fit that uses them."""

from __future__ import annotations

import pytest
import torch

from gqaprune_core.compensate import refit_down
from gqaprune_core.linalg import kept_block_, spd_solve_


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(3 * n, n, generator=generator, dtype=torch.float64)
    h[:, :2] *= 30  # outlier channels, as MLP activations have
    return h.T @ h + 0.1 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("block", [1, 3, 4, 64])
def test_kept_block_equals_the_gathered_submatrix(block):
    gram = _spd(13)
    index = torch.tensor([0, 1, 4, 5, 6, 9, 12])
    expected = gram[index][:, index].clone()
    got = kept_block_(gram, index, block=block)
    assert got.data_ptr() == gram.data_ptr()  # in the Gram matrix's own memory
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_kept_block_refuses_indices_out_of_order():
    with pytest.raises(ValueError, match="strictly increasing"):
        kept_block_(_spd(5), torch.tensor([3, 1]))


@pytest.mark.parametrize("n,block", [(1, 4), (10, 3), (17, 4), (16, 16), (40, 64)])
def test_spd_solve_equals_torch_solve(n, block):
    a = _spd(n, seed=n)
    b = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = torch.linalg.solve(a, b)
    work, rhs = a.clone(), b.clone()
    got = spd_solve_(work, rhs, block=block)
    assert got.data_ptr() == rhs.data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(work.tril(), torch.linalg.cholesky(a), rtol=1e-9, atol=1e-12)


def test_spd_solve_refuses_a_matrix_that_is_not_positive_definite():
    a = _spd(6)
    a[4, 4] = -1.0
    with pytest.raises(ValueError, match="not positive definite"):
        spd_solve_(a, torch.ones(6, 2, dtype=torch.float64), block=2)


@pytest.mark.parametrize("feedback", [0.0, 0.5])
def test_refit_in_the_grams_memory_equals_the_copying_one(feedback):
    gram = _spd(30)
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 30, generator=generator)
    drift = torch.randn(30, 8, generator=generator, dtype=torch.float64)
    kept = [1, 2, 3, 7, 11, 12, 20, 29]
    copying = refit_down(gram.clone(), weight, kept, 0.1, drift, feedback)
    in_place = refit_down(gram.clone(), weight, kept, 0.1, drift, feedback, overwrite_gram=True)
    torch.testing.assert_close(in_place, copying, rtol=0, atol=0)
    # and both equal the textbook solution
    index = torch.tensor(kept)
    w = weight.double()
    lam = 0.1 * gram.diagonal()[index].mean()
    lhs = gram[index][:, index] + lam * torch.eye(len(kept), dtype=torch.float64)
    rhs = gram[index] @ w.T + lam * w[:, index].T + feedback * drift[index]
    torch.testing.assert_close(copying, torch.linalg.solve(lhs, rhs).T.float())
