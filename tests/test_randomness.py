"""Operators over a model with active dropout: ``randomness="fixed"``, ``"off"`` and ``"sample"``.

The truth for "fixed" is built independently: ``torch.autograd.functional.hessian`` (or
``jacrev``) of each batch's loss evaluated under ``torch.random.fork_rng`` seeded with the
operator's ``seed + b`` (the documented rule), combined with the batch weights by hand.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from dense import assert_close_rel
from operator_checks import assert_matches_dense
from torch import nn
from torch.func import functional_call, jacrev

import curvfx

CE = nn.CrossEntropyLoss()


def dropout_problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, [(X[:5], y[:5]), (X[5:], y[5:])]


def seeded_truth(model, batches, seed, kind):
    """Σ_b N_b A_b / N with A_b the Hessian or GGN of batch b under the seed ``seed + b``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def as_dict(theta):
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = theta[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    def outputs(theta, b, xb):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + b)
            return functional_call(model, as_dict(theta), (xb,))

    total, n = 0.0, 0
    for b, (xb, yb) in enumerate(batches):
        if kind == "hessian":
            loss = lambda t, b=b, xb=xb, yb=yb: CE(outputs(t, b, xb), yb)  # noqa: E731
            A = torch.autograd.functional.hessian(loss, flat)
        else:
            f = outputs(flat, b, xb).detach()
            J = jacrev(lambda t, b=b, xb=xb: outputs(t, b, xb).reshape(-1))(flat)
            H = torch.autograd.functional.hessian(
                lambda o, yb=yb, s=f.shape: CE(o.reshape(s), yb), f.reshape(-1)
            )
            A = J.T @ H @ J
        total, n = total + len(yb) * A, n + len(yb)
    return total / n


@pytest.mark.parametrize("constructor", [curvfx.hessian, curvfx.ggn], ids=["hessian", "ggn"])
def test_fixed_is_one_matrix(constructor):
    model, batches = dropout_problem()
    op = constructor(model, CE, batches)
    truth = seeded_truth(model, batches, op.model_seed, "hessian" if constructor is curvfx.hessian else "ggn")
    v, V = torch.randn(op.shape[0], dtype=torch.float64), torch.randn(op.shape[0], 4, dtype=torch.float64)
    state = torch.get_rng_state()
    assert torch.equal(op @ v, op @ v)
    assert_close_rel(op @ V, torch.stack([op @ V[:, k] for k in range(4)], 1), tol=1e-12)
    dense = op.to_dense()
    assert torch.equal(state, torch.get_rng_state())  # products leave the global RNG alone
    assert_close_rel(dense, dense.T, tol=1e-12)
    assert_matches_dense(op, truth)
    assert model.training


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_fixed_fisher_diagonal_matches_dense(kind):
    model, batches = dropout_problem()
    op = curvfx.fisher(model, CE, batches, kind=kind)
    dense = op.to_dense()
    assert_close_rel(dense, dense.T, tol=1e-12)
    assert_close_rel(curvfx.diagonal(op, method="exact"), dense.diagonal(), tol=1e-10)


def test_fixed_exact_diagonal_of_ggn():
    model, batches = dropout_problem()
    op = curvfx.ggn(model, CE, batches)
    dense = op.to_dense()
    assert_close_rel(curvfx.diagonal(op, method="exact"), dense.diagonal(), tol=1e-10)
    with pytest.raises(ValueError, match="randomness"):
        op._exact_diagonal("generic")  # the per-sample route would draw its own masks


def test_fixed_chunked_matmat_uses_the_same_masks():
    model, batches = dropout_problem()
    op = curvfx.ggn(model, CE, batches)
    chunked = curvfx.ggn(model, CE, batches, chunk_size=2)
    assert chunked.model_seed == op.model_seed  # read without advancing the global RNG
    V = torch.randn(op.shape[0], 5, dtype=torch.float64)
    assert_close_rel(chunked @ V, op @ V, tol=1e-12)


