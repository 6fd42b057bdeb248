"""LevenbergMarquardt: known optima (Rosenbrock, curve fits vs scipy), the shared Gauss-Newton solve,
the gain-ratio damping rule, state_dict, groups, memory and errors (float64)."""

from __future__ import annotations

import gc
import io
import math
import warnings

import pytest
import torch

import curvfx
from curvfx.optim import GaussNewton, LevenbergMarquardt

DTYPE = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rosenbrock(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Residuals (1 - x₀, scale·(x₁ - x₀²)); scale 10 is Rosenbrock's function."""
    return torch.stack([1 - x[0], scale * (x[1] - x[0] ** 2)])


@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("marquardt_scaling", [False, True], ids=["identity", "marquardt"])
@pytest.mark.parametrize("scale", [10.0, 100.0])
def test_rosenbrock_reaches_the_minimum(scale, marquardt_scaling, solver):
    """From the classic start (-1.2, 1): ‖x - (1, 1)‖_∞ ≤ 1e-10 within 60 steps, f never rises."""
    x = torch.tensor([-1.2, 1.0], dtype=DTYPE, requires_grad=True)
    opt = LevenbergMarquardt([x], marquardt_scaling=marquardt_scaling, solver=solver, cg_tol=1e-14)
    losses = []
    for _ in range(60):
        losses.append(float(opt.step(lambda backward=True: rosenbrock(x, scale))))
        if float((x.detach() - 1).abs().max()) <= 1e-10:
            break
    assert float((x.detach() - 1).abs().max()) <= 1e-10
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    for _ in range(5):  # at the minimum: no step, and λ does not run away
        opt.step(lambda backward=True: rosenbrock(x, scale))
    assert float((x.detach() - 1).abs().max()) <= 1e-10 and opt.state[x]["damping"] < 1.0


def exp_decay_data():
    t = torch.linspace(0, 4, 50, dtype=DTYPE)
    y = 2.5 * torch.exp(-1.3 * t) + 0.5 + 0.05 * torch.randn(50, dtype=DTYPE, generator=gen(0))
    return t, y


@pytest.mark.parametrize("start", [(1.0, 1.0, 0.0), (10.0, 8.0, -3.0)], ids=["near", "far"])
def test_curve_fit_matches_scipy_least_squares(start):
    """a·exp(-b t) + c: the optimum of scipy's MINPACK LM, also from a start where plain Gauss-Newton
    (no line search) diverges."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    t, y = exp_decay_data()

    def residuals(theta):
        a, b, c = theta
        return a * torch.exp(-b * t) + c - y

    theta = torch.tensor(start, dtype=DTYPE, requires_grad=True)
    opt = LevenbergMarquardt([theta], marquardt_scaling=True)
    for _ in range(100):  # well past convergence, at a minimum with f > 0
        opt.step(lambda backward=True: residuals(theta))
    state = opt.state[theta]  # stationary: no trial, λ kept (it ran away to 1e307 before)
    assert state["trials"] == 0 and not state["accepted"] and state["damping"] < 1e6
    ref = scipy_optimize.least_squares(
        lambda x: residuals(torch.from_numpy(x)).numpy(), start, method="lm", xtol=1e-15, ftol=1e-15
    )
    assert torch.allclose(theta.detach(), torch.from_numpy(ref.x), atol=1e-7, rtol=0)
    assert float(residuals(theta.detach()).pow(2).sum()) == pytest.approx(2 * ref.cost, rel=1e-10)
    if start[0] == 10.0:
        gn_theta = torch.tensor(start, dtype=DTYPE, requires_grad=True)
        gn = GaussNewton([gn_theta])
        for _ in range(5):
            gn.step(lambda backward=True: residuals(gn_theta))
        assert not float(residuals(gn_theta.detach()).pow(2).sum()) < 2 * float(2 * ref.cost)
    y += 0.1  # new data: the next step moves again
    before = theta.detach().clone()
    opt.step(lambda backward=True: residuals(theta))
    assert opt.state[theta]["accepted"] and not torch.equal(theta.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_decreases_count_beside_a_large_irreducible_residual(dtype):
    """f = 100 + ‖θ - t‖² + 0.01 (θ₁ - t₁)²: near t, the decrease is below f's rounding level
    in float32, but (r - r₁)ᵀ(r + r₁) shows it, so LM reaches t (it stopped 2.5e-3 away)."""
    theta = torch.tensor([1.01, -0.5], dtype=dtype, requires_grad=True)
    target = torch.tensor([1.0, 2.0], dtype=dtype)

    def closure(backward=True):
        return torch.cat([torch.tensor([10.0], dtype=dtype), theta - target, 0.1 * (theta[:1] - target[:1])])

    opt = LevenbergMarquardt([theta])
    for _ in range(30):
        opt.step(closure)
    assert float((theta.detach() - target).abs().max()) <= 4 * torch.finfo(dtype).eps


def test_accepted_step_is_the_gauss_newton_step_with_reg_lambda():
    """One implementation, two front ends: LM's first accepted trial = GaussNewton(reg=λ)'s step."""
    t, y = exp_decay_data()
    thetas = [torch.tensor([2.0, 1.0, 0.3], dtype=DTYPE, requires_grad=True) for _ in range(2)]

    def closure_for(theta):
        return lambda backward=True: theta[0] * torch.exp(-theta[1] * t) + theta[2] - y

    LevenbergMarquardt([thetas[0]], damping=0.1).step(closure_for(thetas[0]))
    GaussNewton([thetas[1]], reg=0.1).step(closure_for(thetas[1]))
    assert torch.equal(thetas[0], thetas[1])


def test_gain_ratio_rule():
    """Accepted: λ ← λ·max(1/3, 1 - (2ρ - 1)³), ν = 2, with ρ the actual / predicted decrease."""
    t, y = exp_decay_data()
    theta = torch.tensor([2.0, 1.0, 0.3], dtype=DTYPE, requires_grad=True)
    closure = lambda backward=True: theta[0] * torch.exp(-theta[1] * t) + theta[2] - y  # noqa: E731
    r0 = closure().detach()
    J = torch.autograd.functional.jacobian(
        lambda th: th[0] * torch.exp(-th[1] * t) + th[2] - y, theta.detach()
    )
    opt = LevenbergMarquardt([theta], damping=0.5)
    f0 = float(opt.step(closure))
    d = -torch.linalg.solve(J.T @ J + 0.5 * torch.eye(3, dtype=DTYPE), J.T @ r0)
    f1 = float(closure().detach().pow(2).sum())
    rho = (f0 - f1) / float(r0 @ r0 - (r0 + J @ d) @ (r0 + J @ d))
    state = opt.state[theta]
    assert state["accepted"] and state["trials"] == 1 and state["nu"] == 2.0
    assert state["rho"] == pytest.approx(rho, rel=1e-8)
    assert state["damping"] == pytest.approx(0.5 * max(1 / 3, 1 - (2 * rho - 1) ** 3), rel=1e-8)


def test_rejected_trials_raise_damping_and_keep_parameters():
    """r = atan(w) at w = 2: the Gauss-Newton step overshoots (f rises), so each trial fails until λ
    is large; with max_trials=1 the parameters stay put and λ, ν double."""
    w = torch.tensor([2.0], dtype=DTYPE, requires_grad=True)
    opt = LevenbergMarquardt([w], damping=1e-12, max_trials=1)
    opt.step(lambda backward=True: torch.atan(w))
    state = opt.state[w]
    assert float(w.detach()) == 2.0 and not state["accepted"] and state["rho"] < 0
    assert state["damping"] == pytest.approx(2e-12) and state["nu"] == 4.0
    opt = LevenbergMarquardt([w], damping=1e-12, max_trials=30)
    opt.step(lambda backward=True: torch.atan(w))
    assert opt.state[w]["accepted"] and opt.state[w]["trials"] > 1 and abs(float(w.detach())) < 2.0


def test_marquardt_scale_is_the_running_maximum_of_the_jacobian_column_norms():
    t, y = exp_decay_data()
    theta = torch.tensor([2.0, 1.0, 0.3], dtype=DTYPE, requires_grad=True)
    opt = LevenbergMarquardt([theta], marquardt_scaling=True)
    scales = []
    for _ in range(3):
        J = torch.autograd.functional.jacobian(
            lambda th: th[0] * torch.exp(-th[1] * t) + th[2] - y, theta.detach()
        )
        scales.append((J * J).sum(0))
        opt.step(lambda backward=True: theta[0] * torch.exp(-theta[1] * t) + theta[2] - y)
    expected = torch.stack(scales).max(0).values
    assert torch.allclose(opt.state[theta]["scale"], expected, rtol=1e-12)


def test_state_dict_round_trip_resumes_identically():
    t, y = exp_decay_data()

    def make(theta):
        return lambda backward=True: theta[0] * torch.exp(-theta[1] * t) + theta[2] - y

    theta = torch.tensor([10.0, 8.0, -3.0], dtype=DTYPE, requires_grad=True)
    opt = LevenbergMarquardt([theta], marquardt_scaling=True, solver="cg")
    for _ in range(4):
        opt.step(make(theta))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = theta.detach().clone().requires_grad_()
    opt2 = LevenbergMarquardt([resumed])  # the options come back from the state dict
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(4):
        assert float(opt.step(make(theta))) == float(opt2.step(make(resumed)))
        assert torch.equal(theta, resumed)


def test_groups_frozen_parameters_and_no_graph():
    """Two groups = one group; a frozen parameter stays put; no graph or .grad left; memory flat."""
    g = gen(1)
    A, b = torch.randn(20, 4, dtype=DTYPE, generator=g), torch.randn(20, dtype=DTYPE, generator=g)
    runs = []
    for grouped in (False, True):
        w = torch.zeros(3, dtype=DTYPE, requires_grad=True)
        s = torch.ones(1, dtype=DTYPE, requires_grad=True)
        frozen = torch.full((1,), 0.5, dtype=DTYPE, requires_grad=False)
        params = [{"params": [w, frozen]}, {"params": [s]}] if grouped else [w, frozen, s]
        opt = LevenbergMarquardt(params, marquardt_scaling=True)

        def closure(backward=True, w=w, s=s, frozen=frozen):
            return torch.tanh(A[:, :3] @ w) * s + A[:, 3] * frozen - b

        for _ in range(5):
            opt.step(closure)
        runs.append((w.detach().clone(), s.detach().clone()))
        assert float(frozen) == 0.5 and w.grad is None and s.grad is None
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])

    def census():
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    loss = opt.step(closure)
    before = census()
    for _ in range(200):
        loss = opt.step(closure)
    assert census() == before and loss.grad_fn is None


def test_errors_name_the_problem():
    w = torch.ones(2, dtype=DTYPE, requires_grad=True)
    opt = LevenbergMarquardt([w])
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match=r"1-D.*scalar"):
        opt.step(lambda backward=True: (w**2).sum())
    with pytest.raises(TypeError, match="tensor"):
        opt.step(lambda backward=True: (w[0], w[1]))
    with pytest.raises(TypeError, match="backward"):
        opt.step(lambda: w - 1)
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(lambda backward=True: w * math.inf)
    with pytest.raises(ValueError, match="depend"):
        opt.step(lambda backward=True: w.detach() - 1)
    for bad in (dict(damping=0.0), dict(solver="qr"), dict(max_trials=0), dict(cg_tol=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LevenbergMarquardt([w], **bad)
    with pytest.raises(TypeError, match="batched: expected a bool"):
        LevenbergMarquardt([w], batched=1)
    v = torch.ones(2, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match="every param group"):
        LevenbergMarquardt([{"params": [w]}, {"params": [v], "damping": 1.0}])
    with pytest.raises(ValueError, match="no parameter requires grad"):
        LevenbergMarquardt([torch.ones(2, dtype=DTYPE)]).step(lambda backward=True: w - 1)


def test_exported():
    assert curvfx.optim.LevenbergMarquardt is LevenbergMarquardt
