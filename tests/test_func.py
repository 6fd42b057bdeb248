"""curvfx.func transforms and make_functional against the dense truths of ``dense.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import CASES, CASES_BY_NAME, GENERIC_LOSS_CASES, TiedNet, TwoInputNet, call_model, frozen_mlp
from dense import (
    assert_close_rel,
    dense_truth,
    flatten,
    random_like,
    rel_err,
    tree_leaves,
    tree_map,
    unflatten,
)
from helpers import (
    GGN_STRATEGIES,
    HVP_STRATEGIES,
    functional,
    hvp_or_none,
    loss_of_params,
    unchanged,
)
from torch import nn
from torch.nn import functional as F

import curvfx

# ---------------------------------------------------------------------------------------
# the dense truths agree with each other (so a failure below is about curvfx)


def test_dense_truth_outputs_match_model(case, problem, dense):
    if problem.model is None:
        expected = problem.pure_fn(problem.pure_params, problem.x)
    else:
        expected = call_model(copy.deepcopy(problem.model), problem.x)
    assert_close_rel(dense.outputs, expected.detach(), tol=1e-14)


def test_dense_ggn_closed_form_for_mse(case, dense):
    if not case.mse:
        pytest.skip("closed form only for MSE")
    reduction = dense.problem.loss_fn.reduction
    scale = 2.0 / dense.outputs.numel() if reduction == "mean" else 2.0
    J = dense.jacobian
    assert_close_rel(dense.ggn, scale * J.T @ J, tol=1e-12)


def test_dense_ggn_equals_hessian_for_linear_models(case, dense):
    if not case.linear:
        pytest.skip("only for models linear in their parameters")
    assert_close_rel(dense.ggn, dense.hessian, tol=1e-12)


def test_dense_hessian_is_symmetric_and_nonzero(case, dense):
    assert torch.linalg.matrix_norm(dense.hessian) > 1e-3
    assert_close_rel(dense.hessian, dense.hessian.T, tol=1e-12)


# ---------------------------------------------------------------------------------------
# make_functional


def test_make_functional_params_in_named_parameters_order(module_case):
    problem = module_case.make()
    _, params = curvfx.make_functional(problem.model)
    trainable = [(n, p) for n, p in problem.model.named_parameters() if p.requires_grad]
    assert isinstance(params, dict)
    assert list(params) == [n for n, _ in trainable]
    for (name, p), value in zip(trainable, params.values()):
        assert torch.equal(value, p.detach()), name


def test_make_functional_matches_model_and_leaves_state(module_case):
    problem = module_case.make()
    x = problem.x
    expected = call_model(copy.deepcopy(problem.model), x)
    fn, params = curvfx.make_functional(problem.model)
    with unchanged(problem, params):
        out = fn(params, x)
        out2 = fn(params, x)
    assert_close_rel(out, expected.detach(), tol=1e-14)
    assert torch.equal(out, out2), "a second call differs (state leaked between calls)"


def test_make_functional_uses_given_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    fn, params = curvfx.make_functional(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    new = {k: torch.randn_like(v) for k, v in params.items()}
    expected = torch.tanh(x @ new["0.weight"].T + new["0.bias"]) @ new["2.weight"].T + new["2.bias"]
    assert_close_rel(fn(new, x), expected, tol=1e-14)


def test_make_functional_frozen_parameters_excluded_but_used():
    torch.manual_seed(0)
    model = frozen_mlp().double()
    fn, params = curvfx.make_functional(model)
    assert list(params) == ["2.weight", "2.bias"]
    x = torch.randn(3, 4, dtype=torch.float64)
    new = {k: torch.randn_like(v) for k, v in params.items()}
    hidden = torch.tanh(model[0](x))
    assert_close_rel(fn(new, x), hidden @ new["2.weight"].T + new["2.bias"], tol=1e-14)


def test_make_functional_tied_weight_appears_once_and_feeds_both_uses():
    torch.manual_seed(0)
    model = TiedNet().double()
    fn, params = curvfx.make_functional(model)
    assert list(params) == ["a.weight", "a.bias", "b.bias", "out.weight", "out.bias"]
    x = torch.randn(3, 4, dtype=torch.float64)
    new = dict(params)
    new["a.weight"] = torch.randn_like(params["a.weight"])
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.a.weight.copy_(new["a.weight"])  # also changed.b.weight: the same tensor
    assert changed.b.weight is changed.a.weight
    assert_close_rel(fn(new, x), changed(x).detach(), tol=1e-14)


@pytest.mark.parametrize("form", ["tuple", "list", "dict"])
def test_make_functional_input_forms(form):
    torch.manual_seed(0)
    model = TwoInputNet().double()
    fn, params = curvfx.make_functional(model)
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    x = {"tuple": (a, b), "list": [a, b], "dict": {"b": b, "a": a}}[form]
    assert_close_rel(fn(params, x), model(a, b).detach(), tol=1e-14)


def test_make_functional_batchnorm_train_uses_batch_statistics_and_keeps_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).double().train()
    fn, params = curvfx.make_functional(model)
    x = torch.randn(6, 4, dtype=torch.float64)
    h = model[0](x)
    expected = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + model[1].eps)
    expected = expected * model[1].weight + model[1].bias
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    assert_close_rel(fn(params, x), expected.detach(), tol=1e-12)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


# ---------------------------------------------------------------------------------------
# hvp


@pytest.mark.parametrize("strategy", HVP_STRATEGIES)
def test_hvp_matches_dense_hessian(case, problem, dense, strategy):
    fn, params = functional(problem)
    v = random_like(params, torch.Generator().manual_seed(0))
    Hv = hvp_or_none(loss_of_params(problem, fn), params, v, strategy, mse=case.mse)
    if Hv is None:
        return  # "fwd-rev" declined an MSE loss, or "rev-fwd" an unchecked operation: allowed
    assert_close_rel(Hv, dense.hvp(v))


def test_rev_fwd_applies_to_every_case(case, problem, dense):
    """Reverse-over-forward is exact on every model here (batch norm and log-softmax decomposed)."""
    fn, params = functional(problem)
    v = random_like(params, torch.Generator().manual_seed(0))
    assert_close_rel(curvfx.hvp(loss_of_params(problem, fn), params, v, strategy="rev-fwd"), dense.hvp(v))


@pytest.mark.parametrize("strategy", HVP_STRATEGIES)
def test_hvp_flat_vector(case, problem, dense, strategy):
    fn, params = functional(problem)
    v_tree = random_like(params, torch.Generator().manual_seed(1))
    v = curvfx.ravel(v_tree)
    assert v.shape == (dense.num_params,)
    Hv = hvp_or_none(loss_of_params(problem, fn), params, v, strategy, mse=case.mse)
    if Hv is None:
        return
    assert isinstance(Hv, torch.Tensor) and Hv.shape == v.shape
    assert_close_rel(curvfx.unravel(Hv, params), dense.hvp(v_tree))


def test_ravel_unravel_round_trip(case, problem):
    _, params = functional(problem)
    v = random_like(params, torch.Generator().manual_seed(2))
    flat = curvfx.ravel(v)
    assert torch.equal(flat.sort().values, flatten(v).sort().values)  # same entries
    back = curvfx.unravel(flat, params)
    assert_close_rel(back, v, tol=0.0, atol=0.0)


@pytest.mark.parametrize("strategy", HVP_STRATEGIES)
@pytest.mark.parametrize("shape", [(5,), (2, 3)], ids=["vector", "matrix"])
def test_hvp_with_a_single_tensor_as_params(shape, strategy):
    g = torch.Generator().manual_seed(12)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    A = torch.randn(w.numel(), w.numel(), generator=g, dtype=torch.float64)

    def f(t):
        flat = t.reshape(-1)
        return torch.tanh(A @ flat).sum() + (flat**4).sum()

    H = torch.autograd.functional.hessian(f, w).reshape(w.numel(), w.numel())
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    Hv = curvfx.hvp(f, w, v, strategy=strategy)
    assert_close_rel(Hv, (H @ v.reshape(-1)).reshape(shape))
    Hv_flat = curvfx.hvp(f, w, v.reshape(-1), strategy=strategy)
    assert_close_rel(Hv_flat, H @ v.reshape(-1))


@pytest.mark.parametrize("strategy", HVP_STRATEGIES)
@pytest.mark.parametrize("keywords", [False, True], ids=["positional", "keywords"])
def test_hvp_of_embedding_with_padding_row_matches_backward(strategy, keywords):
    """The padding row is a constant (torch's backward): forward-mode tangents must agree."""
    g = torch.Generator().manual_seed(13)
    W0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    ids = torch.tensor([[4, 1, 4], [2, 4, 0]])  # padding_idx=-1 is row 4

    def f(W):
        e = F.embedding(input=ids, weight=W, padding_idx=-1) if keywords else F.embedding(ids, W, -1)
        return (torch.tanh(e).sum((1, 2)) ** 2).sum()

    H = torch.autograd.functional.hessian(f, W0).reshape(15, 15)
    assert H[12:].abs().max() == 0 and H[:12].abs().max() > 0  # truth: row 4 carries no curvature
    v = torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert_close_rel(curvfx.hvp(f, W0, v, strategy=strategy), (H @ v.reshape(-1)).reshape(5, 3))


# ---------------------------------------------------------------------------------------
# ggn_vp


@pytest.mark.parametrize("strategy", GGN_STRATEGIES)
def test_ggn_vp_matches_dense_ggn(problem, dense, strategy):
    fn, params = functional(problem)
    v = random_like(params, torch.Generator().manual_seed(3))
    Gv = curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v, strategy=strategy)
    assert_close_rel(Gv, dense.ggn_vp(v))


