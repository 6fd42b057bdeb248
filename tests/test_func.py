"""curvfx.func transforms and make_functional against the dense truths of ``dense.py``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from cases import CASES, CASES_BY_NAME, GENERIC_LOSS_CASES, TiedNet, TwoInputNet, call_model, frozen_mlp
from dense import (
    assert_close_rel,
    dense_truth,
    flatten,
    random_like,
    rel_err,
    tree_dot,
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


def test_make_functional_shared_module_and_tied_names():
    """A submodule registered twice (its parameters and buffers under two names each): a
    value given under either name feeds both uses, two different values are refused, and
    the module's own tensors are back in place afterwards."""
    torch.manual_seed(0)
    shared = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double().eval()
    model = nn.Sequential(shared, nn.Tanh(), shared)
    fn, params = curvfx.make_functional(model)
    assert list(params) == ["0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"]
    x = torch.randn(4, 3, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = torch.randn(3, 3, dtype=torch.float64)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0][0].weight.copy_(weight)
    for name in ("0.0.weight", "2.0.weight"):  # the first name or the second
        given = {**{k: v for k, v in params.items() if k != "0.0.weight"}, name: weight}
        assert_close_rel(fn(given, x), changed(x).detach(), tol=1e-14)
    with pytest.raises(ValueError, match="tied names"):
        fn({**params, "2.0.weight": weight}, x)
    with pytest.raises(ValueError, match=r"\['0\.2\.weight'\] are not parameters"):
        fn({**params, "0.2.weight": weight}, x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model[0][0].weight is model[2][0].weight and isinstance(model[0][0].weight, nn.Parameter)


class _ListAlias(nn.Module):
    """Reads ``a.weight`` a second time from a plain Python list, past functional_call's swap."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)
        self.alias = [self.a.weight]

    def forward(self, x):
        return self.b(torch.tanh(torch.tanh(self.a(x)) @ self.alias[0].T))


def test_a_parameter_read_past_the_swap_is_refused():
    """Derivatives would treat the list's use of a.weight as a constant (the HVP was 45 % off):
    the model function's first call with a graph says so; values computed from the
    parameters themselves (a graph back to them through the call's values) pass."""
    torch.manual_seed(0)
    model = _ListAlias().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    fn, params = curvfx.make_functional(model)
    v = {k: torch.ones_like(p) for k, p in params.items()}
    with pytest.raises(ValueError, match=r"reads the parameter 'a\.weight' other than as a module attribute"):
        curvfx.hvp(lambda p: F.cross_entropy(fn(p, x), y), params, v)
    with pytest.raises(ValueError, match=r"'a\.weight'"):
        curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y)) @ v
    with pytest.raises(ValueError, match=r"'a\.weight'"):  # vmapped routes: a first-sample check
        curvfx.per_sample_grad(model, nn.CrossEntropyLoss(), None, x, y)
    with pytest.raises(ValueError, match=r"'a\.weight'"):
        curvfx.per_sample_jacobian(model, None, x)
    own = dict(model.named_parameters())  # the module's own tensors: a list read looks like theirs
    with pytest.raises(ValueError, match=r"'a\.weight'"):
        curvfx.per_sample_grad(_ListAlias().double(), nn.CrossEntropyLoss(), None, x, y)
    fresh = _ListAlias().double()
    with pytest.raises(ValueError, match=r"'a\.weight'"):  # own parameters: the torch.func route
        curvfx.ggn_vp(fresh, nn.CrossEntropyLoss(), dict(fresh.named_parameters()), x, y, v)
    fn, _ = curvfx.make_functional(model)
    fn(own, x)  # cannot tell: the check stays pending
    assert not fn.aliases_checked
    fn({k: v for k, v in params.items() if k != "a.weight"}, x)  # a.weight held fixed: harmless
    plain = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    fn, _ = curvfx.make_functional(plain)
    scaled = {k: 2.0 * p for k, p in plain.named_parameters()}  # graphs back to the parameters
    assert_close_rel(fn(scaled, x), torch.func.functional_call(plain, scaled, (x,)), tol=1e-14)


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


