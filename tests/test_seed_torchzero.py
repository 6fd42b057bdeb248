"""torchzero's least-squares seed (GaussNewton, SumOfSquares) against dense truths and scipy, in float64."""

from __future__ import annotations

import inspect
import io
import math

import pytest
import torch
from torch import nn

import curvfx
from curvfx.optim import GaussNewton

DTYPE = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rosenbrock(X: torch.Tensor, scale: float) -> torch.Tensor:
    """Residuals (1 - x, scale·(y - x²)); scale 100 in torchzero's example, 10 gives Rosenbrock."""
    x1, x2 = X
    return torch.stack([(1 - x1), scale * (x2 - x1**2)])


def steps_to_minimum(scale: float, line_search, solver: str = "dense", max_steps: int = 50):
    """Steps from (-1.1, 2.5) until ‖X - (1, 1)‖_∞ ≤ 1e-8 (None if not reached), and the losses."""
    X = torch.tensor([-1.1, 2.5], dtype=DTYPE, requires_grad=True)
    opt = GaussNewton([X], line_search=line_search, solver=solver)
    losses = []
    for k in range(1, max_steps + 1):
        losses.append(float(opt.step(lambda backward=True: rosenbrock(X, scale))))
        if float((X.detach() - 1).abs().max()) <= 1e-8:
            return k, losses
    return None, losses


def dense_step(residual_fn, params, regs):
    """-(JᵀJ + D)⁻¹Jᵀr by an independent route: autograd.functional.jacobian of the flat map."""
    x0 = curvfx.ravel([p.detach() for p in params])

    def flat_residuals(x):
        return residual_fn(curvfx.unravel(x, [p.detach() for p in params]))

    J = torch.autograd.functional.jacobian(flat_residuals, x0)
    r = flat_residuals(x0)
    D = torch.cat([torch.full((p.numel(),), reg, dtype=DTYPE) for p, reg in zip(params, regs)])
    return -torch.linalg.solve(J.T @ J + torch.diag(D), J.T @ r), float(r @ r)


# ---------------------------------------------------------------------------------------
# the seed's documented examples


def test_seed_example_rosenbrock_with_backtracking():
    """torchzero's first example: GaussNewton + Backtracking on (1 - x, 100(y - x²)), 10 steps."""
    X = torch.tensor([-1.1, 2.5], dtype=DTYPE, requires_grad=True)
    opt = GaussNewton([X], line_search="backtracking")

    def closure(backward=True):
        return rosenbrock(X, 100.0)

    losses = [float(opt.step(closure)) for _ in range(10)]
    assert losses[0] == pytest.approx(2.1**2 + 129.0**2)  # rᵀr at the start, before the step
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert torch.allclose(X.detach(), torch.ones(2, dtype=DTYPE), atol=1e-12, rtol=0)


def test_seed_example_neural_network():
    """torchzero's second example (64 × 20 -> 10 MLP, residuals = per-output MSE), matrix-free.

    torchzero wraps GaussNewton in a TrustCG trust region; curvfx's matrix-free counterpart is
    ``solver="cg"`` with the backtracking line search. m = 10 residuals, P = 2058.
    """
    torch.manual_seed(0)
    X = torch.randn(64, 20, dtype=DTYPE)
    y = torch.randn(64, 10, dtype=DTYPE)
    model = nn.Sequential(nn.Linear(20, 64), nn.ELU(), nn.Linear(64, 10)).double()
    opt = GaussNewton(model.parameters(), solver="cg", line_search="backtracking")

    def closure(backward=True):
        y_hat = model(X)  # (64, 10)
        return (y_hat - y).pow(2).mean(0)  # (10,)

    losses = [float(opt.step(closure)) for _ in range(20)]
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.1 * losses[0]
    assert opt.state[next(model.parameters())]["cg_iters"] > 0