@pytest.mark.parametrize("strategy", GGN_STRATEGIES)
def test_ggn_vp_flat_vector(problem, dense, strategy):
    fn, params = functional(problem)
    v_tree = random_like(params, torch.Generator().manual_seed(4))
    v = curvfx.ravel(v_tree)
    Gv = curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v, strategy=strategy)
    assert isinstance(Gv, torch.Tensor) and Gv.shape == v.shape
    assert_close_rel(curvfx.unravel(Gv, params), dense.ggn_vp(v_tree))


@pytest.mark.parametrize("strategy", GGN_STRATEGIES)
def test_ggn_vp_accepts_module_as_fn(module_case, strategy):
    problem = module_case.make()
    dense = dense_truth(module_case)
    _, params = curvfx.make_functional(problem.model)
    v = random_like(params, torch.Generator().manual_seed(5))
    with unchanged(problem, params):
        Gv = curvfx.ggn_vp(problem.model, problem.loss_fn, params, problem.x, problem.y, v, strategy=strategy)
    assert_close_rel(Gv, dense.ggn_vp(v))


def test_ggn_vp_mse_mean_is_two_over_nc_jtj(case, problem, dense):
    if not case.mse or problem.loss_fn.reduction != "mean":
        pytest.skip("MSELoss(reduction='mean') only")
    fn, params = functional(problem)
    v = random_like(params, torch.Generator().manual_seed(6))
    J = dense.jacobian
    expected = unflatten(2.0 / dense.outputs.numel() * J.T @ (J @ flatten(v)), dense.params)
    Gv = curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v)
    assert_close_rel(Gv, expected)