# With live parameters (leaves requiring grad, gradients recorded) a product must be
# differentiable: "auto" takes the torch.func engine ("rev-rev", "func"), an eager engine
# named explicitly raises (its result would add nothing to a gradient), and under
# torch.no_grad every engine gives the value alone.
_EAGER = ("autograd", "forward-ad", "rev-fwd")


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
            f = loss_of_params(problem, fn)
            if strategy in _EAGER:
                with pytest.raises(ValueError, match="without an autograd graph"):
                    curvfx.hvp(f, params, v, strategy=strategy)
                with torch.no_grad():
                    Hv = hvp_or_none(f, params, v, strategy, mse=case.mse)
            else:
                Hv = hvp_or_none(f, params, v, strategy, mse=case.mse)
            if Hv is not None:
                assert_close_rel(Hv, dense.hvp(v))
                assert all(t.requires_grad for t in tree_leaves(Hv)) == (strategy not in _EAGER)
        if strategy in GGN_STRATEGIES:
            product = lambda: curvfx.ggn_vp(  # noqa: E731
                fn, problem.loss_fn, params, problem.x, problem.y, v, strategy=strategy
            )
            if strategy in _EAGER:
                with pytest.raises(ValueError, match="without an autograd graph"):
                    product()
                with torch.no_grad():
                    Gv = product()
            else:
                Gv = product()
            assert_close_rel(Gv, dense.ggn_vp(v))
            assert all(t.requires_grad for t in tree_leaves(Gv)) == (strategy not in _EAGER)


def _tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    fn, params = curvfx.make_functional(model)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    return fn, params, x, y, nn.CrossEntropyLoss()


def test_auto_products_are_differentiable_in_live_tensors():
    """d/dθ (vᵀ H(θ) v), d/dv (uᵀ G v) = G u and d/dx Σ_n ‖g_n‖ against torch.func truths."""
    fn, params, x, y, ce = _tiny_problem()
    theta0 = curvfx.ravel(params)
    v = torch.randn(theta0.shape[0], dtype=torch.float64)

    def f(t):
        return ce(fn(curvfx.unravel(t, params), x), y)

    truth = torch.func.grad(lambda t: v @ torch.func.hessian(f)(t) @ v)(theta0)
    theta = theta0.clone().requires_grad_()
    got = torch.autograd.grad((v * curvfx.hvp(f, theta, v)).sum(), theta)[0]
    assert_close_rel(got, truth, tol=1e-10)

    G = torch.func.jacrev(lambda w: curvfx.ggn_vp(fn, ce, params, x, y, w, strategy="func"))(v)
    u, w = torch.randn_like(v), v.clone().requires_grad_()
    got = torch.autograd.grad(u @ curvfx.ggn_vp(fn, ce, params, x, y, w), w)[0]
    assert_close_rel(got, G.T @ u, tol=1e-10)
    model = curvfx.ggn(fn, ce, (x, y), params=params)
    got = torch.autograd.grad(u @ (model @ w), w)[0]  # an operator is linear in v
    assert_close_rel(got, G.T @ u, tol=1e-10)

    def norms(t, xs):  # Σ_n ‖∇_θ ℓ(f(θ, x_n), y_n)‖ by a loop of torch.func.grad
        def sample_loss(s, n):
            return ce(fn(curvfx.unravel(s, params), xs[n : n + 1]), y[n : n + 1])

        return torch.stack([torch.func.grad(sample_loss)(t, n) for n in range(5)]).norm(dim=1).sum()

    xs = x.clone().requires_grad_()
    got = torch.autograd.grad(curvfx.per_sample_grad_norms(fn, ce, params, xs, y).sum(), xs)[0]
    assert_close_rel(got, torch.func.grad(norms, argnums=1)(theta0, x), tol=1e-10)
    got = torch.autograd.grad(
        curvfx.per_sample_grad_norms(fn, ce, curvfx.unravel(theta, params), x, y).sum(), theta
    )[0]
    assert_close_rel(got, torch.func.grad(norms)(theta0, x), tol=1e-10)


