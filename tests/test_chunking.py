"""Matrix products: the transforms on V [P, K], operators' matmats, batched layer-output gradients."""

from __future__ import annotations

import pytest
import torch
from dense import assert_close_rel
from torch import nn

import curvfx

DT = torch.float64


def _conv_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.randn(5, 2, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (5,))
    return model.double(), x, y


def _operators(model, x, y):
    loss = nn.CrossEntropyLoss()
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    g = torch.Generator().manual_seed(4)
    return {
        "hessian": curvfx.hessian(model, loss, batches),
        "ggn": curvfx.ggn(model, loss, batches),
        "fisher-exact": curvfx.fisher(model, loss, batches, kind="exact"),
        "fisher-mc": curvfx.fisher(model, loss, batches, kind="mc", num_samples=2, generator=g),
        "empirical": curvfx.empirical_fisher(model, loss, batches),
    }


@pytest.mark.parametrize("chunk_size", [None, 1, 3], ids=["shared-graph loop", "vmap 1", "vmap 3"])
@pytest.mark.parametrize("name", ["hessian", "ggn", "fisher-exact", "fisher-mc", "empirical"])
def test_matmat_equals_columns_and_dense(name, chunk_size):
    """One forward pass shared by the columns (the default), or vmap in chunks: the dense matrix."""
    model, x, y = _conv_problem()
    op = _operators(model, x, y)[name]
    op.chunk_size = chunk_size
    V = torch.randn(op.shape[0], 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    dense = torch.stack([op @ e for e in torch.eye(op.shape[0], dtype=DT)], 1)  # one column at a time
    assert_close_rel(op @ V, dense @ V)


P = 4 * 6 + 6 + 6 * 3 + 3  # parameters of the MLP below


def _mlp_problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    fn, params = curvfx.make_functional(model)
    return fn, params, torch.randn(5, 4, dtype=DT), torch.randn(5, 3, dtype=DT)


@pytest.mark.parametrize("strategy", ["auto", "autograd", "rev-rev"])
def test_hvp_of_matrix_is_hvp_of_each_column(strategy):
    fn, params, x, y = _mlp_problem()

    def f(p):
        return nn.functional.mse_loss(fn(p, x), y)

    V = torch.randn(P, 3, dtype=DT)
    expected = torch.stack([curvfx.hvp(f, params, V[:, k]) for k in range(3)], 1)
    assert_close_rel(curvfx.hvp(f, params, V, strategy=strategy), expected)


@pytest.mark.parametrize("strategy", ["auto", "autograd", "forward-ad", "func", "func-vjp"])
@pytest.mark.parametrize("kind", ["ggn", "exact", "empirical", "mc"])
def test_gauss_newton_of_matrix_is_product_of_each_column(strategy, kind):
    fn, params, x, y = _mlp_problem()
    V = torch.randn(P, 3, dtype=DT)
    loss = nn.MSELoss()

    def product(v):
        if kind == "ggn":
            return curvfx.ggn_vp(fn, loss, params, x, y, v, strategy=strategy)
        g = torch.Generator().manual_seed(3)  # the same draws for the matrix and each column
        return curvfx.fisher_vp(fn, loss, params, x, y, v, kind=kind, generator=g, strategy=strategy)

    expected = torch.stack([product(V[:, k]) for k in range(3)], 1)
    assert_close_rel(product(V), expected)


def test_matrix_of_wrong_height_is_rejected():
    fn, params, x, y = _mlp_problem()
    with pytest.raises(ValueError, match=r"v: a matrix of flat vectors must have shape \[P, K\] = \[51"):
        curvfx.ggn_vp(fn, nn.MSELoss(), params, x, y, torch.zeros(P - 1, 2, dtype=DT))
    with pytest.raises(ValueError, match=r"v: .*dtype"):
        curvfx.hvp(lambda p: fn(p, x).sum(), params, torch.zeros(P, 2))


@pytest.mark.parametrize("budget", [1, 2**40], ids=["loop", "batched"])
def test_layer_output_gradients_by_loop_or_batch_match_dense(monkeypatch, budget):
    """The factored diagonal and KFAC back-propagate K factor columns either batched or one by one."""
    monkeypatch.setattr("curvfx._chunking.COLUMN_NUMBERS", budget)
    model, x, y = _conv_problem()
    G = curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y))
    assert_close_rel(curvfx.diagonal(G, "exact"), G.to_dense().diagonal())
    K = curvfx.kfac(model, nn.CrossEntropyLoss(), (x, y), fisher_type="type-2")
    monkeypatch.setattr("curvfx._chunking.COLUMN_NUMBERS", 2**40 if budget == 1 else 1)
    K_other = curvfx.kfac(model, nn.CrossEntropyLoss(), (x, y), fisher_type="type-2")
    assert_close_rel(K.to_dense(), K_other.to_dense())