# Eager engines return detached results. The torch.func engines ("rev-rev", "fwd-rev",
# "func") stay differentiable with respect to live parameters, like torch.func.grad does.
_EAGER = ("auto", "autograd", "forward-ad")


@pytest.mark.parametrize("strategy", sorted(set(HVP_STRATEGIES) | set(GGN_STRATEGIES)))
@pytest.mark.parametrize("case_name", ["mlp_tanh-mse_sum", "batchnorm_train-ce_mean", "tied-ce_mean"])
def test_products_with_live_parameters(case_name, strategy):
    """``params = dict(model.named_parameters())`` (leaves requiring grad) gives the same numbers."""
    case = CASES_BY_NAME[case_name]
    problem = case.make()
    dense = dense_truth(case)
    fn, _ = curvfx.make_functional(problem.model)
    params = dict(problem.model.named_parameters())
    v = random_like(dense.params, torch.Generator().manual_seed(13))
    with unchanged(problem):
        if strategy in HVP_STRATEGIES:
            Hv = hvp_or_none(loss_of_params(problem, fn), params, v, strategy, mse=case.mse)
            if Hv is not None:
                assert_close_rel(Hv, dense.hvp(v))
                if strategy in _EAGER:
                    assert not any(t.requires_grad for t in tree_leaves(Hv))
        if strategy in GGN_STRATEGIES:
            Gv = curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v, strategy=strategy)
            assert_close_rel(Gv, dense.ggn_vp(v))
            if strategy in _EAGER:
                assert not any(t.requires_grad for t in tree_leaves(Gv))