def test_inference_mode_is_refused():
    """Under torch.inference_mode autograd is off: a ValueError, never zeros."""
    fn, params, x, y, ce = _tiny_problem()
    v = torch.ones(curvfx.ravel(params).shape[0], dtype=torch.float64)
    products = [
        lambda: curvfx.hvp(lambda p: ce(fn(p, x), y), params, v),
        lambda: curvfx.ggn_vp(fn, ce, params, x, y, v),
        lambda: curvfx.model_jvp(fn, params, x, v),
        lambda: curvfx.hessian(fn, ce, (x, y), params=params) @ v,
        lambda: curvfx.diagonal(curvfx.empirical_fisher(fn, ce, (x, y), params=params)),
        lambda: curvfx.kfac(nn.Sequential(nn.Linear(3, 2)).double(), ce, (x, y)).to_dense(),
    ]
    for product in products:
        with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
            product()


def test_eager_strategies_inside_transforms_are_refused():
    fn, params, x, y, ce = _tiny_problem()
    V = torch.eye(curvfx.ravel(params).shape[0], dtype=torch.float64)[:, :2]
    with pytest.raises(ValueError, match=r"inside a torch\.func transform"):
        torch.func.vmap(lambda c: curvfx.hvp(lambda p: ce(fn(p, x), y), params, c, strategy="autograd"), 1)(V)
    with pytest.raises(ValueError, match=r"inside a torch\.func transform"):
        torch.func.vmap(lambda c: curvfx.ggn_vp(fn, ce, params, x, y, c, strategy="forward-ad"), 1)(V)


def test_complex_parameters_are_refused():
    params = {"w": torch.randn(3, dtype=torch.complex128)}
    with pytest.raises(ValueError, match="complex"):
        curvfx.hvp(lambda p: (p["w"].abs() ** 2).sum(), params, torch.ones(3, dtype=torch.complex128))


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


# ---------------------------------------------------------------------------------------
# fisher_vp(kind="mc"): the empirical formula at the drawn targets, and convergence to F


def _normalizer(loss_fn, y) -> float:
    """Z of the cases used below: 1 for the sum; the number of target entries (class-index
    positions for cross-entropy) for the mean (no class weights, no ignored positions)."""
    return 1.0 if loss_fn.reduction == "sum" else float(y.numel())


def _sample_gradient(dense, loss_fn, targets, n: int) -> torch.Tensor:
    """∇_θ L_n(targets) [P] (our flat order): autograd of the batch loss with only sample n's
    outputs depending on θ (the others detached), so the other samples' terms drop out."""
    theta = dense.flat.clone().requires_grad_(True)
    f = dense.outputs_of_flat(theta)
    live = torch.zeros(f.shape[0], dtype=torch.bool)
    live[n] = True
    f = torch.where(live.reshape(-1, *[1] * (f.dim() - 1)), f, f.detach())
    (g,) = torch.autograd.grad(loss_fn(f, targets), theta)
    return g


# the negative log-likelihood whose gradients the MC Fisher takes (docs/conventions.md):
# the loss itself, without label smoothing, with √w for BCE entry weights w
_LIKELIHOOD = {
    "mlp_tanh-ce_label_smoothing_mean": lambda loss: nn.CrossEntropyLoss(),
    "mlp_tanh-bce_weight_mean": lambda loss: nn.BCEWithLogitsLoss(weight=loss.weight.sqrt()),
}