def test_neural_network_dense_and_cg_steps_agree():
    """m < P: the dense solve (m × m system) and CG (P-side, matrix-free) give the same step."""
    torch.manual_seed(1)
    X, y = torch.randn(64, 20, dtype=DTYPE), torch.randn(64, 10, dtype=DTYPE)
    models = [nn.Sequential(nn.Linear(20, 16), nn.ELU(), nn.Linear(16, 10)).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model, solver in zip(models, ("dense", "cg")):
        opt = GaussNewton(model.parameters(), reg=1e-3, solver=solver)
        opt.step(lambda backward=True, model=model: (model(X) - y).pow(2).mean(0))
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.allclose(p, q, atol=1e-8, rtol=0)


# ---------------------------------------------------------------------------------------
# convergence


@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("scale", [10.0, 100.0], ids=["rosenbrock", "seed-example"])
def test_rosenbrock_reaches_minimum_with_line_search(scale, solver):
    steps, losses = steps_to_minimum(scale, "backtracking", solver)
    assert steps is not None and steps <= 20
    assert all(b <= a for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("scale", [10.0, 100.0], ids=["rosenbrock", "seed-example"])
def test_rosenbrock_steps_without_line_search(scale):
    """Full Gauss-Newton steps are Newton steps on r = 0 for this square system: 3 steps."""
    steps, _ = steps_to_minimum(scale, None)
    assert steps == 3
    steps_ls, _ = steps_to_minimum(scale, "backtracking")
    assert steps_ls == 5


def test_curve_fit_matches_scipy_least_squares():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    t = torch.linspace(0, 4, 50, dtype=DTYPE)
    y = 2.5 * torch.exp(-1.3 * t) + 0.5 + 0.05 * torch.randn(50, dtype=DTYPE, generator=gen(0))

    def residuals(theta):
        a, b, c = theta
        return a * torch.exp(-b * t) + c - y

    theta = torch.tensor([1.0, 1.0, 0.0], dtype=DTYPE, requires_grad=True)
    opt = GaussNewton([theta], line_search="backtracking")
    for _ in range(30):
        opt.step(lambda backward=True: residuals(theta))

    def np_residuals(x):
        return residuals(torch.from_numpy(x)).numpy()

    ref = scipy_optimize.least_squares(np_residuals, [1.0, 1.0, 0.0], method="lm", xtol=1e-15, ftol=1e-15)
    assert torch.allclose(theta.detach(), torch.from_numpy(ref.x), atol=1e-6, rtol=0)
    assert float(residuals(theta.detach()).pow(2).sum()) == pytest.approx(2 * ref.cost, rel=1e-10)


@pytest.mark.parametrize("reg", [1e-8, 1e-3])
def test_mlp_regression_decreases_monotonically(reg):
    """Tiny MLP, residuals = predictions - targets. With the seed's reg = 1e-8 the Gauss-Newton
    steps are huge and the line search cuts them to t ~ 1e-2 ... 1e-5 (slow but monotone);
    reg = 1e-3 damps them and converges fast."""
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 40, dtype=DTYPE).unsqueeze(1)
    y = torch.sin(2 * x) + 0.05 * torch.randn(40, 1, dtype=DTYPE, generator=gen(1))
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()  # P = 25 < m = 40
    opt = GaussNewton(model.parameters(), reg=reg, line_search="backtracking")

    def closure(backward=True):
        return (model(x) - y).reshape(-1)  # predictions - targets [40]

    losses = [float(opt.step(closure)) for _ in range(30)]
    assert all(b < a for a, b in zip(losses, losses[1:]))  # every step accepted, strictly better
    assert losses[-1] < (0.8 if reg == 1e-8 else 0.005) * losses[0]


# ---------------------------------------------------------------------------------------
# one step against a dense truth; solvers and Jacobian modes agree


def two_group_problem(m: int):
    """Params of three shapes in two groups (one frozen), residuals tanh(W x + b)·s - y [m]."""
    g = gen(3)
    W = torch.randn(m, 4, dtype=DTYPE, generator=g, requires_grad=True)
    b = torch.randn(m, dtype=DTYPE, generator=g, requires_grad=True)
    s = torch.randn((), dtype=DTYPE, generator=g).exp().requires_grad_()
    frozen = torch.randn(4, dtype=DTYPE, generator=g)  # requires_grad=False: not optimized
    y = torch.randn(m, dtype=DTYPE, generator=g)

    def residual_fn(params):
        W_, b_, s_ = params
        return torch.tanh(W_ @ frozen + b_) * s_ - y

    return [W, b, s], frozen, residual_fn


@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("m", [3, 40], ids=["m<P", "m>P"])
def test_step_matches_dense_truth(m, solver):
    """Per-group reg (a diagonal D), several shapes, a frozen parameter left alone."""
    (W, b, s), frozen, residual_fn = two_group_problem(m)
    regs = [1e-3, 1e-3, 0.5]
    expected, f0 = dense_step(residual_fn, [W, b, s], regs)
    x0 = curvfx.ravel([W.detach(), b.detach(), s.detach()])
    frozen_before = frozen.clone()
    opt = GaussNewton(
        [{"params": [W, b, frozen]}, {"params": [s], "reg": 0.5}], reg=1e-3, solver=solver, cg_tol=1e-13
    )
    loss = opt.step(lambda backward=True: residual_fn([W, b, s]))
    assert float(loss) == pytest.approx(f0, rel=1e-14)
    assert torch.allclose(curvfx.ravel([W.detach(), b.detach(), s.detach()]) - x0, expected, atol=1e-9)
    assert torch.equal(frozen, frozen_before)


def test_cg_matches_dense_step_by_step():
    t = torch.linspace(0, 3, 20, dtype=DTYPE)
    y = 1.5 * torch.exp(-0.7 * t) * torch.cos(2.0 * t) + 0.02 * torch.randn(20, dtype=DTYPE, generator=gen(2))
    thetas = [torch.tensor([1.0, 0.5, 1.8], dtype=DTYPE, requires_grad=True) for _ in range(2)]
    opts = [GaussNewton([thetas[0]]), GaussNewton([thetas[1]], solver="cg", cg_tol=1e-14)]

    def closure_for(theta):
        def closure(backward=True):
            a, b, w = theta
            return a * torch.exp(-b * t) * torch.cos(w * t) - y

        return closure

    for _ in range(6):
        losses = [float(opt.step(closure_for(theta))) for opt, theta in zip(opts, thetas)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-12, abs=1e-14)
        assert torch.allclose(thetas[0], thetas[1], atol=1e-8, rtol=0)


def test_batched_jacobian_equals_loop():
    params_pair = [two_group_problem(7) for _ in range(2)]
    for (params, _, residual_fn), batched in zip(params_pair, (True, False)):
        opt = GaussNewton(params, batched=batched, line_search="backtracking")
        for _ in range(3):
            opt.step(lambda backward=True, params=params, fn=residual_fn: fn(params))
    for p, q in zip(params_pair[0][0], params_pair[1][0]):
        assert torch.allclose(p, q, atol=1e-13, rtol=0)


def test_reg_zero_gives_minimum_norm_step():
    """reg = 0 with m < P: the step is -J⁺r, the limit of the regularized steps."""
    A = torch.randn(2, 5, dtype=DTYPE, generator=gen(4))
    b = torch.randn(2, dtype=DTYPE, generator=gen(5))
    w = torch.zeros(5, dtype=DTYPE, requires_grad=True)
    GaussNewton([w], reg=0.0).step(lambda backward=True: A @ w - b)
    assert torch.allclose(w.detach(), torch.linalg.pinv(A) @ b, atol=1e-12)


def test_dense_solve_is_accurate_for_few_residuals():
    """m = 10 ≪ P = 2000, reg = 1e-8: the step equals the SVD formula -V diag(σ/(σ² + λ)) Uᵀr.

    (torchzero's lstsq on JᵀJ + λI [P, P] is off by ~4e-4 relative here, in float64.)
    """
    J = torch.randn(10, 2000, dtype=DTYPE, generator=gen(6))
    r = torch.randn(10, dtype=DTYPE, generator=gen(7))
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    expected = -(Vh.T @ (S / (S**2 + 1e-8) * (U.T @ r)))
    w = torch.zeros(2000, dtype=DTYPE, requires_grad=True)
    GaussNewton([w]).step(lambda backward=True: J @ w + r)
    assert float((w.detach() - expected).norm() / expected.norm()) < 1e-12


# ---------------------------------------------------------------------------------------
# optimizer protocol: state_dict, side effects, closure calls


def test_state_dict_round_trip_resumes_identically():
    t = torch.linspace(0, 4, 30, dtype=DTYPE)
    y = 2.0 * torch.exp(-0.8 * t) + 0.3

    def make(theta):
        return lambda backward=True: theta[0] * torch.exp(-theta[1] * t) + theta[2] - y

    theta = torch.tensor([1.0, 1.5, 0.0], dtype=DTYPE, requires_grad=True)
    opt = GaussNewton([theta], reg=1e-4, solver="cg", line_search="backtracking")
    for _ in range(2):
        opt.step(make(theta))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # plain Python numbers: pickles
    buffer.seek(0)

    resumed = theta.detach().clone().requires_grad_()
    opt2 = GaussNewton([resumed])  # other options: restored from the state dict
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.param_groups[0]["solver"] == "cg" and opt2.param_groups[0]["reg"] == 1e-4
    assert opt2.state[resumed]["step"] == 2
    for _ in range(2):
        assert float(opt.step(make(theta))) == float(opt2.step(make(resumed)))
        assert torch.equal(theta, resumed)
    assert opt.state[theta] == opt2.state[resumed]


def test_no_side_effects_on_grad_or_graph():
    w = torch.ones(3, dtype=DTYPE, requires_grad=True)
    calls = []

    def closure(backward=True):
        calls.append((backward, torch.is_grad_enabled()))
        return torch.stack([w[0] * w[1] - 2, w[2] ** 2 - 4, w.sum() - 1])

    opt = GaussNewton([w])
    loss = opt.step(closure)
    assert w.grad is None and not loss.requires_grad and loss.shape == ()
    assert w.requires_grad
    assert calls == [(False, True)]  # called once, with backward=False, under grad mode

    calls.clear()
    GaussNewton([w], line_search="backtracking").step(closure)
    assert calls[0] == (False, True)
    assert calls[1:] and all(call == (False, False) for call in calls[1:])  # trials: no graph


def test_line_search_rejects_all_trials_keeps_parameters():
    """A closure whose value blows up away from the start point: no step is taken (t = 0)."""
    w = torch.tensor([0.5], dtype=DTYPE, requires_grad=True)
    start = w.detach().clone()

    def closure(backward=True):
        if torch.is_grad_enabled():  # the linearization sees a smooth residual ...
            return w - 1
        return w - 1 + 1e6 * (w - start).abs().sign()  # ... every trial point is much worse

    opt = GaussNewton([w], line_search="backtracking")
    opt.step(closure)
    assert torch.equal(w.detach(), start)
    assert opt.state[w]["step_size"] == 0.0


# ---------------------------------------------------------------------------------------
# errors


def test_errors_name_the_problem():
    w = torch.ones(2, dtype=DTYPE, requires_grad=True)
    opt = GaussNewton([w])
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match=r"1-D.*scalar"):
        opt.step(lambda backward=True: (w**2).sum())
    with pytest.raises(ValueError, match=r"1-D.*reshape\(-1\)"):
        opt.step(lambda backward=True: w.outer(w))
    with pytest.raises(TypeError, match="tensor"):
        opt.step(lambda backward=True: [w[0], w[1]])
    with pytest.raises(TypeError, match="backward"):
        opt.step(lambda: w - 1)
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(lambda backward=True: w / 0)
    with pytest.raises(ValueError, match="no autograd graph"):
        opt.step(lambda backward=True: (w - 1).detach())
    with pytest.raises(ValueError, match="dtype"):
        opt.step(lambda backward=True: (w - 1).float())
    with pytest.raises(ValueError, match="solver"):
        GaussNewton([w], solver="lstsq")
    with pytest.raises(ValueError, match="line_search"):
        GaussNewton([w], line_search="wolfe")
    with pytest.raises(ValueError, match="reg"):
        GaussNewton([w], reg=-1e-3)
    with pytest.raises(ValueError, match="reg"):
        GaussNewton([w], reg=math.nan)
    with pytest.raises(ValueError, match="reg"):
        GaussNewton([{"params": [w], "reg": -1.0}])
    v = torch.ones(2, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match="solver: every param group"):
        GaussNewton([{"params": [w]}, {"params": [v], "solver": "cg"}])
    with pytest.raises(ValueError, match="one dtype"):
        GaussNewton([w, torch.ones(2, requires_grad=True)]).step(lambda backward=True: w - 1)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        GaussNewton([torch.ones(2)]).step(lambda backward=True: w - 1)