def test_off_equals_eval_and_restores_modes():
    model, batches = dropout_problem()
    reference = copy.deepcopy(model).eval()
    for constructor in (curvfx.hessian, curvfx.ggn, curvfx.empirical_fisher):
        op = constructor(model, CE, batches, randomness="off")
        truth = constructor(reference, CE, batches).to_dense()
        assert torch.equal(op.to_dense(), truth)
        assert model.training and all(m.training for m in model.modules())


def test_off_keeps_batchnorm_mode():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    op = curvfx.ggn(model, CE, (X, y), randomness="off")
    reference = copy.deepcopy(model)
    reference[2].eval()  # dropout off, BatchNorm still in train mode
    assert torch.equal(op.to_dense(), curvfx.ggn(reference, CE, (X, y)).to_dense())
    assert model[1].training and model[2].training


def test_sample_draws_per_product():
    model, batches = dropout_problem()
    op = curvfx.ggn(model, CE, batches, randomness="sample")
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert not torch.equal(op @ v, op @ v)


def test_pure_function_fixed_and_off():
    params = {"w": torch.randn(3, 2, dtype=torch.float64)}

    def fn(p, x):
        return torch.nn.functional.dropout(x @ p["w"], 0.5, training=True)

    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    op = curvfx.ggn(fn, nn.MSELoss(), (X, y), params=params)
    v = torch.randn(6, dtype=torch.float64)
    assert torch.equal(op @ v, op @ v)
    with pytest.raises(ValueError, match="randomness"):
        curvfx.ggn(fn, nn.MSELoss(), (X, y), params=params, randomness="off")


def test_unknown_randomness():
    model, batches = dropout_problem()
    with pytest.raises(ValueError, match="randomness"):
        curvfx.hessian(model, CE, batches, randomness="same")


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)], ids=["aot_eager", "inductor"]
)
def test_fixed_compiled_products_equal_eager(backend):
    model, batches = dropout_problem()
    compiled = curvfx.ggn(model, CE, batches, compile={"backend": backend, "fullgraph": True})
    eager = curvfx.ggn(model, CE, batches)
    v = torch.randn(eager.shape[0], dtype=torch.float64)
    V = torch.randn(eager.shape[0], 3, dtype=torch.float64)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the self-check passes: it replays the draws
        first, first_matmat = compiled @ v, compiled @ V
        assert torch.equal(compiled @ v, first) and torch.equal(compiled @ V, first_matmat)
    assert torch.equal(state, torch.get_rng_state())
    assert_close_rel(first, eager @ v, tol=1e-10)
    assert_close_rel(first_matmat, eager @ V, tol=1e-10)


@pytest.mark.parametrize("randomness", ["fixed", "off"])
def test_jacobian_with_dropout_is_one_matrix_and_its_transpose(randomness):
    """J and Jᵀ see the same masks ("fixed": those of the seed; "off": none)."""
    model, batches = dropout_problem()
    X = batches[0][0]
    state = torch.get_rng_state()
    J = curvfx.jacobian(model, X, randomness=randomness)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(theta):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = theta[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        if randomness == "off":
            return functional_call(copy.deepcopy(model).eval(), params, (X,)).reshape(-1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(J.model_seed)
            return functional_call(model, params, (X,)).reshape(-1)

    truth = jacrev(outputs)(flat)
    assert_matches_dense(J, truth)
    assert torch.equal(J @ flat, J @ flat)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and model[2].training


def test_fixed_fisher_trace_and_top_eigenvalue_match_the_seeded_truth():
    """With dropout active: the exact Fisher equals the GGN for cross-entropy under the same
    masks; its trace and top eigenvalue from the operator equal the dense truth's."""
    model, batches = dropout_problem()
    op = curvfx.fisher(model, CE, batches, kind="exact")
    truth = seeded_truth(model, batches, op.model_seed, "ggn")
    assert_matches_dense(op, truth)
    assert_close_rel(curvfx.trace(op, "exact"), torch.trace(truth))
    top = curvfx.eigsh(op, k=1, return_eigenvectors=False, generator=torch.Generator().manual_seed(0))
    assert_close_rel(top, torch.linalg.eigvalsh(truth)[-1:], tol=1e-8)
