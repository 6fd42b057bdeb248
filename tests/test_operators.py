"""Curvature operators (hessian, ggn, fisher, empirical_fisher, jacobian) against dense truths.

The truths come from ``dense.py`` (autograd Hessians, jacrev Jacobians in its own flat
order, permuted here to curvfx's ``named_parameters()`` order) and, for the empirical
Fisher, from a loop of ``torch.autograd.grad`` over single-sample losses built below.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from cases import CASES_BY_NAME, GENERIC_LOSS_CASES, Problem, slice_batch
from dense import (
    DenseTruth,
    assert_close_rel,
    dense_truth,
    flatten,
    rel_err,
    tree_leaves,
    tree_map,
    unflatten,
)
from helpers import unchanged
from hypothesis import given, settings
from hypothesis import strategies as st
from operator_checks import assert_matches_dense
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import curvfx

DTYPE = torch.float64


# ---------------------------------------------------------------------------------------
# glue: operators of a problem, truths in curvfx's flat order


def _model(problem: Problem) -> tuple:
    """``(model_or_fn, kwargs)`` as the operator constructors take them."""
    if problem.model is None:
        return problem.pure_fn, {"params": problem.pure_params}
    return problem.model, {}


def _op(builder, problem: Problem, data=None, **kwargs) -> curvfx.LinearOperator:
    """``builder(model, loss_fn, data, ...)`` for a curvature operator; data defaults to the batch."""
    model, extra = _model(problem)
    data = (problem.x, problem.y) if data is None else data
    return builder(model, problem.loss_fn, data, **extra, **kwargs)


def _fisher_exact(model, loss_fn, data, **kwargs):
    return curvfx.fisher(model, loss_fn, data, kind="exact", **kwargs)


BUILDERS = {
    "hessian": curvfx.hessian,
    "ggn": curvfx.ggn,
    "fisher_exact": _fisher_exact,
    "empirical_fisher": curvfx.empirical_fisher,
}


def _order(dense: DenseTruth) -> Tensor:
    """Indices ``perm`` with (curvfx flat vector)[i] = (dense.py flat vector)[perm[i]]."""
    index = unflatten(torch.arange(dense.num_params), dense.params)  # dense.py position of each entry
    problem = dense.problem
    if problem.model is None:  # pure params: leaf order is the pytree's own (no reordered dict keys)
        assert list(problem.pure_params) == sorted(problem.pure_params)
        return flatten(index)
    names = [n for n, p in problem.model.named_parameters() if p.requires_grad]
    return torch.cat([index[n].reshape(-1) for n in names])


def _square(dense: DenseTruth, M: Tensor) -> Tensor:
    """A P x P truth, rows and columns in curvfx's order."""
    perm = _order(dense)
    return M[perm][:, perm]