@pytest.mark.parametrize("name", [c.name for c in GENERIC_LOSS_CASES])
def test_products_with_a_loss_curvfx_does_not_know(name):
    """Generic autograd fallback: hvp, ggn_vp (every strategy, also under vmap), per-sample grads."""
    case = CASES_BY_NAME[name]
    problem = case.make()
    dense = dense_truth(case)
    fn, params = functional(problem)
    v = random_like(params, torch.Generator().manual_seed(14))
    with unchanged(problem, params):
        for strategy in HVP_STRATEGIES:
            Hv = hvp_or_none(loss_of_params(problem, fn), params, v, strategy, mse=False)
            if Hv is not None or strategy != "rev-fwd":  # "rev-fwd" declines torch.cosh
                assert_close_rel(Hv, dense.hvp(v))
        for strategy in GGN_STRATEGIES:
            Gv = curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v, strategy=strategy)
            assert_close_rel(Gv, dense.ggn_vp(v))
        grads = curvfx.per_sample_grad(fn, problem.loss_fn, params, problem.x, problem.y)
    assert_close_rel(grads, dense.per_sample_grads, tol=1e-12)
    V = torch.stack([curvfx.ravel(v), curvfx.ravel(random_like(params, torch.Generator().manual_seed(15)))])
    GV = torch.func.vmap(lambda u: curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, u))(V)
    expected = torch.stack([curvfx.ravel(dense.ggn_vp(curvfx.unravel(u, params))) for u in V])
    assert_close_rel(GV, expected)


# ---------------------------------------------------------------------------------------
# per-sample gradients and Jacobians


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_per_sample_grad_matches_loop(independent_case, chunk_size):
    problem = independent_case.make()
    dense = dense_truth(independent_case)
    fn, params = functional(problem)
    with unchanged(problem, params):
        grads = curvfx.per_sample_grad(
            fn, problem.loss_fn, params, problem.x, problem.y, chunk_size=chunk_size
        )
    assert_close_rel(grads, dense.per_sample_grads, tol=1e-12)