@pytest.mark.parametrize(
    "name",
    [
        "mlp_tanh-mse_mean",
        "cnn-mse_sum",
        "mlp_relu-ce_sum",
        "sequence-ce_mean",
        "pytree_fn-bce_mean",
        "mlp_tanh-ce_label_smoothing_mean",
        "mlp_tanh-bce_weight_mean",
    ],
)
def test_fisher_vp_mc_is_the_empirical_formula_at_the_drawn_targets(name):
    """F_mc v = (Z/M) Σ_m Σ_n ∇L_n(ỹ_m) ∇L_n(ỹ_m)ᵀ v at the targets the seed draws.

    The targets are redrawn with the loss's ``sample_targets`` from a generator with the
    same seed (M draws in a row, as ``output_factor`` draws them on CPU); the gradients are a
    loop of per-sample autograd on our own flat parameter vector.
    """
    case = CASES_BY_NAME[name]
    problem = case.make()
    dense = dense_truth(case)
    fn, params = functional(problem)
    loss = curvfx.losses.get_loss(problem.loss_fn)
    M, seed = 3, 21
    g = torch.Generator().manual_seed(seed)
    draws = [loss.sample_targets(dense.outputs, g, observed=problem.y) for _ in range(M)]
    assert not any(torch.equal(t, problem.y) for t in draws)  # drawn, not the data's targets
    likelihood = _LIKELIHOOD.get(name, lambda loss: loss)(problem.loss_fn)
    Z = _normalizer(problem.loss_fn, problem.y)
    v = random_like(params, torch.Generator().manual_seed(22))
    vf = flatten(v)
    expected = torch.zeros_like(vf)
    for t in draws:
        for n in range(problem.num_samples):
            gn = _sample_gradient(dense, likelihood, t, n)
            expected += Z / M * gn * (gn @ vf)
    with unchanged(problem, params):
        same_seed = torch.Generator().manual_seed(seed)
        args = (fn, problem.loss_fn, params, problem.x, problem.y, v)
        Fv = curvfx.fisher_vp(*args, kind="mc", num_samples=M, generator=same_seed)
    assert_close_rel(Fv, unflatten(expected, dense.params), tol=1e-10)


def test_fisher_vp_mc_converges_to_the_exact_fisher_at_the_monte_carlo_rate():
    """‖F_M − F‖_F against its exact expectation √(V/M), for M = 10, 100, 2000.

    F is the dense GGN Jᵀ(∇²_f L)J (= the exact Fisher for cross-entropy). V = E‖F_1 − F‖²_F
    for one draw is computed exactly by enumerating each sample's classes:
    V = Σ_n Σ_c p_nc ‖Z g_n(c) g_n(c)ᵀ − F_n‖²_F (the samples' draws are independent),
    with F_n = Σ_c p_nc Z g_n(c) g_n(c)ᵀ, g_n(c) = ∇_θ L_n at label c. The ratio
    ‖F_M − F‖_F / √(V/M) is a root-mean-square-normalized error: about 1, and the bounds
    [0.3, 3] leave room for the seed's luck (it is a sum of 6·2 independent squared terms).
    """
    case = CASES_BY_NAME["mlp_relu-ce_mean"]
    problem = case.make()
    dense = dense_truth(case)
    fn, params = functional(problem)
    N, C = dense.outputs.shape
    Z, P = float(N), dense.num_params
    probs = dense.outputs.softmax(1)
    per_sample, terms = [], {}
    for n in range(N):
        Fn = torch.zeros(P, P, dtype=torch.float64)
        for c in range(C):
            labels = problem.y.clone()
            labels[n] = c
            gn = _sample_gradient(dense, problem.loss_fn, labels, n)
            terms[n, c] = Z * torch.outer(gn, gn)
            Fn += probs[n, c] * terms[n, c]
        per_sample.append(Fn)
    F = dense.ggn
    assert_close_rel(sum(per_sample), F, tol=1e-10)  # the two truths agree
    V = sum(probs[n, c] * (terms[n, c] - per_sample[n]).square().sum() for n in range(N) for c in range(C))
    # curvfx's flat order (params' insertion order) -> our flat order
    perm = curvfx.ravel(unflatten(torch.arange(P, dtype=torch.float64), dense.params)).long()
    eye = torch.eye(P, dtype=torch.float64)
    errors, ratios = [], []
    for M in (10, 100, 2000):
        args = (fn, problem.loss_fn, params, problem.x, problem.y, eye)
        FM = curvfx.fisher_vp(*args, kind="mc", num_samples=M, generator=torch.Generator().manual_seed(M))
        error = float((FM - F[perm][:, perm]).norm())
        errors.append(error)
        ratios.append(error / math.sqrt(float(V) / M))
    assert all(0.3 < r < 3.0 for r in ratios), ratios
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.05 * float(F.norm()), (errors[2], float(F.norm()))