# ---------------------------------------------------------------------------------------
# SumOfSquares: a residual closure as a loss closure for torch.optim


def test_sum_of_squares_has_torchzeros_constructor():
    """torchzero documents ``SumOfSquares.__init__(self)``: no arguments."""
    assert "SumOfSquares" in curvfx.optim.__all__
    assert inspect.signature(curvfx.optim.SumOfSquares).parameters == {}
    curvfx.optim.SumOfSquares()


def regression_problem(seed: int = 0):
    """An MLP, its data and a closure returning its residuals r = model(X) - y [N, C] (2-D)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    X, y = torch.randn(10, 3, dtype=DTYPE), torch.randn(10, 2, dtype=DTYPE)

    def closure(backward=True):
        return model(X) - y

    return model, X, y, closure


def gradient_of_sum_of_squares(model, X, y):
    """∇(rᵀr) = 2 Jᵀr, J = ∂r/∂θ by autograd.functional.jacobian of the flat map θ -> r."""
    named = list(model.named_parameters())
    like = [p.detach() for _, p in named]

    def flat_residuals(x):
        split = dict(zip([n for n, _ in named], curvfx.unravel(x, like)))
        return (torch.func.functional_call(model, split, (X,)) - y).reshape(-1)

    x0 = curvfx.ravel(like)
    J = torch.autograd.functional.jacobian(flat_residuals, x0)
    r = flat_residuals(x0)
    return 2 * J.T @ r, float(r @ r)


def test_sum_of_squares_sets_grads_to_the_gradient_of_r_dot_r_replacing_stale_ones():
    model, X, y, closure = regression_problem()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 1e6)  # stale gradients from an earlier backward pass
    unused = torch.ones(2, dtype=DTYPE, requires_grad=True)
    unused.grad = torch.full_like(unused, 3.0)
    f = curvfx.optim.SumOfSquares()(closure)()
    expected, f_true = gradient_of_sum_of_squares(model, X, y)
    assert f.shape == () and not f.requires_grad
    assert float(f) == pytest.approx(f_true, rel=1e-14)
    assert torch.allclose(curvfx.ravel([p.grad for p in params]), expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(unused.grad, torch.full_like(unused, 3.0))  # f does not depend on it
    again = curvfx.optim.SumOfSquares()(closure)(backward=True)  # replaced, not accumulated
    assert float(again) == float(f)
    assert torch.allclose(curvfx.ravel([p.grad for p in params]), expected, rtol=1e-12, atol=1e-14)


def test_sum_of_squares_without_backward_returns_f_with_its_graph_and_writes_no_grad():
    model, X, y, closure = regression_problem()
    calls = []

    def recording(backward=True):
        calls.append((backward, torch.is_grad_enabled()))
        return closure(backward)

    with torch.no_grad():  # as an optimizer's step runs the closure (torch.optim enables grad)
        f = curvfx.optim.SumOfSquares()(recording)(False)
    assert calls == [(False, True)]  # closure(False), under grad mode
    assert all(p.grad is None for p in model.parameters())
    assert f.shape == () and f.requires_grad
    grads = torch.autograd.grad(f, list(model.parameters()))
    assert torch.allclose(curvfx.ravel(grads), gradient_of_sum_of_squares(model, X, y)[0], rtol=1e-12)


@pytest.mark.parametrize("optimizer", ["Adam", "LBFGS"])
def test_sum_of_squares_drives_torch_optimizers_on_rosenbrock(optimizer):
    """torchzero's use: an ordinary optimizer on the least-squares closure of GaussNewton.

    The run equals the one with the usual closure (zero_grad, f = rᵀr, f.backward()).
    """

    def run(make_closure):
        X = torch.tensor([-1.1, 2.5], dtype=DTYPE, requires_grad=True)
        if optimizer == "Adam":
            opt, steps = torch.optim.Adam([X], lr=0.05), 200
        else:
            opt, steps = torch.optim.LBFGS([X], line_search_fn="strong_wolfe"), 10
        closure = make_closure(X, opt)
        losses = [float(opt.step(closure)) for _ in range(steps)]
        return X.detach(), [*losses, float(rosenbrock(X.detach(), 10.0).pow(2).sum())]

    def usual(X, opt):
        def closure():
            opt.zero_grad()
            f = rosenbrock(X, 10.0).pow(2).sum()
            f.backward()
            return f.detach()

        return closure

    X, losses = run(lambda X, opt: curvfx.optim.SumOfSquares()(lambda backward=True: rosenbrock(X, 10.0)))
    X_usual, losses_usual = run(usual)
    assert torch.equal(X, X_usual) and losses == losses_usual
    assert losses[-1] < 0.05 * losses[0]
    if optimizer == "LBFGS":
        assert torch.allclose(X, torch.ones(2, dtype=DTYPE), atol=1e-6, rtol=0)  # LBFGS stops at ‖∇f‖ ≤ 1e-7


def test_sum_of_squares_errors_name_the_closure():
    w = torch.ones(2, dtype=DTYPE, requires_grad=True)
    sos = curvfx.optim.SumOfSquares()
    with pytest.raises(ValueError, match="closure"):
        sos(None)
    with pytest.raises(TypeError, match="closure: expected a callable"):
        sos(w)
    with pytest.raises(TypeError, match="backward"):
        sos(lambda: w - 1)
    with pytest.raises(TypeError, match="closure: must return the residuals as a tensor"):
        sos(lambda backward=True: [w[0], w[1]])()
    with pytest.raises(ValueError, match="closure: the residuals depend on no tensor that requires grad"):
        sos(lambda backward=True: (w - 1).detach())()
