"""The memory budget: clear errors with the estimate, automatic chunks that keep results exact."""

from __future__ import annotations

import pytest
import torch
from dense import assert_close_rel
from torch import nn

import curvfx
from curvfx._memory import DEFAULT_BUDGET, current_budget


def wide_model():
    torch.manual_seed(0)
    return nn.Linear(10, 200_000).double()  # P = 2.2 M, C = 200 000 outputs per sample


def test_per_sample_jacobian_and_to_dense_state_their_size():
    model = wide_model()
    X, y = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 200_000, dtype=torch.float64)
    fn, params = curvfx.make_functional(model)
    with pytest.raises(curvfx.MemoryBudgetError, match=r"per_sample_jacobian: .* needs 12\.8 TB"):
        curvfx.per_sample_jacobian(fn, params, X)
    with curvfx.memory_budget(2**20):
        message = r"per_sample_grad: .* needs 67\.1 MB .* budget of 1\.0 MB"
        with pytest.raises(curvfx.MemoryBudgetError, match=message):
            curvfx.per_sample_grad(fn, nn.MSELoss(), params, X, y)
        G = curvfx.ggn(model, nn.MSELoss(), (X, y))
        with pytest.raises(ValueError, match=r"GGNOperator.to_dense: .* TB .* curvfx.set_memory_budget"):
            G.to_dense()


def test_exact_diagonal_is_chunked_to_fit_and_unchanged():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, 5, generator=g, dtype=torch.float64)}

    def fn(p, x):  # a pure function: the generic per-sample route
        return torch.tanh(x @ p["w"].T)

    X, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 6, (12,), generator=g)
    op = curvfx.ggn(fn, nn.CrossEntropyLoss(), (X, y), params=params)
    reference = curvfx.diagonal(op, method="exact")
    K, P = 6, 30  # per sample K·P float64 numbers: 1440 bytes; 3 samples per chunk
    with curvfx.memory_budget(3 * K * P * 8):
        chunked = curvfx.diagonal(op, method="exact")
    assert_close_rel(chunked, reference, tol=1e-12)
    assert_close_rel(reference, op.to_dense().diagonal(), tol=1e-10)
    with curvfx.memory_budget(K * P * 8 - 1):
        with pytest.raises(curvfx.MemoryBudgetError, match="method='hutchinson'"):
            curvfx.diagonal(op, method="exact")


def test_set_memory_budget():
    previous = curvfx.set_memory_budget(1000)
    try:
        assert previous == DEFAULT_BUDGET and current_budget() == 1000
        with curvfx.memory_budget(10):
            assert current_budget() == 10
        assert current_budget() == 1000
    finally:
        curvfx.set_memory_budget(None)
    assert current_budget() == DEFAULT_BUDGET
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="nbytes"):
            curvfx.set_memory_budget(bad)


def test_factored_layers_do_not_count_against_the_generic_routes_budget():
    """Only the parameters on the generic per-sample route hold K per-sample gradients each."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 200), nn.PReLU(), nn.Linear(200, 3)).double()
    x, y = torch.randn(4, 10, dtype=torch.float64), torch.randint(0, 3, (4,))
    G = curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y))
    unconstrained = curvfx.diagonal(G, "exact")
    with curvfx.memory_budget(3 * 8 * 100):  # K = 3: room for the PReLU's 1 entry, not for all P
        assert_close_rel(curvfx.diagonal(G, "exact"), unconstrained)
        with pytest.raises(curvfx.MemoryBudgetError, match="K·P = 3·"):
            G._exact_diagonal(backend="generic")
    assert_close_rel(unconstrained, G.to_dense().diagonal())


def test_exact_diagonal_on_a_huge_output_space_states_the_factor_size():
    """Cross-entropy on [N, V, T] logits: the exact factor has V·T columns per sample."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(512, 4), nn.Linear(4, 512)

        def forward(self, ids):
            return self.out(self.emb(ids)).transpose(1, 2)  # [N, V, T]

    x, y = torch.randint(0, 512, (8, 64)), torch.randint(0, 512, (8, 64))
    G = curvfx.ggn(Tokens(), nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(
        curvfx.MemoryBudgetError, match=r"factor S \[K ≤ 32768, \*\[8, 512, 64\]\] needs 32.0 GB"
    ):
        curvfx.diagonal(G, "exact")
    F = curvfx.fisher(
        Tokens(), nn.CrossEntropyLoss(), (x, y), kind="mc", generator=torch.Generator().manual_seed(0)
    )
    assert_close_rel(curvfx.diagonal(F, "exact"), F._exact_diagonal("generic"))  # K = 1 draw: fits