def _is_canonical(loss_fn) -> bool:
    """MSE, cross-entropy (no class weight) and BCE with logits (no pos_weight): exact Fisher == GGN."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return loss_fn.weight is None
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return loss_fn.pos_weight is None
    return isinstance(loss_fn, nn.MSELoss)


def _summed(loss_fn):
    """The same loss with ``reduction="sum"``."""
    out = copy.deepcopy(loss_fn)
    out.reduction = "sum"
    return out


@functools.cache
def empirical_fisher_truth(dense: DenseTruth) -> Tensor:
    """``EF = (1/Z) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` (mean) or ``Σ_n ∇ℓ_n ∇ℓ_nᵀ`` (sum), in curvfx's order.

    ℓ_n is sample n's unnormalized loss (its entries summed, ``reduction="sum"`` on the
    sample alone), its gradient one ``torch.autograd.grad`` per sample. Z is the mean's
    denominator on the whole batch, read off torch itself as ``L_sum / L_mean`` (torch's
    mean is the sum divided by Z: N·C for MSE/BCE, Σ of counted class weights for CE).
    """
    problem = dense.problem
    summed = _summed(problem.loss_fn)
    grads = []
    for n in range(problem.num_samples):
        flat = dense.flat.detach().clone().requires_grad_(True)
        xn, yn = slice_batch(problem.x, n, n + 1), problem.y[n : n + 1]
        loss_n = summed(dense.fn(unflatten(flat, dense.params), xn), yn)
        (g,) = torch.autograd.grad(loss_n, flat)
        grads.append(g)
    G = torch.stack(grads)  # [N, P]
    if problem.loss_fn.reduction == "mean":
        z = summed(dense.outputs, problem.y) / problem.loss_fn(dense.outputs, problem.y)
        EF = G.T @ G / z
    else:
        EF = G.T @ G
    return _square(dense, EF)


def _truth_matrix(name: str, dense: DenseTruth) -> Tensor:
    """The dense matrix of operator ``name`` (a key of BUILDERS), in curvfx's order."""
    if name == "hessian":
        return _square(dense, dense.hessian)
    if name in ("ggn", "fisher_exact"):
        return _square(dense, dense.ggn)
    return empirical_fisher_truth(dense)


@functools.cache
def _variant(name: str, reduction: str) -> DenseTruth:
    """Dense truth of registry case ``name`` with its loss switched to ``reduction``."""
    problem = CASES_BY_NAME[name].make()
    loss_fn = copy.deepcopy(problem.loss_fn)
    loss_fn.reduction = reduction
    return DenseTruth(dataclasses.replace(problem, loss_fn=loss_fn))


def _split(problem: Problem, bounds: list[int]) -> list[tuple]:
    """The batch cut at ``bounds`` (e.g. [0, 1, 4, 6]) into a list of (X, y) batches."""
    return [
        (slice_batch(problem.x, a, b), problem.y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _random(n: int, seed: int = 0) -> Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ---------------------------------------------------------------------------------------
# every registry case against its dense truth


def test_hessian_matches_dense(problem, dense):
    assert_matches_dense(_op(curvfx.hessian, problem), _square(dense, dense.hessian))


def test_ggn_matches_dense(problem, dense):
    assert_matches_dense(_op(curvfx.ggn, problem), _square(dense, dense.ggn))


def test_fisher_exact_equals_dense_ggn(problem, dense):
    if not _is_canonical(problem.loss_fn):
        pytest.skip("exact Fisher == GGN only for MSE / cross-entropy / BCE with logits")
    assert_matches_dense(_op(_fisher_exact, problem), _square(dense, dense.ggn))


@pytest.mark.parametrize("generic", GENERIC_LOSS_CASES, ids=[c.name for c in GENERIC_LOSS_CASES])
def test_generic_loss_hessian_and_ggn_match_dense(generic):
    # a loss curvfx does not know: output Hessian by autograd; no factor for an exact diagonal
    dense = dense_truth(generic)
    problem = generic.make()
    assert_matches_dense(_op(curvfx.hessian, problem), _square(dense, dense.hessian))
    G = _op(curvfx.ggn, problem)
    assert_matches_dense(G, _square(dense, dense.ggn))
    with pytest.raises(ValueError, match="factor"):
        G._exact_diagonal()
    batches = _split(problem, [0, 1, 4, 6])  # mean over samples, unequal batches
    assert_close_rel(_op(curvfx.ggn, problem, batches).to_dense(), _square(dense, dense.ggn))


def _callable_loss_problem():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64).softmax(1)  # soft targets
    return model, x, y


def _ef_from_one_sample_gradients(model, loss_fn, x, y, z):
    """``(1/z) Σ_n g_n g_nᵀ`` with g_n the gradient of ``loss_fn`` on sample n alone (a loop)."""
    params = list(model.parameters())
    rows = []
    for n in range(x.shape[0]):
        g = torch.autograd.grad(loss_fn(model(x[n : n + 1]), y[n : n + 1]), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(rows)
    return G.T @ G / z


def test_empirical_fisher_of_plain_callables_takes_the_mean_over_samples():
    model, x, y = _callable_loss_problem()

    def soft_ce(o, t):  # a mean over the N samples of per-sample sums over classes
        return -(t * o.log_softmax(1)).sum(1).mean()

    EF = curvfx.empirical_fisher(model, soft_ce, (x, y)).to_dense()
    assert_close_rel(EF, _ef_from_one_sample_gradients(model, soft_ce, x, y, 6), tol=1e-10)


def test_functional_losses_reduce_as_their_modules():
    """F.huber_loss averages over entries as nn.HuberLoss() does: the same empirical Fisher."""
    model, x, y = _callable_loss_problem()
    by_module = curvfx.empirical_fisher(model, nn.HuberLoss(), (x, y)).to_dense()
    by_function = curvfx.empirical_fisher(model, torch.nn.functional.huber_loss, (x, y)).to_dense()
    assert_close_rel(by_function, by_module, tol=1e-12)
    summed = functools.partial(torch.nn.functional.huber_loss, reduction="sum")
    assert_close_rel(
        curvfx.empirical_fisher(model, summed, (x, y)).to_dense(),
        curvfx.empirical_fisher(model, nn.HuberLoss(reduction="sum"), (x, y)).to_dense(),
        tol=1e-12,
    )


def test_empirical_fisher_refuses_a_plain_callable_whose_reduction_it_would_get_wrong():
    model, x, y = _callable_loss_problem()

    def squares(o, t):
        return ((o - t) ** 2).sum()

    with pytest.raises(ValueError, match=r"loss_fn: squares is not a 'batchmean' reduction.*reduction='sum'"):
        curvfx.empirical_fisher(model, squares, (x, y)).to_dense()
    summed = curvfx.losses.AutogradLoss(squares, reduction="sum")  # declared: exact
    EF = curvfx.empirical_fisher(model, summed, (x, y)).to_dense()
    assert_close_rel(EF, _ef_from_one_sample_gradients(model, squares, x, y, 1), tol=1e-10)

    def coupled(o, t):  # no per-sample terms: the samples' errors cancel in a batch sum
        return ((o - t).sum(0) ** 2).sum()

    with pytest.raises(ValueError, match="per-sample terms"):
        curvfx.diagonal(curvfx.empirical_fisher(model, curvfx.losses.AutogradLoss(coupled, "sum"), (x, y)))


def test_callable_losses_over_batches_are_checked_against_their_reduction():
    """Batches weigh by the normalizer a callable's reduction declares (a lambda: "batchmean").
    A callable that normalizes by the targets it counts (ignore_index) or sums contradicts
    it: the Hessian and GGN over two batches were 0.35 and 0.6 off the concatenated batch's.
    Now refused once per batch; a declared reduction, or a true mean over samples, is exact."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.tensor([0, 1, -100, 2, 1, -100, 0])
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    counted = lambda o, t: F.cross_entropy(o, t, ignore_index=-100)  # noqa: E731
    for build in (curvfx.hessian, curvfx.ggn):
        with pytest.raises(ValueError, match=r"not a 'batchmean' reduction.*nn\.CrossEntropyLoss"):
            build(model, counted, batches).to_dense()
        exact = build(model, nn.CrossEntropyLoss(), batches).to_dense()
        assert_close_rel(exact, build(model, nn.CrossEntropyLoss(), (x, y)).to_dense(), tol=1e-12)
    t = torch.randn(7, 3, dtype=torch.float64)
    squares = lambda o, t: ((o - t) ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="reduction='sum'"):
        curvfx.ggn(model, squares, [(x[:3], t[:3]), (x[3:], t[3:])]).to_dense()
    summed = curvfx.losses.AutogradLoss(squares, "sum")
    split = curvfx.ggn(model, summed, [(x[:3], t[:3]), (x[3:], t[3:])]).to_dense()
    assert_close_rel(split, curvfx.ggn(model, summed, (x, t)).to_dense(), tol=1e-12)
    coupled = curvfx.losses.AutogradLoss(lambda o, t: ((o - t).mean(0) ** 2).sum(), "sum")  # declared
    two = curvfx.hessian(model, coupled, [(x[:3], t[:3]), (x[3:], t[3:])]).to_dense()
    halves = [curvfx.hessian(model, coupled, (x[a:b], t[a:b])).to_dense() for a, b in ((0, 3), (3, 7))]
    assert_close_rel(two, halves[0] + halves[1], tol=1e-12)  # trusted as declared: a sum over batches
    tupled = lambda o, t: F.mse_loss(o[0], t)  # noqa: E731  (outputs that are not one tensor: unchecked)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3).double()

        def forward(self, inputs):
            return self.lin(inputs), inputs

    pair = Pair()
    split = curvfx.hessian(pair, tupled, [(x[:3], t[:3]), (x[3:], t[3:])]).to_dense()
    assert_close_rel(split, curvfx.hessian(pair, tupled, (x, t)).to_dense(), tol=1e-12)
    per_sample = lambda o, t: ((o - t) ** 2).sum(1).mean()  # noqa: E731  (a true "batchmean")
    split = curvfx.hessian(model, per_sample, [(x[:3], t[:3]), (x[3:], t[3:])]).to_dense()
    assert_close_rel(split, curvfx.hessian(model, per_sample, (x, t)).to_dense(), tol=1e-12)


def test_empirical_fisher_matches_per_sample_gradients(case, problem, dense):
    if case.batchnorm_train:
        pytest.skip("per-sample losses are undefined with BatchNorm in train mode (coupled samples)")
    assert_matches_dense(_op(curvfx.empirical_fisher, problem), empirical_fisher_truth(dense))


def test_empirical_fisher_is_not_the_squared_batch_gradient():
    dense = dense_truth(CASES_BY_NAME["mlp_tanh-mse_mean"])
    g = torch.func.grad(dense.loss_of_flat)(dense.flat)
    squared = _square(dense, torch.outer(g, g))
    EF = _op(curvfx.empirical_fisher, dense.problem).to_dense()
    assert rel_err(EF, squared) > 0.1


def test_jacobian_matches_jacrev(problem, dense):
    model, extra = _model(problem)
    J = curvfx.jacobian(model, problem.x, **extra)
    truth = dense.jacobian[:, _order(dense)]
    assert truth.shape == (dense.outputs.numel(), dense.num_params)
    assert_matches_dense(J, truth)


@pytest.mark.parametrize("name", ["mlp_relu-ce_mean", "two_inputs_dict-ce_mean", "pytree_fn-bce_mean"])
def test_jacobian_transpose_matches_jacrev(name):
    dense = dense_truth(CASES_BY_NAME[name])
    model, extra = _model(dense.problem)
    J = curvfx.jacobian(model, dense.problem.x, **extra)
    assert_matches_dense(J.T, dense.jacobian[:, _order(dense)].T)


def test_ggn_of_pure_function_with_pytree_params():
    dense = dense_truth(CASES_BY_NAME["pytree_fn-bce_mean"])
    problem = dense.problem
    params = problem.pure_params
    op = curvfx.ggn(problem.pure_fn, problem.loss_fn, (problem.x, problem.y), params=params)
    M = _square(dense, dense.ggn)
    assert_matches_dense(op, M)
    v = tree_map(torch.ones_like, params)
    Gv = op @ v
    assert isinstance(Gv, dict) and isinstance(Gv["layer"], list) and isinstance(Gv["out"], tuple)
    assert [t.shape for t in tree_leaves(Gv)] == [t.shape for t in tree_leaves(params)]
    assert_close_rel(curvfx.ravel(Gv), M @ curvfx.ravel(v))


@pytest.mark.parametrize("operator", ["hessian", "ggn", "fisher"])
def test_operators_over_live_parameters_are_fixed_matrices(operator):
    """Live ``params=`` (requiring grad): the same matrix, products without a graph to θ."""
    dense = dense_truth(CASES_BY_NAME["pytree_fn-bce_mean"])
    problem = dense.problem
    live = tree_map(lambda t: t.clone().requires_grad_(), problem.pure_params)
    options = {"kind": "exact"} if operator == "fisher" else {}
    op = getattr(curvfx, operator)(
        problem.pure_fn, problem.loss_fn, (problem.x, problem.y), params=live, **options
    )
    M = _square(dense, dense.hessian if operator == "hessian" else dense.ggn)
    v = torch.randn(M.shape[0], dtype=M.dtype, generator=torch.Generator().manual_seed(0))
    Av = op @ v
    assert not Av.requires_grad
    assert_close_rel(Av, M @ v)
    w = v.clone().requires_grad_()  # linear in the vector: ∂(uᵀ A w)/∂w = Aᵀ u
    assert_close_rel(torch.autograd.grad(v @ (op @ w), w)[0], M.T @ v)
    assert_close_rel(
        curvfx.diagonal(op, "exact") if operator != "hessian" else op.to_dense().diagonal(), M.diagonal()
    )


def test_operators_refuse_mixed_dtype_and_complex_parameters():
    fn = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    mixed = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float32)}
    with pytest.raises(ValueError, match="one dtype"):
        curvfx.ggn(fn, nn.MSELoss(), (x, y), params=mixed)
    complex_params = {
        "w": torch.randn(3, 2, dtype=torch.complex128),
        "b": torch.zeros(2, dtype=torch.complex128),
    }
    with pytest.raises(ValueError, match="complex"):
        curvfx.hessian(fn, nn.MSELoss(), (x, y), params=complex_params)


def test_scaled_identities_take_their_partners_dtype():
    """c·I (default dtype float32) composes with a float64 operator from either side."""
    dense = dense_truth(CASES_BY_NAME["pytree_fn-bce_mean"])
    problem = dense.problem
    G = curvfx.ggn(problem.pure_fn, problem.loss_fn, (problem.x, problem.y), params=problem.pure_params)
    M = _square(dense, dense.ggn)
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    I = curvfx.identity(M.shape[0])  # noqa: E741
    for op, expected in [
        ((0.5 * I) @ G, 0.5 * M),
        (G @ (2 * I), 2 * M),
        ((-I) @ G, -M),
        ((I + I) @ G, 2 * M),
        (G + 0.1 * I, M + 0.1 * eye),
    ]:
        assert_close_rel(op.to_dense(), expected)


def test_single_tensor_params_take_a_params_shaped_vector():
    problem = CASES_BY_NAME["linear-mse_mean"].make()
    W, b = problem.model.weight.detach(), problem.model.bias.detach()

    def fn(w, x):
        return x @ w.T + b

    op = curvfx.ggn(fn, problem.loss_fn, (problem.x, problem.y), params=W)
    V = torch.ones_like(W)
    expected = (op @ V.reshape(-1)).reshape(W.shape)
    got = op.matvec(V)
    assert got.shape == W.shape
    assert_close_rel(got, expected)


# ---------------------------------------------------------------------------------------
# several batches == their concatenation

# (registry case, cut points of its N samples into unequal batches)
MULTI_BATCH = {
    "mlp_tanh-mse_mean": [0, 1, 4, 6],
    "mlp_relu-ce_sum": [0, 3, 4, 6],
    "mlp_tanh-ce_ignore_sum": [0, 1, 4, 6],  # ignored samples 1 and 4: 0 / 1 / 1 per batch
    "sequence-ce_ignore_mean": [0, 2, 3, 4],  # counted positions 11 / 4 / 5 of 12 / 6 / 6
    "mlp_tanh-ce_weight_mean": [0, 2, 5, 6],  # Z_b = Σ class weights, not N_b
    "mlp_tanh-bce_mean": [0, 1, 3, 6],
    "two_inputs_dict-ce_mean": [0, 4, 5, 6],
    "pytree_fn-mse_sum": [0, 2, 6],
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("operator", list(BUILDERS))
@pytest.mark.parametrize("name", list(MULTI_BATCH))
def test_batches_combine_exactly(name, operator, reduction):
    dense = _variant(name, reduction)
    problem = dense.problem
    if operator == "fisher_exact" and not _is_canonical(problem.loss_fn):
        pytest.skip("exact Fisher == GGN only without a class weight")
    batches = _split(problem, MULTI_BATCH[name])
    op = _op(BUILDERS[operator], problem, batches)
    M = _truth_matrix(operator, dense)
    assert_close_rel(op.to_dense(), M, tol=1e-10)
    v = _random(M.shape[0])
    assert_close_rel(op @ v, M @ v, tol=1e-10)


def test_ignore_index_mean_batches_with_different_ignored_counts():
    # the mean over counted positions: weighting batches by N_b instead of Z_b is off
    dense = _variant("mlp_tanh-ce_ignore_sum", "mean")
    problem = dense.problem
    batches = _split(problem, [0, 1, 4, 6])  # Z_b = 1, 2, 1 for N_b = 1, 3, 2
    assert [int((y != -1).sum()) for _, y in batches] == [1, 2, 1]
    for operator in ("ggn", "empirical_fisher", "fisher_exact"):
        op = _op(BUILDERS[operator], problem, batches)
        assert_close_rel(op.to_dense(), _truth_matrix(operator, dense), tol=1e-10)


@pytest.mark.parametrize("operator", ["hessian", "ggn", "fisher_exact", "empirical_fisher"])
def test_batch_with_every_position_ignored_adds_nothing(operator):
    # e.g. a padded-sequence DataLoader whose batch holds only padding: the concatenation is fine
    dense = _variant("mlp_tanh-ce_ignore_sum", "mean")
    problem = dense.problem
    batches = _split(problem, [0, 1, 2, 6])  # sample 1 alone: every position ignored
    assert bool((batches[1][1] == -1).all())
    op = _op(BUILDERS[operator], problem, batches)
    M = _truth_matrix(operator, dense)
    assert_close_rel(op.to_dense(), M, tol=1e-10)
    if operator != "hessian":
        assert_close_rel(op._exact_diagonal(), torch.diagonal(M), tol=1e-10)


@pytest.mark.parametrize("operator", list(BUILDERS))
def test_chunk_size_gives_the_same_matrix(operator):
    dense = dense_truth(CASES_BY_NAME["mlp_relu-ce_mean"])
    op = _op(BUILDERS[operator], dense.problem, chunk_size=5)
    M = _truth_matrix(operator, dense)
    assert_matches_dense(op, M)
    if operator != "hessian":
        assert_close_rel(op._exact_diagonal(), torch.diagonal(M), tol=1e-10)


@pytest.mark.parametrize("operator", list(BUILDERS))
def test_dataloader_as_data(operator):
    dense = dense_truth(CASES_BY_NAME["mlp_tanh-mse_mean"])
    problem = dense.problem
    loader = DataLoader(TensorDataset(problem.x, problem.y), batch_size=4)  # batches of 4 and 2
    op = _op(BUILDERS[operator], problem, loader)
    assert_matches_dense(op, _truth_matrix(operator, dense))


@pytest.mark.parametrize("operator", list(BUILDERS))
def test_factor_scales_exactly(operator):
    dense = dense_truth(CASES_BY_NAME["mlp_relu-ce_mean"])
    problem = dense.problem
    op = _op(BUILDERS[operator], problem, _split(problem, [0, 2, 6]), factor=3.75)
    assert_close_rel(op.to_dense(), 3.75 * _truth_matrix(operator, dense), tol=1e-10)


# ---------------------------------------------------------------------------------------
# exact diagonals


@pytest.mark.parametrize("operator", ["ggn", "fisher_exact", "empirical_fisher"])
def test_exact_diagonal_matches_dense(case, problem, dense, operator):
    if case.batchnorm_train:
        pytest.skip("no exact diagonal with BatchNorm in train mode (see test_exact_diagonal_rejects_...)")
    if operator == "fisher_exact" and not _is_canonical(problem.loss_fn):
        pytest.skip("exact Fisher == GGN only for MSE / cross-entropy / BCE with logits")
    op = _op(BUILDERS[operator], problem)
    diag = op._exact_diagonal()
    assert isinstance(diag, Tensor) and diag.shape == (dense.num_params,)
    assert_close_rel(diag, torch.diagonal(_truth_matrix(operator, dense)), tol=1e-10)


@pytest.mark.parametrize("operator", ["ggn", "fisher_exact", "empirical_fisher"])
def test_exact_diagonal_over_batches(operator):
    dense = _variant("sequence-ce_ignore_mean", "mean")
    op = _op(BUILDERS[operator], dense.problem, _split(dense.problem, [0, 2, 3, 4]), factor=0.5)
    assert_close_rel(op._exact_diagonal(), 0.5 * torch.diagonal(_truth_matrix(operator, dense)), tol=1e-10)


MC_CASES = [
    "mlp_tanh-mse_mean",
    "mlp_relu-ce_sum",
    "sequence-ce_ignore_mean",
    "mlp_tanh-bce_mean",
    "log_softmax-nll_mean",
    "pytree_fn-mse_sum",
]


@pytest.mark.parametrize("name", MC_CASES)
def test_mc_fisher_diagonal_is_diagonal_of_its_matrix(name):
    problem = CASES_BY_NAME[name].make()
    batches = _split(problem, [0, 1, problem.num_samples])
    op = _op(
        curvfx.fisher, problem, batches, kind="mc", num_samples=3, generator=torch.Generator().manual_seed(7)
    )
    assert_close_rel(op._exact_diagonal(), torch.diagonal(op.to_dense()), tol=1e-10)


@pytest.mark.parametrize(
    "name",
    [
        "mlp_relu-ce_mean",
        "mlp_tanh-mse_mean",
        "mlp_tanh-bce_mean",
        "mlp_tanh-ce_label_smoothing_mean",  # MC without the smoothing: the predictive's Fisher
        "mlp_tanh-bce_weight_mean",  # MC with weights √w: w σ(1 - σ) once, as the GGN
    ],
)
def test_mc_fisher_converges_to_exact_fisher(name):
    dense = dense_truth(CASES_BY_NAME[name])
    exact = _square(dense, dense.ggn)
    errors = []
    for num_samples in (10, 100, 1000):
        g = torch.Generator().manual_seed(0)
        op = _op(curvfx.fisher, dense.problem, kind="mc", num_samples=num_samples, generator=g)
        errors.append(rel_err(op.to_dense(), exact))
    # unbiased: the error falls like 1/sqrt(num_samples) (seen: 0.15-0.42 -> 0.01-0.05)
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 3, errors
    assert errors[2] < 0.1, errors


def test_mc_fisher_fixed_generator_is_reproducible_and_fixed():
    problem = CASES_BY_NAME["mlp_relu-ce_mean"].make()
    batches = _split(problem, [0, 2, 6])

    def build(seed):
        return _op(curvfx.fisher, problem, batches, kind="mc", generator=torch.Generator().manual_seed(seed))

    A, B = build(3), build(3)
    F = A.to_dense()
    assert torch.equal(F, B.to_dense()), "same seed, different matrices"
    assert torch.equal(F, A.to_dense()), "one operator changed between calls"
    assert_close_rel(F, F.T, tol=1e-12)
    v = _random(F.shape[0])
    assert torch.equal(A @ v, A @ v)
    assert_close_rel(A @ v, F @ v, tol=1e-10)
    assert rel_err(build(4).to_dense(), F) > 1e-3, "a different seed should give different draws"


# ---------------------------------------------------------------------------------------
# arithmetic

ARITHMETIC = {
    "A + B": (lambda A, B: A + B, lambda A, B: A + B),
    "A - B": (lambda A, B: A - B, lambda A, B: A - B),
    "2.5 * A": (lambda A, B: 2.5 * A, lambda A, B: 2.5 * A),
    "A * 2.5": (lambda A, B: A * 2.5, lambda A, B: 2.5 * A),
    "-A": (lambda A, B: -A, lambda A, B: -A),
    "A + 0.3 I": (
        lambda A, B: A + 0.3 * curvfx.identity(A.shape[0]),
        lambda A, B: A + 0.3 * torch.eye(A.shape[0], dtype=DTYPE),
    ),
    "A @ B": (lambda A, B: A @ B, lambda A, B: A @ B),
    "(A - 2 B) @ (B + A)": (lambda A, B: (A - 2 * B) @ (B + A), lambda A, B: (A - 2 * B) @ (B + A)),
}


@pytest.mark.parametrize("expression", list(ARITHMETIC))
def test_arithmetic_matches_dense(expression):
    dense = dense_truth(CASES_BY_NAME["mlp_tanh-ce_label_smoothing_mean"])
    H, G = _op(curvfx.hessian, dense.problem), _op(curvfx.ggn, dense.problem)
    ops, dense_fn = ARITHMETIC[expression]
    expected = dense_fn(_square(dense, dense.hessian), _square(dense, dense.ggn))
    assert_matches_dense(ops(H, G), expected)


def test_jacobian_composes_with_curvature():
    dense = dense_truth(CASES_BY_NAME["mlp_relu-ce_mean"])
    problem = dense.problem
    J = curvfx.jacobian(problem.model, problem.x, chunk_size=4)
    G = _op(curvfx.ggn, problem)
    Jd, Gd = dense.jacobian[:, _order(dense)], _square(dense, dense.ggn)
    assert_matches_dense(J @ G, Jd @ Gd)
    assert_matches_dense(J.T @ J, Jd.T @ Jd)
    assert_matches_dense(J @ G @ J.T, Jd @ Gd @ Jd.T)


def test_arithmetic_rejects_mismatched_shapes():
    problem = CASES_BY_NAME["mlp_relu-ce_mean"].make()
    G = _op(curvfx.ggn, problem)
    J = curvfx.jacobian(problem.model, problem.x)
    P, M = G.shape[0], J.shape[0]
    assert P != M
    with pytest.raises(ValueError, match="compose"):
        G @ J
    with pytest.raises(ValueError, match="add"):
        G + J
    with pytest.raises(ValueError, match="add"):
        G + curvfx.identity(P + 1)
    with pytest.raises(ValueError, match="add"):
        J.T @ J - curvfx.identity(P - 1)
    with pytest.raises(TypeError, match="@"):
        G * G


# ---------------------------------------------------------------------------------------
# scipy


def test_to_scipy_eigsh_matches_eigvalsh():
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    dense = dense_truth(CASES_BY_NAME["cnn-ce_mean"])
    M = _square(dense, dense.ggn)
    op = _op(curvfx.ggn, dense.problem)
    top = scipy_linalg.eigsh(op.to_scipy(), k=2, which="LA", return_eigenvectors=False, tol=1e-12)
    expected = torch.linalg.eigvalsh(M)[-2:]
    assert_close_rel(torch.as_tensor(sorted(top), dtype=DTYPE), expected, tol=1e-8)
    H = _op(curvfx.hessian, dense.problem).to_scipy()
    x = _random(M.shape[0]).numpy()
    Hd = _square(dense, dense.hessian)
    assert_close_rel(torch.as_tensor(H @ x), Hd @ torch.as_tensor(x), tol=1e-10)
    assert_close_rel(torch.as_tensor(H.rmatvec(x)), Hd @ torch.as_tensor(x), tol=1e-10)
    X = torch.randn(M.shape[0], 2, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    assert_close_rel(torch.as_tensor(H.matmat(X.numpy())), Hd @ X, tol=1e-10)


# ---------------------------------------------------------------------------------------
# side effects, BatchNorm in train mode


def _all_products(problem: Problem) -> None:
    """Every operator, every kind of product, and exact diagonals where they are defined."""
    for builder in BUILDERS.values():
        op = _op(builder, problem)
        v = _random(op.shape[0])
        op @ v
        op @ curvfx.unravel(v, op.in_like)
        op @ torch.stack([v, 2 * v], dim=1)
        v @ op
        op.to_dense()
        if hasattr(op, "_exact_diagonal") and not _couples(problem):
            op._exact_diagonal()
    mc = _op(curvfx.fisher, problem, kind="mc", num_samples=2, generator=torch.Generator().manual_seed(0))
    mc @ v
    J = curvfx.jacobian(problem.model, problem.x)
    J @ v
    J.T @ _random(J.shape[0])
    J.to_dense()


def _couples(problem: Problem) -> bool:
    return any(isinstance(m, nn.BatchNorm1d) and m.training for m in problem.model.modules())


@pytest.mark.parametrize(
    "name", ["batchnorm_train-ce_mean", "mlp_relu-ce_mean", "frozen-mse_mean", "tied-ce_mean"]
)
def test_products_leave_model_state_alone(name):
    problem = CASES_BY_NAME[name].make()
    params_before = {k: p.detach().clone() for k, p in problem.model.named_parameters()}
    with unchanged(problem):
        _all_products(problem)
    for k, p in problem.model.named_parameters():
        assert torch.equal(p.detach(), params_before[k]), k


@pytest.mark.parametrize("name", ["batchnorm_train-ce_mean", "batchnorm_train-mse_mean"])
def test_batchnorm_train_matches_batch_truth(name):
    dense = dense_truth(CASES_BY_NAME[name])
    problem = CASES_BY_NAME[name].make()
    with unchanged(problem):
        H = _op(curvfx.hessian, problem).to_dense()
        G = _op(curvfx.ggn, problem).to_dense()
    assert problem.model.training
    assert_close_rel(H, _square(dense, dense.hessian), tol=1e-10)
    assert_close_rel(G, _square(dense, dense.ggn), tol=1e-10)
    # and the batch statistics matter: the eval-mode matrix is a different one
    problem.model.eval()
    assert rel_err(_op(curvfx.ggn, problem).to_dense(), G) > 1e-3


@pytest.mark.parametrize("operator", ["ggn", "fisher_exact", "empirical_fisher"])
def test_exact_diagonal_rejects_batchnorm_train(operator):
    problem = CASES_BY_NAME["batchnorm_train-ce_mean"].make()
    with pytest.raises(ValueError, match="BatchNorm"):
        _op(BUILDERS[operator], problem)._exact_diagonal()


# ---------------------------------------------------------------------------------------
# bad input

_BAD = CASES_BY_NAME["mlp_relu-ce_mean"]


def _ggn():
    problem = _BAD.make()
    return _op(curvfx.ggn, problem), problem


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_rejects_wrong_vector_length(builder):
    problem = _BAD.make()
    op = _op(BUILDERS[builder], problem)
    P = op.shape[0]
    with pytest.raises(ValueError, match=rf"\[{P}\]"):
        op @ torch.zeros(P + 1, dtype=DTYPE)
    with pytest.raises(ValueError, match=rf"\[{P}\]"):
        torch.zeros(P - 1, dtype=DTYPE) @ op
    with pytest.raises(ValueError, match="V"):
        op @ torch.zeros(P + 1, 2, dtype=DTYPE)


def test_rejects_wrong_pytree_structure():
    op, problem = _ggn()
    good = {k: torch.zeros_like(p) for k, p in problem.model.named_parameters()}
    missing = dict(list(good.items())[1:])
    with pytest.raises(ValueError, match="structure"):
        op @ missing
    first = next(iter(good))
    wrong_leaf = {**good, first: torch.zeros(3, dtype=DTYPE)}
    with pytest.raises(ValueError, match=first):
        op @ wrong_leaf
    with pytest.raises((ValueError, TypeError), match=r"\bv\b"):
        op @ list(good.values())


def test_rejects_dtype_mismatch():
    op, problem = _ggn()
    P = op.shape[0]
    with pytest.raises(ValueError, match="dtype"):
        op @ torch.zeros(P, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        op @ torch.zeros(P, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        op @ {k: torch.zeros_like(p, dtype=torch.float32) for k, p in problem.model.named_parameters()}


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_rejects_empty_data(builder):
    op = _op(BUILDERS[builder], _BAD.make(), [])
    with pytest.raises(ValueError, match="empty"):
        op @ _random(op.shape[0])
    with pytest.raises(ValueError, match="empty"):
        op.to_dense()


def test_rejects_one_shot_iterator():
    problem = _BAD.make()
    batches = ((problem.x[i : i + 2], problem.y[i : i + 2]) for i in range(0, 6, 2))
    with pytest.raises(ValueError, match="one-shot iterator"):
        _op(curvfx.ggn, problem, batches)
    with pytest.raises(ValueError, match="one-shot iterator"):
        _op(curvfx.hessian, problem, iter([(problem.x, problem.y)]))


def test_rejects_batch_that_is_not_a_pair():
    problem = _BAD.make()
    P = _ggn()[0].shape[0]
    bad = [(problem.x, problem.y), (problem.x, problem.y, problem.y)]
    with pytest.raises(ValueError, match="batch 1 is not an"):
        _op(curvfx.ggn, problem, bad) @ _random(P)
    with pytest.raises(ValueError, match="not an"):
        _op(curvfx.hessian, problem, [problem.x]) @ _random(P)
    with pytest.raises(TypeError, match="data"):
        _op(curvfx.ggn, problem, problem.x)


def test_rejects_unknown_fisher_kind_and_bad_num_samples():
    problem = _BAD.make()
    with pytest.raises(ValueError, match="kind"):
        _op(curvfx.fisher, problem, kind="empirial")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_samples"):
            _op(curvfx.fisher, problem, kind="mc", num_samples=bad)


def test_rejects_pure_function_without_params():
    problem = CASES_BY_NAME["pytree_fn-mse_sum"].make()
    for builder in (*BUILDERS.values(), curvfx.fisher):
        with pytest.raises(ValueError, match="params"):
            builder(problem.pure_fn, problem.loss_fn, (problem.x, problem.y))
    with pytest.raises(ValueError, match="params"):
        curvfx.jacobian(problem.pure_fn, problem.x)


@pytest.mark.parametrize("operator", list(BUILDERS))
def test_rejects_non_finite_products(operator):
    problem = _BAD.make()
    x = problem.x.clone()
    x[2, 1] = float("nan")
    op = _op(BUILDERS[operator], problem, [(problem.x[:3], problem.y[:3]), (x, problem.y)])
    with pytest.raises(ValueError, match="non-finite"):
        op @ _random(op.shape[0])
    with pytest.raises(ValueError, match="non-finite"):
        op.to_dense()


def test_fisher_with_class_weight_is_refused():
    problem = CASES_BY_NAME["mlp_tanh-ce_weight_mean"].make()
    P = _op(curvfx.ggn, problem).shape[0]
    with pytest.raises(ValueError, match="weight"):
        _op(_fisher_exact, problem) @ _random(P)
    with pytest.raises(ValueError, match="weight"):
        _op(curvfx.fisher, problem, kind="mc", generator=torch.Generator().manual_seed(0)) @ _random(P)


# ---------------------------------------------------------------------------------------
# properties

_PROPERTY_CASES = ["mlp_relu-ce_mean", "mlp_tanh-mse_sum", "sequence-ce_ignore_mean", "pytree_fn-bce_mean"]


@functools.cache
def _property_ops(name: str) -> dict:
    problem = CASES_BY_NAME[name].make()
    batches = _split(problem, [0, 1, problem.num_samples])
    return {key: _op(builder, problem, batches) for key, builder in BUILDERS.items()}


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(_PROPERTY_CASES),
    operator=st.sampled_from(list(BUILDERS)),
    seed=st.integers(0, 2**31 - 1),
    a=st.floats(-3.0, 3.0, allow_nan=False),
    b=st.floats(-3.0, 3.0, allow_nan=False),
)
def test_ggn_symmetric_psd_and_operators_linear(name, operator, seed, a, b):
    ops = _property_ops(name)
    G, A = ops["ggn"], ops[operator]
    g = torch.Generator().manual_seed(seed)
    v, w = (torch.randn(G.shape[0], generator=g, dtype=DTYPE) for _ in range(2))
    Gv, Gw = G @ v, G @ w
    scale = (v.norm() * Gw.norm() + w.norm() * Gv.norm()).item()
    assert abs((w @ Gv - v @ Gw).item()) <= 1e-10 * scale + 1e-14
    assert (v @ Gv).item() >= -1e-12 * (v @ v).item()
    Av, Aw = A @ v, A @ w
    lhs, rhs = A @ (a * v + b * w), a * Av + b * Aw
    assert (lhs - rhs).norm().item() <= 1e-10 * (abs(a) * Av.norm() + abs(b) * Aw.norm()).item() + 1e-13


def test_sixteen_bit_operators_and_autocast_accumulate_in_float32():
    """Z_b-weighted batch sums and KFAC's sums of squares overflow float16 when kept in it;
    under bfloat16 autocast the exact diagonal mixes dtypes. Both match float64 closely."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    x, y = torch.randn(8192, 16) * 8, torch.randn(8192, 16)
    batches = [(x[:4096], y[:4096]), (x[4096:], y[4096:])]
    reference = copy.deepcopy(model).double()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    truth = curvfx.ggn(reference, nn.MSELoss(), [(a.double(), b.double()) for a, b in batches]) @ v
    half = copy.deepcopy(model).half()
    got = curvfx.ggn(half, nn.MSELoss(), [(a.half(), b.half()) for a, b in batches]) @ v.half()
    assert got.dtype == torch.float16
    assert float((got.double() - truth).norm() / truth.norm()) < 2e-2
    K16 = curvfx.kfac(half, nn.MSELoss(), [(a.half(), b.half()) for a, b in batches])
    K64 = curvfx.kfac(reference, nn.MSELoss(), [(a.double(), b.double()) for a, b in batches])
    for b16, b64 in zip(K16.factors.blocks, K64.factors.blocks):
        assert b16.A.dtype == torch.float16
        assert float((b16.A.double() - b64.A).norm() / b64.A.norm()) < 1e-2

    xs, ys = torch.randn(32, 16), torch.randint(0, 16, (32,))
    dense_diag = curvfx.diagonal(curvfx.ggn(reference, nn.CrossEntropyLoss(), (xs.double(), ys)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        diag = curvfx.diagonal(curvfx.ggn(model, nn.CrossEntropyLoss(), (xs, ys)))
        kfac_diag = curvfx.diagonal(curvfx.kfac(model, nn.CrossEntropyLoss(), (xs, ys)))
    assert float((diag.double() - dense_diag).norm() / dense_diag.norm()) < 3e-2
    exact_kfac = curvfx.diagonal(curvfx.kfac(reference, nn.CrossEntropyLoss(), (xs.double(), ys)))
    assert float((kfac_diag.double() - exact_kfac).norm() / exact_kfac.norm()) < 3e-2


def test_jacobian_of_a_model_that_upcasts_its_outputs_keeps_the_parameters_dtype():
    """bfloat16 weights, float32 logits (as language models do): J and Jᵀ compose."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    model = nn.Sequential(copy.deepcopy(lin).bfloat16(), _Upcast())
    x = torch.randn(4, 5).bfloat16()
    J = curvfx.jacobian(model, x)
    v = torch.randn(J.shape[1]).bfloat16()
    assert (J @ v).dtype == torch.bfloat16 and (J.T @ (J @ v)).dtype == torch.bfloat16
    lin64 = copy.deepcopy(lin).double()
    dense = torch.func.jacrev(lambda w: torch.func.functional_call(lin64, w, (x.double(),)))(
        dict(lin64.named_parameters())
    )
    Jd = torch.cat([dense[k].reshape(12, -1) for k in ("weight", "bias")], 1)
    assert (
        float(((J.T @ (J @ v)).double() - Jd.T @ (Jd @ v.double())).norm() / (Jd.T @ Jd @ v.double()).norm())
        < 3e-2
    )


class _Upcast(nn.Module):
    def forward(self, t):
        return t.float()