def test_per_sample_grads_of_sum_loss_add_up_to_batch_gradient(independent_case):
    problem = independent_case.make()
    loss = problem.loss_fn
    if getattr(loss, "reduction", None) != "sum":
        pytest.skip("only a sum reduction adds up sample by sample")
    fn, params = functional(problem)
    grads = curvfx.per_sample_grad(fn, loss, params, problem.x, problem.y)
    dense = dense_truth(independent_case)
    theta = flatten(dense.params).requires_grad_(True)
    (g,) = torch.autograd.grad(dense.loss_of_flat(theta), theta)
    assert_close_rel(flatten(tree_map(lambda t: t.sum(0), grads)), g, tol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_per_sample_jacobian_matches_jacrev(independent_case, chunk_size):
    problem = independent_case.make()
    dense = dense_truth(independent_case)
    fn, params = functional(problem)
    with unchanged(problem, params):
        jac = curvfx.per_sample_jacobian(fn, params, problem.x, chunk_size=chunk_size)
    assert_close_rel(jac, dense.per_sample_jacobians, tol=1e-12)


def test_per_sample_transforms_reject_batchnorm_in_train_mode():
    case = next(c for c in CASES if c.batchnorm_train)
    problem = case.make()
    fn, params = functional(problem)
    with pytest.raises(ValueError, match=r"(?i)batch ?norm|train"):
        curvfx.per_sample_grad(fn, problem.loss_fn, params, problem.x, problem.y)
    with pytest.raises(ValueError, match=r"(?i)batch ?norm|train"):
        curvfx.per_sample_jacobian(fn, params, problem.x)


def test_per_sample_grad_batchnorm_eval_mode_is_fine():
    case = next(c for c in CASES if c.batchnorm_train)
    problem = case.make()
    problem.model.eval()
    fn, params = functional(problem)
    grads = curvfx.per_sample_grad(fn, problem.loss_fn, params, problem.x, problem.y)
    for n in range(problem.num_samples):
        theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        loss = problem.loss_fn(fn(theta, problem.x[n : n + 1]), problem.y[n : n + 1])
        expected = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
        assert_close_rel({k: g[n] for k, g in grads.items()}, expected, tol=1e-12)


# ---------------------------------------------------------------------------------------
# composition with torch.func.vmap


def _columns(dense, params, V):
    """Truth H @ V[k] for flat curvfx-order rows V[k], returned flat in curvfx order."""
    return torch.stack([curvfx.ravel(dense.hvp(curvfx.unravel(v, params))) for v in V])


@pytest.mark.parametrize("strategy", ["auto", "rev-rev", "fwd-rev"])
def test_vmap_of_hvp_gives_hessian_columns(case, problem, dense, strategy):
    fn, params = functional(problem)
    f = loss_of_params(problem, fn)
    V = torch.randn(3, dense.num_params, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    if strategy == "fwd-rev" and case.mse:
        try:
            HV = torch.func.vmap(lambda v: curvfx.hvp(f, params, v, strategy=strategy))(V)
        except ValueError:
            return
    else:
        HV = torch.func.vmap(lambda v: curvfx.hvp(f, params, v, strategy=strategy))(V)
    assert HV.shape == V.shape
    assert_close_rel(HV, _columns(dense, params, V))


@pytest.mark.parametrize("strategy", ["auto", "func"])
def test_vmap_of_ggn_vp_gives_ggn_columns(problem, dense, strategy):
    fn, params = functional(problem)
    V = torch.randn(3, dense.num_params, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    GV = torch.func.vmap(
        lambda v: curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v, strategy=strategy)
    )(V)
    expected = torch.stack([curvfx.ravel(dense.ggn_vp(curvfx.unravel(v, params))) for v in V])
    assert GV.shape == V.shape
    assert_close_rel(GV, expected)


def test_vmap_of_hvp_over_pytree_columns(case, problem, dense):
    fn, params = functional(problem)
    f = loss_of_params(problem, fn)
    g = torch.Generator().manual_seed(9)
    V = tree_map(lambda t: torch.randn(2, *t.shape, generator=g, dtype=t.dtype), params)
    HV = torch.func.vmap(lambda v: curvfx.hvp(f, params, v))(V)
    for k in range(2):
        column = tree_map(lambda t, k=k: t[k], V)
        assert_close_rel(tree_map(lambda t, k=k: t[k], HV), dense.hvp(column))


# ---------------------------------------------------------------------------------------
# no side effects


_OPS = (
    [f"hvp-{s}" for s in HVP_STRATEGIES]
    + [f"ggn_vp-{s}" for s in GGN_STRATEGIES]
    + [
        "per_sample_grad",
        "per_sample_jacobian",
    ]
)


@pytest.mark.parametrize("op", _OPS)
@pytest.mark.parametrize(
    "case_name",
    ["batchnorm_train-ce_mean", "batchnorm_train-mse_mean", "frozen-mse_mean", "tied-ce_mean"],
)
def test_no_side_effects(case_name, op):
    case = next(c for c in CASES if c.name == case_name)
    if case.batchnorm_train and op.startswith("per_sample"):
        pytest.skip("samples are coupled under BatchNorm in train mode")
    problem = case.make()
    fn, params = functional(problem)
    v = random_like(params, torch.Generator().manual_seed(10))
    name, _, strategy = op.partition("-")
    with unchanged(problem, params):
        for _ in range(2):
            if name == "hvp":
                hvp_or_none(loss_of_params(problem, fn), params, v, strategy, mse=case.mse)
            elif name == "ggn_vp":
                curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v, strategy=strategy)
            elif name == "per_sample_grad":
                curvfx.per_sample_grad(fn, problem.loss_fn, params, problem.x, problem.y)
            else:
                curvfx.per_sample_jacobian(fn, params, problem.x)


def test_results_carry_no_autograd_graph(problem):
    fn, params = functional(problem)
    v = random_like(params, torch.Generator().manual_seed(11))
    outs = [
        curvfx.hvp(loss_of_params(problem, fn), params, v),
        curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v),
    ]
    for out in outs:
        for leaf in tree_leaves(out):
            assert leaf.grad_fn is None and not leaf.requires_grad


def test_dense_truths_are_not_trivially_equal():
    """Guard: the cases are rich enough that H, G and the per-sample grads differ."""
    dense = dense_truth(next(c for c in CASES if c.name == "mlp_tanh-ce_weight_mean"))
    assert rel_err(dense.ggn, dense.hessian) > 1e-3
    assert len(tree_leaves(dense.per_sample_grads)) == 4
