"""Matrix products: the transforms on V [P, K] and how operators batch their columns."""

from __future__ import annotations

import gc

import pytest
import torch
from dense import assert_close_rel
from torch import nn

import curvfx
from curvfx._chunking import COLUMN_NUMBERS, columns_per_call

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


def test_columns_per_call_counts_largest_activation(monkeypatch):
    model, x, _ = _conv_problem()
    fn, params = curvfx.make_functional(model)
    per_column = 5 * 2 * 4 * 4  # the conv output saved by ReLU (parameters are not counted)
    assert columns_per_call(fn, params, x) == COLUMN_NUMBERS // per_column
    monkeypatch.setattr("curvfx._chunking.COLUMN_NUMBERS", 3 * per_column + 1)
    assert columns_per_call(fn, params, x) == 3


def test_measurement_leaves_rng_and_grads_untouched():
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    fn, params = curvfx.make_functional(model)
    x = torch.randn(4, 3)
    state = torch.get_rng_state()
    columns_per_call(fn, params, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("budget", [1, 2**40], ids=["loop", "vmap"])
@pytest.mark.parametrize("name", ["hessian", "ggn", "fisher-exact", "fisher-mc", "empirical"])
def test_matmat_equals_columns_and_dense(monkeypatch, name, budget):
    monkeypatch.setattr("curvfx._chunking.COLUMN_NUMBERS", budget)
    model, x, y = _conv_problem()
    op = _operators(model, x, y)[name]
    V = torch.randn(op.shape[0], 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    dense = torch.stack([op @ e for e in torch.eye(op.shape[0], dtype=DT)], 1)  # one column at a time
    assert_close_rel(op @ V, dense @ V)
    first_batch = 3 * 2 * 4 * 4  # measured on the first batch (3 samples)
    if name == "hessian":  # always one shared graph: nothing to measure
        assert op._measured_columns is None
    else:
        assert op._measured_columns == (1 if budget == 1 else 2**40 // first_batch)


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


def test_measurement_keeps_no_tensor_alive():
    model, x, _ = _conv_problem()
    fn, params = curvfx.make_functional(model)
    columns_per_call(fn, params, x)

    def live():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    before = live()
    for _ in range(5):
        columns_per_call(fn, params, x)
    assert live() <= before  # a saved tensor that referenced itself would add one per call


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