# ---------------------------------------------------------------------------------------
# model_jvp, model_vjp


def test_model_vjp_and_jvp_match_the_dense_jacobian(case, problem, dense):
    """Jᵀu = J.T @ u and Jv = J @ v with J from jacrev (pytree and flat v), and ⟨u, Jv⟩ = ⟨Jᵀu, v⟩."""
    fn, params = functional(problem)
    g = torch.Generator().manual_seed(23)
    u = torch.randn(dense.outputs.shape, generator=g, dtype=torch.float64)
    v = random_like(params, g)
    J = dense.jacobian
    with unchanged(problem, params):
        JTu = curvfx.model_vjp(fn, params, problem.x, u)
        Jv = curvfx.model_jvp(fn, params, problem.x, v)
        Jv_flat = curvfx.model_jvp(fn, params, problem.x, curvfx.ravel(v))
    assert_close_rel(JTu, unflatten(J.T @ u.reshape(-1), dense.params), tol=1e-12)
    assert_close_rel(Jv, (J @ flatten(v)).reshape(dense.outputs.shape), tol=1e-12)
    assert_close_rel(Jv_flat, Jv, tol=1e-12)
    lhs, rhs = float((u * Jv).sum()), float(tree_dot(JTu, v))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-14)


def test_products_are_differentiable_in_targets_alone():
    """Only y requires grad (targets fitted, e.g. distillation): d/dy against torch.func truths."""
    fn, params, x, _, _ = _tiny_problem()
    mse = nn.MSELoss()
    theta0 = curvfx.ravel(params)
    y0 = torch.randn(5, 2, dtype=torch.float64)
    v = torch.randn(theta0.shape[0], dtype=torch.float64)

    def sample_grads(targets):  # ∇_θ ℓ(f(θ, x_n), y_n), a loop of torch.func.grad
        def sample_loss(t, n):
            return mse(fn(curvfx.unravel(t, params), x[n : n + 1]), targets[n : n + 1])

        return torch.stack([torch.func.grad(sample_loss)(theta0, n) for n in range(5)])

    def ef_v(targets):  # Z Σ_n ∇L_n ∇L_nᵀ v with Z = N·C, L_n = ℓ_n / N: (C/N) Σ_n g_n g_nᵀ v
        g = sample_grads(targets)
        return g.T @ (g @ v) * 2 / 5

    def norms(targets):
        return sample_grads(targets).norm(dim=1).sum()

    u = torch.randn_like(v)
    y = y0.clone().requires_grad_()
    got = torch.autograd.grad(u @ curvfx.fisher_vp(fn, mse, params, x, y, v, kind="empirical"), y)[0]
    assert_close_rel(got, torch.func.grad(lambda t: u @ ef_v(t))(y0), tol=1e-10)
    for backend in ("auto", "generic"):
        got = torch.autograd.grad(
            curvfx.per_sample_grad_norms(fn, mse, params, x, y, backend=backend).sum(), y
        )[0]
        assert_close_rel(got, torch.func.grad(norms)(y0), tol=1e-10)


def test_auto_falls_back_to_one_forward_pass_for_models_without_forward_mode():
    """An LSTM has no forward-mode rule: a differentiable GGN product takes torch.func's vjp route."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True).double()

    def fn(p, x):
        return torch.func.functional_call(lstm, p, (x,))[0][:, -1]

    params = {k: t.detach().clone().requires_grad_() for k, t in lstm.named_parameters()}
    x, y = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    got = curvfx.ggn_vp(fn, nn.MSELoss(), params, x, y, v)
    assert all(t.requires_grad for t in tree_leaves(got))
    with torch.no_grad():
        expected = curvfx.ggn_vp(fn, nn.MSELoss(), params, x, y, v, strategy="autograd")
    assert_close_rel(got, expected, tol=1e-10)
